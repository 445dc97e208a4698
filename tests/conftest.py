"""Shared fixtures: tiny random models built offline, never downloaded; running the repo's scripts."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that tries to download fails instead of hanging

import contextlib
import io
import json
import runpy
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = str(REPO / "configs/demo.toml")


def checked(result: subprocess.CompletedProcess, expect: int | None) -> subprocess.CompletedProcess:
    """The result, once its exit status is `expect` (None: any); else a failure that shows what the run said."""
    if expect is not None:
        assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_script(cwd: Path, script: str, *args: str, expect: int | None = 0,
               launcher: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess:
    """`python <script> <args>` in a process of its own, in `cwd`, as a user types it (`launcher` may be torchrun)."""
    return checked(subprocess.run([*launcher, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True,
                                  timeout=600), expect)


def run_in_process(cwd: Path, script: str, *args: str, expect: int | None = 0) -> subprocess.CompletedProcess:
    """The same as run_script, but run here as __main__ (runpy): the script's own code, exit status and output,
    without a new interpreter importing torch and diffusers again (seconds a run). Signals, SIGKILL, torchrun and
    a fresh interpreter's imports need run_script."""
    argv = [str(REPO / script), *args]
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # train.py sets its own
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        os.chdir(cwd)
        sys.argv = argv
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = exit_status(argv[0])
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return checked(subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue()), expect)


def exit_status(path: str) -> int:
    """Runs a script as `python <path>` does; what the interpreter prints on the way out (a SystemExit's message,
    an uncaught exception's traceback) goes to stderr, and the status is the one it would exit with."""
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def read_log(path: Path) -> list[dict]:
    """A run's log.jsonl, one dict a step."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Random offsets on every parameter, so ones / zeros initialisations cannot hide a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module


def tiny_diffusers_transformer(heads: int = 2, head_dim: int = 8, layers: int = 2, channels: int = 8, caption: int = 12):
    from diffusers import LTXVideoTransformer3DModel
    torch.manual_seed(0)
    ref = LTXVideoTransformer3DModel(in_channels=channels, out_channels=channels, num_attention_heads=heads,
                                     attention_head_dim=head_dim, cross_attention_dim=heads * head_dim,
                                     num_layers=layers, caption_channels=caption)
    return perturb(ref).eval()


DATA = '\n[[datasets]]\ninstance_data_dir = "clips"\n'  # the least data a config needs


def write_config(tmp_path, text: str, data: bool = True) -> str:
    """A config file; with `data`, a dataset table is appended (TOML tables must come after plain keys)."""
    path = tmp_path / "x.toml"
    path.write_text(text + (DATA if data else ""))
    return str(path)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """The tiny random LTX pipeline in diffusers layout, as the demo writes it."""
    import demo
    return demo.make_tiny_pipeline(tmp_path_factory.mktemp("tiny-ltx") / "model", seed=0)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`python train.py configs/demo.toml` exactly as README says, in a fresh folder and a process of its own (the
    smoke test of the README command): the 300-step run, with the tiny model, the clips and their cache in
    output/demo. Shared by every test that needs a demo: they read it and
    write elsewhere (their runs take an --output_dir; cache files of other settings may join clips/.ltx-cache)."""
    cwd = tmp_path_factory.mktemp("demo")
    return cwd, run_script(cwd, "train.py", DEMO_CONFIG)


def link_demo(demo_cwd: Path, folder: Path) -> Path:
    """`folder` as the demo leaves its own, less the run: output/demo/tiny-ltx and output/demo/clips are links to
    the shared demo's, so configs/demo.toml trains there at once, making and caching nothing (the cache is keyed by
    resolved paths). A quarantine, too, lands beside the clips the link resolves to."""
    (folder / "output/demo").mkdir(parents=True)
    for name in ("tiny-ltx", "clips"):
        (folder / "output/demo" / name).symlink_to(demo_cwd / "output/demo" / name)
    return folder


@pytest.fixture
def demo_folder(demo_run, tmp_path) -> Path:
    """This test's tmp_path, linked to the shared demo (see link_demo)."""
    return link_demo(demo_run[0], tmp_path)
