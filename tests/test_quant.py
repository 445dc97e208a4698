"""quant.py: the frozen base in int8 / fp8 / nf4 under a full-precision LoRA, for real on the CPU (torchao and
bitsandbytes run here); what needs CUDA is marked and runs whenever a GPU is lent."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

import config
import errors
import lora
import model as ltx
import optim
import prepare
import quant
import ranks
import train
from conftest import DEMO_CONFIG, REPO, read_log, run_in_process, tiny_diffusers_transformer

QUANTIZED = ("int8-torchao", "fp8-torchao", "nf4-bnb")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def ours(layers: int = 2, dtype=torch.bfloat16) -> ltx.LTXTransformer:
    ref = tiny_diffusers_transformer(layers=layers)
    m = ltx.LTXTransformer(ltx.config_from_json(dict(ref.config)))
    m.load_state_dict(ref.state_dict())
    return m.to(dtype)


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The weight a quantized layer computes with, as a plain tensor."""
    w = layer.weight
    if hasattr(w, "quant_state"):  # bitsandbytes
        import bitsandbytes as bnb
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return w.dequantize()


def stored(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen tensor as stored (a quantized weight by its parts), copied."""
    out = {}
    for name, t in model.state_dict().items():
        if ".lora_" in name:
            continue
        parts = {a: getattr(t, a) for a in t.__tensor_flatten__()[0]} if hasattr(t, "__tensor_flatten__") else {"": t}
        out.update({f"{name}.{a}": p.detach().clone() for a, p in parts.items()})
    return out


@pytest.mark.parametrize("precision", QUANTIZED)
def test_the_block_linears_are_quantized_and_nothing_else(precision):
    m = ours()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    names = quant.quantize(m, precision, quant.block_linears(m))
    linears = [n for n, x in m.named_modules() if isinstance(x, nn.Linear)]
    assert names == [n for n in linears if n.startswith("transformer_blocks.")] and len(names) == 2 * 10
    for n in linears:  # proj_in, proj_out, the time embedding and caption projection stay as they were
        kept = type(m.get_submodule(n).weight) is nn.Parameter
        assert kept == (n not in names), n
        if kept:
            assert torch.equal(m.get_submodule(n).weight, before[n + ".weight"])
    assert torch.equal(m.scale_shift_table, before["scale_shift_table"])
    assert not any(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("precision", QUANTIZED)
def test_t5_quantized_keeps_what_transformers_keeps_in_fp32_and_encodes_alike(tiny_pipeline_dir, precision):
    tokenizer, encoder = ltx.load_text_encoder(str(tiny_pipeline_dir), torch.float32)
    names = quant.encoder_linears(encoder)
    assert names and all(".block." in f".{n}" and not n.endswith(".wo") for n in names)
    assert any(n.endswith(".wo") for n, x in encoder.named_modules() if isinstance(x, nn.Linear))
    prompts = ["a red circle moving left", "a blue square"]
    reference = ltx.encode_prompts(tokenizer, encoder, prompts)[0]
    quant.quantize(encoder, precision, names)
    assert type(encoder.encoder.block[0].layer[1].DenseReluDense.wo.weight) is nn.Parameter
    assert type(encoder.encoder.block[0].layer[0].SelfAttention.q.weight) is not nn.Parameter
    error = (ltx.encode_prompts(tokenizer, encoder, prompts)[0] - reference).norm() / reference.norm()
    assert 0 < error < TOLERANCE["t5"][precision]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("precision", QUANTIZED)
def test_lora_over_a_quantized_layer_is_lora_over_its_dequantized_weight(precision, dtype, tolerance):
    """The output and every gradient (input, lora_A, lora_B) equal those of the same LoRA over a plain layer holding
    the weight the quantized one computes with; nothing but the adapters gets a gradient."""
    torch.manual_seed(0)
    quantized = nn.Sequential(nn.Linear(64, 96)).to(dtype)
    quant.quantize(quantized, precision, ["0"])
    plain = nn.Sequential(nn.Linear(64, 96)).to(dtype)
    with torch.no_grad():
        plain[0].weight.copy_(dequantized(quantized[0]))
        plain[0].bias.copy_(quantized[0].bias)
    results = []
    for m in (quantized, plain):
        lora.inject(m, ["0"], rank=4, alpha=8)
        torch.manual_seed(1)
        nn.init.normal_(m[0].lora_A.weight)
        nn.init.normal_(m[0].lora_B.weight)
        x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
        y = m(x)
        (y.float() * torch.linspace(-1, 1, 96)).sum().backward()
        results.append([y.float(), x.grad.float(), m[0].lora_A.weight.grad, m[0].lora_B.weight.grad])
        assert [n for n, p in m.named_parameters() if p.grad is not None] == ["0.lora_A.weight", "0.lora_B.weight"]
    for a, b in zip(*results):
        assert (a - b).norm() <= tolerance * b.norm()


# ||y_q - y_bf16|| / ||y_bf16|| below these (README's table gives the measured errors; the tiny models' layers
# are 16-32 wide, where a 4-bit block of 64 spans whole rows, so they err more than real widths)
TOLERANCE = {"tiny": {"int8-torchao": 0.01, "fp8-torchao": 0.02, "nf4-bnb": 0.07},
             "medium": {"int8-torchao": 0.01, "fp8-torchao": 0.04, "nf4-bnb": 0.1},
             "t5": {"int8-torchao": 0.015, "fp8-torchao": 0.07, "nf4-bnb": 0.2}}


def random_model(size: str) -> ltx.LTXTransformer:
    """The tiny test model, or bench.py's medium preset's shape (4 blocks, 8x64 heads, 4096-wide captions)."""
    if size == "tiny":
        return ours()
    torch.manual_seed(0)
    return ltx.LTXTransformer(ltx.TransformerConfig(in_channels=128, out_channels=128, num_attention_heads=8,
                                                    attention_head_dim=64, cross_attention_dim=512, num_layers=4,
                                                    caption_channels=4096)).to(torch.bfloat16)


@pytest.mark.parametrize("size", ["tiny", "medium"])
@pytest.mark.parametrize("precision", QUANTIZED)
def test_a_quantized_model_stays_close_to_bf16(precision, size):
    """A whole forward of the quantized model against the bf16 one, relative error below the stated tolerance."""
    m = random_model(size)
    gen = torch.Generator().manual_seed(2)
    grid = (2, 3, 4) if size == "tiny" else (2, 8, 8)
    tokens = grid[0] * grid[1] * grid[2]
    x = torch.randn(1, tokens, m.proj_in.in_features, generator=gen).bfloat16()
    text = torch.randn(1, 6, m.caption_projection.linear_1.in_features, generator=gen).bfloat16()
    args = (x, text, torch.tensor([400.0]), torch.ones(1, 6, dtype=torch.bool), *grid, (8 / 25, 32, 32))
    with torch.no_grad():
        reference = m(*args).float()
        quant.quantize(m, precision, quant.block_linears(m))
        error = ((m(*args).float() - reference).norm() / reference.norm()).item()
    assert 0 < error < TOLERANCE[size][precision]


@pytest.mark.parametrize("precision", ["int8-torchao", "nf4-bnb"])
def test_compiled_blocks_over_a_quantized_base_equal_eager(precision):
    """compile = true over a quantized base: every block compiles with fullgraph=True (no graph break in torchao's or
    bitsandbytes' layers) and gives eager's output and LoRA gradients. (fp8-torchao too, checked by hand: ~30 s.)"""
    m = ours(dtype=torch.float32)
    quant.quantize(m, precision, quant.block_linears(m))
    lora.inject(m, rank=4, alpha=4)
    for layer in lora.lora_layers(m).values():
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    gen = torch.Generator().manual_seed(2)
    args = (torch.randn(1, 24, 8, generator=gen), torch.randn(1, 6, 12, generator=gen), torch.tensor([400.0]),
            torch.ones(1, 6, dtype=torch.bool), 2, 3, 4, (8 / 25, 32, 32))
    results = []
    for compiled in (False, True):
        if compiled:
            ltx.compile_blocks(m)
        y = m(*args)
        y.square().mean().backward()
        results.append([y.detach()] + [p.grad for p in lora.lora_parameters(m)])
        for p in lora.lora_parameters(m):
            p.grad = None
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*results))


def load(tiny_pipeline_dir, **overrides):
    cfg = config.Config(pretrained_model_name_or_path=str(tiny_pipeline_dir), lora_rank=4, learning_rate=1e-2,
                        mixed_precision="no", base_model_default_dtype="fp32", **overrides)
    return cfg, prepare.load_model(cfg, torch.device("cpu"))


def train_steps(transformer, cfg, steps: int = 3) -> list[float]:
    gen = torch.Generator().manual_seed(4)
    batch = {"latents": torch.randn(2, 8, 2, 3, 4, generator=gen), "prompt_embeds": torch.randn(2, 6, 16, generator=gen),
             "prompt_attention_mask": torch.ones(2, 6, dtype=torch.bool), "i2v": torch.zeros(2, dtype=torch.bool)}
    empty = {"prompt_embeds": torch.zeros(6, 16), "prompt_attention_mask": torch.ones(6, dtype=torch.bool)}
    params = lora.lora_parameters(transformer)
    optimizer, scaler = optim.make_optimizer(params, cfg), torch.amp.GradScaler("cpu", enabled=False)

    def forward(flow, grid):
        return transformer(flow.x_t, flow.text, flow.timestep, flow.text_mask, *grid, (8 / 25, 32, 32))

    losses = []
    for k in range(steps):
        loss = train.micro_step(forward, batch, empty, cfg, [train.example_seed(0, 0, j) for j in range(2)], scaler).flow
        assert not any(p.grad is not None for n, p in transformer.named_parameters() if ".lora_" not in n)
        losses.append(train.optimizer_step(params, optimizer, scaler, loss, cfg, ranks.Dist())[0])
    return losses


@pytest.mark.parametrize("precision", QUANTIZED)
def test_training_moves_the_adapters_and_never_the_quantized_base(tiny_pipeline_dir, precision):
    cfg, transformer = load(tiny_pipeline_dir, base_model_precision=precision)
    assert all(type(layer.base.weight) is not nn.Parameter for layer in lora.lora_layers(transformer).values())
    base, adapters = stored(transformer), copy.deepcopy(lora.adapter_state(transformer))
    losses = train_steps(transformer, cfg, steps=5)
    assert losses[-1] < losses[0]
    after = stored(transformer)
    assert base.keys() == after.keys() and all(torch.equal(base[k], after[k]) for k in base)
    assert any(not torch.equal(v, lora.adapter_state(transformer)[k]) for k, v in adapters.items())


@pytest.mark.parametrize("precision", ("no_change",) + QUANTIZED)
def test_each_precision_trains_the_demo_and_writes_the_same_lora_file(demo_run, tmp_path, precision):
    """The LoRA learns over every base (the demo's loss falls over 40 steps) and renders its validation video, T5
    (quantized too) encoding the new prompt; the file has the same keys, shapes and dtypes whatever the base, and
    records the precision it was trained against."""
    from safetensors import safe_open
    cwd, _ = demo_run
    out = tmp_path / precision
    run_in_process(cwd, "train.py", DEMO_CONFIG, "--max_train_steps=40", "--checkpoint_step_interval=0",
                   f"--validation_prompt=a {precision} circle", f"--output_dir={out}",  # a new prompt: T5 runs
                   f"--base_model_precision={precision}", f"--text_encoder_precision={precision}", "--lr_warmup_steps=5")
    losses = [r["loss"] for r in read_log(out / "log.jsonl")]
    assert sum(losses[-10:]) < sum(losses[:10])
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        layout = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
        recorded = f.metadata()["ltx_lora"]
    with safe_open(str(cwd / "output/demo/lora.safetensors"), "pt") as f:
        assert layout == {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    assert f'"base_model_precision": "{"fp32" if precision == "no_change" else precision}"' in recorded
    assert list((out / "samples/step-40").glob("*.mp4"))


def test_captions_cached_by_a_quantized_t5_are_never_read_by_a_full_precision_run(demo_run, tmp_path, monkeypatch):
    """The text cache is keyed by how T5 ran: after an int8-T5 run over the same clips, a full-precision run reads
    its own embeddings (made first, kept), never the int8 ones, and so needs no T5; a new precision is said once."""
    import shutil
    cwd, _ = demo_run
    (tmp_path / "output/demo").mkdir(parents=True)
    (tmp_path / "output/demo/tiny-ltx").symlink_to(cwd / "output/demo/tiny-ltx")
    shutil.copytree(cwd / "output/demo/clips", tmp_path / "output/demo/clips", ignore=shutil.ignore_patterns(".*"))
    short = [DEMO_CONFIG, "--max_train_steps=1", "--disable_validation=true", "--checkpoint_step_interval=0"]
    run_in_process(tmp_path, "train.py", *short, "--output_dir=plain")
    cache = tmp_path / "output/demo/clips/.ltx-cache"
    plain = {p: p.read_bytes() for p in cache.glob("text-*")}
    result = run_in_process(tmp_path, "train.py", *short, "--output_dir=int8", "--text_encoder_precision=int8-torchao")
    said = [line for line in result.stdout.splitlines() if "encoded again" in line]
    assert len(said) == 1 and said[0].startswith("16 text file(s) in output/demo/clips/.ltx-cache are encoded again") \
        and "precision 'no_change' -> 'int8-torchao'" in said[0]
    assert len(list(cache.glob("text-*"))) == 2 * len(plain) and all(p.read_bytes() == b for p, b in plain.items())

    def no_t5(*args):
        raise AssertionError("T5 was loaded")
    monkeypatch.setattr(ltx, "load_text_encoder", no_t5)
    result = run_in_process(tmp_path, "train.py", *short, "--output_dir=again")
    assert "encoded again" not in result.stdout and (tmp_path / "again/lora.safetensors").exists()


def test_other_trainers_names_are_translated_once(tmp_path, capsys):
    from conftest import write_config
    cfg = config.parse_config([write_config(tmp_path, 'output_dir = "out"'), "--base_model_precision=int8-quanto",
                               "--text_encoder_precision=fp8-quanto"])
    assert (cfg.base_model_precision, cfg.text_encoder_precision) == ("int8-torchao", "fp8-torchao")
    said = capsys.readouterr().out
    assert said.count("int8-quanto") == 1 and said.count("fp8-quanto") == 1


def test_nf4_validation_forward_runs_on_cpus_with_avx512_bf16(monkeypatch):
    """On a CPU with AVX512-bf16 bitsandbytes repacks a 4-bit weight at its first no-grad eval forward and asserts
    out_features divide 32: validation on a small model died there. That CPU is pretended here; the eval forward
    must run and equal the training forward."""
    errors.import_quiet("bitsandbytes")
    import bitsandbytes.nn.modules as bnb_modules
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 48)).to(torch.bfloat16)
    quant.quantize(layer, "nf4-bnb", ["0"])
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    trained = layer.train()(x)
    with torch.no_grad():
        evaluated = layer.eval()(x)
    assert torch.equal(trained.detach(), evaluated)
    quant.check("nf4-bnb", torch.device("cpu"))


def test_a_precision_this_machine_cannot_run_stops_in_one_sentence(monkeypatch):
    def missing(name):
        raise ImportError(f"No module named '{name}'")
    monkeypatch.setattr(errors.importlib, "import_module", missing)
    with pytest.raises(SystemExit, match=r"^base_model_precision = nf4-bnb needs the bitsandbytes package.*"
                                         r"pip install -r requirements.txt, or use int8-torchao or fp8-torchao"):
        quant.check("nf4-bnb", torch.device("cpu"))
    monkeypatch.undo()

    def unsupported(*args):
        raise NotImplementedError("no float8 kernel for this GPU\nmore detail")
    monkeypatch.setattr(quant, "quantize", unsupported)
    with pytest.raises(SystemExit, match=r"^text_encoder_precision = fp8-torchao does not run on this machine's cpu "
                                         r"\(no float8 kernel for this GPU\); use int8-torchao or nf4-bnb, or no_change$"):
        quant.check("fp8-torchao", torch.device("cpu"), "text_encoder_precision")
    monkeypatch.undo()
    for precision in QUANTIZED:  # and on this CPU every one runs
        quant.check(precision, torch.device("cpu"))


@pytest.mark.parametrize("change,said", [
    ("--base_model_precision=nf4-bnb", "base_model_precision: 'no_change' -> 'nf4-bnb'"),
    ("--optimizer=optimi-lion", "the checkpoint was trained with optimizer = adamw; the LoRA continues from it, and "
                                "optimi-lion starts with fresh state"),
])
def test_resuming_over_another_precision_or_optimizer_is_allowed_and_said(demo_run, tmp_path, change, said):
    cwd, _ = demo_run
    common = [DEMO_CONFIG, "--checkpoint_step_interval=2", "--disable_validation=true", f"--output_dir={tmp_path}"]
    run_in_process(cwd, "train.py", *common, "--max_train_steps=2")
    result = run_in_process(cwd, "train.py", *common, "--max_train_steps=4", "--resume_from_checkpoint=latest", change)
    assert said in result.stdout and "resumed from" in result.stdout
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2, 3, 4]


@cuda
@pytest.mark.parametrize("via", ["cpu", "accelerator"])
@pytest.mark.parametrize("precision", QUANTIZED)
def test_cuda_quantized_training(tiny_pipeline_dir, precision, via):
    """On a GPU: quantized where quantize_via says, moved, trained in bf16 autocast; the base never changes."""
    cfg = config.Config(pretrained_model_name_or_path=str(tiny_pipeline_dir), lora_rank=4, learning_rate=1e-2,
                        base_model_precision=precision, quantize_via=via)
    transformer = prepare.load_model(cfg, torch.device("cuda"))
    base = stored(transformer)
    gen = torch.Generator().manual_seed(4)
    batch = {"latents": torch.randn(2, 8, 2, 3, 4, generator=gen).cuda(),
             "prompt_embeds": torch.randn(2, 6, 16, generator=gen).cuda(),
             "prompt_attention_mask": torch.ones(2, 6, dtype=torch.bool, device="cuda"),
             "i2v": torch.zeros(2, dtype=torch.bool)}
    empty = {"prompt_embeds": torch.zeros(6, 16), "prompt_attention_mask": torch.ones(6, dtype=torch.bool)}
    params = lora.lora_parameters(transformer)
    optimizer, scaler = optim.make_optimizer(params, cfg), torch.amp.GradScaler("cuda", enabled=False)
    losses = []
    for _ in range(5):
        loss = train.micro_step(lambda flow, grid: transformer(flow.x_t, flow.text, flow.timestep, flow.text_mask,
                                                               *grid, (8 / 25, 32, 32)),
                                batch, empty, cfg, [1, 2], scaler).flow
        losses.append(train.optimizer_step(params, optimizer, scaler, loss, cfg, ranks.Dist())[0])
    assert losses[-1] < losses[0]
    after = stored(transformer)
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_the_low_vram_config_is_the_lowest_setting_and_runs(demo_folder):
    """configs/low-vram.toml as documented (nf4 base and T5, 8-bit paged Lion, ~480x480 px, 125 frames, rank 16,
    batch 1, gradient checkpointing, group offload), then run for real on the demo's tiny model and clips: only the model, the data
    and the length are swapped on the command line."""
    low = str(REPO / "configs/low-vram.toml")
    cfg = config.parse_config([low])
    assert (cfg.base_model_precision, cfg.text_encoder_precision, cfg.optimizer) == ("nf4-bnb", "nf4-bnb",
                                                                                     "bnb-lion8bit-paged")
    assert (cfg.lora_rank, cfg.train_batch_size, cfg.gradient_checkpointing, cfg.quantize_via) == (16, 1, True, "cpu")
    assert cfg.enable_group_offload and cfg.group_offload_use_stream and not cfg.group_offload_to_disk_path
    clips = config.dataset_entries(cfg, log=lambda message: None)[0][0]
    assert (clips.resolution, clips.resolution_type, clips.num_frames) == (480, "pixel_area", 125)
    backend = demo_folder / "backend.json"
    backend.write_text(json.dumps([{"id": "shapes", "instance_data_dir": "output/demo/clips", "resolution": 96,
                                    "resolution_type": "pixel", "video": {"num_frames": 25}}]))
    run_in_process(demo_folder, "train.py", low, "--demo=true", "--pretrained_model_name_or_path=output/demo/tiny-ltx",
                   f"--data_backend_config={backend}", "--max_train_steps=3", "--gradient_accumulation_steps=1",
                   "--validation_resolution=128x96", "--validation_num_frames=9", "--validation_num_inference_steps=2",
                   "--output_dir=out", "--resume_from_checkpoint=")
    log = read_log(demo_folder / "out/log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    assert list((demo_folder / "out/samples/step-3").glob("*.mp4")) and (demo_folder / "out/lora.safetensors").exists()


def test_only_a_backends_failure_becomes_a_start_up_sentence():
    """A start-up probe turns a library's error into one sentence; one raised in the trainer's own modules is a bug
    and keeps its traceback."""
    with pytest.raises(ValueError) as ours_:
        config.parse_resolutions("not a size")
    with pytest.raises(RuntimeError) as torch_:
        torch.ones(2, 3) @ torch.ones(2, 3)
    assert not errors.raised_by_library(ours_.value) and errors.raised_by_library(torch_.value)
