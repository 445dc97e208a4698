"""Runs that die, are stopped, or go wrong: nothing lost, exact resume, clear refusals."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import config
import train

REPO = Path(__file__).resolve().parent.parent
ARGS = ["--max_train_steps=120", "--checkpoint_step_interval=20", "--checkpoints_total_limit=2"]


def command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), str(REPO / "configs/demo.toml"), *ARGS, *args]


def run(cwd: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(command(*args), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def log_lines(path: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["bucket"])
            for r in map(json.loads, path.read_text().splitlines())]


def same_lora(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def start_and_wait(cwd: Path, out: str, until_step: int) -> subprocess.Popen:
    """Starts a run and returns once its log has reached `until_step`."""
    process = subprocess.Popen(command(f"--output_dir={out}"), cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    log = cwd / out / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= until_step:
            return process
        if process.poll() is not None:
            raise AssertionError(process.stderr.read()[-3000:])
        time.sleep(0.005)
    process.kill()
    raise AssertionError("the run did not get going")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run; the folder also holds the demo's tiny model, clips and cache."""
    cwd = tmp_path_factory.mktemp("resilience")
    run(cwd, "--output_dir=reference")
    return cwd


def test_sigkill_at_any_moment_then_resume_is_bit_identical(reference):
    process = start_and_wait(reference, "killed", until_step=50)  # past the checkpoints at 20 and 40
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = len((reference / "killed/log.jsonl").read_text().splitlines())
    assert 50 <= killed_at < 120
    run(reference, "--output_dir=killed", "--resume_from_checkpoint=latest")
    assert same_lora(reference / "reference/lora.safetensors", reference / "killed/lora.safetensors")
    assert log_lines(reference / "killed/log.jsonl") == log_lines(reference / "reference/log.jsonl")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_and_print_the_resume_command(reference, sig):
    out = f"stopped-{sig.name}"
    process = start_and_wait(reference, out, until_step=30)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert f"stopped by {sig.name}" in stdout
    step = len((reference / out / "log.jsonl").read_text().splitlines())
    assert step < 120 and (reference / out / f"checkpoints/step-{step}/lora.safetensors").exists()
    resume = stdout.split("resume with: ")[1].strip()
    assert resume.endswith("--resume_from_checkpoint=latest")
    argv = shlex.split(resume)
    assert argv[0] == "python"
    subprocess.run([sys.executable, *argv[1:]], cwd=reference, check=True, capture_output=True, timeout=600)
    assert same_lora(reference / "reference/lora.safetensors", reference / out / "lora.safetensors")


def test_a_failed_save_leaves_the_previous_checkpoint_usable(reference, tmp_path, monkeypatch):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(reference / "reference/checkpoints", out / "checkpoints")
    before = train.list_checkpoints(out)
    assert [p.name for p in before] == ["step-100", "step-120"]
    cfg = config.parse_config([str(REPO / "configs/demo.toml"), "--checkpoints_total_limit=2"])
    monkeypatch.chdir(reference)
    transformer = train.load_model(cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW(train.lora.lora_parameters(transformer))

    def die_halfway(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while writing the adapters

    monkeypatch.setattr(train.lora, "save_lora", die_halfway)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(out, 140, transformer, optimizer, cfg, {}, train.Dist())
    assert (out / "checkpoints/step-140.tmp").exists()  # the half-written one keeps its temporary name...
    assert train.list_checkpoints(out) == before  # ...nothing old was pruned, and latest is still step-120
    cfg.resume_from_checkpoint = "latest"
    assert train.find_resume_folder(cfg, out) == out / "checkpoints/step-120"
    monkeypatch.undo()
    monkeypatch.chdir(reference)
    train.save_checkpoint(out, 140, transformer, optimizer, cfg, {}, train.Dist())
    assert [p.name for p in train.list_checkpoints(out)] == ["step-120", "step-140"]
    assert not (out / "checkpoints/step-140.tmp").exists()


def test_resume_refuses_other_adapters_and_logs_harmless_changes(reference, tmp_path):
    import shutil
    out = tmp_path / "changed"
    shutil.copytree(reference / "reference/checkpoints/step-100", out / "checkpoints/step-100")
    refused = run(reference, f"--output_dir={out}", "--resume_from_checkpoint=latest", "--lora_rank=8", expect=1)
    assert "cannot resume from" in refused.stderr and "lora_rank = 16" in refused.stderr
    assert "Traceback" not in refused.stderr
    allowed = run(reference, f"--output_dir={out}", "--resume_from_checkpoint=latest", "--max_train_steps=110")
    assert "resuming with changed settings: max_train_steps: 120 -> 110" in allowed.stdout
    assert len((out / "log.jsonl").read_text().splitlines()) == 10


def test_checkpoints_load_no_code(reference, tmp_path):
    import shutil
    folder = tmp_path / "step-100"
    shutil.copytree(reference / "reference/checkpoints/step-100", folder)

    class Payload:  # a pickle that would run code on an unsafe load
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"optimizer": Payload()}, folder / "training_state.pt")
    assert train.checkpoint_problem(folder).endswith("training_state.pt is damaged (it differs from what "
                                                     "manifest.json recorded when it was saved)")
    with pytest.raises(SystemExit) as refused:  # even past a forged manifest: nothing is unpickled
        train.load_tensors(folder / "training_state.pt")
    assert "holds more than tensors" in str(refused.value) and "weights_only" not in str(refused.value)


def test_nan_steps_are_skipped_then_the_run_stops_with_a_hint(reference, tmp_path):
    out = tmp_path / "nan"
    result = run(reference, f"--output_dir={out}", "--learning_rate=1e30", "--max_nonfinite_steps=3",
                 "--checkpoint_step_interval=1", "--max_grad_norm=0", expect=1)
    assert "NaN or inf" in result.stderr and "Lower learning_rate" in result.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    skipped = [r for r in log if "skipped" in r]
    assert len(skipped) == 3 and [r["step"] for r in skipped] == [log[-3]["step"], log[-2]["step"], log[-1]["step"]]
    last_good = f"checkpoints/step-{log[-4]['step']}"
    assert last_good in result.stderr and (out / last_good / "lora.safetensors").exists()
    weights = load_file(out / last_good / "lora.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_unwritable_output_dir_is_refused_up_front(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(train.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    config_file = tmp_path / "c.toml"
    config_file.write_text(f'output_dir = "{locked / "run"}"\n[[datasets]]\ninstance_data_dir = "x"\n')
    with pytest.raises(SystemExit, match="cannot be written"):
        config.parse_config([str(config_file)])
