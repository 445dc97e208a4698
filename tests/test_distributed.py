"""torchrun on CPU (gloo): 2 processes x batch 1 train the same LoRA as 1 process x batch 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO_CONFIG, read_log, run_in_process, run_script

STEPS = ["--max_train_steps=6", "--checkpoint_step_interval=3", "--lr_scheduler=constant", "--lr_warmup_steps=0"]
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


@pytest.fixture(scope="module")
def double(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """torchrun, 2 processes x batch 1, in a fresh folder: rank 0 makes the demo's model and clips, each rank caches
    its share. The run is in `double`; the folder is where the tests below run too."""
    cwd = tmp_path_factory.mktemp("distributed")
    return cwd, run_script(cwd, "train.py", DEMO_CONFIG, *STEPS, "--train_batch_size=1", "--output_dir=double",
                           launcher=TORCHRUN)


def test_two_processes_match_one_process_with_the_global_batch(double):
    cwd, double = double
    single = run_in_process(cwd, "train.py", DEMO_CONFIG, *STEPS, "--train_batch_size=2", "--output_dir=single")
    assert "on 2 x cpu" in double.stdout and "on 1 x cpu" in single.stdout
    assert double.stdout.count("done: LoRA written") == 1  # rank 0 alone speaks and writes

    a, b = load_file(cwd / "single/lora.safetensors"), load_file(cwd / "double/lora.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # trained, not zeros on both sides
    losses = [[r["loss"] for r in read_log(cwd / name / "log.jsonl")] for name in ("single", "double")]
    assert len(losses[0]) == 6 and all(abs(x - y) < 1e-5 for x, y in zip(*losses))  # the loss averaged over ranks
    checkpoint = cwd / "double/checkpoints/step-3"
    assert {p.name for p in checkpoint.iterdir()} >= {"rng-0.pt", "rng-1.pt", "lora.safetensors", "meta.json"}
    assert json.loads((checkpoint / "meta.json").read_text())["world_size"] == 2
    assert not list((cwd / "double/checkpoints").glob("*.tmp"))


def test_two_processes_resume_exactly(double):
    cwd, first = double
    assert "caching latents" in first.stderr and "16 samples" in first.stdout  # each rank cached its share
    resumed = cwd / "resumed/checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(cwd / "double/checkpoints/step-3", resumed / "step-3")
    result = run_script(cwd, "train.py", DEMO_CONFIG, *STEPS, "--train_batch_size=1", "--output_dir=resumed",
                        "--resume_from_checkpoint=latest", launcher=TORCHRUN)
    assert "16 samples" in result.stdout  # both ranks' shares of the cache (made by the first run) are there
    assert "resumed from" in result.stdout
    a, b = load_file(cwd / "double/lora.safetensors"), load_file(cwd / "resumed/lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_match_one_with_the_quality_tools_on(double):
    """The eval loss (ranks split the clips and sum), the CREPA term (features cached per rank's share, averaged
    like the loss) and the EMA are the same numbers on 2 processes x batch 1 as on 1 x batch 2."""
    cwd, _ = double
    tools = ["--use_ema=true", "--ema_decay=0.5", "--eval_fraction=0.25", "--eval_step_interval=3",
             "--crepa_enabled=true", "--crepa_model=output/demo/tiny-ltx/dinov2", "--crepa_block_index=1",
             "--crepa_encoder_image_size=56", "--disable_validation=true"]
    run_script(cwd, "train.py", DEMO_CONFIG, *STEPS, *tools, "--train_batch_size=1", "--output_dir=double-tools",
               launcher=TORCHRUN)
    run_in_process(cwd, "train.py", DEMO_CONFIG, *STEPS, *tools, "--train_batch_size=2", "--output_dir=single-tools")
    logs = [read_log(cwd / name / "log.jsonl") for name in ("single-tools", "double-tools")]
    for key in ("loss", "crepa_loss", "eval_loss"):
        values = [[r[key] for r in log if key in r] for log in logs]
        assert len(values[0]) == len(values[1]) > 1 and all(abs(x - y) < 1e-5 for x, y in zip(*values)), key
    a, b = (load_file(cwd / name / "lora_ema.safetensors") for name in ("single-tools", "double-tools"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
