"""Runs that die, are stopped, or go wrong: nothing lost, exact resume, clear refusals."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import config
import outputs
import prepare
import ranks
import train
from conftest import DEMO_CONFIG, REPO, link_demo, read_log, run_in_process

# checkpoints at 10, 20, ... keep the newest 2; the validation at step 40 falls inside every resumed stretch below,
# so rendering it must leave the training RNG exactly where it was
ARGS = ["--max_train_steps=60", "--checkpoint_step_interval=10", "--checkpoints_total_limit=2",
        "--validation_step_interval=40"]
KILL_AT, STOP_AT = 25, 15  # the SIGKILL lands past the checkpoints at 10 and 20; SIGTERM / SIGINT mid-run


def log_lines(path: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["bucket"]) for r in read_log(path)]


def steps_logged(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def same_lora(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def when_logged(log: Path, step: int, action: Callable[[], None], running: Callable[[], bool]) -> threading.Thread:
    """A thread that calls action() once `log` has `step` lines, while running() holds: the signal lands at
    whatever moment of the next step that is, as a user's would."""
    def watch():
        while running():
            if steps_logged(log) >= step:
                return action()
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def stopped_here(cwd: Path, sig: signal.Signals) -> subprocess.CompletedProcess:
    """A run in this process that gets `sig` (from another thread, as from another process) at step STOP_AT."""
    out = f"stopped-{sig.name}"
    done = threading.Event()
    late = signal.signal(sig, lambda *args: None)  # train.py's handler holds for the run; a signal after it, nothing
    try:
        watcher = when_logged(cwd / out / "log.jsonl", STOP_AT, lambda: os.kill(os.getpid(), sig),
                              lambda: not done.is_set())
        result = run_in_process(cwd, "train.py", DEMO_CONFIG, *ARGS, f"--output_dir={out}")
        done.set()
        watcher.join()
    finally:
        signal.signal(sig, late)
    return result


@pytest.fixture(scope="module")
def runs(demo_run, tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """In a folder linked to the shared demo: `reference`, an uninterrupted run; `killed`, a run in a process of its
    own that a SIGKILL ends at step KILL_AT or a little later (started first, so its seconds of start-up overlap the
    others); `stopped-SIGTERM` and `stopped-SIGINT`, runs in this process that those signals stop."""
    cwd = link_demo(demo_run[0], tmp_path_factory.mktemp("resilience"))
    with open(cwd / "killed.stdout", "w") as stdout, open(cwd / "killed.stderr", "w") as stderr:
        killed = subprocess.Popen([sys.executable, str(REPO / "train.py"), DEMO_CONFIG, *ARGS, "--output_dir=killed"],
                                  cwd=cwd, stdout=stdout, stderr=stderr)
    try:
        watcher = when_logged(cwd / "killed/log.jsonl", KILL_AT, killed.kill, lambda: killed.poll() is None)
        run_in_process(cwd, "train.py", DEMO_CONFIG, *ARGS, "--output_dir=reference")
        stopped = {f"stopped-{sig.name}": stopped_here(cwd, sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        killed.wait(timeout=300)
        watcher.join()
    finally:
        killed.kill()  # (nothing, once it has ended)
    assert killed.returncode == -signal.SIGKILL, (cwd / "killed.stderr").read_text()[-3000:]
    return cwd, stopped


@pytest.fixture(scope="module")
def reference(runs) -> Path:
    return runs[0]


def test_sigkill_at_any_moment_then_resume_is_bit_identical(reference):
    killed_at = steps_logged(reference / "killed/log.jsonl")
    assert KILL_AT <= killed_at < 60
    run_in_process(reference, "train.py", DEMO_CONFIG, *ARGS, "--output_dir=killed", "--resume_from_checkpoint=latest")
    assert same_lora(reference / "reference/lora.safetensors", reference / "killed/lora.safetensors")
    assert log_lines(reference / "killed/log.jsonl") == log_lines(reference / "reference/log.jsonl")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_and_print_the_resume_command(runs, sig):
    reference, stopped = runs
    out = f"stopped-{sig.name}"
    stdout = stopped[out].stdout
    assert f"stopped by {sig.name}" in stdout
    step = steps_logged(reference / out / "log.jsonl")
    assert step < 60 and (reference / out / f"checkpoints/step-{step}/lora.safetensors").exists()
    resume = stdout.split("resume with: ")[1].strip()
    assert resume.endswith("--resume_from_checkpoint=latest")
    argv = shlex.split(resume)
    assert argv[0] == "python"
    run_in_process(reference, argv[1], *argv[2:])  # the command as printed (argv[1] is train.py's full path)
    assert same_lora(reference / "reference/lora.safetensors", reference / out / "lora.safetensors")


def test_a_failed_save_leaves_the_previous_checkpoint_usable(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(reference / "reference/checkpoints", out / "checkpoints")
    before = outputs.list_checkpoints(out)
    assert [p.name for p in before] == ["step-50", "step-60"]
    cfg = config.parse_config([DEMO_CONFIG, "--checkpoints_total_limit=2"])
    monkeypatch.chdir(reference)
    transformer = prepare.load_model(cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW(train.lora.lora_parameters(transformer))

    def die_halfway(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while writing the adapters

    monkeypatch.setattr(train.lora, "save_lora", die_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(out, 70, transformer, optimizer, cfg, {}, ranks.Dist())
    assert (out / "checkpoints/step-70.tmp").exists()  # the half-written one keeps its temporary name...
    assert outputs.list_checkpoints(out) == before  # ...nothing old was pruned, and latest is still step-60
    cfg.resume_from_checkpoint = "latest"
    assert checkpoint.find_resume_folder(cfg, out) == out / "checkpoints/step-60"
    monkeypatch.undo()
    monkeypatch.chdir(reference)
    checkpoint.save_checkpoint(out, 70, transformer, optimizer, cfg, {}, ranks.Dist())
    assert [p.name for p in outputs.list_checkpoints(out)] == ["step-60", "step-70"]
    assert not (out / "checkpoints/step-70.tmp").exists()


def test_resume_refuses_other_adapters_and_logs_harmless_changes(reference, tmp_path):
    out = tmp_path / "changed"
    shutil.copytree(reference / "reference/checkpoints/step-50", out / "checkpoints/step-50")
    refused = run_in_process(reference, "train.py", DEMO_CONFIG, *ARGS, f"--output_dir={out}",
                             "--resume_from_checkpoint=latest", "--lora_rank=8", expect=1)
    assert "cannot resume from" in refused.stderr and "lora_rank 16 -> 8" in refused.stderr
    assert "Traceback" not in refused.stderr
    allowed = run_in_process(reference, "train.py", DEMO_CONFIG, *ARGS, f"--output_dir={out}",
                             "--resume_from_checkpoint=latest", "--max_train_steps=55")
    assert "resuming with changed settings: max_train_steps: 60 -> 55" in allowed.stdout
    assert steps_logged(out / "log.jsonl") == 5


def test_checkpoints_load_no_code(reference, tmp_path):
    folder = tmp_path / "step-50"
    shutil.copytree(reference / "reference/checkpoints/step-50", folder)

    class Payload:  # a pickle that would run code on an unsafe load
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"optimizer": Payload()}, folder / "training_state.pt")
    assert checkpoint.checkpoint_problem(folder).endswith("training_state.pt is damaged (it differs from what "
                                                     "manifest.json recorded when it was saved)")
    with pytest.raises(SystemExit) as refused:  # even past a forged manifest: nothing is unpickled
        checkpoint.load_tensors(folder / "training_state.pt")
    assert "holds more than tensors" in str(refused.value) and "weights_only" not in str(refused.value)


def test_nan_steps_are_skipped_then_the_run_stops_with_a_hint(reference, tmp_path):
    out = tmp_path / "nan"
    result = run_in_process(reference, "train.py", DEMO_CONFIG, *ARGS, f"--output_dir={out}", "--learning_rate=1e30",
                            "--max_nonfinite_steps=3", "--checkpoint_step_interval=1", "--max_grad_norm=0", expect=1)
    assert "NaN or inf" in result.stderr and "Lower learning_rate" in result.stderr
    log = read_log(out / "log.jsonl")
    skipped = [r for r in log if "skipped" in r]
    assert len(skipped) == 3 and [r["step"] for r in skipped] == [log[-3]["step"], log[-2]["step"], log[-1]["step"]]
    last_good = f"checkpoints/step-{log[-4]['step']}"
    assert last_good in result.stderr and (out / last_good / "lora.safetensors").exists()
    weights = load_file(out / last_good / "lora.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_crepa_head_of_another_width_starts_fresh_with_fresh_optimizer_state(tmp_path):
    """crepa_model changed to one of another width between resumes: the LoRA continues, the head cannot."""
    from types import SimpleNamespace
    import lora
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(4, 4))
    lora.inject(model, ["proj"], rank=2)
    old_head, head = torch.nn.Linear(6, 4), torch.nn.Linear(8, 4)
    old_optimizer = torch.optim.AdamW([*lora.lora_parameters(model), *old_head.parameters()])
    folder = tmp_path / "step-3"
    folder.mkdir()
    torch.save({"adapters": lora.adapter_state(model), "optimizer": old_optimizer.state_dict(),
                "crepa_head": old_head.state_dict()}, folder / "training_state.pt")
    torch.save(checkpoint.rng_state(), folder / "rng-0.pt")
    meta = {"step": 3, "world_size": 1, "config": {"crepa_enabled": True, "optimizer": "adamw", "crepa_model": "small"}}
    optimizer = torch.optim.AdamW([*lora.lora_parameters(model), *head.parameters()])
    fresh = {k: v.clone() for k, v in head.state_dict().items()}
    said = []
    cfg = config.Config(crepa_enabled=True, crepa_model="wide")
    step = checkpoint.load_checkpoint(folder, meta, model, optimizer, cfg, ranks.Dist(), said.append,
                                 alignment=SimpleNamespace(head=head))
    assert step == 3 and any("a fresh head starts training" in line for line in said)
    assert all(torch.equal(head.state_dict()[k], fresh[k]) for k in fresh) and not optimizer.state
