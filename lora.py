"""Low-rank adapters on the frozen transformer, and LoRA files that ComfyUI and diffusers load unchanged.

Owns: `LoRALinear` (y = W x + b + (alpha / r) · B A dropout(x), B zero-initialised so training starts
from the base model exactly), `inject` by module-name suffix, `LoKrLinear` and `inject_lokr` (LyCORIS' LoKr from
a LyCORIS JSON config, its math and key names), writing a LoRA file in one of
three layouts (universal by default: one file for ComfyUI and diffusers), reading any common layout
(`apply_file`), and the exact adapter state a checkpoint resumes from.
Does not: depend on train.py or model.py, or know about quantization (a quantized base layer runs its own
forward; see LoRALinear); it knows LTX-Video's module names only where ComfyUI spells them differently
(COMFYUI_NAMES).
"""

import dataclasses
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import data


class LoRAError(Exception):
    """A LoRA file or target list that does not fit (not safetensors, other targets or rank): one sentence."""


# Every attention projection and feed-forward linear of every block, so a LoRA trains every component.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


class AdaptedLinear(nn.Linear):
    """A frozen linear layer an adapter (LoRA, LoKr) is added to; only the adapter's parameters train.

    A plain base (its weight an ordinary Parameter) lends its weight and bias Parameters (same names, nothing
    copied). A base whose weight is stored in another form (quant.py's int8 / fp8 / nf4 layers) is kept whole as
    `base` and runs its own forward; autograd takes its input gradient through that layer's own backward, and the
    adapter's is added to it."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        if type(base.weight) is nn.Parameter:
            self.weight, self.bias = base.weight, base.bias
            self.base = None
        else:
            self.base = base

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """One compute dtype for base and adapter: autocast's if it is on, else the base weight's (the input's over a
        stored-in-another-form weight). The adapter weights are cast to it (small, cheap); activations never are."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype if self.base is not None else self.weight.dtype


class LoRALinear(AdaptedLinear):
    """A frozen linear layer plus lora_A [r, in] (kaiming-uniform) and lora_B [out, r] (zeros), kept in fp32 (the
    master copy) unless `dtype` says otherwise (adamw_bf16 trains them in bf16). Over a plain base, base and adapter
    run fused in LoRAFunction."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, dtype=torch.float32):
        super().__init__(base)
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype(x)
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
    return replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout, dtype))


def replace(model: nn.Module, name: str, layer: nn.Module) -> nn.Module:
    """Puts `layer` where the module `name` was; returns it."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer)
    return layer


def lora_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Every adapted layer, LoRA or LoKr."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What trains: lora_A / lora_B, or the lokr_ factors, layer by layer."""
    return [p for m in lora_layers(model).values() for n, p in m.named_parameters() if n.startswith(ADAPTER_NAMES)]


ADAPTER_NAMES = ("lora_", "lokr_")  # how an adapter's parameters are named (a base layer's never are)


# -----------------------------------------------------------------------------
# LoKr (LyCORIS' "lokr" algo, lycoris-lora 4.1): ΔW = multiplier · (alpha / dim) · kron(w1, w2), the same math,
# shapes, initialisation and parameter names as lycoris.modules.lokr.LokrModule on a Linear (tests/test_lokr.py
# compares both). out = a·b and in = c·d are split by `factorization`; w1 is [a, c] (always whole here: LyCORIS'
# decompose_both is not supported), w2 is [b, d] or w2_a [b, r] @ w2_b [r, d]. LyCORIS takes the whole w2 when
# r >= max(b, d) / 2 (or full_matrix), and with w1 and w2 both whole it sets alpha = r: the scale is then 1.

LYCORIS_KEYS = ("algo", "multiplier", "linear_dim", "linear_alpha", "factor", "full_matrix", "apply_preset",
                "conv_dim", "conv_alpha", "bypass_mode")  # conv_*: no conv in the targets; bypass: the same math
PRESET_KEYS = ("target_module", "module_algo_map")
ALGO_MAP_KEYS = ("algo", "factor")


@dataclasses.dataclass
class LoKrSpec:
    """What a LyCORIS JSON config asks of LoKr: `targets` are module class names (LyCORIS' rule: every Linear inside
    a module whose class is named so), `factors` the per-class factor that overrides `factor`."""
    dim: int = 4
    alpha: float = 1.0
    factor: int = -1
    multiplier: float = 1.0
    full_matrix: bool = False
    targets: tuple[str, ...] = ("Attention", "FeedForward")
    factors: dict = dataclasses.field(default_factory=dict)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of `dimension` into m <= n with m · n = dimension: m = factor when it divides, else m grows
    through the divisors while m + n <= 1 + dimension and m <= factor (factor < 0: no bound, so the split
    nearest the square root)."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    bound = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > 1 + dimension or new_m > bound:
            break
        m, n = new_m, new_n
    return min(m, n), max(m, n)


def lokr_shapes(out_features: int, in_features: int, factor: int, dim: int, full_matrix: bool = False):
    """((a, c), (b, d), rank of w2 or None when w2 is whole), as LokrModule picks them for a Linear."""
    a, b = factorization(out_features, factor)
    c, d = factorization(in_features, factor)
    return (a, c), (b, d), None if full_matrix or dim >= max(b, d) / 2 else dim


class LoKrLinear(AdaptedLinear):
    """A frozen linear layer plus LyCORIS' LoKr factors lokr_w1 [a, c] (kaiming-uniform) and lokr_w2 [b, d] (zeros) or
    lokr_w2_a [b, r] (kaiming-uniform) and lokr_w2_b [r, d] (zeros): ΔW starts at 0. The base is held as in LoRALinear
    (AdaptedLinear); only the lokr_ factors train. `alpha` is a
    buffer, as in LyCORIS' state dict: dim when w2 is whole (scale 1), else the config's alpha (scale alpha / r)."""

    def __init__(self, base: nn.Linear, w1_shape, w2_shape, rank: int | None, alpha: float, multiplier: float = 1.0,
                 dtype=torch.float32):
        super().__init__(base)
        if (w1_shape[0] * w2_shape[0], w1_shape[1] * w2_shape[1]) != (self.out_features, self.in_features):
            raise LoRAError(f"LoKr factors {tuple(w1_shape)} and {tuple(w2_shape)} do not make a "
                            f"{self.in_features} -> {self.out_features} layer")
        kw = dict(device=base.weight.device, dtype=dtype)
        self.lokr_w1 = nn.Parameter(torch.empty(*w1_shape, **kw))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if rank is None:
            self.lokr_w2 = nn.Parameter(torch.zeros(*w2_shape, **kw))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(w2_shape[0], rank, **kw))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, w2_shape[1], **kw))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = 1.0 if rank is None else alpha / rank  # a Python float: the forward never reads the buffer
        self.multiplier = multiplier

    def delta(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """ΔW x without building ΔW: with x as [c, d] per token, kron(w1, w2) x = w1 · x · w2ᵀ (flattened)."""
        w1 = self.lokr_w1.to(dtype) * (self.scale * self.multiplier)  # the scale on the small factor
        h = x.to(dtype).unflatten(-1, (w1.shape[1], -1))  # [..., c, d]
        if self.rank is None:
            h = h @ self.lokr_w2.to(dtype).t()
        else:
            h = (h @ self.lokr_w2_b.to(dtype).t()) @ self.lokr_w2_a.to(dtype).t()
        return (w1 @ h).flatten(-2)  # [..., a, b] -> [..., out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype(x)
        y = self.base(x) if self.base is not None else None
        with torch.autocast(x.device.type, enabled=False):
            if y is None:
                y = F.linear(x.to(dtype), self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))
            return y + self.delta(x, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w1={tuple(self.lokr_w1.shape)}, "
                f"rank={self.rank or 'full'}")


def read_lycoris_config(path) -> LoKrSpec:
    """The LoKr a LyCORIS JSON config describes (SimpleTuner's lycoris_config files); anything this trainer does not
    implement is a LoRAError naming it, rather than a different adapter trained silently."""
    try:
        raw = json.loads(open(path).read())
    except FileNotFoundError:
        raise LoRAError(f"lycoris_config {path} does not exist")
    except (OSError, ValueError) as e:
        raise LoRAError(f"lycoris_config {path} is not a readable JSON file ({e})")
    if not isinstance(raw, dict):
        raise LoRAError(f"lycoris_config {path} must hold a JSON object like {{\"algo\": \"lokr\", \"factor\": 16}}")
    if raw.get("algo") != "lokr":
        raise LoRAError(f"lycoris_config {path} asks for algo {raw.get('algo')!r}; only \"lokr\" is supported")
    preset = raw.get("apply_preset", {})
    algo_map = preset.get("module_algo_map", {}) if isinstance(preset, dict) else None
    unknown = ([k for k in raw if k not in LYCORIS_KEYS] + [f"apply_preset.{k}" for k in preset if k not in PRESET_KEYS]
               if isinstance(preset, dict) else ["apply_preset (not an object)"])
    if not isinstance(algo_map, dict) or not all(isinstance(v, dict) for v in algo_map.values()):
        unknown.append("apply_preset.module_algo_map (not an object of objects)")
    else:
        unknown += [f"module_algo_map.{cls}.{k}" for cls, v in algo_map.items() for k in v if k not in ALGO_MAP_KEYS]
        unknown += [f"module_algo_map.{cls}.algo = {v['algo']!r}" for cls, v in algo_map.items()
                    if v.get("algo", "lokr") != "lokr"]
    if unknown:
        raise LoRAError(f"lycoris_config {path}: {', '.join(unknown)} is not supported here (supported: "
                        f"{', '.join(LYCORIS_KEYS)}; apply_preset with {' and '.join(PRESET_KEYS)}; per class "
                        f"{' and '.join(ALGO_MAP_KEYS)} = \"lokr\")")
    target_module = preset.get("target_module", list(LoKrSpec.targets))
    if not isinstance(target_module, list):  # a string would be read as its letters
        raise LoRAError(f"lycoris_config {path}: apply_preset.target_module must be a list of class names like "
                        f"[\"Attention\", \"FeedForward\"], got {target_module!r}")
    spec = LoKrSpec(dim=raw.get("linear_dim", 4), alpha=raw.get("linear_alpha", 1.0), factor=raw.get("factor", -1),
                    multiplier=raw.get("multiplier", 1.0), full_matrix=raw.get("full_matrix", False),
                    targets=tuple(dict.fromkeys([*target_module, *algo_map])),
                    factors={cls: v["factor"] for cls, v in algo_map.items() if "factor" in v})
    numbers = {"linear_dim": spec.dim, "factor": spec.factor, **{f"{c}.factor": f for c, f in spec.factors.items()}}
    wrong = [k for k, v in numbers.items() if type(v) is not int] + [k for k, v in (
        ("linear_alpha", spec.alpha), ("multiplier", spec.multiplier)) if type(v) not in (int, float)]
    if wrong or spec.dim < 1 or type(spec.full_matrix) is not bool or not all(isinstance(t, str) for t in spec.targets):
        raise LoRAError(f"lycoris_config {path}: linear_dim must be a whole number >= 1, factors whole numbers, "
                        f"linear_alpha and multiplier numbers, full_matrix true or false, target_module class names"
                        + (f" ({', '.join(wrong)} is not)" if wrong else ""))
    if not (math.isfinite(spec.alpha) and math.isfinite(spec.multiplier)) or spec.alpha < 0 or spec.multiplier <= 0:
        # (Python's json reads NaN and Infinity; a multiplier of 0 trains nothing)
        raise LoRAError(f"lycoris_config {path}: linear_alpha must be a finite number >= 0 (0 means linear_dim) and "
                        f"multiplier a finite number > 0, got linear_alpha {spec.alpha!r}, multiplier "
                        f"{spec.multiplier!r}")
    return spec


def inject_lokr(model: nn.Module, spec: LoKrSpec, dtype=torch.float32) -> list[str]:
    """Freezes `model` and wraps, as LyCORIS' preset does, every nn.Linear inside a module whose class name is in
    spec.targets (model.py's Attention and FeedForward carry diffusers' class names, so one config means the same
    layers here and in SimpleTuner) in a LoKrLinear, with that class's factor; returns the names wrapped."""
    model.requires_grad_(False)
    found = {}  # linear name -> the class of the target holding it (in model.py no target holds another)
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls in spec.targets:
            for sub, m in module.named_modules(prefix=name):
                if isinstance(m, nn.Linear):
                    found.setdefault(sub, cls)
    if not found:
        raise LoRAError(f"lycoris_config's target_module {list(spec.targets)} matched no module class of the model "
                        f"(it has Attention and FeedForward)")
    for name, cls in found.items():
        base = model.get_submodule(name)
        w1, w2, rank = lokr_shapes(base.out_features, base.in_features, spec.factors.get(cls, spec.factor), spec.dim,
                                   spec.full_matrix)
        alpha = spec.dim if rank is None or not spec.alpha else spec.alpha  # LyCORIS: 0 means dim; whole w2: dim
        replace(model, name, LoKrLinear(base, w1, w2, rank, alpha, spec.multiplier, dtype))
    return list(found)


# -----------------------------------------------------------------------------
# Files. The same adapters spelled three ways (`lora_format`); what each tool reads was measured (docs/lora-files.md):
#   universal  diffusion_model.<name>.lora_A/B.weight, alpha / r folded into lora_B, no .alpha tensors.
#              ComfyUI applies scale 1 when a file has no .alpha (it ignores metadata); diffusers strips
#              `diffusion_model.`, refuses .alpha tensors and assumes alpha = r: both apply what was trained.
#   diffusers  transformer.<name>.lora_A/B.weight, alpha in the metadata diffusers reads.
#   comfyui    diffusion_model.<ComfyUI name>.lora_A/B.weight and a .alpha tensor per module (kohya's rule).
# LoKr layers are written as LyCORIS names its tensors, under the same module names as universal / comfyui:
#   diffusion_model.<name>.lokr_w1, .lokr_w2 (or .lokr_w2_a and .lokr_w2_b), .alpha
# Verified in ComfyUI's source (comfy/lora.py, comfy/weight_adapter/lokr.py, 2025): for an LTXV model,
# model_lora_keys_unet maps only the generic "diffusion_model.<m>" and "lora_unet_<m with _>" names (the
# "lycoris_<m with _>" names SimpleTuner writes are mapped for SD UNets, SD3, Flux, HiDream and Qwen-Image, not
# LTXV; "transformer.<m>" neither); load_lora reads "<x>.alpha", and the LoKr adapter reads <x>.lokr_w1 / lokr_w2 /
# lokr_w1_a / lokr_w1_b / lokr_w2_a / lokr_w2_b / lokr_t2 and adds strength · s · kron(w1, w2), s = alpha / r with
# r = w2_b's rows when w2 is low-rank, else s = 1: the same scale LyCORIS trains with. diffusers loads no LoKr file.

FORMATS = ("universal", "diffusers", "comfyui")
# LTX-Video's original module names (Lightricks' checkpoints, ComfyUI) where diffusers renamed the module
COMFYUI_NAMES = {"proj_in": "patchify_proj", "time_embed": "adaln_single"}
# how a key names its tensor: lora_A / lora_down is A [r, in], lora_B / lora_up is B [out, r]
PARTS = {".lora_A.weight": "A", ".lora_down.weight": "A", ".lora_B.weight": "B", ".lora_up.weight": "B",
         ".alpha": "alpha", ".lokr_w1": "lokr_w1", ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a",
         ".lokr_w2_b": "lokr_w2_b"}
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
        key = f"transformer.{name}" if fmt == "diffusers" else f"diffusion_model.{comfyui_name(name)}"
        if isinstance(layer, LoKrLinear):
            tensors |= lokr_tensors(layer, key)
            continue
        a, b = (getattr(layer, f"lora_{ab}").weight.detach().float().cpu() for ab in "AB")
        tensors[f"{key}.lora_A.weight"] = a.contiguous()
        tensors[f"{key}.lora_B.weight"] = (b * layer.scale if fmt == "universal" else b).contiguous()
        if fmt == "comfyui":
            tensors[f"{key}.alpha"] = torch.tensor(layer.scale * a.shape[0])
    return tensors


def lokr_tensors(layer: "LoKrLinear", key: str) -> dict[str, torch.Tensor]:
    """LyCORIS' tensors for one layer; a multiplier other than 1 is folded into lokr_w1 (no loader reads one)."""
    out = {f"{key}.{n}": p.detach().float().cpu() for n, p in layer.named_parameters() if n.startswith("lokr_")}
    out[f"{key}.lokr_w1"] = (out[f"{key}.lokr_w1"] * layer.multiplier).contiguous()
    out[f"{key}.alpha"] = layer.alpha.detach().float().cpu()
    return out


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
    if isinstance(first, LoKrLinear):  # ComfyUI reads its own tensors; diffusers has no LoKr loader
        if fmt == "diffusers":
            raise LoRAError('diffusers loads no LoKr file; set lora_format = "universal" (ComfyUI and LyCORIS names)')
        metadata = {"ltx_lora": json.dumps({"type": "lokr", "format": fmt, **(info or {})})}
    else:
        rank, alpha = first.lora_A.out_features, first.scale * first.lora_A.out_features
        metadata = {
            "lora_adapter_metadata": json.dumps({"transformer.r": rank,
                                                 "transformer.lora_alpha": rank if fmt == "universal" else alpha,
                                                 "transformer.target_modules": sorted(layers)}),
            "ltx_lora": json.dumps({"rank": rank, "alpha": alpha, "format": fmt,
                                    **({"alpha_folded_into_lora_B": True} if fmt == "universal" else {}),
                                    **(info or {})}),
        }
    tensors = file_tensors(model, fmt)  # written whole: a kill mid-write never leaves a truncated LoRA behind
    data.write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def universal_refusal(names: list[str]) -> str:
    return (f"lora_target_modules adapt {', '.join(names[:3])}, which ComfyUI calls "
            f"{', '.join(comfyui_name(n) for n in names[:3])}: no single file names it for both ComfyUI and diffusers; "
            f"set lora_format = \"comfyui\" or \"diffusers\" for the tool you will use, or leave it out of the targets")


def read_lora_file(path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name as the file spells it: (A [r, in], B [out, r], scale)} from any common LoRA layout:
    `transformer.` / `diffusion_model.` / bare / kohya `lora_unet_` names, lora_A/B or lora_down/up, and
    alpha from a per-module `.alpha` tensor, else from diffusers' metadata, else alpha = r (scale 1)."""
    adapters, lokr = read_adapters(path)
    if lokr:
        raise LoRAError(f"{path} holds LoKr factors (lokr_w1, ...), not LoRA matrices; lora.apply_file loads it")
    return adapters


def read_adapters(path) -> tuple[dict, dict]:
    """read_lora_file's LoRA adapters, and the file's LoKr layers as {name: ({lokr_w1, lokr_w2 or lokr_w2_a and
    lokr_w2_b: tensor}, scale)}, the scale by LyCORIS' and ComfyUI's rule: alpha / r for a low-rank w2, else 1."""
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
                            f"{', '.join(PARTS)}); LoHa, DoRA and LoKr with a low-rank w1 or a tucker w2 are not supported")
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
    adapters, lokr = {}, {}
    for name, found in parts.items():
        if any(k.startswith("lokr_") for k in found):
            lokr[name] = lokr_factors(path, name, found)
            continue
        a, b = found.get("A"), found.get("B")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise LoRAError(f"{path}: {name} needs a down [r, in] and an up [out, r] matrix, the file has "
                            f"{ {k: tuple(v.shape) for k, v in found.items()} }")
        rank = a.shape[0]
        alpha = found["alpha"].item() if "alpha" in found else diffusers_alpha or rank
        adapters[name] = (a.float(), b.float(), alpha / rank)
    return adapters, lokr


def lokr_factors(path, name: str, found: dict) -> tuple[dict, float]:
    w1, w2, w2_a, w2_b = (found.get(k) for k in ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"))
    kinds = set(found) - {"alpha"}
    whole = kinds == {"lokr_w1", "lokr_w2"} and w1.ndim == w2.ndim == 2
    low_rank = (kinds == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"} and w1.ndim == w2_a.ndim == w2_b.ndim == 2
                and w2_a.shape[1] == w2_b.shape[0])
    if not (whole or low_rank):
        raise LoRAError(f"{path}: {name} needs LoKr factors lokr_w1 [a, c] and lokr_w2 [b, d] (or lokr_w2_a [b, r] "
                        f"and lokr_w2_b [r, d]), the file has { {k: tuple(v.shape) for k, v in found.items()} }")
    rank = w2_b.shape[0] if low_rank else None
    alpha = found["alpha"].item() if "alpha" in found else rank
    return {k: found[k].float() for k in kinds}, 1.0 if rank is None else alpha / rank


def resolve_names(path, names, model: nn.Module) -> dict[str, str]:
    """The model's linear layer for each module name of a file: ours (= diffusers'), ComfyUI's, or either written
    the kohya way (lora_unet_transformer_blocks_0_attn1_to_q). A name that matches none is an error naming it."""
    spellings = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            for spelled in (n, comfyui_name(n)):
                spellings[spelled] = spellings["lora_unet_" + spelled.replace(".", "_")] = n
            spellings["lycoris_" + n.replace(".", "_")] = n  # LyCORIS' own names (SimpleTuner's LoKr files)
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
    """Injects adapters where a LoRA or LoKr file has them (their own ranks, alphas and factors, any layout
    read_adapters reads, trained here or elsewhere), loads them, and multiplies their effect by `scale`."""
    adapters, lokr = read_adapters(path)
    names = resolve_names(path, [*adapters, *lokr], model)
    model.requires_grad_(False)
    for spelled, (a, b, file_scale) in adapters.items():
        layer = wrap(model, names[spelled], a.shape[0], alpha=file_scale * a.shape[0])
        if (layer.in_features, layer.out_features) != (a.shape[1], b.shape[0]):
            raise LoRAError(f"{path}: {spelled} is {a.shape[1]} -> {b.shape[0]}, the model's {names[spelled]} is "
                            f"{layer.in_features} -> {layer.out_features} (a LoRA for another model size?)")
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
        layer.scale *= scale
    for spelled, (factors, file_scale) in lokr.items():
        base, w1 = model.get_submodule(names[spelled]), factors["lokr_w1"]
        w2 = factors["lokr_w2"] if "lokr_w2" in factors else factors["lokr_w2_a"] @ factors["lokr_w2_b"]
        if (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]) != (base.out_features, base.in_features):
            raise LoRAError(f"{path}: {spelled} is {w1.shape[1] * w2.shape[1]} -> {w1.shape[0] * w2.shape[0]}, the "
                            f"model's {names[spelled]} is {base.in_features} -> {base.out_features} (a LoKr for "
                            f"another model size?)")
        rank = factors["lokr_w2_b"].shape[0] if "lokr_w2_b" in factors else None
        layer = replace(model, names[spelled], LoKrLinear(base, w1.shape, w2.shape, rank, file_scale * (rank or 1),
                                                          multiplier=scale))
        for k, t in factors.items():
            getattr(layer, k).copy_(t)
    return sorted(names.values())


# -----------------------------------------------------------------------------
# Training state: the adapters exactly as trained (raw B, scale apart), for bit-identical resume

def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if any(f".{a}" in k for a in ADAPTER_NAMES)}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = set(adapter_state(model))
    if set(state) != expected:
        raise LoRAError(f"the saved adapters do not fit this model's: missing {sorted(expected - set(state))[:3]}, "
                        f"unexpected {sorted(set(state) - expected)[:3]}")
    shapes = {k: v.shape for k, v in model.state_dict().items() if k in expected}
    wrong = [f"{k} {tuple(state[k].shape)} (this model's: {tuple(shapes[k])})" for k in state if state[k].shape != shapes[k]]
    if wrong:
        raise LoRAError(f"the saved adapters have other shapes than this model's: {', '.join(wrong[:3])}")
    model.load_state_dict(state, strict=False)
