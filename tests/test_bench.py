"""bench.py runs as README says (tiny sizes here: the numbers themselves are not asserted)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_data_prints_its_table():
    result = subprocess.run([sys.executable, str(REPO / "bench.py"), "--data", "--clips", "2", "--frames", "17",
                             "--size", "128x96", "--resolution", "64", "--repeats", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| **ours / naive** |" in result.stdout and "rerun over the full cache" in result.stdout


def test_bench_without_a_section_is_an_error():
    result = subprocess.run([sys.executable, str(REPO / "bench.py")], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "--data" in result.stderr
