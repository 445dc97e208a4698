"""Train a LoRA of LTX-Video with rectified flow.

    python train.py configs/demo.toml [--key=value ...]
    torchrun --nproc_per_node=8 train.py configs/disney.toml     # data parallel over 8 GPUs
    python train.py --simpletuner_config config/config.json      # a SimpleTuner config, mapped key by key
    python train.py --simpletuner_config config/config.json --write_toml mine.toml   # ... written as ours

Owns: the flow-matching loss and the loop around it: σ schedules, scheduled sampling, device and precision,
optimizer and LR schedule, the EMA of the LoRA, the eval loss, logging, checkpoint save / resume, torchrun.
Every setting is in config.py, model internals in model.py, adapters in lora.py, videos and caches in data.py,
the CREPA term in crepa.py, sampling and validation videos in sample.py.
"""

import contextlib
import dataclasses
import hashlib
import http.client
import json
import math
import os
import pickle
import queue
import random
import shlex
import shutil
import signal
import sys
import threading
import time
import traceback
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import config
import crepa
import data
import demo
import lora
import model as ltx
import offload
import quant
import sample


# -----------------------------------------------------------------------------
# Flow matching

def sample_sigmas(batch: int, cfg: config.Config, shift: float, generator: torch.Generator, device) -> torch.Tensor:
    """Each clip's noise level σ ∈ [0, 1], drawn as flow_weighting_scheme says, then shifted by k:
        logit_normal   σ = sigmoid(m + s·n), n ~ N(0, 1)       most draws mid-way (m, s = logit_mean, logit_std)
        uniform        σ = u, u ~ U(0, 1)
        mode           σ = 1 − u − c·(cos²(πu/2) − 1 + u)     (SD3's mode sampling; c = mode_scale)
        shifted        σ' = k·σ / (1 + (k − 1)·σ)              k > 1 moves the draws toward noise
    k is flow_schedule_shift, or with flow_schedule_auto_shift the sampler's resolution shift for the clip's
    token count (sample.resolution_shift). tests/test_train.py checks each against its closed-form CDF."""
    if cfg.flow_weighting_scheme == "uniform":
        sigma = torch.rand(batch, generator=generator, device=device)
    elif cfg.flow_weighting_scheme == "mode":
        u = torch.rand(batch, generator=generator, device=device)
        sigma = 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        sigma = torch.sigmoid(torch.randn(batch, generator=generator, device=device) * cfg.logit_std + cfg.logit_mean)
    return shift * sigma / (1 + (shift - 1) * sigma)


def schedule_shift(cfg: config.Config, scheduler: dict, tokens: int) -> float:
    """The shift k of training's σ for clips of `tokens` tokens."""
    return sample.resolution_shift(tokens, scheduler) if cfg.flow_schedule_auto_shift else cfg.flow_schedule_shift


class FlowInputs(NamedTuple):
    x_t: torch.Tensor  # [B, S, C] noisy tokens
    target: torch.Tensor  # [B, S, C] velocity ε − x0
    sigma: torch.Tensor  # [B] each clip's noise level σ (what a loss weighting would read)
    timestep: torch.Tensor  # σ·TIMESTEP_SCALE: [B], or [B, S] with 0 on image-conditioned tokens
    text: torch.Tensor  # [B, L, D]
    text_mask: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, S]: 1 where the loss counts (0 on conditioning tokens)


def example_seed(seed: int, k: int, position: int) -> int:
    """The seed of the example at `position` in the global batch of micro-batch k: the same example gets the
    same σ, noise, caption dropout and i2v choice whether one process or eight hold its batch, and after a
    resume. (A tuple of ints hashes the same in every process.)"""
    return hash((seed, k, position)) & 0x7FFF_FFFF_FFFF_FFFF


def flow_matching_inputs(batch: dict[str, torch.Tensor], empty_prompt: dict[str, torch.Tensor], cfg: config.Config,
                         seeds: list[int], scheduler: dict | None = None) -> FlowInputs:
    """One rectified-flow training example per clip, its randomness drawn from its own seed: σ (sample_sigmas),
    the noise ε, whether its caption drops to the empty prompt, whether it trains as image-to-video.
    σ and ε are drawn on the device; caption dropout and i2v on the CPU (batch["i2v"] stays there), so
    deciding whether any clip is conditioned needs no device sync. scheduler: the model's scheduler config,
    read only by flow_schedule_auto_shift."""
    latents = batch["latents"]  # [B, C, F, H, W] normalised
    x0 = ltx.pack_latents(latents)  # [B, S, C], frame-major: frame 0 is the first H·W tokens
    device = x0.device
    on_device = [torch.Generator(device).manual_seed(s) for s in seeds]
    on_cpu = [torch.Generator().manual_seed(s) for s in seeds]
    shift = schedule_shift(cfg, scheduler or {}, x0.shape[1])
    sigma = torch.cat([sample_sigmas(1, cfg, shift, g, device) for g in on_device])
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g, device=device) for g in on_device])
    drop_draw, i2v_draw = torch.stack([torch.rand(2, generator=g) for g in on_cpu]).unbind(1)
    drop = (drop_draw < cfg.caption_dropout_probability).to(device)
    text = torch.where(drop[:, None, None], empty_prompt["prompt_embeds"].to(device), batch["prompt_embeds"])
    text_mask = torch.where(drop[:, None], empty_prompt["prompt_attention_mask"].to(device),
                            batch["prompt_attention_mask"])
    conditioned = batch["i2v"] & (i2v_draw < cfg.i2v_probability)
    return noised(x0, noise, sigma, text, text_mask, conditioned, latents.shape[3] * latents.shape[4])


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
           conditioned: torch.Tensor, frame_tokens: int) -> FlowInputs:
    """x_t = (1 − σ)·x0 + σ·ε walks a straight line from the data (σ = 0) to noise (σ = 1); the model
    learns its velocity dx_t/dσ = ε − x0.
    Image-to-video (as LTXImageToVideoPipeline conditions), for the clips `conditioned` [B] (on the CPU) marks:
    the first latent frame (its first `frame_tokens` tokens) stays clean in x_t, its tokens get timestep 0, and
    the loss skips them. The causal VAE encodes latent frame 0 from pixel frame 0 alone, so it is exactly the
    latent of the conditioning image."""
    device = x0.device
    s = sigma[:, None, None]
    x_t = (1 - s) * x0 + s * noise
    loss_mask = torch.ones(x0.shape[:2], device=device)
    if not conditioned.any():
        return FlowInputs(x_t, noise - x0, sigma, sigma * ltx.TIMESTEP_SCALE, text, text_mask, loss_mask)
    clean = torch.zeros(x0.shape[:2], dtype=torch.bool, device=device)
    clean[:, :frame_tokens] = conditioned.to(device)[:, None]
    x_t = torch.where(clean[..., None], x0, x_t)
    timestep = sigma[:, None] * ltx.TIMESTEP_SCALE * (~clean)
    return FlowInputs(x_t, noise - x0, sigma, timestep, text, text_mask, loss_mask * (~clean))


def flow_matching_loss(pred: torch.Tensor, flow: FlowInputs) -> torch.Tensor:
    """Mean over clips of each clip's mean squared error over the tokens that count: the same number whether
    a batch is split across ranks or not."""
    return per_clip_loss(pred, flow).mean()


def per_clip_loss(pred: torch.Tensor, flow: FlowInputs) -> torch.Tensor:
    per_token = (pred.float() - flow.target).square().mean(-1)  # [B, S]
    return (per_token * flow.loss_mask).sum(1) / flow.loss_mask.sum(1)


ROLLOUT_SALT = 0x5EED_0F_5A3  # scheduled sampling's draw has its own generator: with it off, nothing else moves


@torch.no_grad()
def rollout(forward, flow: FlowInputs, x0: torch.Tensor, chosen: torch.Tensor, cfg: config.Config,
            grid: tuple[int, int, int]) -> FlowInputs:
    """Scheduled sampling: the chosen clips' x_t is where the model itself takes them, not the analytic line.

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


def autocast(cfg: config.Config, device: torch.device):
    """The forward's autocast: mixed_precision's dtype, or off with "no"."""
    return torch.autocast(device.type, dtype=config.DTYPES.get(cfg.mixed_precision, torch.float32),
                          enabled=cfg.mixed_precision != "no")


class Losses(NamedTuple):
    flow: torch.Tensor  # the flow-matching loss, detached
    crepa: torch.Tensor | None  # the CREPA term before its weight, detached; None when off


def micro_step(forward, batch: dict[str, torch.Tensor], empty_prompt: dict[str, torch.Tensor], cfg: config.Config,
               seeds: list[int], scaler: torch.amp.GradScaler, scheduler: dict | None = None,
               alignment=None) -> Losses:
    """One micro-batch's share of an optimizer step: its flow-matching inputs (in the base's dtype), scheduled
    sampling's rollout for the clips it picks, the forward under autocast (mixed_precision), the loss (+ λ·CREPA
    with `alignment`, a crepa.Alignment), and the backward of loss / accumulation steps.
    `forward(flow, (frames, height, width))` runs the transformer: train.py's, or bench.py's reference."""
    device, dtype = batch["latents"].device, config.DTYPES[cfg.base_model_default_dtype]
    grid = batch["latents"].shape[2:]
    flow = flow_matching_inputs(batch, empty_prompt, cfg, seeds, scheduler)
    flow = flow._replace(x_t=flow.x_t.to(dtype), text=flow.text.to(dtype))
    if cfg.scheduled_sampling_probability:
        draws = [torch.rand(1, generator=torch.Generator().manual_seed(s ^ ROLLOUT_SALT)) for s in seeds]
        chosen = torch.cat(draws) < cfg.scheduled_sampling_probability
        if chosen.any():
            with autocast(cfg, device):
                flow = rollout(forward, flow, ltx.pack_latents(batch["latents"]), chosen, cfg, grid)
    with autocast(cfg, device):
        pred = forward(flow, grid)  # with CREPA on, alignment's hook keeps one block's output meanwhile
    loss = total = flow_matching_loss(pred, flow)
    crepa_term = None
    if alignment:
        with autocast(cfg, device):
            crepa_term = alignment.loss(batch["crepa_features"], grid)
        total = loss + cfg.crepa_lambda * crepa_term
    scaler.scale(total / cfg.gradient_accumulation_steps).backward()
    return Losses(loss.detach(), None if crepa_term is None else crepa_term.detach())


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


# -----------------------------------------------------------------------------
# Checkpoints: output_dir/checkpoints/step-N/{lora.safetensors, training_state.pt, meta.json}

def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is still named step-N.tmp)."""
    folder = output_dir / "checkpoints"
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


@dataclass
class Dist:
    """Where this process sits in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_dist(cfg: config.Config) -> tuple[Dist, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous); without them: one process.
    NCCL between GPUs, gloo on CPU."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return Dist(), torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return (Dist(dist.get_rank(), dist.get_world_size(), local_rank),
            torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, transformer, optimizer, cfg: config.Config, info: dict, d: Dist,
                    ema: "EMA | None" = None, alignment=None) -> Path:
    """Every rank adds its RNG state; rank 0 writes the rest, fsyncs, writes manifest.json (each file's size and
    hash) last, and renames step-N.tmp to step-N: a kill at any moment leaves either the complete new checkpoint
    or none, and the older ones untouched; damage done later is caught by the manifest on resume."""
    final = output_dir / "checkpoints" / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if d.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    torch.save(rng_state(), tmp / f"rng-{d.rank}.pt")
    if d.rank == 0:
        lora.save_lora(transformer, tmp / "lora.safetensors", info, cfg.lora_format)  # for the user to try
        state = {"adapters": lora.adapter_state(transformer), "optimizer": optimizer.state_dict()}
        if ema:
            state["ema"] = ema.shadow
            with ema.applied(lora.lora_parameters(transformer)):
                lora.save_lora(transformer, tmp / "lora_ema.safetensors", info, cfg.lora_format)
        if alignment:
            state["crepa_head"] = alignment.head.state_dict()
        torch.save(state, tmp / "training_state.pt")  # exactly as trained: what resume reads
        meta = {"step": step, "world_size": d.world_size, **info, "adapter": adapter_definition(cfg),
                "config": dataclasses.asdict(cfg)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    d.barrier()
    if d.rank == 0:
        files = sorted(tmp.iterdir())
        manifest = {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in files}
        (tmp / "manifest.json").write_text(json.dumps({"files": manifest}, indent=2))
        for f in [*files, tmp / "manifest.json"]:  # on disk before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if cfg.checkpoints_total_limit:  # old ones go only once the new one is complete
            for old in list_checkpoints(output_dir)[:-cfg.checkpoints_total_limit]:
                shutil.rmtree(old)
        if cfg.push_checkpoints_to_hub:
            push_files({f"checkpoints/{final.name}/{f.name}": f for f in sorted(final.glob("lora*.safetensors"))},
                       cfg, output_dir, f"ltx-lora: checkpoint {final.name}")
    d.barrier()
    return final


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, naming the file; None when every file its manifest lists is
    there, whole and unchanged."""
    try:
        manifest = json.loads((folder / "manifest.json").read_bytes())
    except FileNotFoundError:
        return f"{folder / 'manifest.json'} is missing, so the checkpoint was never completed"
    except ValueError:  # not JSON
        manifest = None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(f, dict) and isinstance(f.get("bytes"), int)
                                              and isinstance(f.get("sha256"), str) for f in files.values()):
        return f"{folder / 'manifest.json'} is damaged"
    for name, f in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != f["bytes"] or sha256(path) != f["sha256"]:
            return f"{path} is damaged (it differs from what manifest.json recorded when it was saved)"
    return None


def find_resume_folder(cfg: config.Config, output_dir: Path, log=print) -> Path | None:
    """The checkpoint to resume from: the named one, or with "latest" the newest complete one (damaged ones
    are skipped with a line each); None for a fresh start."""
    if cfg.resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        for folder in reversed(found):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder
            log(f"skipping checkpoint {folder.name}: {problem}")
        if found:
            raise SystemExit(f"no checkpoint in {output_dir / 'checkpoints'} is complete (see above), so there is "
                             f"nothing to resume; start over in another output_dir or with {START_OVER}")
        return None  # nothing saved yet: a fresh start, as other trainers do
    if not cfg.resume_from_checkpoint:
        return None
    folder = Path(cfg.resume_from_checkpoint)
    problem = checkpoint_problem(folder)
    if problem:
        raise SystemExit(f"cannot resume from {folder}: {problem}")
    step = int(folder.name[5:]) if folder.name[5:].isdigit() else None  # a copy may be named anything
    newer = [p.name for p in list_checkpoints(output_dir) if step is not None and int(p.name[5:]) > step
             and p.resolve().parent == folder.resolve().parent]
    if newer:  # they belong to the run that went on from here; pruning and "latest" would mix the two
        raise SystemExit(f"cannot resume from {folder}: {output_dir} also holds the later checkpoints "
                         f"{', '.join(newer)} of the run that went on from it; resume from latest, or resume into "
                         f"another output_dir (--output_dir=...)")
    return folder


# A checkpoint means nothing to a run with another base model or other adapters; anything else may change.
MUST_MATCH = ("pretrained_model_name_or_path", "pretrained_transformer_model_name_or_path",
              "pretrained_transformer_subfolder")


def adapter_definition(cfg: config.Config) -> dict:
    """Everything that shapes or scales the adapters (meta.json keeps it): LoRA's rank, alpha and targets, or the
    LoKr its lycoris_config describes (the file's contents, not its name: an edited file is another adapter)."""
    if cfg.lora_type == "lycoris":
        spec = dataclasses.asdict(lora.read_lycoris_config(cfg.lycoris_config))
        named = {"dim": "linear_dim", "alpha": "linear_alpha", "targets": "target_module"}  # as the JSON names them
        found = {"lora_type": "lycoris", **{named.get(k, k): v for k, v in spec.items()}}
    else:
        found = {"lora_type": "standard", "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
                 "lora_target_modules": cfg.lora_target_modules}
    return json.loads(json.dumps(found))  # as meta.json gives it back (tuples are lists there)


def saved_adapter_definition(meta: dict) -> dict:
    """A checkpoint's adapter definition; one written before meta.json kept it has its config keys instead."""
    if "adapter" in meta:
        return meta["adapter"]
    saved = meta["config"]
    if saved.get("lora_type", "standard") == "lycoris":
        return {"lora_type": "lycoris", "lycoris_config": saved.get("lycoris_config")}
    return {"lora_type": "standard", **{k: saved.get(k) for k in ("lora_rank", "lora_alpha", "lora_target_modules")}}


def check_resume(folder: Path, cfg: config.Config, log=print) -> dict:
    """The checkpoint's meta.json, once it is known to fit this run: refusals come before anything is cached."""
    meta = json.loads((folder / "meta.json").read_text())
    saved, now = meta["config"], dataclasses.asdict(cfg)
    for key in MUST_MATCH:
        if saved.get(key) != now[key]:
            raise SystemExit(f"cannot resume from {folder}: it was trained with {key} = {saved.get(key)!r}, this run "
                             f"has {now[key]!r}; use the same value or start a new output_dir")
    then, adapter = saved_adapter_definition(meta), adapter_definition(cfg)
    if "adapter" not in meta and then["lora_type"] == "lycoris":  # an old LoKr checkpoint: its file's name is known
        adapter = {"lora_type": "lycoris", "lycoris_config": cfg.lycoris_config}
    keys = ["lora_type"] if then["lora_type"] != adapter["lora_type"] else dict.fromkeys([*then, *adapter])
    differ = [f"{k} {then.get(k)!r} -> {adapter.get(k)!r}" for k in keys if then.get(k) != adapter.get(k)]
    if differ:
        raise SystemExit(f"cannot resume from {folder}: its adapters were defined otherwise ({'; '.join(differ)}); "
                         f"resume with the settings it was trained with (lora_type, lora_rank / lora_alpha / "
                         f"lora_target_modules, or the same lycoris_config contents), or start a new output_dir")
    if cfg.max_train_steps and meta["step"] > cfg.max_train_steps:
        raise SystemExit(f"cannot resume from {folder}: it is at step {meta['step']}, past max_train_steps = "
                         f"{cfg.max_train_steps}; raise max_train_steps or resume from an earlier checkpoint")
    changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]
               and k not in ("resume_from_checkpoint", "overwrite_output_dir")]
    if changed:
        log(f"resuming with changed settings: {'; '.join(changed)}")
    return meta


def load_checkpoint(folder: Path, meta: dict, transformer, optimizer, cfg: config.Config, d: Dist, log=print,
                    ema: "EMA | None" = None, alignment=None) -> int:
    """Restores adapters, optimizer, EMA, CREPA head and this rank's RNG; returns the step to continue from.
    Only safetensors, JSON and weights_only tensors are read: loading never runs code from a file."""
    state = load_tensors(folder / "training_state.pt")
    if "adapters" not in state:  # written before checkpoints kept the adapters apart: lora.safetensors was exact
        state["adapters"] = {f"{name}.lora_{ab}.weight": t for name, (a, b, _) in
                             lora.read_lora_file(folder / "lora.safetensors").items() for ab, t in zip("AB", (a, b))}
    lora.load_adapter_state(transformer, state["adapters"])
    saved = meta["config"]
    head = alignment and "crepa_head" in state and fits(alignment.head.state_dict(), state["crepa_head"])
    if alignment and "crepa_head" in state and not head:  # crepa_model of another width: the head cannot continue
        log(f"the checkpoint's CREPA projection head was trained for crepa_model = {saved.get('crepa_model')!r} of "
            f"another width; a fresh head starts training, and the optimizer starts with fresh state")
    elif (saved.get("optimizer", "adamw"), saved.get("crepa_enabled", False)) == (cfg.optimizer, cfg.crepa_enabled):
        optimizer.load_state_dict(state["optimizer"])
    elif saved.get("optimizer", "adamw") != cfg.optimizer:  # another rule's state means nothing to this one
        log(f"the checkpoint was trained with optimizer = {saved.get('optimizer', 'adamw')}; the LoRA continues from "
            f"it, and {cfg.optimizer} starts with fresh state")
    else:  # the CREPA head's weights come or go: the optimizer's tensors no longer line up
        log(f"the checkpoint was trained with crepa_enabled = {saved.get('crepa_enabled', False)}; the LoRA continues "
            f"from it, and the optimizer starts with fresh state")
    if ema and "ema" in state:
        ema.shadow = [t.to(ema.shadow[0].device) for t in state["ema"]]
    elif ema:
        ema.shadow = EMA(lora.lora_parameters(transformer), ema.decay, ema.shadow[0].device).shadow
        log("the checkpoint has no EMA (use_ema was off): the average starts from its LoRA")
    if head:
        alignment.head.load_state_dict(state["crepa_head"])
    elif alignment and "crepa_head" not in state:
        log("the checkpoint has no CREPA projection head (crepa_enabled was off): a fresh one starts training")
    saved_world = meta.get("world_size", 1)
    rng_file = folder / f"rng-{d.rank}.pt"
    if saved_world == d.world_size or rng_file.exists():  # same world size: the manifest made sure it is there
        set_rng_state(load_tensors(rng_file))
    if saved_world != d.world_size:
        log(f"resuming a {saved_world}-process run on {d.world_size} processes: global batches change size, so the "
            f"data order is not the one the first run would have seen")
    return meta["step"]


def fits(model_state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> bool:
    """Whether saved tensors have exactly the names and shapes of a module's state."""
    return model_state.keys() == saved.keys() and all(model_state[k].shape == saved[k].shape for k in saved)


def load_tensors(path: Path):
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:  # weights_only met an object it will not build
        raise SystemExit(f"{path} holds more than tensors (a pickled object, which could run code when loaded); "
                         f"it was not loaded. Resume from a checkpoint this trainer wrote")


def truncate_log(path: Path, step: int, log=print, source: Path | None = None) -> None:
    """Keeps the log lines up to the step we start from (none on a fresh start): later ones will be written
    again. A damaged line (a crash mid-write leaves a partial last one) is dropped with a note. With `source`
    (the log of the run whose checkpoint this one continues in another folder), its lines are the ones kept."""
    source = source or path
    if not source.exists():
        return
    kept, damaged = [], 0
    for line in source.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # not JSON: cut short
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            damaged += 1
        elif record["step"] <= step:
            kept.append(line + "\n")
    if damaged:
        log(f"{path}: dropped {damaged} damaged line(s), e.g. a partial last line left by a crash")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def json_line(record: dict) -> str:
    """Strict JSON (no bare NaN / Infinity): a non-finite number is written as null and named in "nonfinite"."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        record = {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}
    return json.dumps(record, allow_nan=False) + "\n"


# -----------------------------------------------------------------------------
# Trackers: log.jsonl is always written; report_to adds TensorBoard or wandb, webhook_config adds webhooks.
# The loop calls one Tracker whatever stands behind it (ranks other than 0 get the one that does nothing).

class Tracker:
    """Does nothing: report_to = "none" with no webhook, and every rank but 0. The trackers below override it."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def video(self, step: int, name: str, path: Path) -> None:
        pass

    def image(self, step: int, name: str, path: Path) -> None:
        pass

    def close(self, error: BaseException | None = None) -> None:
        """The run ends; `error` is the exception ending it, if one does (it is raised on afterwards)."""


class TrackerGroup(Tracker):
    """Several trackers as one: each call goes to each, in order."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for t in self.trackers:
            t.log(step, scalars)

    def video(self, step: int, name: str, path: Path) -> None:
        for t in self.trackers:
            t.video(step, name, path)

    def image(self, step: int, name: str, path: Path) -> None:
        for t in self.trackers:
            t.image(step, name, path)

    def close(self, error: BaseException | None = None) -> None:
        for t in self.trackers:
            t.close(error)


class TensorBoard(Tracker):
    """Scalars and the validation contact sheets in output_dir/tensorboard (`tensorboard --logdir <output_dir>`).
    A video shows as its contact sheet: TensorBoard's add_video would need moviepy."""

    def __init__(self, folder: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        # a resumed run writes its steps again: the events the last run logged past the checkpoint are dropped
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def image(self, step: int, name: str, path: Path) -> None:
        from PIL import Image
        self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self, error: BaseException | None = None) -> None:
        self.writer.close()


class Wandb(Tracker):
    """A wandb run in output_dir/wandb with the resolved config, the scalars, the validation videos and contact
    sheets. wandb reads its mode from the environment: WANDB_MODE=offline keeps the run on disk (`wandb sync`
    uploads it later); online needs `wandb login` or WANDB_API_KEY."""

    def __init__(self, cfg: config.Config, name: str, output_dir: Path):
        import wandb
        self.wandb = wandb
        try:
            self.run = wandb.init(project=cfg.tracker_project_name, name=name, dir=str(output_dir),
                                  config=dataclasses.asdict(cfg))
        except wandb.errors.Error as e:  # no login, a refused key, no network: before any work, in one sentence
            raise SystemExit(f'report_to = "wandb" could not start a wandb run ({quant.first_line(e)}): run `wandb '
                             f'login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to keep the run on disk and '
                             f'`wandb sync` it later')

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def video(self, step: int, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Video(str(path))}, step=step)

    def image(self, step: int, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self, error: BaseException | None = None) -> None:
        self.run.finish(exit_code=1 if ended_by_error(error) else 0)


def ended_by_error(error: BaseException | None) -> bool:
    """Whether an exception ending the run is a failure: a SystemExit with no message is a normal end."""
    return error is not None and not (isinstance(error, SystemExit) and error.code in (None, 0))


def shown_url(url: str) -> str:
    """A webhook URL as it may be printed: its path is the key that lets anyone post, so only scheme and host."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}…"


class Webhook(Tracker):
    """Posts the run's news to a Discord channel or any URL (one entry of webhook_config): the start, progress every
    webhook_reporting_interval steps (loss, lr, the latest eval loss), each validation contact sheet (Discord: the
    PNG itself; raw: the paths of it and its videos), an error that ends the run (with its traceback), and the end.

    A thread of its own posts, in order, so a slow endpoint never slows a step. Each try waits at most `timeout`
    seconds (the entry's "timeout", 10 by default); a failed post is tried RETRIES more times, after timeout/10,
    /5, /2.5 seconds, and then given up with one line: training goes on. close() waits at most 3 x timeout for
    what is still queued. The URL is never printed whole (shown_url)."""

    RETRIES = 3

    def __init__(self, entry: dict, name: str, interval: int, log=print):
        self.kind = entry["webhook_type"]
        self.url = entry[config.WEBHOOK_URL_KEYS[self.kind]]
        self.timeout, self.prefix = float(entry.get("timeout", 10)), entry.get("message_prefix", "")
        self.name, self.interval, self.print = name, interval, log
        self.step, self.eval_loss, self.videos = 0, None, []
        self.queue = queue.Queue()
        self.thread = threading.Thread(target=self.send_queued, daemon=True)  # a hung post never holds the exit
        self.thread.start()
        self.post("start", f"{name}: training started")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.step = step
        self.eval_loss = scalars.get("eval_loss", self.eval_loss)
        if self.interval and step % self.interval == 0 and "loss" in scalars:
            loss, lr = scalars["loss"], scalars["lr"]
            evaluated = f", eval loss {self.eval_loss:.4f}" if self.eval_loss is not None else ""
            self.post("progress", f"{self.name}: step {step}, loss {loss:.4f}, lr {lr:.2e}{evaluated}", step=step,
                      loss=loss, lr=lr, eval_loss=self.eval_loss)

    def video(self, step: int, name: str, path: Path) -> None:
        self.videos.append(str(path))  # posted with the contact sheet that follows it

    def image(self, step: int, name: str, path: Path) -> None:
        self.post("validation", f"{self.name}: validation at step {step} ({Path(path).name})", step=step,
                  image=str(path), videos=self.videos)
        self.videos = []

    def close(self, error: BaseException | None = None) -> None:
        if ended_by_error(error):
            what = traceback.format_exception_only(error)[-1].strip()
            self.post("error", f"{self.name}: stopped by an error after step {self.step}: {what}", step=self.step,
                      traceback="".join(traceback.format_exception(error)))
        else:
            self.post("finish", f"{self.name}: training ended at step {self.step}", step=self.step)
        self.queue.put(None)
        self.thread.join(3 * self.timeout)
        if self.thread.is_alive():
            self.print(f"webhook {shown_url(self.url)}: gave up waiting for the last post(s) to be answered")

    def post(self, event: str, message: str, **fields) -> None:
        self.queue.put((event, f"{self.prefix} {message}".strip(), fields))

    def send_queued(self) -> None:
        while (item := self.queue.get()) is not None:
            event = item[0]
            for attempt in range(self.RETRIES + 1):
                try:
                    with urllib.request.urlopen(self.request(*item), timeout=self.timeout) as response:
                        response.read()
                    break
                except (OSError, http.client.HTTPException) as error:  # network, HTTP status, timeout: logged
                    # (a bug in building the post is not caught here: it shows its traceback in this thread)
                    if attempt == self.RETRIES:
                        reason = str(error).replace(self.url, shown_url(self.url))
                        self.print(f"webhook {shown_url(self.url)}: the {event} post failed {attempt + 1} times "
                                   f"({reason}); training goes on")
                    else:
                        time.sleep(self.timeout / 10 * 2 ** attempt)

    def request(self, event: str, message: str, fields: dict) -> urllib.request.Request:
        """raw: the event as JSON. Discord: the message as a chat message (at most 2,000 characters), a contact
        sheet attached as a file (multipart/form-data), the end of an error's traceback as a code block."""
        headers = {"User-Agent": "ltx-lora"}  # Discord refuses urllib's default agent
        if self.kind == "raw":
            payload = {"event": event, "run": self.name, "message": message, **fields}
            return urllib.request.Request(self.url, json_line(payload).encode(),  # strict JSON: NaN as null
                                          {**headers, "Content-Type": "application/json"})
        room = 1900 - len(message)  # for the end of a traceback
        if "traceback" in fields and room > 100:
            message += "\n```\n" + fields["traceback"][-room:] + "```"
        payload = json.dumps({"content": message[:2000]})
        if "image" not in fields:
            return urllib.request.Request(self.url, payload.encode(), {**headers, "Content-Type": "application/json"})
        boundary = os.urandom(16).hex()
        image = Path(fields["image"])
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"payload_json\"\r\n"
                f"Content-Type: application/json\r\n\r\n{payload}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"files[0]\"; filename=\"{image.name}\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        return urllib.request.Request(self.url, body, {**headers,
                                                       "Content-Type": f"multipart/form-data; boundary={boundary}"})


def check_trackers(cfg: config.Config) -> None:
    """report_to's package missing stops the run at start, before any work, in one sentence."""
    if cfg.report_to not in ("none", "jsonl"):  # (log.jsonl is written whatever report_to says)
        try:
            __import__(cfg.report_to)
        except ImportError:
            raise SystemExit(f"report_to = \"{cfg.report_to}\" needs the {cfg.report_to} package, which is not "
                             f"installed here; pip install {cfg.report_to}, or set report_to = \"none\"")


def open_trackers(cfg: config.Config, output_dir: Path, d: Dist, start_step: int, log=print) -> Tracker:
    """Rank 0's trackers (report_to, then one Webhook per webhook_config entry); the no-op on other ranks."""
    if d.rank != 0:
        return Tracker()
    name = cfg.tracker_run_name or output_dir.resolve().name
    trackers, before = [], tracker_logs(output_dir)
    if cfg.report_to == "tensorboard":
        trackers.append(TensorBoard(output_dir / "tensorboard", start_step))
    if cfg.report_to == "wandb":
        trackers.append(Wandb(cfg, name, output_dir))
    own(output_dir, *sorted(str(p.relative_to(output_dir)) for p in tracker_logs(output_dir) - before))
    trackers += [Webhook(entry, name, cfg.webhook_reporting_interval, log) for entry in config.webhooks(cfg)]
    return TrackerGroup(trackers)


def tracker_logs(output_dir: Path) -> set[Path]:
    """TensorBoard's event files and wandb's run folders in output_dir (each tracker start makes one)."""
    found = {*output_dir.glob("tensorboard/events.out.tfevents.*"), *output_dir.glob("wandb/*run-*")}
    return {p for p in found if not p.is_symlink()}  # (wandb's latest-run is a link to the newest)


def can_plot() -> bool:
    """Whether matplotlib is here to draw loss.png (it is optional: the start-up summary says when it is not)."""
    try:
        __import__("matplotlib")
    except ImportError:
        return False
    return True


def plot_loss(output_dir: Path) -> None:
    """output_dir/loss.png from log.jsonl: each step's loss, its moving average (as the progress bar shows it),
    and the eval loss where it was measured. Drawn on matplotlib's Agg canvas (no display, no pyplot state), to a
    temporary name and renamed: a reader never sees half a PNG."""
    from matplotlib.figure import Figure
    records = []
    for line in (output_dir / "log.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    points = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    steps, losses = [step for step, _ in points], [loss for _, loss in points]
    smooth, smoothed = None, []
    for loss in losses:
        smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
        smoothed.append(smooth)
    figure = Figure(figsize=(8, 4.5), dpi=100)
    ax = figure.subplots()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    ax.plot(steps, smoothed, color="tab:blue", linewidth=1.5, label="loss, moving average (0.9)")
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", label="eval loss")
    ax.set(xlabel="step", ylabel="flow-matching loss", title=output_dir.resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = output_dir / "loss.png.tmp"
    figure.savefig(tmp, format="png")
    os.replace(tmp, output_dir / "loss.png")


def human_time(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


# -----------------------------------------------------------------------------
# The output folder: one run at a time; a finished run, and every file this trainer did not write, left alone

START_OVER = "--resume_from_checkpoint= --overwrite_output_dir=true"
OUTPUTS = ".ltx-lora-outputs.json"  # what this trainer wrote in output_dir: {path: SHA-256, or null}
RUN_FILES = ("lora.safetensors", "lora_ema.safetensors", "log.jsonl", "config.toml", "data_report.json",
             "memory.json", "loss.png", "model_card.md")  # what a run writes at the top of output_dir
STEP_FOLDERS = ("checkpoints", "samples")  # their step-N folders are a run's; anything else in them is kept
CHANGED_BY_HAND = ("lora.safetensors", "lora_ema.safetensors", "config.toml", "model_card.md")  # hashed: an
# edited or replaced copy is yours from then on. The others are recorded by name only (logs, reports, plots).


def lock_output_dir(output_dir: Path):
    """An exclusive OS lock on output_dir/.lock, held while the returned file stays open: the OS releases it when
    the process ends, however it ends (SIGKILL included), so it is never stale. A second run stops at once."""
    import fcntl
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise SystemExit(f"output_dir {output_dir} is in use by another run (PID {holder}); wait for it to end, stop "
                         f"it, or choose another output_dir")
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def read_outputs(output_dir: Path) -> dict[str, str | None]:
    """The record of what this trainer wrote in output_dir: {path relative to it: the file's SHA-256 when written,
    or None for what is recorded by name}. A missing or damaged record is empty: nothing is then taken as ours."""
    try:
        record = json.loads((output_dir / OUTPUTS).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    ok = isinstance(record, dict) and all(isinstance(v, (str, type(None))) for v in record.values())
    return record if ok else {}


def own(output_dir: Path, *names: str) -> None:
    """Records files or folders of output_dir as this trainer's (CHANGED_BY_HAND files with their hash): a later
    run of this trainer may replace them, and overwrite_output_dir may remove them."""
    record = read_outputs(output_dir)
    for name in names:
        path = output_dir / name
        record[name] = sha256(path) if name in CHANGED_BY_HAND and path.is_file() else None
    write_json_atomic(output_dir / OUTPUTS, record)


def write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def not_ours(output_dir: Path, names) -> list[str]:
    """The names among `names` that exist in output_dir but this trainer did not write (or that were edited or
    replaced since: their hash differs): files of yours that a run must not replace."""
    record = read_outputs(output_dir)
    return [name for name in names if (output_dir / name).exists()
            and (name not in record or record[name] not in (None, sha256(output_dir / name)))]


def adopt_earlier_outputs(output_dir: Path) -> None:
    """A run written before OUTPUTS existed is taken as this trainer's as it stands: its files and tracker logs.
    Its log.jsonl is what tells a run from a folder where a user keeps a LoRA (a lone one stays the user's)."""
    if (output_dir / OUTPUTS).exists() or not (output_dir / "log.jsonl").is_file():
        return
    own(output_dir, *[n for n in RUN_FILES if (output_dir / n).exists()],
        *sorted(str(p.relative_to(output_dir)) for p in tracker_logs(output_dir)))


def previous_run(output_dir: Path) -> str:
    """What of an earlier run output_dir holds ("" when nothing): its LoRA, checkpoints or log lines."""
    found = []
    if (output_dir / "lora.safetensors").exists():
        found.append("lora.safetensors")
    checkpoints = sorted(p.name for p in (output_dir / "checkpoints").glob("step-*"))
    if checkpoints:
        found.append(f"checkpoints {', '.join(checkpoints)}")
    log = output_dir / "log.jsonl"
    if log.exists() and log.stat().st_size:
        found.append("log.jsonl")
    return "; ".join(found)


def remove_run(output_dir: Path) -> list[str]:
    """overwrite_output_dir: deletes what the earlier run wrote (its recorded files and tracker logs, and the
    step-N folders of checkpoints/ and samples/) and nothing else; returns what it removed."""
    removed = []
    for name in read_outputs(output_dir):
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
        if path.parent != output_dir:  # a tracker's folder: its links to what went (wandb's latest-run), then it
            for link in [p for p in path.parent.iterdir() if p.is_symlink() and not p.exists()]:
                link.unlink()
            with contextlib.suppress(OSError):  # kept when it holds anything else
                path.parent.rmdir()
    for folder in STEP_FOLDERS:
        steps = sorted((output_dir / folder).glob("step-*"))
        for path in steps:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if steps:
            removed.append(f"{folder}/{{{', '.join(p.name for p in steps)}}}")
            with contextlib.suppress(OSError):  # kept when it holds anything else
                (output_dir / folder).rmdir()
    write_json_atomic(output_dir / OUTPUTS, {})
    return removed


def claim_output_dir(cfg: config.Config, output_dir: Path, log=print) -> None:
    """Makes output_dir this run's, refusing (before anything is changed) when the run would replace a file it did
    not write or another run: a fresh run refuses a folder that holds a run, unless overwrite_output_dir removes
    that run's outputs (never anything else: the demo keeps its model and clips there); a resume of another
    folder's checkpoint needs an output_dir without a run."""
    adopt_earlier_outputs(output_dir)
    writes = [n for n in RUN_FILES if n != "model_card.md" or cfg.push_to_hub]
    foreign = not_ours(output_dir, writes)
    if foreign:
        raise SystemExit(f"output_dir {output_dir} holds {', '.join(foreign)}, which this trainer did not write (or "
                         f"which changed since it did); this run would replace {'them' if len(foreign) > 1 else 'it'}"
                         f": move {'them' if len(foreign) > 1 else 'it'} elsewhere or choose another output_dir")
    found = previous_run(output_dir)
    elsewhere = cfg.resume_from_checkpoint not in ("", "latest") and \
        Path(cfg.resume_from_checkpoint).resolve().parent != (output_dir / "checkpoints").resolve()
    if cfg.overwrite_output_dir and found:  # (config.check refused it together with resume_from_checkpoint)
        log(f"overwrite_output_dir: removed the previous run from {output_dir}: {'; '.join(remove_run(output_dir))}")
    elif found and not cfg.resume_from_checkpoint:
        raise SystemExit(f"output_dir {output_dir} holds a run already ({found}); continue it with "
                         f"--resume_from_checkpoint=latest, or start over in another output_dir or with "
                         f"--overwrite_output_dir=true (which deletes that run's checkpoints, log, LoRA and samples)")
    elif found and elsewhere:
        raise SystemExit(f"output_dir {output_dir} holds a run ({found}), and resume_from_checkpoint = "
                         f"{cfg.resume_from_checkpoint} is another folder's checkpoint: continuing it here would "
                         f"replace that run; resume into an output_dir that holds no run")
    elif found and cfg.resume_from_checkpoint == "latest" and not list_checkpoints(output_dir) \
            and (output_dir / "lora.safetensors").exists():
        raise SystemExit(f"output_dir {output_dir} holds a finished run (lora.safetensors) with no checkpoint to "
                         f"resume from; start over in another output_dir or with {START_OVER}")
    own(output_dir, *[n for n in writes if n not in CHANGED_BY_HAND])  # this run's from now on


# -----------------------------------------------------------------------------
# Setup: demo assets, caches, the model

def prepare_demo(cfg: config.Config) -> None:
    """The tiny random LTX pipeline and the synthetic clips, each made once at its configured path."""
    model_dir = Path(cfg.pretrained_model_name_or_path)
    folder = Path(config.dataset_entries(cfg, log=lambda message: None)[0][0].instance_data_dir)  # the first dataset's
    demo.prepare(model_dir, folder, cfg.seed)


def source_id(name_or_path: str) -> str:
    """A stable name for a model: the absolute path of a local folder, or the hub id."""
    return str(Path(name_or_path).resolve()) if os.path.isdir(name_or_path) else name_or_path


class Prepared(NamedTuple):
    samples: list[data.Sample]  # every usable sample that trains
    eval_clips: list[data.Sample]  # the ones held out for the eval loss (hold_out)
    buckets: list[data.Bucket]
    datasets: dict[str, data.Dataset]  # by id
    texts: dict[str, dict[str, torch.Tensor]]  # embeddings of "" and the validation prompts
    vae: torch.nn.Module | None  # kept (on the CPU) on rank 0 when there is something to validate
    rope_scale: tuple[float, float, float]


def prepare_data(cfg: config.Config, d: Dist, device: torch.device, output_dir: Path,
                 peaks: dict[str, int] | None = None) -> Prepared:
    """Plans every dataset's samples and caches their latents and captions, with the VAE and T5 loaded only
    for that and freed afterwards.

    Rank 0 plans (it alone moves bad files to quarantine) and hands the plan to the others; each rank then
    caches its share and all wait for each other. T5-XXL (9.8 GB in bf16) loads only if some caption or prompt
    needs encoding, so a rerun over a full cache skips it. One frozen model at a time is on the accelerator: T5
    (text_encoder_precision) while the prompts and captions are cached, then the VAE (tiled with
    vae_enable_tiling) while the clips are; the transformer loads after both. With validation prompts, rank 0 keeps
    the VAE, on the CPU until a validation decodes.
    """
    peaks = {} if peaks is None else peaks  # each phase's memory peak is recorded here (record_peak)
    datasets, text_entry = config.dataset_entries(cfg, log=print if d.rank == 0 else lambda message: None)
    by_id = {ds.id: ds for ds in datasets}
    report = data.Report(output_dir / "data_report.json", quarantine=cfg.delete_problematic_images,
                         echo=d.rank == 0)
    planned = [None]
    if d.rank == 0:  # (an error on rank 0 ends the other ranks too: torchrun stops the job)
        planned = [[s for ds in datasets for s in data.plan_samples(ds, cfg.aspect_bucket_rounding, cfg.seed, report)]]
        stop_if_mostly_skipped(report)  # a settings mistake stops here, before any caching
    if d.world_size > 1:
        dist.broadcast_object_list(planned, src=0)
    samples = planned[0]

    dtype = config.DTYPES[cfg.base_model_default_dtype]
    vae_source = cfg.pretrained_vae_model_name_or_path or cfg.pretrained_model_name_or_path
    vae = ltx.load_vae(vae_source, None if cfg.pretrained_vae_model_name_or_path else "vae", dtype)  # on the CPU
    if cfg.vae_enable_tiling:
        vae.enable_tiling()
    text, too_long = {}, {}  # too_long: caption -> its tokens, for captions T5's 128 tokens cut short

    def encode_text(prompts: list[str]):
        vae.to("cpu")  # one of the two on the accelerator at a time
        if not text:
            text["tokenizer"], text["encoder"] = ltx.load_text_encoder(cfg.pretrained_model_name_or_path, dtype)
            if cfg.quantize_via == "accelerator":
                text["encoder"].to(device)
            quant.quantize(text["encoder"], cfg.text_encoder_precision, quant.encoder_linears(text["encoder"]))
        text["encoder"].to(device)
        lengths = ltx.prompt_lengths(text["tokenizer"], prompts)
        too_long.update((p, n) for p, n in zip(prompts, lengths) if n > ltx.TEXT_TOKENS)
        return ltx.encode_prompts(text["tokenizer"], text["encoder"], prompts)

    def encode_video(video: torch.Tensor) -> torch.Tensor:
        if "text caching" not in peaks:
            record_peak(peaks, "text caching", device)
        if text:  # one of the two on the accelerator at a time
            text["encoder"].to("cpu")
        vae.to(device)
        return ltx.encode_video(vae, video)

    shape = data.CacheShape(*ltx.vae_ratios(vae), vae.config.latent_channels, ltx.TEXT_TOKENS,
                            ltx.text_dim(cfg.pretrained_model_name_or_path))  # what the encoders make of a clip
    vae_encoder = {"model": source_id(vae_source), "dtype": cfg.base_model_default_dtype,
                   "tiling": cfg.vae_enable_tiling}
    text_encoder = {"model": source_id(cfg.pretrained_model_name_or_path), "dtype": cfg.base_model_default_dtype,
                    "precision": cfg.text_encoder_precision, "tokens": ltx.TEXT_TOKENS}
    text_dir = Path(text_entry.cache_dir) if text_entry and text_entry.cache_dir else None
    data.cache_samples(samples, by_id, encode_video, encode_text, vae=vae_encoder, text=text_encoder,
                       text_dir=text_dir, compress=cfg.compress_disk_cache, vae_batch_size=cfg.vae_batch_size,
                       text_batch_size=(text_entry or data.Dataset()).write_batch_size, report=report,
                       shape=shape, rank=d.rank, world_size=d.world_size)
    prompts = config.validation_prompts(cfg)
    extra = [""] + ([p for _, p in prompts] + [cfg.validation_negative_prompt] if prompts else [])
    texts = data.cached_text(extra, encode_text, text_dir or data.latent_cache_dir(datasets[0]), text_encoder)
    del text  # T5 is done: every caption and prompt is cached
    record_peak(peaks, "latent caching" if "text caching" in peaks else "caching", device)  # no clip to encode
    rope_scale = ltx.rope_scale(vae)
    vae = vae.to("cpu") if prompts and d.rank == 0 else None  # kept off the GPU until a validation needs it
    if device.type == "cuda":
        torch.cuda.empty_cache()
    d.barrier()  # every rank's share is on disk
    if cfg.crepa_enabled:
        cache_crepa_features(data.cached(samples), by_id, cfg, d, device, report, shape)
        record_peak(peaks, "feature caching", device)
    if d.world_size > 1:  # decode failures and long captions each rank found in its share
        found = [None] * d.world_size
        dist.all_gather_object(found, (report.problems, too_long))
        report.problems = [p for problems, _ in found for p in problems]
        too_long = {caption: n for _, theirs in found for caption, n in theirs.items()}
    for ds in datasets:  # said once: the run that encodes them
        cut = {s.path.name: too_long[s.caption] for s in samples if s.dataset == ds.id and s.caption in too_long}
        if cut:
            longest = max(cut, key=cut.get)
            report.note(f"dataset '{ds.id}': {len(cut)} caption(s) are longer than T5's {ltx.TEXT_TOKENS} tokens and "
                        f"were cut to {ltx.TEXT_TOKENS} (the longest: {longest}'s, {cut[longest]} tokens)")
    if d.rank == 0:
        stop_if_mostly_skipped(report)
        report.move_broken(by_id)  # only files broken in themselves, and only with delete_problematic_images
    samples, eval_clips = hold_out(data.cached(samples), cfg)
    buckets = data.make_buckets(samples, by_id, cfg.train_batch_size * d.world_size, not cfg.disable_bucket_pruning,
                                report)
    if d.rank == 0:
        for ds in datasets:
            held = sum(s.dataset == ds.id for s in eval_clips)
            if held:
                print(f"dataset '{ds.id}': {held} clip(s) held out for the eval loss, never trained on")
            if ds.id == cfg.eval_dataset_id:
                continue
            mine = [b for b in buckets if b.dataset == ds.id]
            skipped = sum(p["dataset"] == ds.id for p in report.problems)
            print(f"dataset '{ds.id}': {sum(len(b.samples) for b in mine)} samples in {len(mine)} bucket(s) "
                  f"({', '.join(f'{b.name}: {len(b.samples)}' for b in mine)}), "
                  f"{skipped} file(s) skipped")
        report.write()
    for ds in datasets:  # every dataset must fill one optimizer step on its own (none is empty: see Report)
        if ds.id == cfg.eval_dataset_id:
            continue
        usable = sum(s.dataset == ds.id for s in samples)
        needed = cfg.train_batch_size * d.world_size * cfg.gradient_accumulation_steps
        if usable * (1 + ds.repeats) < needed:
            raise SystemExit(f"no samples detected in dataset {ds.id}: {usable} usable clips < batch x accumulation "
                             f"{'x processes ' if d.world_size > 1 else ''}= {needed}; raise repeats or lower the "
                             f"batch (skipped files: {report.path})")
    if not buckets:
        raise SystemExit(f"every bucket holds fewer clips than one batch of {cfg.train_batch_size * d.world_size} "
                         f"and was pruned; lower train_batch_size or set disable_bucket_pruning = true")
    return Prepared(samples, eval_clips, buckets, by_id, texts, vae, rope_scale)


def cache_crepa_features(samples: list[data.Sample], datasets: dict[str, data.Dataset], cfg: config.Config, d: Dist,
                         device: torch.device, report: data.Report, shape: data.CacheShape) -> None:
    """CREPA's DINOv2 features of the clean frames, cached beside the latents (data.cache_features): DINOv2 loads
    only when some clip's features are missing, alone on the accelerator (T5 is gone and the VAE on the CPU by
    then), and is freed before the transformer loads; training reads the features from disk."""
    encoder = {}
    spatial, temporal = shape.spatial, shape.temporal

    def encode_frames(video: torch.Tensor) -> torch.Tensor:
        if not encoder:
            encoder["dinov2"] = crepa.load_encoder(cfg.crepa_model, device, config.DTYPES[cfg.base_model_default_dtype])
        frames, height, width = video.shape[2:]
        grid = ((frames - 1) // temporal + 1, height // spatial, width // spatial)
        return crepa.frame_features(encoder["dinov2"], video, cfg.crepa_encoder_image_size, grid, temporal)

    settings = crepa.feature_encoder(cfg.crepa_model, cfg.crepa_encoder_image_size, cfg.base_model_default_dtype)
    data.cache_features(samples, datasets, encode_frames, settings, cfg.vae_batch_size, report, cfg.compress_disk_cache,
                        d.rank, d.world_size, shape, crepa.feature_dim(cfg.crepa_model))
    encoder.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    d.barrier()  # every rank's features are on disk


def stop_if_mostly_skipped(report: data.Report) -> None:
    """More than half of a dataset unusable looks like wrong settings: stop with the report written, nothing moved."""
    try:
        report.check_mostly_usable()
    except data.DataError:
        report.write()
        raise


def load_model(cfg: config.Config, device: torch.device):
    """The transformer as training uses it: loaded in base_model_default_dtype, then prepare_model."""
    transformer = ltx.load_transformer(*config.transformer_source(cfg), config.DTYPES[cfg.base_model_default_dtype])
    return prepare_model(transformer, cfg, device)


def prepare_model(transformer: ltx.LTXTransformer, cfg: config.Config, device: torch.device):
    """A loaded transformer made ready to train, in one fixed order (bench.py builds its rows with it too):
        quantize the block linears (quant.py) -> inject LoRA (lora.py) -> device,
        the blocks' frozen weights offloaded instead with enable_group_offload (offload.py)
    With quantize_via = "cpu" the weights are quantized before they move, so the full-precision model never sits
    on the accelerator whole; "accelerator" moves it first (faster quantization, the full model's memory once)."""
    if cfg.quantize_via == "accelerator":
        transformer.to(device)
    quant.quantize(transformer, cfg.base_model_precision, quant.block_linears(transformer))
    adapter_dtype = torch.bfloat16 if cfg.optimizer == "adamw_bf16" else torch.float32
    if cfg.lora_type == "lycoris":  # LoKr in the linears LyCORIS' preset names (lora_rank / alpha / targets unused)
        lora.inject_lokr(transformer, lora.read_lycoris_config(cfg.lycoris_config), adapter_dtype)
    else:
        lora.inject(transformer, cfg.lora_target_modules, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank,
                    cfg.lora_dropout, dtype=adapter_dtype)
    ltx.set_attention(transformer, cfg.attention_mechanism)
    transformer.gradient_checkpointing = cfg.gradient_checkpointing
    transformer.checkpointing_interval = cfg.gradient_checkpointing_interval
    if cfg.compile:
        ltx.compile_blocks(transformer)
    if cfg.enable_group_offload:  # the rest moves to the device; the blocks' frozen weights visit it (offload.py)
        folder = cfg.group_offload_to_disk_path and offload.make_folder(cfg.group_offload_to_disk_path)
        offload.offload_blocks(transformer, device, cfg.group_offload_blocks_per_group, cfg.group_offload_use_stream,
                               folder)
        return transformer.train()
    return transformer.to(device).train()


# -----------------------------------------------------------------------------
# Optimizers: the update rule and how many bytes its state takes per LoRA weight (README: Memory)

def make_optimizer(params: list[torch.nn.Parameter], cfg: config.Config) -> torch.optim.Optimizer:
    """cfg.optimizer over the adapter weights. The libraries are imported here, only when chosen.
        adamw                torch AdamW, fused (one kernel for every tensor) on CUDA and on the CPU: 8 bytes of state
        adamw_bf16           AdamWBF16 below: adapters and state in bf16, stochastic rounding: 4 bytes of state
        optimi-lion          Lion (sign of a momentum blend; one state): 4 bytes       (torch-optimi)
        optimi-stableadamw   AdamW with AdaFactor's update clipping per tensor: 8 bytes (torch-optimi)
        bnb-adamw8bit        AdamW, both moments in 8 bits, blockwise scaled: 2 bytes  (bitsandbytes)
        bnb-lion8bit-paged   Lion, 8-bit state in paged memory, which CUDA may evict to the CPU: 1 byte"""
    lr, wd = cfg.learning_rate, cfg.adam_weight_decay
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True)
    if cfg.optimizer == "adamw_bf16":
        return AdamWBF16(params, lr=lr, weight_decay=wd)
    if cfg.optimizer.startswith("optimi-"):
        import optimi
        rule = optimi.Lion if cfg.optimizer == "optimi-lion" else optimi.StableAdamW
        return rule(params, lr=lr, weight_decay=wd)
    quant.import_quiet("bitsandbytes")
    import bitsandbytes as bnb
    if cfg.optimizer == "bnb-adamw8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=wd)
    # paging is CUDA's unified memory; elsewhere the state is ordinary memory (check_optimizer says so once)
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    return bnb.optim.PagedLion8bit(params, lr=lr, weight_decay=wd)


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


def check_optimizer(cfg: config.Config, device: torch.device, log=print) -> None:
    """Stops at start-up, in one sentence, when this machine lacks the chosen optimizer's package, or it does not
    run on `device` (a probe: one step on a small tensor there)."""
    package = {"optimi": "torch-optimi", "bnb": "bitsandbytes"}.get(cfg.optimizer.partition("-")[0])
    if cfg.optimizer.endswith("-paged") and device.type != "cuda":
        log(f"optimizer = {cfg.optimizer}: paging needs CUDA; on the {device.type} its 8-bit state is ordinary memory")
    probe = [torch.nn.Parameter(torch.ones(64, 64, device=device))]
    probe[0].grad = torch.ones_like(probe[0])
    try:
        make_optimizer(probe, cfg).step()
    except ImportError as error:
        raise SystemExit(f"optimizer = {cfg.optimizer} needs the {package} package, which does not import here "
                         f"({error}); pip install -r requirements.txt, or use adamw or adamw_bf16")
    except (RuntimeError, NotImplementedError) as error:  # the backend's "not on this device"
        if not quant.raised_by_library(error):
            raise  # ours (AdamWBF16): a bug, with its traceback
        raise SystemExit(f"optimizer = {cfg.optimizer} does not run on this machine's {device.type} "
                         f"({quant.first_line(error)}); use adamw or adamw_bf16")


# -----------------------------------------------------------------------------

def all_reduce_mean(tensors: list[torch.Tensor], d: Dist) -> None:
    """Averages tensors over the ranks in place, in one collective: the LoRA gradients are small (tens of
    MB at rank 16), so a flat buffer beats DDP's hooks, and the frozen base is never touched."""
    if d.world_size == 1:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= d.world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class DataOrder:
    """The run's global batches, a pure function of (seed, micro-batch k): epoch e is data.epoch_plan(seed, e),
    computed when the run reaches it (only the current epoch is kept)."""

    def __init__(self, buckets: list[data.Bucket], datasets: dict[str, data.Dataset], global_batch: int, seed: int):
        self.buckets, self.datasets, self.global_batch, self.seed = buckets, datasets, global_batch, seed
        self.plans: dict[int, list[list[int]]] = {}
        self.batches_per_epoch = len(self.epoch(0))

    def epoch(self, e: int) -> list[list[int]]:
        if e not in self.plans:
            self.plans = {e: data.epoch_plan(self.buckets, self.datasets, self.global_batch, self.seed, e)}
        return self.plans[e]

    def cursor(self, k: int) -> tuple[int, int]:
        """(epoch, batch in the epoch) of micro-batch k."""
        return divmod(k, self.batches_per_epoch)


def micro_batch(order: DataOrder, k: int, samples: list[data.Sample], rank: int, batch_size: int,
                device: torch.device) -> tuple[dict[str, torch.Tensor], str]:
    """This rank's slice of the k-th global batch of the run, on the device (its i2v flags stay on the CPU),
    and its bucket as WxH@F."""
    epoch, position = order.cursor(k)
    chosen = [samples[i] for i in order.epoch(epoch)[position][rank * batch_size:(rank + 1) * batch_size]]
    batch = data.load_batch(chosen)
    bucket = data.shape_name(chosen[0].width, chosen[0].height, chosen[0].frames)
    return {key: value if key == "i2v" else value.to(device, non_blocking=True) for key, value in batch.items()}, bucket


def checkpoint_info(step: int, order: DataOrder, cfg: config.Config) -> dict:
    """What meta.json (and the LoRA file's metadata) records besides the step and config: where the data continues,
    the base model and the precision its weights were trained in."""
    epoch, position = order.cursor(step * cfg.gradient_accumulation_steps)
    return {"data_cursor": {"epoch": epoch, "batch": position}, "base_model": cfg.pretrained_model_name_or_path,
            "base_model_precision": cfg.base_model_default_dtype if cfg.base_model_precision == "no_change"
            else cfg.base_model_precision}


class Validation(NamedTuple):
    """What the validation videos need, gathered once: cached prompt embeddings, sizes, the VAE."""
    prompts: list[tuple[str, dict]]  # (nickname, cached embedding)
    negative: dict
    sizes: list[tuple[int, int]]
    num_frames: int
    scheduler: dict
    vae: torch.nn.Module | None
    versions: list  # (file-name suffix, context that puts those weights in place): the LoRA, its EMA


def render_validation(step: int, transformer, v: Validation, cfg: config.Config, output_dir: Path, d: Dist,
                      device: torch.device, log=print, tracker: Tracker = Tracker()) -> list[str]:
    """Videos of every validation prompt at this step (rank 0 renders, the others wait), each contact sheet handed
    to the tracker after its videos."""
    paths = []
    if d.rank == 0 and v.prompts:
        paths = sample.render_validation(transformer, v.vae, v.prompts, v.negative, sizes=v.sizes,
                                         num_frames=v.num_frames, steps=cfg.validation_num_inference_steps,
                                         guidance=cfg.validation_guidance, seed=cfg.validation_seed,
                                         image_path=cfg.validation_image, folder=output_dir / "samples" / f"step-{step}",
                                         scheduler=v.scheduler, device=device,
                                         model_cpu_offload=cfg.enable_model_cpu_offload, versions=v.versions)
        log(f"\nvalidation at step {step}: {', '.join(paths)}")
        per_sheet = len(v.versions)  # sample.py: each prompt and size: a video per version, then their sheet
        for i in range(0, len(paths), per_sheet):
            for path in map(Path, paths[i:i + per_sheet]):
                tracker.video(step, f"validation_video/{path.stem}", path)
            sheet = Path(paths[i]).with_suffix(".png")
            tracker.image(step, f"validation/{sheet.stem}", sheet)
    d.barrier()
    return paths


def optimizer_step(params: list[torch.nn.Parameter], optimizer, scaler, loss_sum: torch.Tensor, cfg: config.Config,
                   d: Dist) -> tuple[float, float, bool]:
    """Averages gradients (and the logged loss) over the ranks, clips, and steps unless something is NaN / inf.
    Returns (loss, grad norm, whether the step was taken); reading the two numbers waits for the GPU."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_mean([p.grad for p in params] + [loss_sum], d)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    loss, norm = torch.stack([loss_sum / cfg.gradient_accumulation_steps, grad_norm.float()]).tolist()
    finite = math.isfinite(loss) and (math.isfinite(norm) or scaler.is_enabled())
    if finite:
        if cfg.max_grad_norm > 0 and cfg.grad_clip_method == "norm":
            torch.nn.utils.clip_grads_with_norm_(params, cfg.max_grad_norm, grad_norm)
        elif cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_value_(params, cfg.max_grad_norm)
        scaler.step(optimizer)  # with fp16, skips the update itself when a gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, finite


# -----------------------------------------------------------------------------
# Training quality: the EMA of the LoRA, the stable eval loss (README: Training quality)

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


def hold_out(samples: list[data.Sample], cfg: config.Config) -> tuple[list[data.Sample], list[data.Sample]]:
    """(training samples, eval samples): the whole eval_dataset_id dataset, or eval_fraction of each dataset's
    files (at least one) by a seeded shuffle of their paths, so the same files on every rank and after a resume.
    Every sample of a held-out file is held out: no window of an eval clip is ever trained on."""
    if cfg.eval_dataset_id:
        held = {s.path for s in samples if s.dataset == cfg.eval_dataset_id}
    elif cfg.eval_fraction:
        held = set()
        for ds in sorted({s.dataset for s in samples}):
            files = sorted({s.path for s in samples if s.dataset == ds})
            random.Random(f"{cfg.seed}/eval/{ds}").shuffle(files)
            held |= set(files[:max(1, round(cfg.eval_fraction * len(files)))])
            if len(held & set(files)) == len(files):
                raise SystemExit(f"eval_fraction = {cfg.eval_fraction} holds out every file of dataset '{ds}' "
                                 f"({len(files)} file(s)), leaving nothing to train on; lower it or use "
                                 f"eval_dataset_id")
    else:
        return samples, []
    return [s for s in samples if s.path not in held], [s for s in samples if s.path in held]


@torch.no_grad()
def evaluate(transformer, forward, clips: list[data.Sample], cfg: config.Config, d: Dist,
             device: torch.device) -> dict[str, float]:
    """The eval loss: the flow-matching loss of every eval clip at every σ of eval_sigmas, with one noise per
    clip fixed by its place in the eval set, its own caption, its first frame as condition when it is an i2v clip,
    and no dropout (eval mode). Nothing random is left, so only the weights move it: a loss that falls while
    training is learning, not luck of the draw. Per σ (eval_loss_sigma_0.1, ...) because a LoRA mostly changes
    the low-σ (detail) or high-σ (layout) end; eval_loss is their mean. Ranks split the clips and sum."""
    transformer.eval()
    dtype = config.DTYPES[cfg.base_model_default_dtype]
    sums = torch.zeros(len(cfg.eval_sigmas), device=device)
    for i in range(d.rank, len(clips), d.world_size):
        batch = {k: v if k == "i2v" else v.to(device) for k, v in data.load_batch([clips[i]]).items()}
        latents, grid = batch["latents"], batch["latents"].shape[2:]
        x0 = ltx.pack_latents(latents)
        noise = torch.randn(x0.shape, generator=torch.Generator(device).manual_seed(example_seed(cfg.seed, -1, i)),
                            device=device)
        for j, sigma in enumerate(cfg.eval_sigmas):
            flow = noised(x0, noise, torch.full((1,), sigma, device=device), batch["prompt_embeds"].to(dtype),
                          batch["prompt_attention_mask"], batch["i2v"], latents.shape[3] * latents.shape[4])
            with autocast(cfg, device):
                pred = forward(flow._replace(x_t=flow.x_t.to(dtype)), grid)
            sums[j] += per_clip_loss(pred, flow)[0]
    transformer.train()
    if d.world_size > 1:
        dist.all_reduce(sums)  # every rank's clips
    means = (sums / len(clips)).tolist()
    record = {f"eval_loss_sigma_{sigma:g}": value for sigma, value in zip(cfg.eval_sigmas, means)}
    record["eval_loss"] = sum(means) / len(means)
    return record


# -----------------------------------------------------------------------------
# Publishing: the model card and the hub (push_to_hub, push_checkpoints_to_hub)

def model_card(cfg: config.Config, output_dir: Path, samples: list[data.Sample], total_steps: int,
               images: list[str]) -> str:
    """README.md of the hub repo: what the LoRA is, how it was trained, how to use it; `images` are contact sheets
    uploaded beside it."""
    captions = list(dict.fromkeys(s.caption for s in samples))
    repo = config.hub_repo(cfg)
    base = cfg.pretrained_model_name_or_path
    on_hub = not os.path.isdir(base)  # a local folder's path means nothing to a reader (and is private)
    base_name = base if on_hub else Path(base).name
    prompts = [p for _, p in config.validation_prompts(cfg)]
    settings = {"steps": total_steps, "clips per step": cfg.train_batch_size * cfg.gradient_accumulation_steps,
                "learning rate": f"{cfg.learning_rate:g} ({cfg.lr_scheduler}, {cfg.lr_warmup_steps} warm-up)",
                "LoRA": f"rank {cfg.lora_rank}, alpha {cfg.lora_alpha or cfg.lora_rank:g}, {len(cfg.lora_target_modules)} "
                        f"target modules" if cfg.lora_type == "standard" else "LoKr (LyCORIS)",
                "optimizer": cfg.optimizer,
                "base precision": f"{cfg.base_model_default_dtype}, blocks {cfg.base_model_precision}",
                "clips": f"{len(samples)} in {len({(s.width, s.height, s.frames) for s in samples})} shape(s): "
                         + ", ".join(sorted({data.shape_name(s.width, s.height, s.frames) for s in samples})),
                "EMA": f"decay {cfg.ema_decay} (lora_ema.safetensors)" if cfg.use_ema else "off",
                "CREPA": f"block {cfg.crepa_block_index}, weight {cfg.crepa_lambda}" if cfg.crepa_enabled else "off"}
    lines = ["---", *([f"base_model: {base}"] if on_hub else []), "library_name: diffusers",
             "tags: [ltx-video, text-to-video, image-to-video, lora, ltx-lora]", "---", "",
             f"# {repo.split('/')[-1]}", "",
             (f"A LoRA of [{base}](https://huggingface.co/{base})" if on_hub else
              f"A LoRA of a local LTX-Video model (`{base_name}`)") + " trained with ltx-lora.", "", "## Prompts", "",
             "Captions it was trained on (use their words):", "", *[f"- {c}" for c in captions[:5]], ""]
    if prompts:
        lines += ["Validation prompts:", "", *[f"- {p}" for p in prompts], ""]
    lines += [f"![samples]({image})" for image in images] + ([""] if images else [])
    lines += ["## Training", "", "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in settings.items()],
              "", "## Use it", "", "diffusers:", "", "```python", "import torch",
              "from diffusers import LTXPipeline", "",
              f'pipe = LTXPipeline.from_pretrained("{base_name}", torch_dtype=torch.bfloat16).to("cuda")',
              f'pipe.load_lora_weights("{repo}", weight_name="lora.safetensors")',
              f'video = pipe(prompt="{(prompts or captions or [""])[0]}", width=768, height=512, num_frames=121).frames[0]',
              "```", "",
              f"ComfyUI: put `lora.safetensors` in `models/loras` and load it with LoraLoaderModelOnly after the LTX-Video "
              f"model ({'the universal format: ComfyUI and diffusers read the same file' if cfg.lora_format == 'universal' else f'lora_format = {cfg.lora_format}'})."]
    return "\n".join(lines) + "\n"


def push_files(files: dict[str, Path], cfg: config.Config, output_dir: Path, message: str, log=print) -> bool:
    """Uploads {path in the repo: local file} to the hub repo in one commit, creating the repo (hub_private) if it is
    missing. A network or hub failure is one line with the command that retries it: training is never lost to an
    upload, and the local files are never touched."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    repo = config.hub_repo(cfg)
    try:
        api = HfApi()
        url = api.create_repo(repo, private=cfg.hub_private, exist_ok=True)
        api.create_commit(url.repo_id, [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                                    for name, path in files.items()], commit_message=message)
    except (OSError, HFValidationError, *HfHubHTTPError.__bases__) as e:  # HTTP, the transport's, a refused id
        retry = " && ".join(f"hf upload {repo} {shlex.quote(str(path))} {shlex.quote(name)}"
                            for name, path in files.items())  # each file to its own name in the repo
        log(f"upload to the hub repo {repo} failed ({quant.first_line(e)}); the files are safe in {output_dir}. "
            f"Retry with: {retry}")
        return False
    log(f"uploaded {', '.join(files)} to {url}")
    return True


def publish(cfg: config.Config, output_dir: Path, samples: list[data.Sample], total_steps: int,
            with_ema: bool) -> None:
    """push_to_hub at the end: the LoRA (and its EMA, when this run kept one), config.toml, the last validation's
    contact sheets, and the model card, written to output_dir/model_card.md (never over a README.md of yours) and
    uploaded as the repo's README.md."""
    names = ["lora.safetensors", *(["lora_ema.safetensors"] if with_ema else []), "config.toml"]
    files = {name: output_dir / name for name in names}
    shown = sorted((output_dir / "samples").glob(f"step-{total_steps}/*.png"))
    files.update({f"samples/{p.name}": p for p in shown})
    (output_dir / "model_card.md").write_text(model_card(cfg, output_dir, samples, total_steps,
                                                         [f"samples/{p.name}" for p in shown]))
    own(output_dir, "model_card.md")
    files["README.md"] = output_dir / "model_card.md"
    push_files(files, cfg, output_dir, f"ltx-lora: the LoRA after {total_steps} steps")


def install_stop_handlers() -> dict:
    """SIGTERM / SIGINT (Ctrl-C) ask the loop to stop after the current step and save; a second one kills."""
    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    return stop


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(__doc__.split("\n\n")[1].strip("\n") + "\n\nEvery key, its default and meaning: README.md "
              "(Configuration, Datasets) and the Config block at the top of config.py.")
        return
    argv = config.joined(argv, "--write_toml")
    write_toml = next((a.partition("=")[2] for a in argv if a.startswith("--write_toml=")), "")
    cfg = config.parse_config([a for a in argv if not a.startswith("--write_toml=")],
                              log=print if os.environ.get("RANK", "0") == "0" else lambda message: None)
    if write_toml:  # e.g. a SimpleTuner config translated once, to read and edit as ours
        write_new_toml(Path(write_toml), cfg)
        return
    d, device = setup_dist(cfg)
    quant.check(cfg.base_model_precision, device)  # what this machine cannot run stops here, before any work
    ltx.check_attention(cfg.attention_mechanism, device)
    quant.check(cfg.text_encoder_precision, device, "text_encoder_precision")
    check_optimizer(cfg, device, log=print if d.rank == 0 else lambda message: None)
    check_trackers(cfg)
    print0 = print if d.rank == 0 else (lambda *args, **kwargs: None)
    output_dir = Path(cfg.output_dir)
    if d.rank == 0:
        lock = lock_output_dir(output_dir)  # noqa: F841 -- held until this process ends
        claim_output_dir(cfg, output_dir)
    if cfg.demo:
        if d.rank == 0:
            prepare_demo(cfg)
        d.barrier()
        cfg.pretrained_model_name_or_path = str(Path(cfg.pretrained_model_name_or_path).resolve())
    resume = [find_resume_folder(cfg, output_dir) if d.rank == 0 else None]  # rank 0 checks the files
    if d.world_size > 1:
        dist.broadcast_object_list(resume, src=0)
    resume = resume[0]
    meta = check_resume(resume, cfg, log=print0) if resume else None  # refused before anything is cached
    if d.rank == 0:  # overwriting was this start's one-time action: rerunning config.toml must not wipe this run
        (output_dir / "config.toml").write_text(config.to_toml(dataclasses.replace(cfg, overwrite_output_dir=False)))
        own(output_dir, "config.toml")
    tracker = open_trackers(cfg, output_dir, d, meta["step"] if meta else 0, print0)
    try:
        run_training(cfg, d, device, output_dir, resume, meta, tracker, print0)
    except BaseException as error:  # a bug, Ctrl-C, or a SystemExit that says why: the trackers (webhooks) hear of it
        tracker.close(error)
        raise  # with its traceback as it was
    tracker.close()


def write_new_toml(path: Path, cfg: config.Config) -> None:
    """--write_toml: the config as a TOML of ours, in a file that must not exist yet (it may be the very file the
    config was read from). overwrite_output_dir is written false: a file that reruns must never wipe a run."""
    if path.is_dir():
        raise SystemExit(f"--write_toml {path} is a folder; give the name of a new .toml file")
    if cfg.overwrite_output_dir:
        print("overwrite_output_dir = true is not written: every run of the file would delete the run before it")
    try:
        with open(path, "x") as f:  # "x": never replaces a file, even one made a moment ago
            f.write(config.to_toml(dataclasses.replace(cfg, overwrite_output_dir=False)))
    except FileExistsError:
        raise SystemExit(f"--write_toml {path} exists; give a new file name (nothing was written)")
    except OSError as e:
        raise SystemExit(f"--write_toml {path} cannot be written ({e.strerror or e})")
    print(f"wrote {path}: train with python train.py {path}")


def run_training(cfg: config.Config, d: Dist, device: torch.device, output_dir: Path, resume: Path | None,
                 meta: dict | None, tracker: Tracker, print0=print) -> None:
    """The run, once output_dir is this process's and the checkpoint to resume (if any) is checked: the data, the
    model, the loop, the final LoRA."""
    sizes, num_frames = sample.video_shape(config.parse_resolutions(cfg.validation_resolution),
                                           cfg.validation_num_frames, log=lambda m: print0(f"validation_{m}"))
    torch.manual_seed(cfg.seed)  # the same on every rank: the LoRA starts identical everywhere
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    try:
        peaks = {}  # each phase's memory peak: memory.json
        record_peak(peaks, "start", device)
        samples, eval_clips, buckets, datasets, texts, vae, rope_scale = prepare_data(cfg, d, device, output_dir,
                                                                                      peaks)
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted while preparing the data; every cache file is written whole or not at "
                         "all, so the cache is intact: run the same command again to continue")
    empty_prompt = texts[""]
    global_batch = cfg.train_batch_size * d.world_size  # one batch of clips of one shape, split over the ranks
    order = DataOrder(buckets, datasets, global_batch, cfg.seed)
    batches_per_epoch = order.batches_per_epoch
    total_steps = cfg.max_train_steps or max(1, cfg.num_train_epochs * batches_per_epoch //
                                             cfg.gradient_accumulation_steps)
    if meta and meta["step"] > total_steps:
        raise SystemExit(f"cannot resume from {resume}: it is at step {meta['step']}, past the {total_steps} steps "
                         f"of num_train_epochs = {cfg.num_train_epochs}; raise num_train_epochs or max_train_steps")
    transformer = load_model(cfg, device)
    record_peak(peaks, "loading the transformer", device)
    if cfg.enable_group_offload and device.type != "cuda":
        print0(f"group offload on the {device.type}: group_offload_use_stream is ignored (CUDA streams only)"
               + ("" if cfg.group_offload_to_disk_path else "; without group_offload_to_disk_path nothing moves"))
    lora_params = lora.lora_parameters(transformer)
    alignment = crepa.Alignment(transformer, cfg, crepa.feature_dim(cfg.crepa_model), device, lora_params[0].dtype) \
        if cfg.crepa_enabled else None
    params = lora_params + (list(alignment.head.parameters()) if alignment else [])  # what the optimizer steps
    optimizer = make_optimizer(params, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    ema = EMA(lora_params, cfg.ema_decay, device if cfg.ema_device == "accelerator" else torch.device("cpu")) \
        if cfg.use_ema else None
    prompts = config.validation_prompts(cfg)
    scheduler = ltx.load_scheduler_config(cfg.pretrained_model_name_or_path) \
        if prompts or cfg.flow_schedule_auto_shift else {}  # the sampler's σ shift, and auto shift's

    def forward(flow: FlowInputs, grid: tuple[int, int, int]) -> torch.Tensor:
        return transformer(flow.x_t, flow.text, flow.timestep, flow.text_mask, *grid, rope_scale)

    start_step = 0
    if resume is not None:
        start_step = load_checkpoint(resume, meta, transformer, optimizer, cfg, d, print0, ema, alignment)
        print0(f"resumed from {resume} at step {start_step}")
    if d.rank == 0:  # a checkpoint of another folder's run (claim_output_dir made sure this one holds none): its log
        elsewhere = resume is not None and resume.resolve().parent != (output_dir / "checkpoints").resolve()
        truncate_log(output_dir / "log.jsonl", start_step, source=resume.parent.parent / "log.jsonl" if elsewhere
                     else None)
    plotting = d.rank == 0 and can_plot()
    tracking = ["log.jsonl", "loss.png" if plotting else "no loss.png (matplotlib is not installed: pip install "
                "matplotlib)"]
    tracking += {"none": [], "jsonl": [], "tensorboard": [f"TensorBoard in {output_dir.resolve() / 'tensorboard'}"],
                 "wandb": [f"wandb project {cfg.tracker_project_name}" + (f" (WANDB_MODE={os.environ['WANDB_MODE']})"
                                                                         if "WANDB_MODE" in os.environ else "")]
                 }[cfg.report_to]
    tracking += [f"{w['webhook_type']} webhook {shown_url(w[config.WEBHOOK_URL_KEYS[w['webhook_type']]])} (progress "
                 f"every {cfg.webhook_reporting_interval} steps)" for w in config.webhooks(cfg)]
    model_from = "folder" if os.path.isdir(cfg.pretrained_model_name_or_path) else "hub id"
    source, subfolder = config.transformer_source(cfg)
    transformer_from = source + (f"/{subfolder}" if subfolder and subfolder != "none" else "")
    trainable = f"{sum(p.numel() for p in lora_params):,} trainable parameters ({str(params[0].dtype)[6:]}, " \
                f"{cfg.optimizer})"
    epochs = total_steps * cfg.gradient_accumulation_steps / batches_per_epoch
    print0("\n".join([  # the facts to check at a glance before leaving a run alone
        f"training a LoRA on {d.world_size} x {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"  model      {cfg.pretrained_model_name_or_path} ({model_from}); transformer from {transformer_from}",
        f"  LoRA       rank {cfg.lora_rank}, alpha {cfg.lora_alpha or cfg.lora_rank:g} on "
        f"{', '.join(cfg.lora_target_modules)}: {trainable}, saved as {cfg.lora_format}",
        f"  precision  base weights {cfg.base_model_default_dtype}, blocks "
        f"{checkpoint_info(0, order, cfg)['base_model_precision']}, autocast {cfg.mixed_precision}",
        f"  data       {len(datasets)} dataset(s) ({', '.join(datasets)}): {len(samples)} samples in {len(buckets)} "
        f"buckets ({', '.join(sorted({b.name for b in buckets}))}), {batches_per_epoch} batches per epoch"
        + (f"; {len(eval_clips)} clip(s) held out for the eval loss" if eval_clips else ""),
        f"  steps      {total_steps} steps of {global_batch * cfg.gradient_accumulation_steps} clips "
        f"({cfg.train_batch_size} a micro-batch x {cfg.gradient_accumulation_steps} accumulated x {d.world_size} "
        f"process(es)) = {epochs:.3g} epochs" + (f", resuming at step {start_step}" if start_step else ""),
        f"  outputs    {output_dir.resolve()}",
        f"  tracking   {', '.join(tracking)}"]))
    if alignment:
        print0(f"CREPA: block {cfg.crepa_block_index}'s hidden states -> a "
               f"{sum(p.numel() for p in alignment.head.parameters()):,}-parameter "
               f"projection head -> {cfg.crepa_model} features, weight {cfg.crepa_lambda}")

    trained, averaged = ("", contextlib.nullcontext), ("-ema", lambda: ema.applied(lora_params))
    versions = {"none": [trained], "ema_only": [averaged], "comparison": [trained, averaged]}[
        cfg.ema_validation if ema else "none"]  # validation videos: the LoRA, its EMA, or both side by side
    validation = Validation([(name, texts[p]) for name, p in prompts], texts.get(cfg.validation_negative_prompt),
                            sizes, num_frames, scheduler, vae, versions)
    log = open(output_dir / "log.jsonl", "a") if d.rank == 0 else None
    scores = {}  # the latest eval loss, for the progress bar
    if start_step == 0:
        if cfg.validation_on_startup:
            render_validation(0, transformer, validation, cfg, output_dir, d, device, print0, tracker)
            record_peak(peaks, "validation", device)
        if eval_clips:  # the baseline the eval loss is read against
            scores = evaluate(transformer, forward, eval_clips, cfg, d, device)
            if log:
                log.write(json_line({"step": 0, **scores}))
            tracker.log(0, scores)
    stop = install_stop_handlers()
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="training",
               dynamic_ncols=True, disable=d.rank != 0)
    t0, nonfinite, smooth = time.time(), 0, None

    def plot():  # loss.png, at each checkpoint and at the end
        if plotting:
            plot_loss(output_dir)

    completed = start_step  # the last step whose update is whole (None while one is applied): saved on a failure
    try:
        for step in bar:
            step_start = time.time()
            lr = lr_at(step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            crepa_sum = torch.zeros((), device=device)
            for micro in range(cfg.gradient_accumulation_steps):
                k = step * cfg.gradient_accumulation_steps + micro
                batch, bucket = micro_batch(order, k, samples, d.rank, cfg.train_batch_size, device)
                seeds = [example_seed(cfg.seed, k, d.rank * cfg.train_batch_size + j) for j in range(len(batch["i2v"]))]
                losses = micro_step(forward, batch, empty_prompt, cfg, seeds, scaler, scheduler, alignment)
                loss_sum += losses.flow
                if alignment:
                    crepa_sum += losses.crepa

            completed = None
            loss_value, norm_value, finite = optimizer_step(params, optimizer, scaler, loss_sum, cfg, d)
            record_peak(peaks, "training step", device)
            nonfinite = 0 if finite else nonfinite + 1  # a NaN / inf step was skipped; stop if it keeps happening
            done = step + 1
            if ema and finite and done % cfg.ema_update_interval == 0:
                ema.update(lora_params)
            completed = done

            record = dict(step=done, loss=loss_value, lr=lr, grad_norm=norm_value, seconds=round(time.time() - t0, 3),
                          epoch=order.cursor(done * cfg.gradient_accumulation_steps - 1)[0], bucket=bucket)
            tracked = {"it_per_s": 1 / (time.time() - step_start)}  # the trackers' scalars besides the record's numbers
            if alignment:
                all_reduce_mean([crepa_sum], d)
                record["crepa_loss"] = crepa_sum.item() / cfg.gradient_accumulation_steps
            if eval_clips and (done == total_steps or (cfg.eval_step_interval and done % cfg.eval_step_interval == 0)):
                scores = evaluate(transformer, forward, eval_clips, cfg, d, device)
                record.update(scores)
            if done == total_steps or (cfg.validation_step_interval and done % cfg.validation_step_interval == 0):
                record["samples"] = render_validation(done, transformer, validation, cfg, output_dir, d, device, print0,
                                                      tracker)
                record_peak(peaks, "validation", device)
                tracked.update(peak_scalars(peaks))
            if not finite:
                record["skipped"] = "non-finite loss or gradient"
            if log:
                log.write(json_line({k: v for k, v in record.items() if v != []}))
                log.flush()
            tracker.log(done, {**{k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in
                                  ("step", "seconds")}, **tracked})
            if done == min(start_step + 3, total_steps):  # the first steps measured: is this run what was expected?
                per_step = record["seconds"] / (done - start_step)  # taken before this step's eval and validation
                print0(f"\n{per_step:.3g} s per step over the first {done - start_step}: about "
                       f"{human_time(per_step * (total_steps - start_step))} for the {total_steps - start_step} steps "
                       f"(validation, eval loss and checkpoints not counted); peak "
                       f"{memory_kind(device)} so far "
                       f"{max(peaks.values(), default=0) / 2**20:.0f} MiB")
            if finite:
                smooth = loss_value if smooth is None else 0.9 * smooth + 0.1 * loss_value
                bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lr:.2e}",
                                **({"eval": f"{scores['eval_loss']:.4f}"} if scores else {}))
            if nonfinite >= cfg.max_nonfinite_steps:
                last = list_checkpoints(output_dir)
                raise SystemExit(f"stopped at step {done}: {nonfinite} steps in a row had a NaN or inf loss or gradient "
                                 f"(each was skipped). Lower learning_rate, set max_grad_norm, or use mixed_precision = "
                                 f"\"bf16\" rather than fp16. The last good checkpoint is "
                                 f"{last[-1] if last else 'none (no checkpoint was saved yet)'}.")
            # a checkpoint only of finite weights: during a NaN streak the older, good checkpoints must not be pruned
            if stop_requested(stop, d):
                saved = save_checkpoint(output_dir, done, transformer, optimizer, cfg, checkpoint_info(done, order, cfg), d,
                                        ema, alignment) \
                    if all_finite(params) else "nothing (the LoRA holds NaN or inf values)"
                bar.close()
                plot()
                args = [a for a in sys.argv if not a.startswith(("--resume_from_checkpoint", "--overwrite_output_dir"))]
                print0(f"\nstopped by {stop['signal'] or 'a signal on another rank'} after step {done}; saved {saved}\n"
                       f"resume with: python {' '.join(shlex.quote(a) for a in args)} --resume_from_checkpoint=latest")
                return
            if cfg.checkpoint_step_interval and done % cfg.checkpoint_step_interval == 0 and done < total_steps \
                    and not nonfinite and all_finite(params):
                save_checkpoint(output_dir, done, transformer, optimizer, cfg, checkpoint_info(done, order, cfg), d, ema,
                                alignment)
                plot()
    except Exception:  # a bug, out of memory, a failing validation: the training so far is saved, then the traceback
        if d.rank == 0:
            save_after_failure(output_dir, completed, transformer, optimizer, cfg, order, d, ema, alignment, print0)
        raise
    bar.close()
    if log:
        log.close()
    plot()

    last = list_checkpoints(output_dir)
    last = last[-1] if last else "none (no checkpoint was saved)"
    if not all_finite(params):  # a finite loss can still take a step to NaN weights (an absurd learning rate)
        raise SystemExit(f"the LoRA holds NaN or inf values after step {total_steps}, so it was not written; lower "
                         f"learning_rate or set max_grad_norm. The last checkpoint is {last}.")
    if nonfinite:  # the run did not end on a step it could take: not a success, whatever the weights are
        raise SystemExit(f"the last {nonfinite} step(s) had a NaN or inf loss or gradient and were skipped, so the "
                         f"run did not finish cleanly and the LoRA was not written; lower learning_rate, set "
                         f"max_grad_norm, or check flow_schedule_shift and the data. The last checkpoint is {last}.")
    info = checkpoint_info(total_steps, order, cfg)
    if cfg.checkpoint_step_interval and start_step < total_steps:
        save_checkpoint(output_dir, total_steps, transformer, optimizer, cfg, info, d, ema, alignment)
    if d.rank == 0:
        lora.save_lora(transformer, output_dir / "lora.safetensors", info, cfg.lora_format)
        if ema:
            with ema.applied(lora_params):
                lora.save_lora(transformer, output_dir / "lora_ema.safetensors", info, cfg.lora_format)
        elif (output_dir / "lora_ema.safetensors").exists():  # an earlier part of this run's: it no longer fits
            (output_dir / "lora_ema.safetensors").unlink()
            print("removed lora_ema.safetensors, the EMA of an earlier part of this run (use_ema is off now)")
        own(output_dir, "lora.safetensors", *(["lora_ema.safetensors"] if ema else []))
        if cfg.push_to_hub:
            publish(cfg, output_dir, samples, total_steps, with_ema=ema is not None)
    del peaks["start"]
    tracker.log(total_steps, peak_scalars(peaks))
    if d.rank == 0:
        (output_dir / "memory.json").write_text(json.dumps({"device": device.type, "peak_bytes": peaks}, indent=2))
    print0(f"peak {memory_kind(device)} by phase: "
           + ", ".join(f"{phase} {peak / 2**20:.0f} MiB" for phase, peak in peaks.items()))
    print0(f"done: LoRA written to {(output_dir / 'lora.safetensors').resolve()}"
           + (" (and its EMA to lora_ema.safetensors)" if ema else ""))


def save_after_failure(output_dir: Path, step: int | None, transformer, optimizer, cfg: config.Config,
                       order: DataOrder, d: Dist, ema: "EMA | None", alignment, log=print) -> None:
    """An error after training began: the adapters of the last whole step, saved as checkpoints/step-N (resumable)
    before the traceback, so no trained step is lost. Not under torchrun (the other ranks may be waiting in a
    collective that never comes), not of NaN weights, not in the middle of an update, and not twice."""
    saved = list_checkpoints(output_dir)
    if step is None or d.world_size > 1 or step == 0 or (saved and int(saved[-1].name[5:]) >= step) \
            or not all_finite(lora.lora_parameters(transformer)):
        return
    try:
        folder = save_checkpoint(output_dir, step, transformer, optimizer, cfg, checkpoint_info(step, order, cfg), d,
                                 ema, alignment)
    except Exception as error:  # the first error is the one to show (it is raised next); this one gets a line
        log(f"\nthe run failed after step {step}, and saving its checkpoint failed too ({quant.first_line(error)})")
        return
    log(f"\nthe run failed after step {step} (the traceback follows); the LoRA and training state of step {step} "
        f"are saved in {folder} (lora.safetensors there is the LoRA so far): fix the cause, then continue with "
        f"--resume_from_checkpoint=latest")


def record_peak(peaks: dict[str, int], phase: str, device: torch.device) -> None:
    """Adds `phase`'s memory peak since the last record (and starts the next): CUDA's max allocated, or on the CPU
    the resident set's high-water mark (Linux; reset through /proc/self/clear_refs). memory.json keeps them."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            peak = resident_bytes("VmHWM")
            reset_resident_peak()
        except (OSError, StopIteration):  # not Linux: nothing to read
            return
    peaks[phase] = max(peaks.get(phase, 0), peak)


def memory_kind(device: torch.device) -> str:
    """What record_peak's numbers are on this device."""
    return "GPU memory (allocated)" if device.type == "cuda" else "resident memory"


def peak_scalars(peaks: dict[str, int]) -> dict[str, float]:
    """The memory peaks by phase as the trackers' scalars, in MiB."""
    return {f"peak_memory_mib/{phase.replace(' ', '_')}": peak / 2**20 for phase, peak in peaks.items()}


def resident_bytes(field: str) -> int:
    """The process's resident set now (VmRSS) or its high-water mark (VmHWM), from Linux's /proc/self/status."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith(field)).split()[1]) * 1024


def reset_resident_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the kernel's way to reset VmHWM to the current RSS


def all_finite(tensors: list[torch.Tensor]) -> bool:
    return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all())


def stop_requested(stop: dict, d: Dist) -> bool:
    """Whether any rank got SIGTERM / SIGINT: all ranks must stop at the same step to save together."""
    if d.world_size == 1:
        return stop["signal"] is not None
    flag = torch.tensor([stop["signal"] is not None], dtype=torch.int32,
                        device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (data.DataError, ltx.ModelError, lora.LoRAError) as error:  # the user's to fix: one sentence
        sys.exit(f"error: {error}")  # (config mistakes and refusals are SystemExit already; anything else is a bug)
