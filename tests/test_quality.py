"""The training-quality tools: EMA, the eval loss, scheduled sampling; each off by default and, when off, leaving
the step exactly as it was."""

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import config
import data
import optim
import prepare
import ranks
import scheduled
import train
from config import Config
from conftest import DEMO_CONFIG, REPO, read_log, run_in_process

def test_with_every_tool_off_the_log_has_only_the_step(demo_run):
    log = read_log(demo_run[0] / "output/demo/log.jsonl")
    assert not any(k.startswith(("eval", "crepa", "ema")) for r in log for k in r)


# -----------------------------------------------------------------------------
# EMA

def test_ema_update_and_apply_are_exact():
    params = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[4.0]]))]
    ema = optim.EMA(params, decay=0.75, device=torch.device("cpu"))
    with torch.no_grad():
        params[0].copy_(torch.tensor([5.0, 6.0]))
        params[1].copy_(torch.tensor([[0.0]]))
    ema.update(params)
    assert ema.shadow[0].tolist() == [2.0, 3.0] and ema.shadow[1].tolist() == [[3.0]]  # 0.75·old + 0.25·new
    with ema.applied(params):
        assert params[0].tolist() == [2.0, 3.0] and params[1].tolist() == [[3.0]]
    assert params[0].tolist() == [5.0, 6.0] and params[1].tolist() == [[0.0]]  # the trained weights come back


# -----------------------------------------------------------------------------
# Holding clips out for the eval loss

def samples(files: dict[str, int]) -> list[data.Sample]:
    """Two samples (windows) per file, files named by dataset."""
    return [data.Sample(ds, Path(f"/{ds}/{i}.mp4"), "c", 32, 32, 9, start=w) for ds, n in files.items()
            for i in range(n) for w in (0, 9)]


def test_hold_out_takes_whole_files_the_same_way_every_time():
    every = samples({"a": 10, "b": 4})
    trained, held = prepare.hold_out(every, Config(eval_fraction=0.2, seed=1))
    assert {s.path for s in held} & {s.path for s in trained} == set()  # no window of an eval file trains
    assert len({s.path for s in held if s.dataset == "a"}) == 2 and len({s.path for s in held if s.dataset == "b"}) == 1
    assert prepare.hold_out(every, Config(eval_fraction=0.2, seed=1)) == (trained, held)
    assert prepare.hold_out(every, Config(eval_fraction=0.2, seed=2))[1] != held  # the seed picks them
    trained, held = prepare.hold_out(every, Config(eval_dataset_id="b"))
    assert {s.dataset for s in held} == {"b"} and {s.dataset for s in trained} == {"a"}
    assert prepare.hold_out(every, Config()) == (every, [])
    with pytest.raises(SystemExit, match="every file of dataset 'b'"):
        prepare.hold_out(samples({"a": 10, "b": 1}), Config(eval_fraction=0.2))


def test_eval_loss_moves_only_when_the_weights_do(demo_run, monkeypatch, tmp_path):
    cwd, _ = demo_run
    monkeypatch.chdir(cwd)
    cfg = config.parse_config([DEMO_CONFIG, "--eval_fraction=0.25", "--disable_validation=true"])
    d, device = ranks.Dist(), torch.device("cpu")
    prepared = prepare.prepare_data(cfg, d, device, tmp_path)
    assert len(prepared.eval_clips) == 4 and len(prepared.samples) == 12
    transformer = prepare.load_model(cfg, device)

    def forward(flow, grid):
        return transformer(flow.x_t, flow.text, flow.timestep, flow.text_mask, *grid, prepared.rope_scale)

    first = train.evaluate(transformer, forward, prepared.eval_clips, cfg, d, device)
    assert set(first) == {"eval_loss", *(f"eval_loss_sigma_{s:g}" for s in cfg.eval_sigmas)}
    assert train.evaluate(transformer, forward, prepared.eval_clips, cfg, d, device) == first  # identical
    assert transformer.training  # left as it was found
    params = train.lora.lora_parameters(transformer)
    optimizer, scaler = optim.make_optimizer(params, cfg), torch.amp.GradScaler("cpu", enabled=False)
    order = prepare.DataOrder(prepared.buckets, prepared.datasets, 4, 0)
    batch, _ = prepare.micro_batch(order, 0, prepared.samples, 0, 4, device)
    losses = train.micro_step(forward, batch, prepared.texts[""], cfg, [1, 2, 3, 4], scaler)
    train.optimizer_step(params, optimizer, scaler, losses.flow, cfg, d)
    after = train.evaluate(transformer, forward, prepared.eval_clips, cfg, d, device)
    assert after["eval_loss"] != first["eval_loss"]


# -----------------------------------------------------------------------------
# Scheduled sampling

def test_a_perfect_models_rollout_lands_on_the_analytic_line():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 6, 4, generator=gen), torch.randn(3, 6, 4, generator=gen)
    sigma = torch.tensor([0.3, 0.6, 0.005])
    conditioned = torch.tensor([False, True, False])
    text, mask = torch.zeros(3, 2, 5), torch.ones(3, 2)
    flow = train.noised(x0, noise, sigma, text, mask, conditioned, frame_tokens=2)
    cfg = Config(scheduled_sampling_steps=3, scheduled_sampling_sigma_offset=0.2)
    calls = []

    def perfect(step_flow, grid):  # the true velocity, wherever x is
        calls.append(step_flow.timestep)
        return noise - x0

    out = scheduled.rollout(perfect, flow, x0, torch.tensor([True, True, True]), cfg, (1, 2, 3))
    torch.testing.assert_close(out.x_t, flow.x_t)
    torch.testing.assert_close(out.target[:2], flow.target[:2])
    assert torch.equal(out.x_t[2], flow.x_t[2])  # σ < 0.01 keeps the analytic x_t
    assert len(calls) == 3
    torch.testing.assert_close(calls[0][0], torch.full((6,), 500.0))  # from σ + 0.2 = 0.5
    assert (calls[0][1, :2] == 0).all() and torch.allclose(calls[0][1, 2:], torch.tensor(800.0))  # i2v tokens at 0


def test_a_rollout_that_drifts_gets_the_target_back_to_the_clean_latent():
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 3, generator=gen), torch.randn(2, 4, 3, generator=gen)
    sigma = torch.tensor([0.4, 0.7])
    flow = train.noised(x0, noise, sigma, torch.zeros(2, 1, 2), torch.ones(2, 1), torch.tensor([False, False]), 2)
    out = scheduled.rollout(lambda f, g: torch.zeros_like(x0), flow, x0, torch.tensor([True, False]),
                        Config(scheduled_sampling_steps=2), (1, 2, 2))
    start = 0.5  # σ + 0.1: the model does not move x at all from there
    torch.testing.assert_close(out.x_t[0], (1 - start) * x0[0] + start * noise[0])
    torch.testing.assert_close(out.target[0], (out.x_t[0] - x0[0]) / 0.4)  # (x_t − x0)/σ
    assert torch.equal(out.x_t[1], flow.x_t[1]) and torch.equal(out.target[1], flow.target[1])  # not chosen


# -----------------------------------------------------------------------------
# The demo with every tool on

README_TOOLS = "python train.py configs/demo.toml --output_dir=output/demo-tools"


def readme_tools_args() -> list[str]:
    """The keys of the "demo with every tool on" command in docs/training-quality.md."""
    text = (REPO / "docs/training-quality.md").read_text()
    return text.split(README_TOOLS, 1)[1].split("```", 1)[0].replace("\\\n", " ").split()


CREPA = [a for a in readme_tools_args() if a.startswith("--crepa")]  # the tiny DINOv2 demo.prepare writes


@pytest.fixture(scope="module")
def tools_run(demo_run, tmp_path_factory):
    """The docs' command with every tool on, shortened to 40 steps (and an EMA that moves in 40), with checkpoints
    at 20 for the resume test and a small, quick validation video."""
    cwd, _ = demo_run
    out = tmp_path_factory.mktemp("tools") / "run"
    args = [DEMO_CONFIG, *readme_tools_args(), f"--output_dir={out}", "--max_train_steps=40",
            "--checkpoint_step_interval=20", "--validation_step_interval=0", "--validation_num_inference_steps=2",
            "--validation_resolution=64x64", "--ema_decay=0.9", "--eval_step_interval=20",
            "--flow_weighting_scheme=mode"]
    return cwd, out, args, run_in_process(cwd, "train.py", *args)


def test_the_demo_trains_with_the_tools_on(tools_run):
    from safetensors.torch import load_file
    cwd, out, _, result = tools_run
    assert "4 clip(s) held out for the eval loss" in result.stdout and "lora_ema.safetensors" in result.stdout
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log] == list(range(0, 41))
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert {"eval_loss_sigma_0.1", "eval_loss_sigma_0.9"} <= evals[0].keys()
    trained, averaged = load_file(out / "lora.safetensors"), load_file(out / "lora_ema.safetensors")
    assert trained.keys() == averaged.keys() and any(not torch.equal(trained[k], averaged[k]) for k in trained)
    assert (out / "checkpoints/step-20/lora_ema.safetensors").exists()
    plain = load_file(cwd / "output/demo/lora.safetensors")  # the demo's, trained without CREPA
    assert trained.keys() == plain.keys()  # the projection head is not part of the LoRA
    assert "crepa_head" in torch.load(out / "checkpoints/step-20/training_state.pt", weights_only=True)
    crepa_terms = [r["crepa_loss"] for r in log if "crepa_loss" in r]
    assert len(crepa_terms) == 40 and sum(crepa_terms[-10:]) < sum(crepa_terms[:10])  # the alignment improves
    samples = out / "samples/step-40"
    assert sorted(p.name for p in samples.iterdir()) == ["validation-64x64-ema.mp4", "validation-64x64.mp4",
                                                        "validation-64x64.png"]
    assert Image.open(samples / "validation-64x64.png").size == (4 * 64, 2 * 64)  # the LoRA above its EMA


def test_resume_with_the_tools_on_is_exact(tools_run, tmp_path):
    from safetensors.torch import load_file
    cwd, out, args, _ = tools_run
    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints/step-20", again / "checkpoints/step-20")
    run_in_process(cwd, "train.py", *args, f"--output_dir={again}", "--resume_from_checkpoint=latest")
    first, second = read_log(out / "log.jsonl"), read_log(again / "log.jsonl")
    keys = ("loss", "grad_norm", "eval_loss", "crepa_loss")
    assert [[r.get(k) for k in keys] for r in second] == [[r.get(k) for k in keys] for r in first[21:]]
    for name in ("lora.safetensors", "lora_ema.safetensors"):
        a, b = load_file(out / name), load_file(again / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_ema_only_validation_renders_the_average_alone(tools_run, tmp_path):
    cwd, _, args, _ = tools_run
    out = tmp_path / "ema-only"
    run_in_process(cwd, "train.py", *args, "--max_train_steps=2", "--eval_fraction=0",
                   "--ema_validation=ema_only", f"--output_dir={out}")
    assert sorted(p.name for p in (out / "samples/step-2").iterdir()) == ["validation-64x64-ema.mp4",
                                                                         "validation-64x64-ema.png"]


@pytest.mark.parametrize("args,message", [
    (["--ema_decay=1"], "ema_decay must be in [0, 1)"),
    (["--mode_scale=2"], "mode_scale must be in [-1, 1.75]"),
    (["--eval_dataset_id=nope"], "eval_dataset_id = 'nope' names no dataset"),
    (["--eval_dataset_id=shapes"], "is the only dataset"),
    (["--eval_fraction=0.1", "--eval_dataset_id=shapes"], "two ways to choose the eval clips"),
    (["--flow_schedule_auto_shift=true", "--flow_schedule_shift=3"], "leave flow_schedule_shift at 1"),
    (["--eval_sigmas=0.5,1.5"], "eval_sigmas must be one or more"),
    (["--crepa_enabled=true", "--crepa_model=no/such/folder"], "crepa_model = 'no/such/folder' is neither"),
    (["--crepa_adjacent_tau=0"], "crepa_adjacent_tau must be > 0"),
])
def test_quality_keys_are_checked(args, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config.parse_config([DEMO_CONFIG, *args])


def test_with_features_cached_training_never_builds_dinov2(tools_run, tmp_path, monkeypatch):
    import crepa
    cwd, _, args, _ = tools_run
    monkeypatch.setattr(crepa, "load_encoder", lambda *a, **k: pytest.fail("DINOv2 built with every feature cached"))
    result = run_in_process(cwd, "train.py", *args, "--max_train_steps=2", f"--output_dir={tmp_path / 'again'}")
    assert "caching" not in result.stderr  # no latents, no text, no features encoded
    assert "crepa_loss" in read_log(tmp_path / "again/log.jsonl")[1]


def test_crepa_on_cached_latents_caches_only_the_features(demo_run, tmp_path):
    cwd, _ = demo_run  # the demo's clips, their latents and captions cached already
    result = run_in_process(cwd, "train.py", DEMO_CONFIG, *CREPA, "--crepa_encoder_image_size=56",
                            "--max_train_steps=1", "--disable_validation=true", f"--output_dir={tmp_path / 'out'}")
    assert "caching crepa_features" in result.stderr
    assert "caching latents" not in result.stderr and "caching text" not in result.stderr


@pytest.mark.parametrize("tool", [["--use_ema=true", "--ema_decay=0.9"], CREPA, ["--scheduled_sampling_probability=0.5"],
                                  ["--flow_weighting_scheme=uniform", "--flow_schedule_auto_shift=true"]],
                         ids=["ema", "crepa", "scheduled-sampling", "uniform-auto-shift"])
def test_with_each_tool_alone_the_eval_loss_falls(demo_run, tmp_path, tool):
    cwd, _ = demo_run
    run_in_process(cwd, "train.py", DEMO_CONFIG, *tool, "--max_train_steps=30", "--eval_fraction=0.25",
                   "--eval_step_interval=30", "--disable_validation=true", "--checkpoint_step_interval=0",
                   f"--output_dir={tmp_path}")
    evals = [r["eval_loss"] for r in read_log(tmp_path / "log.jsonl") if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < 0.9 * evals[0], evals


def test_an_eval_dataset_is_scored_and_never_trained_on(demo_run, tmp_path):
    import demo
    cwd, _ = demo_run
    demo.make_synthetic_dataset(tmp_path / "held", n=3)
    config_file = tmp_path / "two.toml"
    config_file.write_text(Path(DEMO_CONFIG).read_text() + f'\n[[datasets]]\nid = "held"\ninstance_data_dir = '
                           f'"{tmp_path / "held"}"\nresolution = 96\nresolution_type = "pixel"\nvideo = {{ num_frames = 25 }}\n')
    result = run_in_process(cwd, "train.py", str(config_file), "--eval_dataset_id=held", "--max_train_steps=10",
                            "--eval_step_interval=5", "--disable_validation=true", "--use_ema=true",
                            f"--output_dir={tmp_path / 'out'}")
    assert "dataset 'held': 3 clip(s) held out for the eval loss" in result.stdout
    assert "16 samples in 1 buckets" in result.stdout  # the training set is the demo's clips alone
    log = read_log(tmp_path / "out/log.jsonl")
    assert [r["step"] for r in log if "eval_loss" in r] == [0, 5, 10]
    # the tools that only watch (an eval set, an EMA, no validation videos) leave every step as the plain demo's
    plain = read_log(cwd / "output/demo/log.jsonl")
    steps = [(r["step"], r["loss"], r["grad_norm"]) for r in log if "loss" in r]
    assert steps == [(r["step"], r["loss"], r["grad_norm"]) for r in plain[:10]]


def test_turning_ema_and_crepa_on_at_a_resume_says_so_and_trains(demo_run, tmp_path):
    cwd, _ = demo_run
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(cwd / "output/demo/checkpoints/step-200", out / "checkpoints/step-200")
    result = run_in_process(cwd, "train.py", DEMO_CONFIG, "--use_ema=true", *CREPA, "--max_train_steps=202",
                            "--disable_validation=true", f"--output_dir={out}", "--resume_from_checkpoint=latest")
    assert "the average starts from its LoRA" in result.stdout and "a fresh one starts training" in result.stdout
    assert "the optimizer starts with fresh state" in result.stdout
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [201, 202] and (out / "lora_ema.safetensors").exists()


def test_a_crepa_block_the_model_does_not_have_is_one_sentence(demo_run, tmp_path):
    result = run_in_process(demo_run[0], "train.py", DEMO_CONFIG, *CREPA, "--crepa_block_index=2",
                            "--max_train_steps=1", f"--output_dir={tmp_path}", expect=1)
    assert "crepa_block_index = 2, but the transformer has 2 blocks (0 to 1)" in result.stderr
    assert "Traceback" not in result.stderr
