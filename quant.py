"""The frozen base in fewer bytes: its linear layers' weights in int8, fp8 or nf4, the LoRA in full precision.

    quantize(model, precision, names)  ->  the named nn.Linears hold quantized weights (in place, on their device)
    block_linears(transformer)         ->  which of the transformer's linears are quantized (below)
    encoder_linears(text_encoder)      ->  which of T5's
    check(precision, device, key)      ->  one sentence (SystemExit) at start-up if this machine cannot run it

Precisions (`base_model_precision`, `text_encoder_precision`):
    no_change      the weights stay in base_model_default_dtype (bf16): 2 bytes per weight
    int8-torchao   torchao Int8WeightOnlyConfig: int8 per output row, scale = max |w| / 127: ~1 byte per weight
    fp8-torchao    torchao Float8WeightOnlyConfig: float8 e4m3 per output row: ~1 byte per weight
    nf4-bnb        bitsandbytes Linear4bit NF4 (4-bit normal-float codes in blocks of 64 with an absmax each,
                   the absmaxes themselves quantized: "double quant"): ~0.52 bytes per weight
    Names other trainers use mean the same scheme here: int8-quanto -> int8-torchao, fp8-quanto -> fp8-torchao.
Activations stay in the compute dtype: every scheme is weight-only, each layer computes with its weight
dequantized (torchao and bitsandbytes fuse that into their kernels where the device has them).

Which layers. In the transformer: every linear inside transformer_blocks (attention q/k/v/out of both attentions
and the feed-forward: ~99% of its weights). proj_in, proj_out, the timestep embedding, the caption projection,
scale_shift_table and the norms stay in base_model_default_dtype: they are 1% of the bytes, and they are where
one error reaches every token of every block. In T5: every linear of every encoder block except those the model
asks to keep in full precision (transformers' _keep_in_fp32_modules: T5's `wo`); the embedding and norms stay.

LoRA wraps a quantized layer as it wraps any other (lora.py calls the layer's own forward and lets autograd take
its input gradient); the quantized weights never train: they are not Parameters that require a gradient.
torchao and bitsandbytes are imported here, lazily: a run without quantization never imports them.
"""


import torch
import torch.nn as nn

import errors
import lora

PRECISIONS = ("no_change", "int8-torchao", "fp8-torchao", "nf4-bnb")
ALIASES = {"int8-quanto": "int8-torchao", "fp8-quanto": "fp8-torchao"}  # SimpleTuner's names, the same schemes
PACKAGES = {"int8-torchao": "torchao", "fp8-torchao": "torchao", "nf4-bnb": "bitsandbytes"}  # pip install <this>


def resolve(precision: str, key: str, log=print) -> str:
    """Our name for a precision; another trainer's name is translated with one line saying so."""
    if precision in ALIASES:
        log(f"{key} = {precision}: quanto is not used here; {ALIASES[precision]} is the same weight-only scheme")
    return ALIASES.get(precision, precision)


def block_linears(transformer: nn.Module) -> list[str]:
    return [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear) and n.startswith("transformer_blocks.")]


def encoder_linears(text_encoder: nn.Module) -> list[str]:
    keep = getattr(text_encoder, "_keep_in_fp32_modules", None) or []
    return [n for n, m in text_encoder.named_modules() if isinstance(m, nn.Linear) and ".block." in f".{n}"
            and n.rpartition(".")[2] not in keep]


def quantize(model: nn.Module, precision: str, names: list[str]) -> list[str]:
    """Quantizes the named nn.Linears of `model` in place, where their weights are (so quantize_via decides the
    device), freezing them; returns the names. Each layer's full-precision weight is freed as soon as it is
    replaced, so the peak is the model plus one layer."""
    if precision == "no_change" or not names:
        return []
    model.requires_grad_(False)
    if precision == "nf4-bnb":
        for name in names:
            lora.replace(model, name, nf4_linear(model.get_submodule(name)))
        return names
    with errors.quiet_imports():
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    config = Int8WeightOnlyConfig() if precision == "int8-torchao" else Float8WeightOnlyConfig()
    chosen = set(names)
    quantize_(model, config, filter_fn=lambda module, name: name in chosen)
    return names


def nf4_linear(layer: nn.Linear) -> nn.Module:
    """bitsandbytes' 4-bit layer over `layer`'s weight, computing in the weight's dtype. Moving a Params4bit to a
    device is what quantizes it (bitsandbytes' rule), so it is "moved" to where the weight already is."""
    errors.import_quiet("bitsandbytes")
    import bitsandbytes as bnb
    weight = layer.weight
    out = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            compute_dtype=weight.dtype, quant_type="nf4", compress_statistics=True, device="meta")
    out.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    out.bias = layer.bias
    # bitsandbytes repacks the weight for its AVX512-bf16 CPU kernel on the first no-grad eval forward, asserting
    # out_features divide its block (a validation pass on a small model died there): the plain 4-bit path serves.
    out.support_avx512bf16_for_cpu = False
    return out.to(weight.device)


def check(precision: str, device: torch.device, key: str = "base_model_precision") -> None:
    """Stops the run at start-up, in one sentence naming `key` and what to use instead, when this machine cannot
    run `precision`: its package is missing, or a probe (one small linear quantized on `device`: a training forward
    with its input gradient, then a no-grad eval forward as validation runs it) fails there. Never a silent
    fallback to bf16."""
    if precision == "no_change":
        return
    package = PACKAGES[precision]
    others = " or ".join(p for p in PRECISIONS[1:] if p != precision)
    errors.need_package(package, f"{key} = {precision}", f"or use {others}, or no_change", pip="-r requirements.txt")
    probe = nn.Sequential(nn.Linear(128, 128)).to(device, torch.bfloat16)
    x = torch.randn(4, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    try:
        quantize(probe, precision, ["0"])
        probe(x).sum().backward()
        with torch.no_grad():
            probe.eval()(x.detach())
    except (RuntimeError, NotImplementedError, AssertionError) as error:  # the backend's "not on this device"
        if not errors.raised_by_library(error):
            raise  # ours: a bug, with its traceback
        raise SystemExit(f"{key} = {precision} does not run on this machine's {device.type} "
                         f"({errors.first_line(error)}); use {others}, or no_change")
