"""Low-rank adapters on the frozen transformer, and LoRA files that ComfyUI and diffusers load unchanged.

Owns: `LoRALinear` (y = W x + b + (alpha / r) · B A dropout(x), B zero-initialised so training starts
from the base model exactly), `inject` by module-name suffix, writing a LoRA file in one of
three layouts (universal by default: one file for ComfyUI and diffusers), reading any common layout
(`apply_file`), and the exact adapter state a checkpoint resumes from.
Does not: depend on train.py or model.py, or know about quantization (a quantized base layer runs its own
forward; see LoRALinear); it knows LTX-Video's module names only where ComfyUI spells them differently
(COMFYUI_NAMES).
"""

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRAError(Exception):
    """A LoRA file or target list that does not fit (not safetensors, other targets or rank): one sentence."""


# Every attention projection and feed-forward linear of every block, so a LoRA trains every component.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


class LoRALinear(nn.Linear):
    """A frozen linear layer plus lora_A [r, in] (kaiming-uniform) and lora_B [out, r] (zeros), kept in fp32 (the
    master copy) unless `dtype` says otherwise (adamw_bf16 trains them in bf16).

    A plain base (its weight an ordinary Parameter) lends its weight and bias Parameters (same names, nothing
    copied) and base and adapter run fused in LoRAFunction. A base whose weight is stored in another form (quant.py's
    int8 / fp8 / nf4 layers) is kept whole as `base` and runs its own forward; autograd takes its input gradient
    through that layer's own backward, and the adapter's is added to it. Either way only lora_A / lora_B train."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, dtype=torch.float32):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        if type(base.weight) is nn.Parameter:
            self.weight, self.bias = base.weight, base.bias
            self.base = None
        else:
            self.base = base
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One compute dtype for base and adapter: autocast's if it is on, else the base weight's (the input's over
        # a stored-in-another-form weight). The adapter weights are cast (r-wide, cheap); activations never are.
        dtype = (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
                 else x.dtype if self.base is not None else self.weight.dtype)
        dropped = self.dropout(x) if self.training and self.dropout.p > 0 else None
        if self.base is not None:
            y = self.base(x)
            with torch.autocast(x.device.type, enabled=False):
                h = F.linear((x if dropped is None else dropped).to(dtype), self.lora_A.weight.to(dtype))
                return y + self.scale * F.linear(h, self.lora_B.weight.to(dtype))
        with torch.autocast(x.device.type, enabled=False):
            cast = [t if t is None else t.to(dtype) for t in (x, self.weight, self.bias, self.lora_A.weight,
                                                              self.lora_B.weight, dropped)]
            return LoRAFunction.apply(*cast[:5], self.scale, cast[5])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_A.out_features}"


class LoRAFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s · (x' Aᵀ) Bᵀ, with x' = dropout(x) (x itself when dropout is off), and its backward:

        h = x' Aᵀ                  [N, r]   kept from the forward (r-wide: small)
        u = s · (g B)              [N, r]   g = dL/dy
        dL/dx  = g W (+ u A, here when x' is x; else returned as dL/dx' for dropout's backward)
        dL/dA  = uᵀ x'             dL/dB = s · gᵀ h

    Written out (rather than left to autograd over four ops) so the adapter's product lands in the base
    output inside one GEMM (addmm, beta 1, alpha s) and its input gradient inside another: no separate
    pass to scale the LoRA output, add it, scale g, or sum the two input gradients.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale: float, dropped):
        x_lora = x if dropped is None else dropped
        y = F.linear(x, weight, bias)
        h = x_lora.reshape(-1, x.shape[-1]) @ a.t()
        y.view(-1, y.shape[-1]).addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x, weight, a, b, h, dropped)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, a, b, h, dropped = ctx.saved_tensors
        s, need = ctx.scale, ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        x2 = (x if dropped is None else dropped).reshape(-1, x.shape[-1])
        u = (g2 @ b).mul_(s)
        grad_x = grad_dropped = grad_w = grad_bias = None
        if need[0]:
            grad_x = input_gradient(g2, weight)
            if dropped is None:
                grad_x.addmm_(u, a)
            grad_x = grad_x.view(x.shape)
        if need[6]:
            grad_dropped = (u @ a).view(x.shape)
        if need[1]:  # a base weight that trains (never in this trainer: inject freezes the model)
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])
        if need[2]:
            grad_bias = g2.sum(0)
        grad_a = u.t() @ x2 if need[3] else None
        grad_b = (g2.t() @ h).mul_(s) if need[4] else None
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, grad_dropped


def input_gradient(g: torch.Tensor, weight: torch.Tensor, rows: int = 128) -> torch.Tensor:
    """g W, the frozen layer's input gradient: the step's biggest backward GEMM. On a CPU without native bf16
    (no AVX512-BF16 / AMX) torch's bf16 GEMM takes a ~10x slower path when both operands are row-major (measured on
    2 AMD EPYC cores: 2.2 s vs 0.23 s for 1024x2048 @ 2048x512); a column-major copy of g avoids it, made `rows`
    rows at a time so the copy adds almost nothing to the step's peak memory."""
    if g.device.type != "cpu" or g.dtype != torch.bfloat16:
        return g @ weight
    out = g.new_empty(g.shape[0], weight.shape[1])
    for i in range(0, g.shape[0], rows):
        torch.mm(g[i:i + rows].t().contiguous().t(), weight, out=out[i:i + rows])
    return out


def matches(name: str, targets: list[str] | tuple[str, ...]) -> bool:
    """PEFT's rule: a target names a module if it equals the full name or a dotted suffix of it."""
    return any(name == t or name.endswith("." + t) for t in targets)


def inject(model: nn.Module, targets=DEFAULT_TARGETS, rank: int = 16, alpha: float | None = None,
           dropout: float = 0.0, dtype=torch.float32) -> list[str]:
    """Freezes `model` and replaces every matching nn.Linear (plain or quantized) by a LoRALinear with adapters in
    `dtype`; returns the names wrapped."""
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches(n, targets)]
    if not names:
        raise LoRAError(f"lora_target_modules {list(targets)} matched no nn.Linear in the model")
    for name in names:
        wrap(model, name, rank, alpha or rank, dropout, dtype)
    return names


def wrap(model: nn.Module, name: str, rank: int, alpha: float, dropout: float = 0.0, dtype=torch.float32) -> LoRALinear:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    layer = LoRALinear(getattr(parent, child), rank, alpha, dropout, dtype)
    setattr(parent, child, layer)
    return layer


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


# -----------------------------------------------------------------------------
# Files. The same adapters spelled three ways (`lora_format`); what each tool reads was measured (README):
#   universal  diffusion_model.<name>.lora_A/B.weight, alpha / r folded into lora_B, no .alpha tensors.
#              ComfyUI applies scale 1 when a file has no .alpha (it ignores metadata); diffusers strips
#              `diffusion_model.`, refuses .alpha tensors and assumes alpha = r: both apply what was trained.
#   diffusers  transformer.<name>.lora_A/B.weight, alpha in the metadata diffusers reads.
#   comfyui    diffusion_model.<ComfyUI name>.lora_A/B.weight and a .alpha tensor per module (kohya's rule).

FORMATS = ("universal", "diffusers", "comfyui")
# LTX-Video's original module names (Lightricks' checkpoints, ComfyUI) where diffusers renamed the module
COMFYUI_NAMES = {"proj_in": "patchify_proj", "time_embed": "adaln_single"}
# how a key names its tensor: lora_A / lora_down is A [r, in], lora_B / lora_up is B [out, r]
PARTS = {".lora_A.weight": "A", ".lora_down.weight": "A", ".lora_B.weight": "B", ".lora_up.weight": "B",
         ".alpha": "alpha"}
PREFIXES = ("transformer.", "diffusion_model.")  # kohya's lora_unet_ names are resolved against the model


def comfyui_name(name: str) -> str:
    head, dot, rest = name.partition(".")
    return COMFYUI_NAMES.get(head, head) + dot + rest


def renamed_in_comfyui(names) -> list[str]:
    """Adapted modules that ComfyUI and diffusers call differently: no single file can name them for both."""
    return [n for n in names if comfyui_name(n) != n]


def file_tensors(model: nn.Module, fmt: str = "universal") -> dict[str, torch.Tensor]:
    tensors = {}
    for name, layer in lora_layers(model).items():
        a, b = (getattr(layer, f"lora_{ab}").weight.detach().float().cpu() for ab in "AB")
        key = f"transformer.{name}" if fmt == "diffusers" else f"diffusion_model.{comfyui_name(name)}"
        tensors[f"{key}.lora_A.weight"] = a.contiguous()
        tensors[f"{key}.lora_B.weight"] = (b * layer.scale if fmt == "universal" else b).contiguous()
        if fmt == "comfyui":
            tensors[f"{key}.alpha"] = torch.tensor(layer.scale * a.shape[0])
    return tensors


def save_lora(model: nn.Module, path, info: dict | None = None, fmt: str = "universal") -> None:
    """Writes the adapters as safetensors in `fmt` (see FORMATS above).

    `lora_adapter_metadata` tells diffusers rank and alpha (alpha = r in the universal form, whose B already
    carries the scale); `ltx_lora` records the trained rank and alpha and the format, for humans and our tools.
    """
    from safetensors.torch import save_file
    if fmt not in FORMATS:
        raise LoRAError(f"lora_format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    layers = lora_layers(model)
    if fmt == "universal" and renamed_in_comfyui(layers):
        raise LoRAError(universal_refusal(renamed_in_comfyui(layers)))
    first = next(iter(layers.values()))
    rank, alpha = first.lora_A.out_features, first.scale * first.lora_A.out_features
    metadata = {
        "lora_adapter_metadata": json.dumps({"transformer.r": rank,
                                             "transformer.lora_alpha": rank if fmt == "universal" else alpha,
                                             "transformer.target_modules": sorted(layers)}),
        "ltx_lora": json.dumps({"rank": rank, "alpha": alpha, "format": fmt,
                                **({"alpha_folded_into_lora_B": True} if fmt == "universal" else {}), **(info or {})}),
    }
    tmp = f"{path}.tmp"  # renamed when complete: a kill mid-write never leaves a truncated LoRA behind
    save_file(file_tensors(model, fmt), tmp, metadata=metadata)
    os.replace(tmp, path)


def universal_refusal(names: list[str]) -> str:
    return (f"lora_target_modules adapt {', '.join(names[:3])}, which ComfyUI calls "
            f"{', '.join(comfyui_name(n) for n in names[:3])}: no single file names it for both ComfyUI and diffusers; "
            f"set lora_format = \"comfyui\" or \"diffusers\" for the tool you will use, or leave it out of the targets")


def read_lora_file(path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name as the file spells it: (A [r, in], B [out, r], scale)} from any common LoRA layout:
    `transformer.` / `diffusion_model.` / bare / kohya `lora_unet_` names, lora_A/B or lora_down/up, and
    alpha from a per-module `.alpha` tensor, else from diffusers' metadata, else alpha = r (scale 1)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:  # not safetensors at all, or cut short
        raise LoRAError(f"{path} is not a complete safetensors file ({e})")
    except FileNotFoundError:
        raise LoRAError(f"LoRA file {path} does not exist")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in PARTS if key.endswith(s)), None)
        if suffix is None:
            raise LoRAError(f"{path}: tensor {key!r} is not a LoRA weight (expected names ending in "
                            f"{', '.join(PARTS)}); LoKr, LoHa and DoRA files are not supported")
        name = key[:-len(suffix)]
        name = next((name[len(p):] for p in PREFIXES if name.startswith(p)), name)
        if PARTS[suffix] in parts.setdefault(name, {}):
            raise LoRAError(f"{path}: {key!r} and another key both name {name}'s {PARTS[suffix]}")
        parts[name][PARTS[suffix]] = value
    if not parts:
        raise LoRAError(f"{path} holds no tensors")
    try:
        diffusers_meta = json.loads(meta.get("lora_adapter_metadata", "{}"))
    except ValueError:  # not JSON
        diffusers_meta = None
    if not isinstance(diffusers_meta, dict):
        raise LoRAError(f"{path}: its lora_adapter_metadata is not the JSON object diffusers writes")
    diffusers_alpha = diffusers_meta.get("transformer.lora_alpha")
    adapters = {}
    for name, found in parts.items():
        a, b = found.get("A"), found.get("B")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise LoRAError(f"{path}: {name} needs a down [r, in] and an up [out, r] matrix, the file has "
                            f"{ {k: tuple(v.shape) for k, v in found.items()} }")
        rank = a.shape[0]
        alpha = found["alpha"].item() if "alpha" in found else diffusers_alpha or rank
        adapters[name] = (a.float(), b.float(), alpha / rank)
    return adapters


def resolve_names(path, names, model: nn.Module) -> dict[str, str]:
    """The model's linear layer for each module name of a file: ours (= diffusers'), ComfyUI's, or either written
    the kohya way (lora_unet_transformer_blocks_0_attn1_to_q). A name that matches none is an error naming it."""
    spellings = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            for spelled in (n, comfyui_name(n)):
                spellings[spelled] = spellings["lora_unet_" + spelled.replace(".", "_")] = n
    unknown = [n for n in names if n not in spellings]
    if unknown:
        raise LoRAError(f"{path}: {len(unknown)} adapter(s) name no linear layer of this model, e.g. {unknown[0]!r} "
                        f"(a LoRA for another model, or another LTX version?)")
    resolved = {n: spellings[n] for n in names}
    twice = [n for n in names if list(resolved.values()).count(resolved[n]) > 1]
    if twice:
        raise LoRAError(f"{path}: {' and '.join(repr(n) for n in twice[:2])} both name {resolved[twice[0]]}")
    return resolved


@torch.no_grad()
def apply_file(model: nn.Module, path, scale: float = 1.0) -> list[str]:
    """Injects adapters where a LoRA file has them (their own ranks and alphas, any layout read_lora_file
    reads, trained here or elsewhere), loads them, and multiplies their effect by `scale`."""
    adapters = read_lora_file(path)
    names = resolve_names(path, adapters, model)
    model.requires_grad_(False)
    for spelled, (a, b, file_scale) in adapters.items():
        layer = wrap(model, names[spelled], a.shape[0], alpha=file_scale * a.shape[0])
        if (layer.in_features, layer.out_features) != (a.shape[1], b.shape[0]):
            raise LoRAError(f"{path}: {spelled} is {a.shape[1]} -> {b.shape[0]}, the model's {names[spelled]} is "
                            f"{layer.in_features} -> {layer.out_features} (a LoRA for another model size?)")
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
        layer.scale *= scale
    return sorted(names.values())


# -----------------------------------------------------------------------------
# Training state: the adapters exactly as trained (raw B, scale apart), for bit-identical resume

def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = set(adapter_state(model))
    if set(state) != expected:
        raise LoRAError(f"the saved adapters do not fit this model's: missing {sorted(expected - set(state))[:3]}, "
                        f"unexpected {sorted(set(state) - expected)[:3]}")
    model.load_state_dict(state, strict=False)
