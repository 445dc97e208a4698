"""Optimizers, the LR schedule and the EMA of the LoRA (docs/memory.md, docs/training-quality.md).

    make_optimizer(params, cfg)   cfg.optimizer over the adapter weights (OPTIMIZERS below: name -> its Rule)
    check_optimizer(cfg, device)  its package missing or its kernels absent here: one sentence at start-up
    lr_at(step, cfg, total)       linear warm-up, then constant / linear / cosine decay
    EMA                           θ_ema ← d·θ_ema + (1 − d)·θ, exported as lora_ema.safetensors
"""

import contextlib
import math
import warnings
from typing import Callable, NamedTuple

import torch

import config
import errors


def lr_at(step: int, cfg: config.Config, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warm-up, then constant / linear / cosine decay to 0."""
    if step < cfg.lr_warmup_steps:
        return cfg.learning_rate * step / cfg.lr_warmup_steps
    progress = (step - cfg.lr_warmup_steps) / max(1, total_steps - cfg.lr_warmup_steps)
    if cfg.lr_scheduler == "linear":
        return cfg.learning_rate * max(0.0, 1 - progress)
    if cfg.lr_scheduler == "cosine":
        return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.learning_rate


class AdamWBF16(torch.optim.Optimizer):
    """AdamW whose parameters and both moments are bf16: 6 bytes per weight (8 with its gradient), not 12 (16).

    Each step computes in fp32, as AdamW does (m, v: the moments; t: the step; g: the gradient):
        m = β1·m + (1 − β1)·g          v = β2·v + (1 − β2)·g²
        p = p·(1 − lr·wd) − lr · (m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + ε)
    and writes p, m and v back to bf16 by stochastic rounding: up with probability equal to the remainder's share
    of the gap to the next bf16 number. Rounding to nearest would lose every update smaller than half of bf16's
    step (2⁻⁸ of the value: most late-training updates, and β2·v of v itself); stochastic rounding keeps them
    in expectation. The random bits come from a generator seeded by the step, so a resumed run draws the same."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        generator = None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = int(state["step"])
                if generator is None:
                    generator = torch.Generator(p.device).manual_seed(t)
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denominator = (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                new = p.float().mul_(1 - group["lr"] * group["weight_decay"])
                new.addcdiv_(m, denominator, value=-group["lr"] / (1 - beta1 ** t))
                for target, value in ((p, new), (state["exp_avg"], m), (state["exp_avg_sq"], v)):
                    target.copy_(stochastic_round_bf16(value, generator))


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16 rounding up or down at random, E[result] = x. bf16 is fp32's upper 16 bits: add a uniform
    16-bit number to the lower 16 (a carry rounds the magnitude up) and cut them off."""
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 = 0xFFFF0000: exact in bf16


class Rule(NamedTuple):
    """One optimizer choice: the module it needs (None: torch's, or ours), its pip package, how it is built over
    the adapter weights, and the dtype the adapters train in."""
    module: str | None
    package: str
    build: Callable  # (the imported module or None, params, lr, weight_decay) -> torch.optim.Optimizer
    adapter_dtype: torch.dtype = torch.float32


def paged_lion(bnb, params, lr: float, weight_decay: float):
    # paging is CUDA's unified memory; elsewhere the state is ordinary memory (check_optimizer says so once)
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    return bnb.optim.PagedLion8bit(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS = {  # cfg.optimizer -> its Rule, and its state's bytes per adapter weight. A new optimizer: one row
    # torch AdamW, fused (one kernel for every tensor) on CUDA and on the CPU: 8 bytes of state
    "adamw": Rule(None, "", lambda _, p, lr, wd: torch.optim.AdamW(p, lr=lr, weight_decay=wd, fused=True)),
    # AdamWBF16 above: adapters and state in bf16, stochastic rounding: 4 bytes of state
    "adamw_bf16": Rule(None, "", lambda _, p, lr, wd: AdamWBF16(p, lr=lr, weight_decay=wd), torch.bfloat16),
    # Lion (sign of a momentum blend; one state): 4 bytes
    "optimi-lion": Rule("optimi", "torch-optimi", lambda m, p, lr, wd: m.Lion(p, lr=lr, weight_decay=wd)),
    # AdamW with AdaFactor's update clipping per tensor: 8 bytes
    "optimi-stableadamw": Rule("optimi", "torch-optimi", lambda m, p, lr, wd: m.StableAdamW(p, lr=lr, weight_decay=wd)),
    # AdamW, both moments in 8 bits, blockwise scaled: 2 bytes
    "bnb-adamw8bit": Rule("bitsandbytes", "bitsandbytes",
                          lambda m, p, lr, wd: m.optim.AdamW8bit(p, lr=lr, weight_decay=wd)),
    # Lion, 8-bit state in paged memory, which CUDA may evict to the CPU: 1 byte
    "bnb-lion8bit-paged": Rule("bitsandbytes", "bitsandbytes", paged_lion),
}


def make_optimizer(params: list[torch.nn.Parameter], cfg: config.Config) -> torch.optim.Optimizer:
    """cfg.optimizer over the adapter weights (OPTIMIZERS); its library is imported here, only when chosen."""
    rule = OPTIMIZERS[cfg.optimizer]
    module = errors.import_quiet(rule.module) if rule.module else None
    return rule.build(module, params, cfg.learning_rate, cfg.adam_weight_decay)


def check_optimizer(cfg: config.Config, device: torch.device, log=print) -> None:
    """Stops at start-up, in one sentence, when this machine lacks the chosen optimizer's package, or it does not
    run on `device` (a probe: one step on a small tensor there)."""
    rule = OPTIMIZERS[cfg.optimizer]
    if rule.module:
        errors.need_package(rule.module, f"optimizer = {cfg.optimizer}", "or use adamw or adamw_bf16",
                            package=rule.package, pip="-r requirements.txt")
    if cfg.optimizer.endswith("-paged") and device.type != "cuda":
        log(f"optimizer = {cfg.optimizer}: paging needs CUDA; on the {device.type} its 8-bit state is ordinary memory")
    probe = [torch.nn.Parameter(torch.ones(64, 64, device=device))]
    probe[0].grad = torch.ones_like(probe[0])
    try:
        make_optimizer(probe, cfg).step()
    except (RuntimeError, NotImplementedError) as error:  # the backend's "not on this device"
        if not errors.raised_by_library(error):
            raise  # ours (AdamWBF16): a bug, with its traceback
        raise SystemExit(f"optimizer = {cfg.optimizer} does not run on this machine's {device.type} "
                         f"({errors.first_line(error)}); use adamw or adamw_bf16")


class EMA:
    """An exponential moving average of the LoRA weights (use_ema), updated after every ema_update_interval-th
    optimizer step:  θ_ema ← d·θ_ema + (1 − d)·θ,  d = ema_decay.
    It averages away the step-to-step noise of small-batch training (about the last 1/(1 − d) updates), so it is
    often the cleaner LoRA: exported as lora_ema.safetensors beside lora.safetensors. fp32, on ema_device."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, device: torch.device):
        self.decay = decay
        self.shadow = [p.detach().to(device, torch.float32, copy=True) for p in params]

    @torch.no_grad()
    def update(self, params: list[torch.nn.Parameter]) -> None:
        for shadow, p in zip(self.shadow, params):
            shadow.lerp_(p.detach().to(shadow.device, torch.float32), 1 - self.decay)

    @contextlib.contextmanager
    def applied(self, params: list[torch.nn.Parameter]):
        """The EMA weights in the LoRA's place for the duration (validation videos, writing lora_ema.safetensors)."""
        trained = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, shadow in zip(params, self.shadow):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(params, trained):
                    p.copy_(t)
