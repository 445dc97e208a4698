"""Scheduled sampling: for a share of the clips, x_t is where the current model itself takes them, not the point
on the analytic line (exposure bias: training sees the slightly-off inputs it meets when sampling).

    draw(seeds, probability)                          which clips of a micro-batch roll out (their own draws)
    rollout(forward, flow, x0, chosen, cfg, grid)     their x_t and target after the model's own Euler steps
"""

import torch

import config
import model as ltx

SALT = 0x5EED_0F_5A3  # the draw has its own generator per clip: with scheduled sampling off, nothing else moves


def draw(seeds: list[int], probability: float) -> torch.Tensor:
    """[B] bool: the clips whose x_t is rolled out, each drawn from its own seed (the same on any number of
    ranks, and after a resume); none when `probability` is 0."""
    if not probability:
        return torch.zeros(len(seeds), dtype=torch.bool)
    draws = [torch.rand(1, generator=torch.Generator().manual_seed(s ^ SALT)) for s in seeds]
    return torch.cat(draws) < probability


@torch.no_grad()
def rollout(forward, flow, x0: torch.Tensor, chosen: torch.Tensor, cfg: config.Config,
            grid: tuple[int, int, int]):
    """The chosen clips' x_t is where the model itself takes them (flow: train.FlowInputs).

    From σ_0 = min(1, σ + scheduled_sampling_sigma_offset), on the line with the clip's own ε, N Euler steps of
    the current model (no grad, N = scheduled_sampling_steps) go down to σ:
        x ← x + (σ_{i+1} − σ_i)·v̂(x, σ_i),    σ_i = σ_0 + (σ − σ_0)·i/N
    so training sees the slightly-off inputs it meets when sampling (exposure bias). The target is still the
    velocity toward the clean latent: the x_t = (1 − σ)·x0 + σ·ε̃ with ε̃ = (x_t − (1 − σ)·x0)/σ gives
    v = ε̃ − x0 = (x_t − x0)/σ, which is ε − x0 when the rollout is exact. Clips at σ < 0.01 keep the analytic
    x_t: dividing by σ would blow up the rollout's error. Image-conditioned tokens stay clean throughout."""
    chosen = chosen.to(x0.device) & (flow.sigma >= 0.01)
    if not chosen.any():
        return flow
    noise = flow.target + x0
    start = (flow.sigma + cfg.scheduled_sampling_sigma_offset).clamp(max=1.0)
    x = (1 - start[:, None, None]) * x0 + start[:, None, None] * noise
    keep = flow.loss_mask[..., None] == 0  # conditioning tokens
    n = cfg.scheduled_sampling_steps
    for i in range(n):
        now, nxt = (start + (flow.sigma - start) * i / n), (start + (flow.sigma - start) * (i + 1) / n)
        step_flow = flow._replace(x_t=x.to(flow.x_t.dtype), timestep=now[:, None] * ltx.TIMESTEP_SCALE * flow.loss_mask)
        x = x + (nxt - now)[:, None, None] * forward(step_flow, grid).float()
        x = torch.where(keep, x0, x)
    pick = chosen[:, None, None] & ~keep
    return flow._replace(x_t=torch.where(pick, x.to(flow.x_t.dtype), flow.x_t),
                         target=torch.where(pick, (x - x0) / flow.sigma[:, None, None], flow.target))
