"""Train a LoRA of LTX-Video with rectified flow.

    python train.py configs/demo.toml [--key=value ...]
    torchrun --nproc_per_node=8 train.py configs/disney.toml     # data parallel over 8 GPUs
    python train.py --simpletuner_config config/config.json      # a SimpleTuner config, mapped key by key
    python train.py --simpletuner_config config/config.json --write_toml mine.toml   # ... written as ours

Owns: the flow-matching math (σ, x_t, the velocity target, the loss, the i2v mask), one micro-step (with
scheduled sampling's rollout from scheduled.py), one optimizer step, the eval loss, and the run: main checks
everything it can before any work, set_up prepares it (prepare.py), loop steps it, finish writes the LoRA.
Settings are in config.py, the model in model.py, adapters in lora.py, clips and caches in data.py, checkpoints
in checkpoint.py, the output folder in outputs.py, trackers in track.py, optimizers and the EMA in optim.py.
"""

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, TextIO

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import config
import crepa
import data
import hub
import lora
import model as ltx
import optim
import outputs
import prepare
import quant
import ranks
import sample
import scheduled
import track


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


def flow_matching_loss(pred: torch.Tensor, flow: FlowInputs, cfg: config.Config) -> torch.Tensor:
    """Mean over clips of each clip's mean squared error over the tokens that count: the same number whether
    a batch is split across ranks or not. Every clip weighs the same; a weighting of the clips by their σ
    (flow.sigma) goes here, its knob read from cfg (docs/changing-the-method.md)."""
    return per_clip_loss(pred, flow).mean()


def per_clip_loss(pred: torch.Tensor, flow: FlowInputs) -> torch.Tensor:
    per_token = (pred.float() - flow.target).square().mean(-1)  # [B, S]
    return (per_token * flow.loss_mask).sum(1) / flow.loss_mask.sum(1)


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
    chosen = scheduled.draw(seeds, cfg.scheduled_sampling_probability)
    if chosen.any():
        with autocast(cfg, device):
            flow = scheduled.rollout(forward, flow, ltx.pack_latents(batch["latents"]), chosen, cfg, grid)
    with autocast(cfg, device):
        pred = forward(flow, grid)  # with CREPA on, alignment's hook keeps one block's output meanwhile
    loss = total = flow_matching_loss(pred, flow, cfg)
    crepa_term = None
    if alignment:
        with autocast(cfg, device):
            crepa_term = alignment.loss(batch["crepa_features"], grid)
        total = loss + cfg.crepa_lambda * crepa_term
    scaler.scale(total / cfg.gradient_accumulation_steps).backward()
    return Losses(loss.detach(), None if crepa_term is None else crepa_term.detach())


# -----------------------------------------------------------------------------
# One step, validation, the eval loss

def optimizer_step(params: list[torch.nn.Parameter], optimizer, scaler, loss_sum: torch.Tensor, cfg: config.Config,
                   d: ranks.Dist) -> tuple[float, float, bool]:
    """Averages gradients (and the logged loss) over the ranks, clips, and steps unless something is NaN / inf.
    Returns (loss, grad norm, whether the step was taken); reading the two numbers waits for the GPU."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    ranks.all_reduce_mean([p.grad for p in params] + [loss_sum], d)
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
# Training quality: the EMA of the LoRA, the stable eval loss (docs/training-quality.md)


@torch.no_grad()
def evaluate(transformer, forward, clips: list[data.Sample], cfg: config.Config, d: ranks.Dist,
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
# The run: main checks everything it can before any work, then set_up, loop, finish

def main(argv: list[str]) -> None:
    if not argv or {"-h", "--help"} & set(argv):
        print(__doc__.split("\n\n")[1].strip("\n") + "\n\nEvery key, its default and meaning: docs/configuration.md "
              "and the Config block at the top of config.py.")
        return
    cfg, write_toml = config.parse_command_line(argv, log=print if os.environ.get("RANK", "0") == "0" else
                                                lambda message: None)
    if write_toml:  # e.g. a SimpleTuner config translated once, to read and edit as ours
        return config.write_new_toml(Path(write_toml), cfg)
    d, device = ranks.setup_dist(cfg)
    quant.check(cfg.base_model_precision, device)  # what this machine cannot run stops here, before any work
    ltx.check_attention(cfg.attention_mechanism, device)
    quant.check(cfg.text_encoder_precision, device, "text_encoder_precision")
    optim.check_optimizer(cfg, device, log=print if d.rank == 0 else lambda message: None)
    track.check_trackers(cfg)
    print0 = print if d.rank == 0 else (lambda *args, **kwargs: None)
    output_dir = Path(cfg.output_dir)
    if d.rank == 0:
        lock = outputs.lock_output_dir(output_dir)  # noqa: F841 -- held until this process ends
        outputs.claim_output_dir(cfg, output_dir)
    if cfg.demo:
        if d.rank == 0:
            prepare.prepare_demo(cfg)
        d.barrier()
        cfg.pretrained_model_name_or_path = str(Path(cfg.pretrained_model_name_or_path).resolve())
    resume, meta = checkpoint.resume_point(cfg, d, output_dir, print0)  # refused before anything is cached
    if d.rank == 0:  # overwriting was this start's one-time action: rerunning config.toml must not wipe this run
        (output_dir / "config.toml").write_text(config.to_toml(dataclasses.replace(cfg, overwrite_output_dir=False)))
        outputs.own(output_dir, "config.toml")
    tracker = track.open_trackers(cfg, output_dir, d, meta["step"] if meta else 0, print0)
    try:
        run = set_up(cfg, d, device, output_dir, resume, meta, tracker, print0)
        skipped = loop(run)
        if skipped is not None:
            finish(run, skipped)
    except BaseException as error:  # a bug, Ctrl-C, or a SystemExit that says why: the trackers (webhooks) hear of it
        tracker.close(error)
        raise  # with its traceback as it was
    tracker.close()


@dataclass
class Run:
    """What the loop works with, made once by set_up."""
    cfg: config.Config
    d: ranks.Dist
    device: torch.device
    output_dir: Path
    tracker: track.Tracker
    print0: Callable
    data: prepare.Prepared  # samples, eval clips, buckets, datasets, prompt embeddings, the VAE
    order: prepare.DataOrder  # which clips each micro-batch takes
    total_steps: int
    start_step: int
    transformer: torch.nn.Module
    forward: Callable  # (FlowInputs, latent grid) -> the predicted velocity
    lora_params: list[torch.nn.Parameter]
    params: list[torch.nn.Parameter]  # what the optimizer steps: the LoRA's, and CREPA's head's
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: optim.EMA | None
    alignment: crepa.Alignment | None
    shift_config: dict  # the model's scheduler config: the σ shift of validation, and of auto shift
    validation: sample.Validation
    peaks: dict[str, int]  # each phase's memory peak: memory.json
    log_file: TextIO | None  # log.jsonl, open on rank 0
    completed: int | None = None  # the last step whose update is whole (None while one is applied): saved on a failure


def set_up(cfg: config.Config, d: ranks.Dist, device: torch.device, output_dir: Path, resume: Path | None,
           meta: dict | None, tracker: track.Tracker, print0=print) -> Run:
    """The data cached, the model with its adapters and optimizer (restored on a resume), the start-up summary,
    and step 0's validation and eval loss."""
    sizes, num_frames = sample.video_shape(config.parse_resolutions(cfg.validation_resolution),
                                           cfg.validation_num_frames, log=lambda m: print0(f"validation_{m}"))
    checkpoint.seed_all(cfg.seed)  # the same on every rank: the LoRA starts identical everywhere
    peaks = {}
    track.record_peak(peaks, "start", device)
    try:
        prepared = prepare.prepare_data(cfg, d, device, output_dir, peaks)
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted while preparing the data; every cache file is written whole or not at "
                         "all, so the cache is intact: run the same command again to continue")
    order = prepare.DataOrder(prepared.buckets, prepared.datasets, cfg.train_batch_size * d.world_size, cfg.seed)
    total_steps = order.total_steps(cfg, resume, meta)
    transformer = prepare.load_model(cfg, device, print0)
    track.record_peak(peaks, "loading the transformer", device)
    lora_params, alignment, params, optimizer, ema = prepare.trainables(cfg, transformer, device)
    prompts = config.validation_prompts(cfg)
    shift_config = ltx.load_scheduler_config(cfg.pretrained_model_name_or_path) \
        if prompts or cfg.flow_schedule_auto_shift else {}
    start_step = checkpoint.resume(resume, meta, transformer, optimizer, cfg, d, output_dir, print0, ema, alignment)
    print0(track.startup_summary(cfg, d, device, output_dir, prepared, order, total_steps, start_step, params,
                                 sum(p.numel() for p in lora_params),
                                 checkpoint.checkpoint_info(0, order, cfg)["base_model_precision"], alignment))
    validation = sample.Validation.of(cfg, prompts, prepared.texts, sizes, num_frames, shift_config, prepared.vae,
                                      ema, lora_params)

    def forward(flow: FlowInputs, grid: tuple[int, int, int]) -> torch.Tensor:
        return transformer(flow.x_t, flow.text, flow.timestep, flow.text_mask, *grid, prepared.rope_scale)

    return Run(cfg, d, device, output_dir, tracker, print0, prepared, order, total_steps, start_step, transformer,
               forward, lora_params, params, optimizer,
               torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16"), ema, alignment, shift_config,
               validation, peaks, open(output_dir / "log.jsonl", "a") if d.rank == 0 else None)


def train_step(run: Run, step: int, t0: float) -> tuple[dict, bool]:
    """One optimizer step: gradient_accumulation_steps micro-steps, then the update (and the EMA's). Returns the
    step's log record and whether the update was taken (False: a NaN / inf loss or gradient, skipped)."""
    cfg, d = run.cfg, run.d
    lr = optim.lr_at(step, cfg, run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=run.device)
    crepa_sum = torch.zeros((), device=run.device)
    for micro in range(cfg.gradient_accumulation_steps):
        k = step * cfg.gradient_accumulation_steps + micro
        batch, bucket = prepare.micro_batch(run.order, k, run.data.samples, d.rank, cfg.train_batch_size, run.device)
        seeds = [example_seed(cfg.seed, k, d.rank * cfg.train_batch_size + j) for j in range(len(batch["i2v"]))]
        losses = micro_step(run.forward, batch, run.data.texts[""], cfg, seeds, run.scaler, run.shift_config,
                            run.alignment)
        loss_sum += losses.flow
        if run.alignment:
            crepa_sum += losses.crepa
    run.completed = None
    loss, grad_norm, finite = optimizer_step(run.params, run.optimizer, run.scaler, loss_sum, cfg, d)
    done = step + 1
    if run.ema and finite and done % cfg.ema_update_interval == 0:
        run.ema.update(run.lora_params)
    run.completed = done
    record = dict(step=done, loss=loss, lr=lr, grad_norm=grad_norm, seconds=round(time.time() - t0, 3),
                  epoch=run.order.cursor(done * cfg.gradient_accumulation_steps - 1)[0], bucket=bucket)
    if run.alignment:
        ranks.all_reduce_mean([crepa_sum], d)
        record["crepa_loss"] = crepa_sum.item() / cfg.gradient_accumulation_steps
    return record, finite


def loop(run: Run) -> int | None:
    """Steps from start_step to total_steps, with the eval loss, validation videos, log lines and checkpoints
    each at its interval. Returns how many of the last steps were skipped as non-finite, or None when a signal
    stopped the run (saved, with the command that resumes)."""
    cfg, d, output_dir, print0 = run.cfg, run.d, run.output_dir, run.print0
    scores = {}  # the latest eval loss, for the progress bar
    if run.start_step == 0:
        if cfg.validation_on_startup:
            validate(0, run)
        if run.data.eval_clips:  # the baseline the eval loss is read against
            scores = evaluate(run.transformer, run.forward, run.data.eval_clips, cfg, d, run.device)
            track.write_record(run.log_file, run.tracker, {"step": 0, **scores})
    stop = ranks.install_stop_handlers()
    bar = tqdm(range(run.start_step, run.total_steps), initial=run.start_step, total=run.total_steps,
               desc="training", dynamic_ncols=True, disable=d.rank != 0)
    t0, nonfinite, smooth = time.time(), 0, None
    run.completed = run.start_step
    try:
        for step in bar:
            step_start = time.time()
            record, finite = train_step(run, step, t0)
            done = step + 1
            track.record_peak(run.peaks, "training step", run.device)
            nonfinite = 0 if finite else nonfinite + 1  # a NaN / inf step was skipped; stop if it keeps happening
            tracked = {"it_per_s": 1 / (time.time() - step_start)}  # the trackers' scalars besides the record's
            if run.data.eval_clips and (done == run.total_steps or
                                        (cfg.eval_step_interval and done % cfg.eval_step_interval == 0)):
                scores = evaluate(run.transformer, run.forward, run.data.eval_clips, cfg, d, run.device)
                record.update(scores)
            if done == run.total_steps or (cfg.validation_step_interval and done % cfg.validation_step_interval == 0):
                record["samples"] = validate(done, run)
                tracked.update(track.peak_scalars(run.peaks))
            if not finite:
                record["skipped"] = "non-finite loss or gradient"
            track.write_record(run.log_file, run.tracker, record, tracked)
            if done == min(run.start_step + 3, run.total_steps):  # the first steps measured: what was expected?
                print0(track.first_steps_line(record["seconds"], done, run.start_step, run.total_steps, run.peaks,
                                              run.device))
            if finite:
                smooth = record["loss"] if smooth is None else 0.9 * smooth + 0.1 * record["loss"]
                bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{record['lr']:.2e}",
                                **({"eval": f"{scores['eval_loss']:.4f}"} if scores else {}))
            if nonfinite >= cfg.max_nonfinite_steps:
                raise SystemExit(f"stopped at step {done}: {nonfinite} steps in a row had a NaN or inf loss or "
                                 f"gradient (each was skipped). Lower learning_rate, set max_grad_norm, or use "
                                 f"mixed_precision = \"bf16\" rather than fp16. The last good checkpoint is "
                                 f"{outputs.last_checkpoint(output_dir)}.")
            if ranks.stop_requested(stop, d):
                bar.close()
                saved = save(run, done) if checkpoint.all_finite(run.params) else \
                    "nothing (the LoRA holds NaN or inf values)"
                print0(ranks.stopped_line(stop, done, saved))
                return None
            # a checkpoint only of finite weights: during a NaN streak the older, good checkpoints must not be pruned
            if cfg.checkpoint_step_interval and done % cfg.checkpoint_step_interval == 0 and done < run.total_steps \
                    and not nonfinite and checkpoint.all_finite(run.params):
                save(run, done)
    except Exception:  # a bug, out of memory, a failing validation: the training so far is saved, then the traceback
        if d.rank == 0:
            checkpoint.save_after_failure(output_dir, run.completed, run.transformer, run.optimizer, cfg, run.order, d,
                                          run.ema, run.alignment, print0)
        raise
    bar.close()
    return nonfinite


def validate(step: int, run: Run) -> list[str]:
    """Videos of every validation prompt at this step: rank 0 renders, the others wait."""
    paths = sample.validate(run.transformer, run.validation, run.output_dir / "samples" / f"step-{step}", run.device,
                            step, run.tracker, run.print0) if run.d.rank == 0 else []
    run.d.barrier()
    track.record_peak(run.peaks, "validation", run.device)
    return paths


def save(run: Run, step: int) -> Path:
    """checkpoints/step-N, and loss.png drawn again."""
    folder = checkpoint.save_checkpoint(run.output_dir, step, run.transformer, run.optimizer, run.cfg,
                                        checkpoint.checkpoint_info(step, run.order, run.cfg), run.d, run.ema,
                                        run.alignment)
    track.plot(run.output_dir, run.d.rank)
    return folder


def finish(run: Run, skipped: int) -> None:
    """The end: the final checkpoint, lora.safetensors (and its EMA), the hub, memory.json; none of it when the
    weights went non-finite or the last `skipped` steps were skipped as NaN / inf."""
    cfg, d, output_dir = run.cfg, run.d, run.output_dir
    if run.log_file:
        run.log_file.close()
    track.plot(run.output_dir, run.d.rank)
    checkpoint.refuse_unfinished(run.params, skipped, run.total_steps, output_dir)
    info = checkpoint.checkpoint_info(run.total_steps, run.order, cfg)
    if cfg.checkpoint_step_interval and run.start_step < run.total_steps:
        checkpoint.save_checkpoint(output_dir, run.total_steps, run.transformer, run.optimizer, cfg, info, d, run.ema,
                                   run.alignment)
    if d.rank == 0:
        checkpoint.save_final(run.transformer, output_dir, info, cfg, run.ema, run.lora_params)
        if cfg.push_to_hub:
            hub.publish(cfg, output_dir, run.data.samples, run.total_steps, with_ema=run.ema is not None)
    del run.peaks["start"]
    run.tracker.log(run.total_steps, track.peak_scalars(run.peaks))
    if d.rank == 0:
        track.write_memory(output_dir, run.device, run.peaks)
    run.print0(track.memory_line(run.device, run.peaks))
    run.print0(f"done: LoRA written to {(output_dir / 'lora.safetensors').resolve()}"
               + (" (and its EMA to lora_ema.safetensors)" if run.ema else ""))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (data.DataError, ltx.ModelError, lora.LoRAError) as error:  # the user's to fix: one sentence
        sys.exit(f"error: {error}")  # (config mistakes and refusals are SystemExit already; anything else is a bug)
