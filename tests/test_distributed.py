"""torchrun on CPU (gloo): 2 processes x batch 1 train the same LoRA as 1 process x batch 2."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
STEPS = ["--max_train_steps=6", "--checkpoint_step_interval=3", "--lr_scheduler=constant", "--lr_warmup_steps=0"]


def run(cwd: Path, launcher: list[str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*launcher, str(REPO / "train.py"), str(REPO / "configs/demo.toml"), *STEPS, *args],
                            cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    single = run(tmp_path, [sys.executable], "--train_batch_size=2", "--output_dir=single")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = run(tmp_path, torchrun, "--train_batch_size=1", "--output_dir=double")
    assert "on 2 x cpu" in double.stdout and "on 1 x cpu" in single.stdout
    assert double.stdout.count("done: LoRA written") == 1  # rank 0 alone speaks and writes

    a, b = load_file(tmp_path / "single/lora.safetensors"), load_file(tmp_path / "double/lora.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # trained, not zeros on both sides
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
              for name in ("single", "double")]
    assert len(losses[0]) == 6 and all(abs(x - y) < 1e-5 for x, y in zip(*losses))  # the loss averaged over ranks
    checkpoint = tmp_path / "double/checkpoints/step-3"
    assert {p.name for p in checkpoint.iterdir()} >= {"rng-0.pt", "rng-1.pt", "lora.safetensors", "meta.json"}
    assert json.loads((checkpoint / "meta.json").read_text())["world_size"] == 2
    assert not list((tmp_path / "double/checkpoints").glob("*.tmp"))


def test_two_processes_resume_exactly(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    first = run(tmp_path, torchrun, "--train_batch_size=1", "--output_dir=full")
    assert "caching latents" in first.stderr and "16 samples" in first.stdout  # each rank cached its share
    resumed = tmp_path / "resumed/checkpoints"
    resumed.mkdir(parents=True)
    import shutil
    shutil.copytree(tmp_path / "full/checkpoints/step-3", resumed / "step-3")
    result = run(tmp_path, torchrun, "--train_batch_size=1", "--output_dir=resumed", "--resume_from_checkpoint=latest")
    assert "16 samples" in result.stdout  # both ranks' shares of the cache (made by the first run) are there
    assert "resumed from" in result.stdout
    a, b = load_file(tmp_path / "full/lora.safetensors"), load_file(tmp_path / "resumed/lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
