"""Low-rank adapters on the frozen transformer, saved in the key format diffusers loads.

Owns: `LoRALinear` (y = W x + b + (alpha / r) · B A dropout(x), B zero-initialised so training starts
from the base model exactly), `inject` by module-name suffix, merge / unmerge, and save / load as
safetensors with diffusers / PEFT keys (`transformer.<module>.lora_A.weight`) or ComfyUI keys
(`diffusion_model.<module>...`).
Does not: depend on train.py or know what the model is.
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
    """An nn.Linear that shares the base layer's weight and bias Parameters (same names, nothing copied)
    and adds lora_A [r, in] (kaiming-uniform) and lora_B [out, r] (zeros), kept in fp32."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        # under autocast the adapter runs in the autocast dtype; without it, in the adapter's fp32
        lora = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return out + (lora * self.scale).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the adapter into the base weight (for fast inference); exact in fp32, rounded in bf16."""
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False


def matches(name: str, targets: list[str] | tuple[str, ...]) -> bool:
    """PEFT's rule: a target names a module if it equals the full name or a dotted suffix of it."""
    return any(name == t or name.endswith("." + t) for t in targets)


def inject(model: nn.Module, targets=DEFAULT_TARGETS, rank: int = 16, alpha: float | None = None,
           dropout: float = 0.0) -> list[str]:
    """Freezes `model` and replaces every matching nn.Linear by a LoRALinear; returns the names wrapped."""
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches(n, targets)]
    if not names:
        raise LoRAError(f"lora_target_modules {list(targets)} matched no nn.Linear in the model")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha or rank, dropout))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def merge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


# -----------------------------------------------------------------------------
# Files: diffusers / PEFT keys, alpha in the metadata (a `.alpha` tensor makes diffusers refuse the file)

def lora_state_dict(model: nn.Module, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    return {f"{prefix}{name}.lora_{ab}.weight": getattr(layer, f"lora_{ab}").weight.detach().float().cpu().contiguous()
            for name, layer in lora_layers(model).items() for ab in "AB"}


def save_lora(model: nn.Module, path, info: dict | None = None) -> None:
    """Writes safetensors that `LTXPipeline.load_lora_weights` loads as it is.

    `lora_adapter_metadata` carries rank, alpha and targets the way diffusers reads them (without it,
    diffusers assumes alpha = rank); `ltx_lora` carries our own facts (base model, ...) for humans.
    """
    from safetensors.torch import save_file
    layers = lora_layers(model)
    first = next(iter(layers.values()))
    rank = first.lora_A.out_features
    metadata = {
        "lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": first.scale * rank,
                                             "transformer.target_modules": sorted(layers)}),
        "ltx_lora": json.dumps({"rank": rank, "alpha": first.scale * rank, **(info or {})}),
    }
    tmp = f"{path}.tmp"  # renamed when complete: a kill mid-write never leaves a truncated LoRA behind
    save_file(lora_state_dict(model), tmp, metadata=metadata)
    os.replace(tmp, path)


def read_lora_file(path) -> tuple[dict[str, torch.Tensor], float | None]:
    """Adapter tensors keyed '<module>.lora_A.weight' / '.lora_B.weight' from a file in diffusers
    (`transformer.` prefix), ComfyUI (`diffusion_model.`) or bare key format, and alpha from its
    metadata (None: the file does not say, so alpha = rank as diffusers assumes)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:  # not safetensors at all, or cut short
        raise LoRAError(f"{path} is not a complete safetensors file ({e})")
    except FileNotFoundError:
        raise LoRAError(f"LoRA file {path} does not exist")
    state = {}
    for key, value in tensors.items():
        for prefix in ("transformer.", "diffusion_model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        state[key] = value
    alpha = json.loads(meta["lora_adapter_metadata"]).get("transformer.lora_alpha") if "lora_adapter_metadata" in meta else None
    return state, alpha


@torch.no_grad()
def load_lora(model: nn.Module, path) -> None:
    """Copies adapter weights from a file into an injected model; every adapter must be present, no extra ones."""
    state, alpha = read_lora_file(path)
    layers = lora_layers(model)
    expected = {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise LoRAError(f"{path} does not fit this model's adapters: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]} (other lora_target_modules?)")
    for name, layer in layers.items():
        a, b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        if a.shape != layer.lora_A.weight.shape:
            raise LoRAError(f"{path}: {name} has rank {a.shape[0]}, the model was injected with rank "
                            f"{layer.lora_A.out_features}; set lora_rank = {a.shape[0]}")
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
        if alpha is not None:
            layer.scale = alpha / a.shape[0]


def apply_file(model: nn.Module, path, scale: float = 1.0) -> list[str]:
    """Injects adapters where a LoRA file has them (its own targets, rank and alpha: diffusers, ComfyUI or
    bare keys, trained here or elsewhere), loads them, and scales their effect by `scale`."""
    state, _ = read_lora_file(path)
    targets = sorted({key.rsplit(".lora_", 1)[0] for key in state if ".lora_A." in key})
    if not targets:
        raise LoRAError(f"{path} holds no lora_A / lora_B weights")
    rank = state[f"{targets[0]}.lora_A.weight"].shape[0]
    inject(model, targets, rank=rank)
    load_lora(model, path)
    for layer in lora_layers(model).values():
        layer.scale *= scale
    return targets
