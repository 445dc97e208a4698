"""offload.py: a step with the blocks' frozen weights offloaded is the same step, bit for bit; on the CPU through the
memory-mapped disk path (what CI can run), on a GPU with and without streams (marked: runs whenever one is lent)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import config
import lora
import model as ltx
import offload
import optim
import quant
import ranks
import train
from conftest import DEMO_CONFIG, REPO, read_log, run_in_process, tiny_diffusers_transformer, write_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def lora_model(precision: str = "no_change", layers: int = 4) -> ltx.LTXTransformer:
    ref = tiny_diffusers_transformer(layers=layers)
    m = ltx.LTXTransformer(ltx.config_from_json(dict(ref.config)))
    m.load_state_dict(ref.state_dict())
    quant.quantize(m, precision, quant.block_linears(m))
    lora.inject(m, rank=4, alpha=4)
    torch.manual_seed(1)
    for layer in lora.lora_layers(m).values():
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    m.gradient_checkpointing = True
    return m


def steps(m: ltx.LTXTransformer, device: torch.device, n: int = 2) -> list:
    """n optimizer steps of train.py's own step on an i2v batch (first latent frame clean, timestep 0, out of
    the loss); returns each step's loss and LoRA gradients."""
    gen = torch.Generator().manual_seed(4)
    batch = {"latents": torch.randn(2, 8, 2, 3, 4, generator=gen).to(device),
             "prompt_embeds": torch.randn(2, 6, 12, generator=gen).to(device),
             "prompt_attention_mask": torch.ones(2, 6, dtype=torch.bool, device=device),
             "i2v": torch.ones(2, dtype=torch.bool)}
    empty = {"prompt_embeds": torch.zeros(6, 12), "prompt_attention_mask": torch.ones(6, dtype=torch.bool)}
    cfg = config.Config(mixed_precision="no", base_model_default_dtype="fp32", learning_rate=1e-2)
    params = lora.lora_parameters(m)
    optimizer, scaler = optim.make_optimizer(params, cfg), torch.amp.GradScaler(device.type, enabled=False)

    def forward(flow, grid):
        return m(flow.x_t, flow.text, flow.timestep, flow.text_mask, *grid, (8 / 25, 32, 32))

    out = []
    for k in range(n):
        loss = train.micro_step(forward, batch, empty, cfg, [train.example_seed(0, k, j) for j in range(2)], scaler).flow
        grads = [p.grad.clone() for p in params]
        train.optimizer_step(params, optimizer, scaler, loss, cfg, ranks.Dist())
        out.append((loss, grads))
    return out


def identical(a: list, b: list) -> bool:
    return all(torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(ga, gb)) for (la, ga), (lb, gb) in zip(a, b))


@pytest.mark.parametrize("precision,disk", [("no_change", True), ("int8-torchao", False), ("nf4-bnb", False)])
@pytest.mark.parametrize("blocks_per_group,interval", [(1, 1), (2, 1), (1, 2)])
def test_a_step_with_offload_is_bit_identical(tmp_path, precision, disk, blocks_per_group, interval):
    """Loss and every LoRA gradient, two optimizer steps, i2v, gradient checkpointing (every block, or every 2nd):
    equal to the bit with and without offload; quantized weights offloaded as they are stored."""
    cpu = torch.device("cpu")
    plain, offloaded = lora_model(precision), lora_model(precision)
    for m in (plain, offloaded):
        m.checkpointing_interval = interval
    offload.offload_blocks(offloaded, cpu, blocks_per_group, use_stream=True, disk_path=str(tmp_path) if disk else "")
    assert identical(steps(plain, cpu), steps(offloaded, cpu))
    if disk:  # the blocks' frozen weights are the memory-mapped file's, between forwards as during them
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"group-{g}.safetensors" for g in
                                                              range(4 // blocks_per_group)]
        for name, p in offloaded.transformer_blocks.named_parameters():
            assert isinstance(p, nn.Parameter) and (p.requires_grad == (".lora_" in name))


def test_each_block_runs_on_the_device_copies_and_points_back_at_the_stored_weights_after(monkeypatch):
    """The whole memory saving: after a block runs (forward, and backward's recompute) its frozen weights are the
    off-device tensors again, so nothing holds the device copies but autograd. On the CPU a copy to the CPU is the
    tensor itself, so the copies are made distinct objects here to tell them apart."""
    m = lora_model()
    o = offload.offload_blocks(m, torch.device("cpu"), 1, use_stream=False)
    fetch = o.fetch

    def distinct_copies(g):
        new = g not in o.on_device
        fetch(g)
        if new:
            copies, event = o.on_device[g]
            o.on_device[g] = ({k: t.detach().clone() for k, t in copies.items()}, event)
    monkeypatch.setattr(o, "fetch", distinct_copies)
    seen = []
    for i, block in enumerate(m.transformer_blocks):
        def stored(module, i=i):
            return [t is o.stored[i][f"{i}.{n}"] for n, t in offload.frozen_tensors(module).items()]
        block.register_forward_pre_hook(lambda module, args, i=i, stored=stored: seen.append(("in", i, stored(module))))
        block.register_forward_hook(lambda module, args, out, i=i, stored=stored: seen.append(("after", i,
                                                                                              stored(module))))
    assert identical(steps(lora_model(), torch.device("cpu"), n=1), steps(m, torch.device("cpu"), n=1))
    order = [0, 1, 2, 3, 2, 1, 0]  # the forward, then backward's recompute (the last block's activations are kept)
    assert [(where, i) for where, i, _ in seen] == [(w, i) for i in order for w in ("in", "after")]
    assert all(not any(flags) for where, _, flags in seen if where == "in")  # running: on the copies
    assert all(all(flags) for where, _, flags in seen if where == "after")  # done: the stored weights again


def test_only_the_blocks_frozen_weights_leave(tmp_path):
    m = lora_model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    files = offload.offload_blocks(m, torch.device("cpu"), 1, True, str(tmp_path)).stored
    names = {f"{i}.{n}" for i, block in enumerate(m.transformer_blocks) for n, p in block.named_parameters()
             if ".lora_" not in n}
    assert {k for group in files for k in group} == names
    from safetensors.torch import load_file
    on_disk = {k: v for g in range(4) for k, v in load_file(tmp_path / f"group-{g}.safetensors").items()}
    assert all(torch.equal(on_disk[f"{n.split('.')[1]}.{n.split('.', 2)[2]}"], before[n]) for n in before
               if n.startswith("transformer_blocks.") and ".lora_" not in n)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())  # the same values, wherever they live


@pytest.mark.parametrize("setting,refusal", [
    ("gradient_checkpointing = false", "enable_group_offload needs gradient_checkpointing = true"),
    ("enable_model_cpu_offload = true", "enable_group_offload and enable_model_cpu_offload are two ways"),
    ("compile = true", "enable_group_offload and compile = true do not go together yet"),
    ('base_model_precision = "nf4-bnb"\ngroup_offload_to_disk_path = "off"',
     "group_offload_to_disk_path keeps plain tensors (safetensors), not nf4-bnb weights"),
])
def test_offload_settings_that_cannot_work_are_refused(tmp_path, setting, refusal):
    with pytest.raises(SystemExit, match=re.escape(refusal)):
        config.parse_config([write_config(tmp_path, f"enable_group_offload = true\n{setting}\n")])


def test_the_disk_folder_is_the_runs_own_never_overwrites_and_goes_with_the_process(tmp_path):
    (tmp_path / "group-0.safetensors").write_text("a user's file")
    made = subprocess.run([sys.executable, "-c", f"import offload; print(offload.make_folder({str(tmp_path)!r}))"],
                          cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert made.startswith(str(tmp_path / "ltx-lora-offload-"))
    assert not Path(made).exists()  # removed when the process ended
    assert [p.name for p in tmp_path.iterdir()] == ["group-0.safetensors"]
    assert (tmp_path / "group-0.safetensors").read_text() == "a user's file"


def test_the_demo_with_offload_trains_renders_and_resumes_bit_identically(demo_run, tmp_path):
    """The demo (i2v) with offload through the disk path: its losses equal the same run's without offload, it renders
    its validation video, and a resume from its checkpoint reproduces the rest and the LoRA bit for bit."""
    from safetensors.torch import load_file
    cwd, _ = demo_run
    common = [DEMO_CONFIG, "--max_train_steps=8", "--checkpoint_step_interval=4", "--gradient_checkpointing=true",
              "--validation_step_interval=0"]
    (tmp_path / "disk").mkdir()
    with_offload = common + ["--enable_group_offload=true", f"--group_offload_to_disk_path={tmp_path / 'disk'}"]
    run_in_process(cwd, "train.py", *common, f"--output_dir={tmp_path / 'plain'}")
    said = run_in_process(cwd, "train.py", *with_offload, f"--output_dir={tmp_path / 'off'}").stdout
    assert "group_offload_use_stream is ignored" in said
    losses = [[(r["loss"], r["grad_norm"]) for r in read_log(tmp_path / name / "log.jsonl")] for name in ("plain", "off")]
    assert losses[0] == losses[1]
    assert list((tmp_path / "off/samples/step-8").glob("*.mp4"))

    (tmp_path / "resumed/checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "off/checkpoints/step-4", tmp_path / "resumed/checkpoints/step-4")
    run_in_process(cwd, "train.py", *with_offload, f"--output_dir={tmp_path / 'resumed'}",
                   "--resume_from_checkpoint=latest")
    resumed = [(r["loss"], r["grad_norm"]) for r in read_log(tmp_path / "resumed/log.jsonl")]
    assert resumed == losses[1][4:]
    a, b = load_file(tmp_path / "off/lora.safetensors"), load_file(tmp_path / "resumed/lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@cuda
@pytest.mark.parametrize("use_stream", [False, True])
@pytest.mark.parametrize("precision", ["no_change", "int8-torchao", "nf4-bnb"])
def test_cuda_offload_is_bit_identical(precision, use_stream):
    """On a GPU: the same loss and gradients as without offload (the same kernels on the same values), with and
    without the side stream, quantized weights moved as they are stored."""
    device = torch.device("cuda")
    plain = lora_model(precision).to(device)
    offloaded = lora_model(precision)
    offload.offload_blocks(offloaded, device, 1, use_stream)
    assert identical(steps(plain, device), steps(offloaded, device))


def test_model_cpu_offload_renders_the_same_video(tiny_pipeline_dir):
    """enable_model_cpu_offload: the transformer steps off while the VAE encodes the i2v image and decodes, the VAE
    while the transformer denoises; the frames are the same and each model ends where it started."""
    import sample
    folder = str(tiny_pipeline_dir)
    transformer, vae = ltx.load_transformer(folder), ltx.load_vae(folder)
    gen = torch.Generator().manual_seed(0)
    text = (torch.randn(1, 8, 16, generator=gen), torch.ones(1, 8, dtype=torch.bool))
    image = torch.rand(3, 64, 96, generator=gen) * 2 - 1
    frames = [sample.generate(transformer, vae, text, text, width=96, height=64, num_frames=9, steps=2, image=image,
                              generator=torch.Generator().manual_seed(1), model_cpu_offload=offloaded)
              for offloaded in (False, True)]
    assert torch.equal(frames[0], frames[1])
    assert next(transformer.parameters()).device.type == next(vae.parameters()).device.type == "cpu"
