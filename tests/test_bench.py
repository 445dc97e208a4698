"""bench.py runs as README says (tiny sizes here: the numbers themselves are not asserted)."""

from conftest import REPO, run_in_process


def test_bench_data_prints_its_table():
    result = run_in_process(REPO, "bench.py", "--data", "--clips", "2", "--frames", "17", "--size", "128x96",
                            "--resolution", "64", "--repeats", "1")
    assert "| **ours / naive** |" in result.stdout and "rerun over the full cache" in result.stdout


def test_bench_without_a_section_is_an_error():
    result = run_in_process(REPO, "bench.py", expect=None)
    assert result.returncode != 0 and "--data" in result.stderr
