"""The flow-matching pieces, and the README command run as a user runs it."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import config
import optim
import prepare
import ranks
import sample
import train
from config import Config
from conftest import DEMO_CONFIG, REPO, read_log, run_in_process


def logit_normal_cdf(x, mean, std):
    return 0.5 * (1 + torch.erf((torch.logit(x) - mean) / (std * 2 ** 0.5)))


def mode_cdf(x, scale):
    """P(σ <= x) for σ = g(u), g decreasing from 1 to 0: 1 − g⁻¹(x), g⁻¹ by bisection."""
    def g(u):
        return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    lo, hi = torch.zeros_like(x), torch.ones_like(x)
    for _ in range(60):
        mid = (lo + hi) / 2
        above = g(mid) > x
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 1 - (lo + hi) / 2


def ks_distance(draws, cdf):
    """Kolmogorov-Smirnov statistic: the largest gap between the draws' empirical CDF and `cdf`."""
    x = draws.double().sort().values
    n, f = len(x), cdf(x)
    return max((torch.arange(1, n + 1) / n - f).max().item(), (f - torch.arange(n) / n).max().item())


def unshift(cdf, k):  # σ' = kσ / (1 + (k − 1)σ)  <=>  σ = σ' / (k − (k − 1)σ')
    return lambda y: cdf(y / (k - (k - 1) * y))


SCHEMES = [  # (keys, closed-form CDF before the shift)
    (dict(), lambda x: logit_normal_cdf(x, 0.0, 1.0)),
    (dict(logit_mean=-0.5, logit_std=1.5), lambda x: logit_normal_cdf(x, -0.5, 1.5)),
    (dict(flow_weighting_scheme="uniform"), lambda x: x),
    (dict(flow_weighting_scheme="mode"), lambda x: mode_cdf(x, 1.29)),
    (dict(flow_weighting_scheme="mode", mode_scale=-0.8), lambda x: mode_cdf(x, -0.8)),
]


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("keys,cdf", SCHEMES)
def test_sigmas_follow_their_closed_form(keys, cdf, shift):
    n = 20000
    draws = train.sample_sigmas(n, Config(**keys), shift, torch.Generator().manual_seed(0), "cpu")
    assert 0 <= draws.min() and draws.max() <= 1
    critical = 1.63 / n ** 0.5  # KS at the 1% level
    assert ks_distance(draws, unshift(cdf, shift)) < critical
    wrong = unshift(cdf, shift * 1.3)  # the test can fail: a 30% different shift is told apart
    assert ks_distance(draws, wrong) > critical


def test_auto_shift_is_the_samplers_resolution_shift():
    scheduler = {"base_image_seq_len": 1024, "max_image_seq_len": 4096, "base_shift": 0.95, "max_shift": 2.05}
    cfg = Config(flow_schedule_auto_shift=True)
    small, large = (train.schedule_shift(cfg, scheduler, tokens) for tokens in (1024, 4096))
    assert small == pytest.approx(math.exp(0.95)) and large == pytest.approx(math.exp(2.05))
    assert train.schedule_shift(Config(flow_schedule_shift=2.0), scheduler, 4096) == 2.0  # off: the fixed shift
    sampler = sample.sampling_sigmas(10, 4096, {**scheduler, "use_dynamic_shifting": True})[:-1]
    plain = torch.linspace(1, 0.1, 10)
    torch.testing.assert_close(sampler, large * plain / (1 + (large - 1) * plain))  # one formula for both


def test_training_shifts_each_clips_sigma_by_the_whole_clips_tokens():
    """Auto shift reads the clip's F·H·W tokens (3·2·3 = 18 here), not one frame's H·W (6): at 18 tokens the shift
    is exp(2.05), at 6 it would be exp(0.95)."""
    scheduler = {"base_image_seq_len": 6, "max_image_seq_len": 18, "base_shift": 0.95, "max_shift": 2.05}
    cfg = Config(flow_schedule_auto_shift=True)
    batch = fake_batch(batch_size=8)
    seeds = [train.example_seed(0, 7, j) for j in range(8)]
    got = train.flow_matching_inputs(batch, EMPTY, cfg, seeds, scheduler).sigma
    shift = sample.resolution_shift(18, scheduler)
    assert shift == pytest.approx(math.exp(2.05))
    expected = torch.cat([train.sample_sigmas(1, cfg, shift, torch.Generator().manual_seed(s), "cpu") for s in seeds])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["norm", "value"])
def test_gradients_past_max_grad_norm_are_clipped_to_it(method):
    """A gradient of norm 10 against max_grad_norm 1: SGD with lr 1 moves the weights by exactly the clipped
    gradient, so the step shows the clipping (norm: rescaled to norm 1, same direction; value: each entry clamped
    to ±1). A gradient under the limit is left alone. The logged norm is the one before clipping."""
    cfg = Config(max_grad_norm=1.0, grad_clip_method=method)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for grads, clipped in (([[6.0, 0.0, 0.0], [-8.0, 0.0]], {"norm": [[0.6, 0.0, 0.0], [-0.8, 0.0]],
                                                                "value": [[1.0, 0.0, 0.0], [-1.0, 0.0]]}[method]),
                           ([[0.3, 0.0, 0.0], [-0.4, 0.0]], [[0.3, 0.0, 0.0], [-0.4, 0.0]])):
        params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        loss, norm, taken = train.optimizer_step(params, torch.optim.SGD(params, lr=1.0), scaler,
                                                 torch.tensor(1.0), cfg, ranks.Dist())
        assert taken and norm == pytest.approx(math.hypot(grads[0][0], grads[1][0]))
        for p, c in zip(params, clipped):
            torch.testing.assert_close(p.detach(), -torch.tensor(c))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedules(schedule):
    cfg = Config(learning_rate=1.0, lr_scheduler=schedule, lr_warmup_steps=10)
    lrs = [optim.lr_at(s, cfg, 110) for s in range(110)]
    assert lrs[0] == 0.0 and lrs[5] == 0.5 and lrs[10] == 1.0  # linear warm-up, then the peak
    if schedule == "constant":
        assert lrs[-1] == 1.0
    else:
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.02
    if schedule == "cosine":
        assert abs(lrs[60] - 0.5) < 1e-9  # half way through the decay


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
        assert {p.name for p in ckpt.iterdir()} == {"lora.safetensors", "training_state.pt", "meta.json", "rng-0.pt",
                                                    "manifest.json"}
    meta = json.loads((out / "checkpoints/step-200/meta.json").read_text())
    assert meta["step"] == 200 and meta["config"]["lora_rank"] == 16
    resolved = config.parse_config([str(out / "config.toml")])
    assert Path(resolved.pretrained_model_name_or_path).is_absolute()
    assert (Path(resolved.pretrained_model_name_or_path) / "model_index.json").exists()
    memory = json.loads((out / "memory.json").read_text())  # each phase's peak, and the console says them too
    assert list(memory["peak_bytes"]) == ["text caching", "latent caching", "loading the transformer",
                                          "training step", "validation"]
    assert all(v > 0 for v in memory["peak_bytes"].values()) and "peak resident memory by phase" in result.stdout


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
    lora.apply_file(ours, lora_file)
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


def test_demo_writes_the_universal_form_and_checkpoints_keep_the_exact_adapters(demo_run):
    from safetensors import safe_open
    import lora
    cwd, _ = demo_run
    out = cwd / "output/demo"
    for path in (out / "lora.safetensors", out / "checkpoints/step-300/lora.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys, meta = list(f.keys()), json.loads(f.metadata()["ltx_lora"])
        assert all(k.startswith("diffusion_model.transformer_blocks.") for k in keys)
        assert not any(k.endswith(".alpha") for k in keys) and meta["format"] == "universal"
    state = torch.load(out / "checkpoints/step-300/training_state.pt", weights_only=True)
    adapters = lora.read_lora_file(out / "lora.safetensors")
    assert state["adapters"].keys() == {f"{n}.lora_{ab}.weight" for n in adapters for ab in "AB"}


def test_checkpoints_resume_the_adapters_exactly_with_alpha_other_than_rank(tmp_path):
    """The exported LoRA has alpha / r folded into B; resume must read B as trained, not divided back."""
    import lora
    from conftest import tiny_diffusers_transformer
    import model as ltx

    def setup():
        ref = tiny_diffusers_transformer()
        m = ltx.LTXTransformer(ltx.config_from_json(dict(ref.config)))
        m.load_state_dict(ref.state_dict())
        lora.inject(m, rank=4, alpha=3.0)
        return m, torch.optim.AdamW(lora.lora_parameters(m), lr=1e-2)

    cfg = config.Config(lora_rank=4, lora_alpha=3.0, checkpoints_total_limit=0)
    model, optimizer = setup()
    for p in lora.lora_parameters(model):
        p.grad = torch.randn_like(p)
    optimizer.step()
    folder = checkpoint.save_checkpoint(tmp_path, 7, model, optimizer, cfg, {}, ranks.Dist())
    meta = checkpoint.check_resume(folder, cfg)
    trained = lora.adapter_state(model)
    assert any((v != 0).any() and ".lora_B." in k for k, v in trained.items())
    for legacy in (False, True):
        if legacy:  # a checkpoint from before the adapters were kept apart: lora.safetensors held them exactly
            state = torch.load(folder / "training_state.pt", weights_only=True)
            torch.save({"optimizer": state["optimizer"]}, folder / "training_state.pt")
            lora.save_lora(model, folder / "lora.safetensors", fmt="diffusers")
        other, other_optimizer = setup()
        assert checkpoint.load_checkpoint(folder, meta, other, other_optimizer, cfg, ranks.Dist()) == 7
        assert all(torch.equal(v, lora.adapter_state(other)[k]) for k, v in trained.items()), legacy
        assert other_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def test_resume_continues_exactly(demo_run, tmp_path):
    """Resuming from step 200 of the demo reproduces its last 100 steps and its final LoRA bit for bit."""
    from safetensors.torch import load_file
    cwd, _ = demo_run
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(cwd / "output/demo/checkpoints/step-200", out / "checkpoints/step-200")
    # a stale log line past the checkpoint, as a killed run leaves it, must be dropped
    (out / "log.jsonl").write_text(json.dumps({"step": 201, "loss": 9.9}) + "\n")
    result = run_in_process(cwd, "train.py", DEMO_CONFIG, f"--output_dir={out}", "--resume_from_checkpoint=latest")
    assert "resumed from" in result.stdout
    original = read_log(cwd / "output/demo/log.jsonl")[200:]
    resumed = read_log(out / "log.jsonl")
    assert [r["step"] for r in resumed] == list(range(201, 301))
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in resumed] == [(r["loss"], r["grad_norm"], r["lr"]) for r in original]
    a, b = load_file(cwd / "output/demo/lora.safetensors"), load_file(out / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_second_run_reuses_the_cache(demo_run, tmp_path):
    cwd, _ = demo_run
    result = run_in_process(cwd, "train.py", DEMO_CONFIG, "--max_train_steps=2", f"--output_dir={tmp_path / 'again'}")
    assert "caching latents" not in result.stderr and "caching text" not in result.stderr
    assert "writing" not in result.stdout  # the tiny model and clips exist already


def fake_batch(batch_size=64, i2v=False):
    latents = torch.randn(batch_size, 4, 3, 2, 3, generator=torch.Generator().manual_seed(5))
    return {"latents": latents, "prompt_embeds": torch.ones(batch_size, 5, 6),
            "prompt_attention_mask": torch.ones(batch_size, 5, dtype=torch.bool),
            "i2v": torch.full((batch_size,), i2v)}


EMPTY = {"prompt_embeds": torch.zeros(5, 6), "prompt_attention_mask": torch.tensor([True, False, False, False, False])}


def flow(batch, **cfg):
    seeds = [train.example_seed(0, 7, j) for j in range(len(batch["i2v"]))]
    return train.flow_matching_inputs(batch, EMPTY, Config(**cfg), seeds)


def test_flow_matching_inputs():
    batch = fake_batch()
    f = flow(batch, caption_dropout_probability=0.5)
    x0 = batch["latents"].flatten(2).transpose(1, 2)
    noise = f.target + x0
    sigma = f.sigma
    assert sigma.shape == (64,) and torch.equal(f.timestep, sigma * 1000)  # no conditioning: one timestep per clip
    s = sigma[:, None, None]
    torch.testing.assert_close(f.x_t, (1 - s) * x0 + s * noise)
    assert abs(noise.std().item() - 1) < 0.05  # the target really is ε − x0 with ε ~ N(0, 1)
    assert (f.loss_mask == 1).all()
    dropped = f.text.flatten(1).abs().sum(1) == 0
    assert 16 < dropped.sum() < 48  # about half the captions replaced by the empty prompt...
    assert torch.equal(f.text_mask[dropped].sum(1), torch.ones(int(dropped.sum()), dtype=torch.long))  # ...and mask
    assert (f.text[~dropped] == 1).all() and f.text_mask[~dropped].all()
    assert (flow(batch).text == 1).all()  # probability 0 keeps every caption


def test_i2v_keeps_the_first_frame_clean_at_timestep_zero_and_out_of_the_loss():
    batch = fake_batch(i2v=True)
    batch["i2v"][::2] = False  # every other clip is not eligible (say, an image dataset)
    f = flow(batch, i2v_probability=1.0)
    x0 = batch["latents"].flatten(2).transpose(1, 2)
    first = 2 * 3  # H·W tokens of latent frame 0
    cond = batch["i2v"]
    assert f.timestep.shape == (64, 18)
    assert (f.timestep[cond, :first] == 0).all() and (f.timestep[cond, first:] > 0).all()
    assert (f.timestep[~cond] > 0).all()
    assert torch.equal(f.x_t[cond, :first], x0[cond, :first])  # never noised
    assert not torch.equal(f.x_t[~cond, :first], x0[~cond, :first])
    assert (f.loss_mask[cond, :first] == 0).all() and (f.loss_mask[cond, first:] == 1).all()
    assert (f.loss_mask[~cond] == 1).all()
    # the conditioned tokens contribute nothing: changing the prediction there leaves the loss as it is
    pred = torch.randn_like(f.target)
    changed = pred.clone()
    changed[cond, :first] += 100
    assert train.flow_matching_loss(changed, f, Config()) == train.flow_matching_loss(pred, f, Config())
    changed[cond, first] += 1  # ...while a token after the first frame does count
    assert train.flow_matching_loss(changed, f, Config()) != train.flow_matching_loss(pred, f, Config())
    assert (flow(batch, i2v_probability=0.0).loss_mask == 1).all()  # a t2v-only run
    mixed = flow(fake_batch(i2v=True), i2v_probability=0.5)
    assert 16 < (mixed.loss_mask[:, 0] == 0).sum() < 48  # about half the clips conditioned


@pytest.mark.parametrize("args", [
    # bf16 weights + autocast, checkpointing, accumulation, caption dropout, value clipping
    ["--mixed_precision=bf16", "--base_model_default_dtype=bf16", "--gradient_checkpointing=true",
     "--gradient_accumulation_steps=2", "--caption_dropout_probability=0.5", "--grad_clip_method=value",
     "--lr_scheduler=linear"],
    ["--mixed_precision=fp16", "--base_model_default_dtype=fp32", "--lora_dropout=0.1", "--max_grad_norm=0"],
])
def test_precision_and_loop_options_train(demo_run, tmp_path, args):
    cwd, _ = demo_run
    run_in_process(cwd, "train.py", DEMO_CONFIG, "--max_train_steps=3", "--checkpoint_step_interval=0",
                   f"--output_dir={tmp_path}", *args)
    log = read_log(tmp_path / "log.jsonl")
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert (tmp_path / "lora.safetensors").exists() and not (tmp_path / "checkpoints").exists()


def test_transformer_and_vae_overrides_load_from_their_own_folders(demo_run, tmp_path):
    cwd, _ = demo_run
    tiny = cwd / "output/demo/tiny-ltx"
    model_copy = tmp_path / "finetune"
    shutil.copytree(tiny / "transformer", model_copy)
    config_file = tmp_path / "override.toml"
    config_file.write_text(f'demo = true\npretrained_model_name_or_path = "{tiny}"\n'
                      f'pretrained_transformer_model_name_or_path = "{model_copy}"\n'
                      'pretrained_transformer_subfolder = "none"\n'
                      f'pretrained_vae_model_name_or_path = "{tiny / "vae"}"\n'
                      'device = "cpu"\nmixed_precision = "no"\nbase_model_default_dtype = "fp32"\n'
                      f'[[datasets]]\ninstance_data_dir = "{cwd / "output/demo/clips"}"\n'
                      f'cache_dir_vae = "{tmp_path / "cache"}"\nresolution = 96\nresolution_type = "pixel"\n'
                      'video = { num_frames = 25 }\n')
    cfg = config.parse_config([str(config_file)])
    transformer = prepare.load_model(cfg, torch.device("cpu"))
    assert len(train.lora.lora_layers(transformer)) == 20
    samples, _, buckets, *_ = prepare.prepare_data(cfg, ranks.Dist(), torch.device("cpu"), tmp_path / "out")
    assert len(samples) == 16 and all(s.latent_file.parent == tmp_path / "cache" for s in samples)
    reference = cwd / "output/demo/clips/.ltx-cache"  # what the demo cached with the pipeline's own vae/
    first = train.data.read_cache_file(samples[0].latent_file)["latents"]
    theirs = [train.data.read_cache_file(p) for p in reference.glob("*.safetensors")]
    assert any(torch.equal(first, t["latents"]) for t in theirs if "latents" in t)  # the same VAE, loaded alone
    with pytest.raises(train.ltx.ModelError, match="transformer"):
        prepare.load_model(Config(pretrained_model_name_or_path=str(model_copy)), torch.device("cpu"))


def test_full_cache_skips_the_text_encoder(demo_run, monkeypatch, tmp_path):
    cwd, _ = demo_run
    cfg = config.parse_config([DEMO_CONFIG])
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(train.ltx, "load_text_encoder", lambda *a, **k: pytest.fail("T5 loaded for a full cache"))
    samples, eval_clips, buckets, datasets, texts, vae, rope_scale = prepare.prepare_data(cfg, ranks.Dist(),
                                                                                        torch.device("cpu"), tmp_path)
    assert len(samples) == 16 and eval_clips == [] and [b.shape for b in buckets] == [(128, 96, 25)]
    assert texts[""]["prompt_embeds"].shape[0] == 128 and rope_scale == (8 / 25, 32, 32)
    assert vae is not None and next(vae.parameters()).device.type == "cpu"  # kept for validation, off the device
    cfg.disable_validation = True
    assert prepare.prepare_data(cfg, ranks.Dist(), torch.device("cpu"), tmp_path).vae is None  # nothing to render
    assert all(s.i2v for s in samples)


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
    with pytest.raises(ltx.ModelError, match="not a hub id"):
        ltx.resolve_folder("some/missing/folder", "vae")

    def offline(repo_id, allow_patterns):
        from huggingface_hub.errors import LocalEntryNotFoundError
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder\nand more detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)  # offline, not in the cache: one sentence
    with pytest.raises(ltx.ModelError, match=r"could not get org/model \(vae\) from the Hugging Face hub: Cannot "
                                             r"find an appropriate cached snapshot folder; check the id"):
        ltx.resolve_folder("org/model", "vae")


def test_user_mistakes_end_in_one_line_errors(tmp_path):
    missing = tmp_path / "missing.toml"
    missing.write_text(f'[[datasets]]\nid = "mine"\ninstance_data_dir = "{tmp_path / "nowhere"}"\n')
    cases = [([str(missing)], "nowhere does not exist"),
             ([DEMO_CONFIG, "--pretrained_model_name_or_path=./no/such/model", "--demo=false"],
              "is neither a folder nor a hub id"),
             ([DEMO_CONFIG, "--lora_rnak=4"], "did you mean 'lora_rank'")]
    for args, message in cases:
        result = run_in_process(tmp_path, "train.py", *args, f"--output_dir={tmp_path / 'out'}", expect=1)
        assert message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_too_small_datasets_stop_with_a_clear_message(demo_run, monkeypatch, tmp_path):
    cwd, _ = demo_run
    monkeypatch.chdir(cwd)
    cfg = config.parse_config([DEMO_CONFIG, "--train_batch_size=5", "--gradient_accumulation_steps=4"])
    with pytest.raises(SystemExit, match="no samples detected in dataset shapes: 16 usable clips < batch x "
                                         "accumulation = 20; raise repeats or lower the batch"):
        prepare.prepare_data(cfg, ranks.Dist(), torch.device("cpu"), tmp_path)


def test_vae_tiling_is_switched_on_when_asked(demo_run, monkeypatch, tmp_path):
    cwd, _ = demo_run
    monkeypatch.chdir(cwd)
    loaded = []
    real_load_vae = train.ltx.load_vae
    monkeypatch.setattr(train.ltx, "load_vae", lambda *a, **k: loaded.append(real_load_vae(*a, **k)) or loaded[-1])
    for tiling in (False, True):
        cfg = config.parse_config([DEMO_CONFIG, f"--vae_enable_tiling={tiling}"])
        prepare.prepare_data(cfg, ranks.Dist(), torch.device("cpu"), tmp_path)
        assert loaded[-1].use_tiling is tiling


def test_the_training_modules_import_without_pyav():
    """PyAV is imported where video is read or written, not at import: a lent GPU machine, where a call carries
    64 MiB of wheels (PyAV's is 35 MB, bitsandbytes' 43 MB), runs the CUDA tests and bench.py --memory without it."""
    code = "import sys; sys.modules['av'] = None; import train, quant, offload, bench, sample, demo, config"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)


def test_the_demo_trains_over_a_single_file_transformer_and_writes_the_same_lora(demo_folder):
    """--pretrained_transformer_model_name_or_path names one .safetensors in Lightricks' layout (the demo's own
    transformer, renamed): the same steps and the same LoRA file as over its folder."""
    import json
    from safetensors.torch import load_file, save_file
    from test_model import original_layout
    folder = demo_folder / "output/demo/tiny-ltx/transformer"
    single = demo_folder / "ltxv-demo.safetensors"
    config_json = json.loads((folder / "config.json").read_text())
    save_file(original_layout(load_file(folder / "diffusion_pytorch_model.safetensors")), single,
              metadata={"config": json.dumps({"transformer": config_json})})
    args = [DEMO_CONFIG, "--max_train_steps=3", "--disable_validation=true", "--checkpoint_step_interval=0"]
    run_in_process(demo_folder, "train.py", *args, "--output_dir=folder")
    said = run_in_process(demo_folder, "train.py", *args, "--output_dir=file",
                          f"--pretrained_transformer_model_name_or_path={single}").stdout
    assert f"transformer from {single}\n" in said
    steps = [[(r["loss"], r["grad_norm"]) for r in read_log(demo_folder / name / "log.jsonl")]
             for name in ("folder", "file")]
    assert steps[0] == steps[1]
    a, b = load_file(demo_folder / "folder/lora.safetensors"), load_file(demo_folder / "file/lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
