"""The flow-matching pieces, and the README command run as a user runs it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from train import Config

REPO = Path(__file__).resolve().parent.parent


def test_sigmas_are_logit_normal_and_shift_moves_them_up():
    gen = torch.Generator().manual_seed(0)
    plain = train.sample_sigmas(20000, 1.0, gen, "cpu")
    assert 0 < plain.min() and plain.max() < 1
    assert abs(plain.median().item() - 0.5) < 0.02  # logit-normal with mean 0
    logits = torch.logit(plain)
    assert abs(logits.std().item() - 1.0) < 0.03
    shifted = train.sample_sigmas(20000, 3.0, torch.Generator().manual_seed(0), "cpu")
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))  # same draws, shifted
    assert shifted.mean() > plain.mean() + 0.1


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedules(schedule):
    cfg = Config(learning_rate=1.0, lr_scheduler=schedule, lr_warmup_steps=10)
    lrs = [train.lr_at(s, cfg, 110) for s in range(110)]
    assert lrs[0] == 0.0 and lrs[5] == 0.5 and lrs[10] == 1.0  # linear warm-up, then the peak
    if schedule == "constant":
        assert lrs[-1] == 1.0
    else:
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.02
    if schedule == "cosine":
        assert abs(lrs[60] - 0.5) < 1e-9  # half way through the decay


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "train.py"), str(REPO / "configs/demo.toml"), *args],
                            cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`python train.py configs/demo.toml` exactly as README says, in a fresh folder."""
    cwd = tmp_path_factory.mktemp("demo")
    result = run_train(cwd)
    return cwd, result


def test_demo_writes_its_outputs_and_the_loss_falls(demo_run):
    cwd, result = demo_run
    out = cwd / "output/demo"
    assert str(out.resolve()) in result.stdout  # it says where its outputs are
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 301))
    assert {"step", "loss", "lr", "grad_norm", "seconds"} <= log[0].keys()
    first, last = (sum(r["loss"] for r in rs) / 20 for rs in (log[:20], log[-20:]))
    assert last < 0.7 * first, (first, last)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-200", "step-300"]  # limit 2
    for ckpt in (out / "checkpoints").iterdir():
        assert {p.name for p in ckpt.iterdir()} == {"lora.safetensors", "training_state.pt", "meta.json"}
    meta = json.loads((out / "checkpoints/step-200/meta.json").read_text())
    assert meta["step"] == 200 and meta["config"]["lora_rank"] == 16
    resolved = train.parse_config([str(out / "config.toml")])
    assert Path(resolved.pretrained_model_name_or_path).is_absolute()
    assert (Path(resolved.pretrained_model_name_or_path) / "model_index.json").exists()


def test_demo_lora_loads_into_the_diffusers_pipeline(demo_run):
    from diffusers import LTXPipeline
    import lora
    import model as ltx
    cwd, _ = demo_run
    model_dir = cwd / "output/demo/tiny-ltx"
    lora_file = cwd / "output/demo/lora.safetensors"
    pipe = LTXPipeline.from_pretrained(str(model_dir))
    pipe.load_lora_weights(str(lora_file))
    ours = ltx.load_transformer(str(model_dir))
    lora.inject(ours, rank=16)
    lora.load_lora(ours, lora_file)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 12, ours.config.in_channels, generator=gen)
    text = torch.randn(1, 6, ours.config.caption_channels, generator=gen)
    mask = torch.ones(1, 6, dtype=torch.bool)
    scale = (8 / 25, 32, 32)
    with torch.no_grad():
        theirs = pipe.transformer(x, text, torch.tensor([500.0]), mask, num_frames=3, height=2, width=2,
                                  rope_interpolation_scale=scale, return_dict=False)[0]
        mine = ours.eval()(x, text, torch.tensor([500.0]), mask, 3, 2, 2, scale)
    torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-5)
    video = pipe("a red circle moving left", num_inference_steps=2, width=64, height=64, num_frames=9,
                 output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 9, 3, 64, 64) and torch.isfinite(video).all()


def test_resume_continues_exactly(demo_run, tmp_path):
    """Resuming from step 200 of the demo reproduces its last 100 steps and its final LoRA bit for bit."""
    from safetensors.torch import load_file
    cwd, _ = demo_run
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(cwd / "output/demo/checkpoints/step-200", out / "checkpoints/step-200")
    # a stale log line past the checkpoint, as a killed run leaves it, must be dropped
    (out / "log.jsonl").write_text(json.dumps({"step": 201, "loss": 9.9}) + "\n")
    result = run_train(cwd, f"--output_dir={out}", "--resume_from_checkpoint=latest")
    assert "resumed from" in result.stdout
    original = read_log(cwd / "output/demo/log.jsonl")[200:]
    resumed = read_log(out / "log.jsonl")
    assert [r["step"] for r in resumed] == list(range(201, 301))
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in resumed] == [(r["loss"], r["grad_norm"], r["lr"]) for r in original]
    a, b = load_file(cwd / "output/demo/lora.safetensors"), load_file(out / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_second_run_reuses_the_cache(demo_run, tmp_path):
    cwd, _ = demo_run
    result = run_train(cwd, "--max_train_steps=2", f"--output_dir={tmp_path / 'again'}")
    assert "caching latents" not in result.stderr and "caching text" not in result.stderr
    assert "writing" not in result.stdout  # the tiny model and clips exist already
