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


def test_flow_matching_inputs():
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(64, 4, 2, 3, 3)
    batch = {"latents": latents, "prompt_embeds": torch.ones(64, 5, 6),
             "prompt_attention_mask": torch.ones(64, 5, dtype=torch.bool)}
    empty = {"prompt_embeds": torch.zeros(5, 6), "prompt_attention_mask": torch.tensor([True, False, False, False, False])}
    cfg = Config(caption_dropout_probability=0.5)
    x_t, target, sigma, text, mask = train.flow_matching_inputs(batch, empty, cfg, gen)
    x0 = latents.flatten(2).transpose(1, 2)
    noise = target + x0
    s = sigma[:, None, None]
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * noise)
    assert abs(noise.std().item() - 1) < 0.05  # the target really is ε − x0 with ε ~ N(0, 1)
    dropped = text.flatten(1).abs().sum(1) == 0
    assert 16 < dropped.sum() < 48  # about half the captions replaced by the empty prompt...
    assert torch.equal(mask[dropped].sum(1), torch.ones(int(dropped.sum()), dtype=torch.long))  # ...with its mask
    assert (text[~dropped] == 1).all() and mask[~dropped].all()
    _, _, _, kept, _ = train.flow_matching_inputs(batch, empty, Config(), torch.Generator().manual_seed(0))
    assert (kept == 1).all()  # probability 0 keeps every caption


@pytest.mark.parametrize("args", [
    # bf16 weights + autocast, checkpointing, accumulation, caption dropout, value clipping
    ["--mixed_precision=bf16", "--base_model_default_dtype=bf16", "--gradient_checkpointing=true",
     "--gradient_accumulation_steps=2", "--caption_dropout_probability=0.5", "--grad_clip_method=value",
     "--lr_scheduler=linear"],
    ["--mixed_precision=fp16", "--base_model_default_dtype=fp32", "--lora_dropout=0.1", "--max_grad_norm=0"],
])
def test_precision_and_loop_options_train(demo_run, tmp_path, args):
    cwd, _ = demo_run
    run_train(cwd, "--max_train_steps=3", "--checkpoint_step_interval=0", f"--output_dir={tmp_path}", *args)
    log = read_log(tmp_path / "log.jsonl")
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert (tmp_path / "lora.safetensors").exists() and not (tmp_path / "checkpoints").exists()


def test_transformer_and_vae_overrides_load_from_their_own_folders(demo_run, tmp_path):
    cwd, _ = demo_run
    tiny = cwd / "output/demo/tiny-ltx"
    model_copy = tmp_path / "finetune"
    shutil.copytree(tiny / "transformer", model_copy)
    cfg = train.parse_config([str(REPO / "configs/demo.toml"), f"--pretrained_model_name_or_path={tiny}",
                              f"--pretrained_transformer_model_name_or_path={model_copy}",
                              "--pretrained_transformer_subfolder=none",
                              f"--pretrained_vae_model_name_or_path={tiny / 'vae'}",
                              f"--instance_data_dir={cwd / 'output/demo/clips'}", f"--cache_dir={tmp_path / 'cache'}"])
    transformer = train.load_model(cfg, torch.device("cpu"))
    assert len(train.lora.lora_layers(transformer)) == 20
    files, _, _ = train.build_caches(cfg, torch.device("cpu"), 128, 96, 25)
    reference = cwd / "output/demo/clips/.ltx-cache"  # what the demo cached with the pipeline's own vae/
    assert len(files) == 16 and all(f.parent == tmp_path / "cache" for f in files)
    first = train.data.load_cached(files[0])["latents"]
    theirs = [train.data.load_cached(p) for p in reference.glob("*.safetensors")]
    assert any(torch.equal(first, t["latents"]) for t in theirs if "latents" in t)  # the same VAE, loaded alone
    with pytest.raises(FileNotFoundError, match="transformer"):
        train.load_model(Config(pretrained_model_name_or_path=str(model_copy)), torch.device("cpu"))


def test_full_cache_skips_the_text_encoder(demo_run, monkeypatch):
    cwd, _ = demo_run
    cfg = train.parse_config([str(REPO / "configs/demo.toml")])
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(train.ltx, "load_text_encoder", lambda *a, **k: pytest.fail("T5 loaded for a full cache"))
    files, empty, rope_scale = train.build_caches(cfg, torch.device("cpu"), 128, 96, 25)
    assert len(files) == 16 and empty["prompt_embeds"].shape[0] == 128
    assert rope_scale == (8 / 25, 32, 32)


def test_hub_ids_download_only_the_needed_subfolder(monkeypatch, tmp_path):
    import huggingface_hub
    import model as ltx
    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    (tmp_path / "vae").mkdir()
    assert ltx.resolve_folder("Lightricks/LTX-Video-0.9.5", "vae") == tmp_path / "vae"
    assert calls == [("Lightricks/LTX-Video-0.9.5", ["vae/*", "*.json"])]
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        ltx.resolve_folder("some/missing/folder", "vae")


def test_user_mistakes_end_in_one_line_errors(tmp_path):
    cases = [([f"--instance_data_dir={tmp_path / 'nowhere'}", "--demo=false"], "nowhere does not exist"),
             (["--pretrained_model_name_or_path=./no/such/model", "--demo=false"], "does not exist"),
             (["--lora_rnak=4"], "did you mean 'lora_rank'")]
    for args, message in cases:
        result = subprocess.run([sys.executable, str(REPO / "train.py"), str(REPO / "configs/demo.toml"),
                                 f"--output_dir={tmp_path / 'out'}", *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
