"""The optimizers: each trains the demo and resumes bit-identically (the CPU is deterministic); adamw_bf16's
stochastic rounding is unbiased and keeps updates that rounding to nearest would lose."""

import shutil

import pytest
import torch

import config
import errors
import optim
from conftest import DEMO_CONFIG, read_log, run_in_process


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    x = torch.full((200_000,), 1.0 + 2 ** -9)  # a quarter of the way from 1 to bf16's next number, 1 + 2^-7
    gen = torch.Generator().manual_seed(0)
    rounded = optim.stochastic_round_bf16(x, gen)
    assert rounded.dtype == torch.bfloat16
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert abs((rounded.float() == 1.0 + 2 ** -7).float().mean().item() - 0.25) < 0.005
    negative = optim.stochastic_round_bf16(-x, gen).float()
    assert set(negative.unique().tolist()) == {-1.0, -1.0 - 2 ** -7} and abs(negative.mean() + x[0]) < 1e-4
    exact = torch.tensor([1.5, -3.0, 0.0])
    assert torch.equal(optim.stochastic_round_bf16(exact, gen).float(), exact)


def test_adamw_bf16_follows_fp32_adamw_and_keeps_updates_below_bf16_resolution():
    """Updates of 1e-4 on weights near 1, where bf16's step is 2^-8: rounding to nearest would never move them.
    Stochastic rounding moves them as fp32 AdamW does, on average, and in a few dozen steps."""
    torch.manual_seed(0)
    start = torch.ones(50_000)
    fp32 = torch.nn.Parameter(start.clone())
    bf16 = torch.nn.Parameter(start.clone().bfloat16())
    reference = torch.optim.AdamW([fp32], lr=1e-4, weight_decay=0.0)
    ours = optim.AdamWBF16([bf16], lr=1e-4, weight_decay=0.0)
    for step in range(50):
        grad = torch.randn(50_000) * 0.1 + 1.0
        fp32.grad, bf16.grad = grad.clone(), grad.clone().bfloat16()
        reference.step()
        ours.step()
    moved = 1 - fp32.detach()
    assert moved.mean() > 4e-3  # 50 steps of ~1e-4: far below the 2^-9 that rounding to nearest would need
    assert abs((1 - bf16.detach().float()).mean() - moved.mean()) < 0.03 * moved.mean()
    assert ours.state[bf16]["exp_avg"].dtype == torch.bfloat16 and ours.state[bf16]["exp_avg_sq"].dtype == torch.bfloat16


# Lion's update is the sign: a step of lr on every weight, so it takes a few times less than the AdamW family
LEARNING_RATE = {"optimi-lion": 3e-4, "bnb-lion8bit-paged": 3e-4}


@pytest.mark.parametrize("optimizer", optim.OPTIMIZERS)
def test_each_optimizer_trains_the_demo_and_resumes_bit_identically(demo_run, tmp_path, optimizer):
    from safetensors import safe_open
    from safetensors.torch import load_file
    cwd, _ = demo_run
    common = [DEMO_CONFIG, f"--optimizer={optimizer}", f"--learning_rate={LEARNING_RATE.get(optimizer, 1e-3)}",
              "--max_train_steps=30", "--lr_warmup_steps=5", "--checkpoint_step_interval=15", "--disable_validation=true"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_in_process(cwd, "train.py", *common, f"--output_dir={full}")
    losses = [r["loss"] for r in read_log(full / "log.jsonl")]
    assert sum(losses[-8:]) < sum(losses[:8]), losses

    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints/step-15", resumed / "checkpoints/step-15")
    result = run_in_process(cwd, "train.py", *common, f"--output_dir={resumed}", "--resume_from_checkpoint=latest")
    assert "resumed from" in result.stdout and "fresh state" not in result.stdout
    first, second = read_log(full / "log.jsonl")[15:], read_log(resumed / "log.jsonl")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in second] == [(r["step"], r["loss"], r["grad_norm"])
                                                                        for r in first]
    a, b = load_file(full / "lora.safetensors"), load_file(resumed / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(cwd / "output/demo/lora.safetensors"), "pt") as f:  # the file is fp32 whatever the optimizer
        assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (f.get_tensor(k).shape, torch.float32) for k in f.keys()}


def test_a_missing_optimizer_package_stops_in_one_sentence(monkeypatch):
    real = errors.importlib.import_module

    def missing(name, *args):
        if name == "optimi":
            raise ImportError("No module named 'optimi'")
        return real(name, *args)
    monkeypatch.setattr(errors.importlib, "import_module", missing)
    with pytest.raises(SystemExit, match=r"^optimizer = optimi-lion needs the torch-optimi package, which does not "
                                         r"import here \(No module named 'optimi'\); pip install -r requirements.txt, "
                                         r"or use adamw or adamw_bf16$"):
        optim.check_optimizer(config.Config(optimizer="optimi-lion"), torch.device("cpu"))
    monkeypatch.undo()
    for name in optim.OPTIMIZERS:  # every one runs on this CPU
        optim.check_optimizer(config.Config(optimizer=name), torch.device("cpu"), log=lambda message: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_cuda_optimizer_state_round_trips_exactly(name):
    """On a GPU: after a few steps, a copy restored from the saved state (torch.save, weights_only load) takes the
    next step exactly as the original does."""
    import io
    cfg = config.Config(optimizer=name, learning_rate=1e-3)
    dtype = torch.bfloat16 if name == "adamw_bf16" else torch.float32
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 4096, device="cuda", dtype=dtype)) for _ in range(2)]
    optimizer = optim.make_optimizer(params, cfg)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = optim.make_optimizer(copies, cfg)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    grads = [torch.randn_like(p) for p in params]
    for ps, opt in ((params, optimizer), (copies, restored)):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, copies))
