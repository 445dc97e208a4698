"""Benchmarks: our code against a reference doing the same work, on the same inputs, in one run.

    python bench.py --preset medium --json out.json   # one training step: ours vs diffusers + peft (the default)
    python bench.py --data                            # clips -> latent cache: data.py vs a naive loop
    python bench.py --tools --precision fp32          # what each training-quality tool adds to a step

The step benchmark builds, in one process, on identical random weights and identical inputs:
  ours       model.py + lora.py, and train.py's step as the training loop runs it: flow_matching_inputs, the
             forward under autocast, flow_matching_loss, backward, optimizer_step (all-reduce, clip, AdamW)
  reference  diffusers' LTXVideoTransformer3DModel + a peft LoRA of the same rank, alpha, targets and A/B weights,
             the same dtype, checkpointing, inputs and the same step around it; on CUDA (or with --compile) also
             the reference under torch.compile, and ours is compared with the faster reference
It first runs one step per side from the identical start and refuses to time unless the losses agree (the same
work), then measures each side's step peak memory (CUDA max allocated; on the CPU the resident set's high-water
mark, reset just before the step), then times --steps steps per side interleaved (A, B, A, B ...) after
--warmup, so a busy machine slows every side alike. It prints median step time, tokens/s, step peak memory,
TFLOP/s of useful work (step_flops) and, on a GPU whose peak it knows, MFU; and the ratios ours / reference.
Presets: tiny (tests), medium (4 blocks, 8x64 heads, 1,024 latent tokens: a few minutes on 2 CPU cores in bf16,
under a minute in fp32), ltx-0.9.5 (the real transformer's shape at 768x512x121, random weights: a GPU's job).

--data writes --clips synthetic H.264 clips (libx264 via data.write_video: a panning noise texture with film
grain and a moving disc, so the codec does real work) with captions into a temp folder, then times, on the same
files and the same training shape (the bucket data.plan_samples gives at --resolution):
  ours      data.plan_samples + data.cache_samples into a fresh cache: FFmpeg threads, decoding on a thread
            pool, stopping at the last frame needed, uint8 torch resize into one float tensor
  naive     one clip at a time: av.open, decode every frame (thread_type left at PyAV's default, SLICE, which
            is one thread for x264's one-slice frames), frame.to_image() + PIL resize, stack, save_file
  reuse     plan_samples + cache_samples again over the full cache: every file a hit
The VAE and T5 are replaced by near-free fakes (a strided slice, zeros), so only data work is timed.
Each figure is the median of --repeats runs after one warm-up clip. Both print a markdown table for docs/benchmarks.md.
"""

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import config
import data
import demo
import errors
import optim
import prepare
import ranks
import track
import train


def fake_encode_video(video: torch.Tensor) -> torch.Tensor:
    return video[:, :, ::8, ::32, ::32]  # [B, 3, F, H, W] -> roughly the VAE's latent shape, for free


def fake_encode_text(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(len(captions), 8, 16), torch.ones(len(captions), 8, dtype=torch.long)


FAKE_SHAPE = data.CacheShape(spatial=32, temporal=8, latent_channels=3, text_tokens=8, text_dim=16)  # the fakes'


# -----------------------------------------------------------------------------
# --data: clips -> cached latents

def make_clips(folder: Path, n: int, frames: int, width: int, height: int, fps: int = 25) -> None:
    """n clips of a smooth noise texture panning under a moving disc, with grain, and their captions."""
    rng = np.random.default_rng(0)
    pan = 2 * frames  # the camera moves 2 px a frame
    for i in range(n):
        coarse = torch.from_numpy(rng.random((1, 3, (height + pan) // 16 + 2, (width + pan) // 16 + 2))).float()
        canvas = F.interpolate(coarse, size=(height + pan, width + pan), mode="bicubic")[0].permute(1, 2, 0).numpy()
        canvas = 40 + 160 * canvas.clip(0, 1)
        video = np.empty((frames, height, width, 3), np.uint8)
        for t in range(frames):
            frame = canvas[t * 2:t * 2 + height, t * 2:t * 2 + width].copy()
            cx, cy = width * (0.2 + 0.6 * t / frames), height * (0.5 + 0.3 * np.sin(t / 5 + i))
            frame[demo.draw_shape("circle", cx, cy, 0.15 * height, width, height)] = (230, 60, 40)
            frame += rng.normal(0, 4, frame.shape)  # sensor grain: what makes real footage expensive to code
            video[t] = frame.clip(0, 255)
        data.write_video(folder / f"clip_{i:03d}.mp4", video, fps)
        (folder / f"clip_{i:03d}.txt").write_text(f"a red disc over a moving texture, clip {i}\n")


def plan(clips: Path, cache: Path, resolution: int,
         frames: int) -> tuple[data.Dataset, list[data.Sample], data.Report]:
    ds = data.Dataset(id="bench", instance_data_dir=str(clips), cache_dir_vae=str(cache), resolution=resolution,
                      resolution_type="pixel", num_frames=frames, min_frames=frames)
    report = data.Report(cache / "data_report.json", quarantine=False)
    return ds, data.plan_samples(ds, 2, 0, report), report  # train.py's defaults: aspect rounding 2, seed 0


def ours(clips: Path, cache: Path, resolution: int, frames: int) -> None:
    """What train.py's prepare_data does with the data: plan every file, then cache what is missing."""
    with contextlib.redirect_stderr(io.StringIO()):  # tqdm's bars
        ds, samples, report = plan(clips, cache, resolution, frames)
        data.cache_samples(samples, {ds.id: ds}, fake_encode_video, fake_encode_text, vae={"model": "fake"},
                           text={"model": "fake"}, text_dir=cache / "text", compress=False, vae_batch_size=1, text_batch_size=64,
                           report=report, shape=FAKE_SHAPE)
    assert not report.problems and len(data.cached(samples)) == len(samples), report.problems


def naive(samples: list[data.Sample], cache: Path) -> None:
    """The naive loop: decode everything, PIL-resize frame by frame, keep the first F, save."""
    import av
    cache.mkdir(parents=True, exist_ok=True)
    for s in samples:
        with av.open(str(s.path)) as container:
            images = [f.to_image().resize((s.width, s.height), resample=2) for f in container.decode(video=0)]
        video = torch.stack([torch.from_numpy(np.array(im)) for im in images[:s.frames]])  # [F, H, W, 3]
        video = video.permute(3, 0, 1, 2).float() / 127.5 - 1.0
        save_file({"latents": fake_encode_video(video[None])[0].contiguous()}, cache / f"{s.path.stem}.safetensors")
        embeds, mask = fake_encode_text([s.caption])
        save_file({"prompt_embeds": embeds[0], "prompt_attention_mask": mask[0]}, cache / f"{s.path.stem}.txt.st")


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bench_data(args, tmp: Path) -> tuple[str, list[tuple[str, str, str]]]:
    width, height = (int(x) for x in args.size.split("x"))
    clips = tmp / "clips"
    clips.mkdir()
    start = time.perf_counter()
    make_clips(clips, args.clips, args.frames, width, height)
    print(f"wrote {args.clips} clips of {args.size}@{args.frames} in {time.perf_counter() - start:.1f} s")

    frames = data.round_frames(args.frames)
    _, samples, _ = plan(clips, tmp / "plan", args.resolution, frames)
    data.load_sample(samples[0])  # warm-up: codec and torch kernels initialised, one clip each way
    naive(samples[:1], tmp / "warmup")
    runs = {"ours": [], "naive": [], "reuse": []}
    for i in range(args.repeats):  # interleaved, so a change in the machine's load hits both alike
        runs["ours"].append(seconds(ours, clips, tmp / f"ours-{i}", args.resolution, frames))
        runs["naive"].append(seconds(naive, samples, tmp / f"naive-{i}"))
        runs["reuse"].append(seconds(ours, clips, tmp / f"ours-{i}", args.resolution, frames))
    t_ours, t_naive, t_reuse = (statistics.median(runs[k]) for k in ("ours", "naive", "reuse"))

    n, s = len(samples), samples[0]
    out = n * s.frames  # frames delivered at the training size: the same for both
    shapes = f"{n} clips {width}x{height}@{args.frames} H.264 -> {s.width}x{s.height}@{s.frames}"
    return shapes, [
        ("naive loop: decode all, PIL resize, save_file", f"{out / t_naive:.0f}", f"{n / t_naive:.2f}"),
        ("ours: plan_samples + cache_samples", f"{out / t_ours:.0f}", f"{n / t_ours:.2f}"),
        ("**ours / naive**", f"**{t_naive / t_ours:.2f}x**", f"**{t_naive / t_ours:.2f}x**"),
        ("ours, rerun over the full cache (all hits)", "", f"{n / t_reuse:.0f}"),
    ]


# -----------------------------------------------------------------------------
# the step benchmark (the default): one training step, ours against diffusers + peft

# the transformer's shape, one clip's latent grid (frames, height, width) and its text tokens
PRESETS = {
    "tiny": dict(layers=2, heads=2, head_dim=8, channels=8, caption=16, grid=(2, 4, 4), text=8),
    "medium": dict(layers=4, heads=8, head_dim=64, channels=128, caption=4096, grid=(4, 16, 16), text=128),
    "ltx-0.9.5": dict(layers=28, heads=32, head_dim=64, channels=128, caption=4096, grid=(16, 16, 24), text=128),
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks, for MFU


def build_pair(p: dict, rank: int, dtype: torch.dtype, checkpointing: bool, device: torch.device, interval: int = 1):
    """Ours (model.py + lora.py) and the reference (diffusers + peft) on identical weights and identical adapters."""
    import lora
    import model as ltx
    with errors.quiet_imports():
        from diffusers import LTXVideoTransformer3DModel
        from peft import LoraConfig
    torch.manual_seed(0)
    dim = p["heads"] * p["head_dim"]
    ref = LTXVideoTransformer3DModel(in_channels=p["channels"], out_channels=p["channels"],
                                     num_attention_heads=p["heads"], attention_head_dim=p["head_dim"],
                                     cross_attention_dim=dim, num_layers=p["layers"], caption_channels=p["caption"])
    ours = ltx.LTXTransformer(ltx.config_from_json(dict(ref.config)))
    ours.load_state_dict(ref.state_dict())
    ours, ref = ours.to(device, dtype), ref.to(device, dtype)
    lora.inject(ours, lora.DEFAULT_TARGETS, rank, rank)
    ref.requires_grad_(False)
    ref.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(lora.DEFAULT_TARGETS)))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            theirs = ref.get_submodule(name)
            for ab in "AB":  # B random too, so the first step's gradients flow through both
                weight = torch.randn(getattr(layer, f"lora_{ab}").weight.shape, generator=gen) * 0.02
                getattr(layer, f"lora_{ab}").weight.copy_(weight)
                getattr(theirs, f"lora_{ab}")["default"].weight.copy_(weight)
    ours.gradient_checkpointing, ours.checkpointing_interval = checkpointing, interval
    if checkpointing:
        ref.enable_gradient_checkpointing()
    return ours.train(), ref.train()


def step_inputs(p: dict, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A cached batch as data.load_batch gives it: normalised latents, T5 embeddings and masks, i2v flags."""
    gen = torch.Generator().manual_seed(2)
    f, h, w = p["grid"]
    return {"latents": torch.randn(batch, p["channels"], f, h, w, generator=gen).to(device),
            "prompt_embeds": torch.randn(batch, p["text"], p["caption"], generator=gen).to(device),
            "prompt_attention_mask": torch.ones(batch, p["text"], dtype=torch.bool, device=device),
            "i2v": torch.zeros(batch, dtype=torch.bool)}


def forward_ours(model, flow, grid):
    return model(flow.x_t, flow.text, flow.timestep, flow.text_mask, *grid, (8 / 25, 32, 32))


def forward_reference(model, flow, grid):
    return model(flow.x_t, flow.text, flow.timestep, flow.text_mask, num_frames=grid[0], height=grid[1],
                 width=grid[2], rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)[0]


def make_step(model, forward, batch: dict, cfg):
    """train.py's optimizer step as a function of nothing: train.micro_step (flow-matching inputs, scheduled
    sampling, forward under autocast, loss + CREPA, backward), train.optimizer_step (clipping, train.py's
    optimizer) and the EMA update, as the loop runs them for `cfg` (CREPA reads batch["crepa_features"])."""
    import crepa
    params = [q for q in model.parameters() if q.requires_grad]
    device = batch["latents"].device
    alignment = crepa.Alignment(model, cfg, batch["crepa_features"].shape[-1], device, params[0].dtype) \
        if cfg.crepa_enabled else None
    ema = optim.EMA(params, cfg.ema_decay, device) if cfg.use_ema else None
    every = params + (list(alignment.head.parameters()) if alignment else [])
    optimizer = optim.make_optimizer(every, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    empty = {"prompt_embeds": torch.zeros_like(batch["prompt_embeds"][0]),
             "prompt_attention_mask": batch["prompt_attention_mask"][0]}
    seeds = [train.example_seed(0, 0, j) for j in range(len(batch["i2v"]))]

    def step() -> float:
        loss = train.micro_step(lambda flow, grid: forward(model, flow, grid), batch, empty, cfg, seeds, scaler,
                                alignment=alignment).flow
        loss = train.optimizer_step(every, optimizer, scaler, loss, cfg, ranks.Dist())[0]
        if ema:
            ema.update(params)
        return loss
    return step


def step_flops(p: dict, batch: int) -> float:
    """The useful work of one step: every linear forward + its input gradient (2 × 2·M·N·K), attention forward
    + backward (3 × its two matmuls); recomputation and the r-wide LoRA matmuls are not counted."""
    s, d, text = p["grid"][0] * p["grid"][1] * p["grid"][2], p["heads"] * p["head_dim"], p["text"]
    linear = (4 * s * d * d + 2 * s * d * d + 2 * text * d * d + 2 * s * d * 4 * d) * 2  # attn1, attn2, ff: 2·MNK
    attention = (s * s * d + s * text * d) * 2 * 2  # QKᵀ and PV
    per_block = 2 * linear + 3 * attention
    outside = 2 * 2 * (s * p["channels"] * d * 2 + text * (p["caption"] + d) * d)  # proj_in/out, caption MLP
    return batch * (p["layers"] * per_block + outside)


def cpu_malloc_threshold(size: int) -> None:
    """glibc's threshold above which a block gets its own mmap (returned to the OS on free). By default it rises
    as big blocks are freed, so freed tensors stay in the heap and RSS stops following live memory. Fixed at 64 KiB
    (then every tensor is mapped and unmapped) the RSS high-water mark is a step's real peak, at the price of page
    faults: so memory is measured first, and the timed steps run with it at glibc's own ceiling, 32 MiB."""
    import ctypes
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, size)  # M_MMAP_THRESHOLD


def malloc_trim() -> None:
    """Hands the pages of freed heap blocks back to the OS, so the next allocation of them counts in RSS again
    (blocks under the mmap threshold, e.g. a small LoRA's weights and optimizer state, stay in glibc's heap)."""
    import ctypes
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def step_memory(step, device: torch.device) -> int:
    """Bytes one step needs above what is in use before it (track.peak_during)."""
    return track.peak_during(step, device)[1]


def step_seconds(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_step(args) -> tuple[str, list[tuple], dict]:
    import copy

    import lora
    import model as ltx
    from config import Config
    device = torch.device(args.device)
    p = dict(PRESETS[args.preset])
    if args.frames:
        p["grid"] = ((args.frames - 1) // 8 + 1, args.height // 32, args.width // 32)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    ours, ref = build_pair(p, args.rank, dtype, args.checkpointing == "on", device, args.checkpointing_interval)
    batch = step_inputs(p, args.batch, device)
    cfg = Config(mixed_precision="bf16" if args.precision == "bf16" else "no", base_model_default_dtype=args.precision)
    models = {"ours": (ours, forward_ours), "reference": (ref, forward_reference)}
    if args.compile or device.type == "cuda":  # the reference at its best: compiled as a whole
        models["reference, compiled"] = (torch.compile(copy.deepcopy(ref)), forward_reference)
    if args.compile:
        ltx.compile_blocks(ours)
    sides = {name: make_step(model, forward, batch, cfg) for name, (model, forward) in models.items()}

    if device.type == "cpu":
        cpu_malloc_threshold(64 * 1024)
    first = {name: step() for name, step in sides.items()}  # from identical states: the same work gives one loss
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    same = all(abs(v - first["reference"]) <= tolerance * abs(first["reference"]) for v in first.values())
    print("first step's loss: " + ", ".join(f"{name} {v:.6f}" for name, v in first.items()) +
          (": the same work" if same else ": DIFFERENT"))
    if not same:
        raise SystemExit("the sides do not compute the same loss; timing them would compare different work")
    memory = {name: step_memory(step, device) for name, step in sides.items()}
    if device.type == "cpu":
        cpu_malloc_threshold(32 * 2**20)
    for _ in range(args.warmup):
        for step in sides.values():
            step()
    times = {name: [] for name in sides}
    for _ in range(args.steps):  # interleaved, so a change in the machine's load hits every side alike
        for name, step in sides.items():
            times[name].append(step_seconds(step, device))

    t = {name: statistics.median(v) for name, v in times.items()}
    best = min((name for name in sides if name.startswith("reference")), key=t.get)
    tokens = args.batch * p["grid"][0] * p["grid"][1] * p["grid"][2]
    flops = step_flops(p, args.batch)
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if device.type == "cuda" and dtype == torch.bfloat16
                       and k in torch.cuda.get_device_name(device)), None)
    rows = [(name, f"{t[name] * 1000:.1f}", f"{tokens / t[name]:.0f}", f"{memory[name] / 2**20:.0f}",
             f"{flops / t[name] / 1e12:.2f}", f"{100 * flops / t[name] / peak_flops:.0f} %" if peak_flops else "")
            for name in sides]
    time_ratio = t["ours"] / t[best]
    memory_ratio = memory["ours"] / memory[best] if memory[best] > 0 else None  # tiny: below one page, no ratio
    rows.append((f"**ours / {best}**", f"**{time_ratio:.2f}x**", "",
                 f"**{memory_ratio:.2f}x**" if memory_ratio is not None else "", "", ""))
    shapes = (f"preset {args.preset} ({p['layers']} blocks, {p['heads']}x{p['head_dim']} heads), {tokens} latent + "
              f"{p['text']} text tokens, batch {args.batch}, LoRA r{args.rank} on {len(lora.DEFAULT_TARGETS)} "
              f"targets, {args.precision}, checkpointing {args.checkpointing}"
              f"{f' (ours every {args.checkpointing_interval})' if args.checkpointing_interval > 1 else ''}, {device.type}")
    result = {"preset": args.preset, "precision": args.precision, "checkpointing": args.checkpointing,
              "device": device_name(device), "command": command_line(), "first_loss": first,
              "step_seconds": t, "step_peak_bytes": memory, "flops_per_step": flops, "compared_with": best,
              "step_time_ratio": time_ratio, "peak_memory_ratio": memory_ratio}
    return shapes, rows, result


# -----------------------------------------------------------------------------
# --memory: what a step needs with the base in each precision and each optimizer (ours only)

MEMORY_PRECISIONS = ("no_change", "int8-torchao", "fp8-torchao", "nf4-bnb")
MEMORY_OPTIMIZERS = ("adamw", "bnb-adamw8bit", "bnb-lion8bit-paged")


def transformer_config(p: dict):
    import model as ltx
    return ltx.TransformerConfig(in_channels=p["channels"], out_channels=p["channels"], num_attention_heads=p["heads"],
                                 attention_head_dim=p["head_dim"], cross_attention_dim=p["heads"] * p["head_dim"],
                                 num_layers=p["layers"], caption_channels=p["caption"])


def build_ours(p: dict, weights: dict, cfg, device: torch.device):
    """Ours from `weights` (the same random ones for every row; copied, on the CPU) as train.py builds it for `cfg`:
    prepare.prepare_model quantizes, injects the LoRA and moves it, or group-offloads its blocks."""
    import model as ltx
    with torch.device("meta"):
        m = ltx.LTXTransformer(transformer_config(p))
    m.load_state_dict({k: v.to(config.DTYPES[cfg.base_model_default_dtype], copy=True) for k, v in weights.items()},
                      assign=True)
    return prepare.prepare_model(m, cfg, device)


def output_error(m, reference_output: torch.Tensor, p: dict, device: torch.device) -> tuple[torch.Tensor, float]:
    """The model's output on a fixed input and its error relative to `reference_output` (the bf16 base's):
    ||y - y_bf16|| / ||y_bf16||. The adapters are B = 0, so this is the quantized base's error alone."""
    gen = torch.Generator().manual_seed(3)
    f, h, w = p["grid"]
    x = torch.randn(1, f * h * w, p["channels"], generator=gen).to(device, torch.bfloat16)
    text = torch.randn(1, p["text"], p["caption"], generator=gen).to(device, torch.bfloat16)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        y = m(x, text, torch.full((1,), 500.0, device=device), torch.ones(1, p["text"], dtype=torch.bool,
              device=device), f, h, w, (8 / 25, 32, 32)).float()
    reference = y if reference_output is None else reference_output
    return y, ((y - reference).norm() / reference.norm()).item()


def memory_row(p: dict, weights: dict, precision: str, optimizer: str, offloaded: bool, batch: dict, args,
               device: torch.device, reference_output: torch.Tensor | None) -> tuple[int, float, torch.Tensor, float]:
    """One row: (peak bytes, median step seconds, the model's output, its error against reference_output)."""
    import gc

    from config import Config
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        malloc_trim()
    cfg = Config(mixed_precision="bf16", base_model_default_dtype="bf16", optimizer=optimizer, lora_rank=args.rank,
                 base_model_precision=precision, gradient_checkpointing=args.checkpointing == "on",
                 enable_group_offload=offloaded, compile=args.compile and not offloaded,
                 quantize_via="cpu" if offloaded else "accelerator")  # bench's weights are on the CPU already
    def build_and_step():  # the row's peak: its model, its optimizer state, its first step
        m = build_ours(p, weights, cfg, device)
        step = make_step(m, forward_ours, batch, cfg)
        step()
        return m, step
    (m, step), peak = track.peak_during(build_and_step, device)
    output, error = output_error(m, reference_output, p, device)
    seconds = statistics.median(step_seconds(step, device) for _ in range(args.steps))
    return peak, seconds, output, error


def bench_memory(args) -> tuple[str, list[tuple], dict]:
    """Rows of precision x optimizer, each built fresh from the same random weights in one process: the step's peak
    memory (the model as it trains plus the step's activations, gradients and optimizer state: CUDA's max allocated
    from just before the first step; on the CPU the resident set's high-water mark, restarted just before that
    step, above what the process held before the row's model was built), its median time, and the quantized
    output's error against the bf16 base. Every row first runs once on the tiny preset, unreported, so no row is
    charged for a library's one-time setup (its kernels, its thread pools)."""
    import model as ltx
    device = torch.device(args.device)
    p = dict(PRESETS[args.preset])
    if args.frames:
        p["grid"] = ((args.frames - 1) // 8 + 1, args.height // 32, args.width // 32)
    grid = [(precision, optimizer, False) for precision in args.precisions.split(",")
            for optimizer in args.optimizers.split(",")]
    if args.offload:  # each precision again, its blocks group-offloaded, with the first optimizer
        grid += [(precision, args.optimizers.split(",")[0], True) for precision in args.precisions.split(",")]
    if device.type == "cpu":
        cpu_malloc_threshold(64 * 1024)  # freed tensors go back to the OS: RSS follows live memory
    tiny = PRESETS["tiny"]
    tiny_weights = ltx.LTXTransformer(transformer_config(tiny)).to(torch.bfloat16).state_dict()
    for precision, optimizer, offloaded in grid:
        memory_row(tiny, tiny_weights, precision, optimizer, offloaded, step_inputs(tiny, 1, device),
                   argparse.Namespace(**{**vars(args), "steps": 1}), device, None)
    torch.manual_seed(0)
    weights = ltx.LTXTransformer(transformer_config(p)).to(torch.bfloat16).state_dict()  # random, on the CPU
    batch = step_inputs(p, args.batch, device)
    result, reference_output = {}, None
    for precision, optimizer, offloaded in grid:
        peak, seconds, output, error = memory_row(p, weights, precision, optimizer, offloaded, batch, args, device,
                                                  reference_output)
        reference_output = output if reference_output is None else reference_output
        name = f"{precision.replace('no_change', 'bf16')} + {optimizer}{' + group offload' if offloaded else ''}"
        result[name] = {"peak_bytes": peak, "step_seconds": seconds, "output_error": error}
        print(f"{name}: peak {peak / 2**20:.0f} MiB, {seconds:.2f} s/step, output error {error:.2e}", flush=True)
    base = result.get("bf16 + adamw") or next(iter(result.values()))
    rows = [(name, f"{r['peak_bytes'] / 2**20:.0f}",
             f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" if base["peak_bytes"] > 0 else "",
             f"{r['step_seconds'] * 1000:.0f}", f"{r['step_seconds'] / base['step_seconds']:.2f}x",
             f"{100 * r['output_error']:.2f} %") for name, r in result.items()]
    f, h, w = p["grid"]
    shapes = (f"preset {args.preset} ({p['layers']} blocks, {p['heads']}x{p['head_dim']} heads), {f * h * w} latent + "
              f"{p['text']} text tokens, batch {args.batch}, LoRA r{args.rank}, bf16 base and autocast, checkpointing "
              f"{args.checkpointing}, {device.type}")
    return shapes, rows, {"preset": args.preset, "device": device_name(device), "command": command_line(),
                          "rows": result}


def bench_whole_run(args) -> tuple[str, list[tuple], dict]:
    """train.py's whole run (text caching, latent caching, loading the transformer, training steps, validation) on
    the demo's pipeline and clips (--preset tiny: the demo itself; medium: the medium preset's transformer, T5 as
    wide as its captions, 512x512x25 clips), once per base precision (T5 in the same one), with and without group
    offload; each phase's peak as the run itself records it in memory.json (CUDA max allocated, CPU resident set).
    Every row starts from an empty cache, so every row caches."""
    import gc
    import shutil

    rows, result = [], {}
    with tempfile.TemporaryDirectory(prefix="ltx-bench-") as tmp:
        saved = os.getcwd()
        os.chdir(tmp)  # configs/demo.toml writes its tiny model and clips under output/demo here
        data_args = []
        if args.preset != "tiny":  # made first, so the demo finds them and makes nothing
            demo.make_tiny_pipeline(Path(tmp, "output/demo/tiny-ltx"), mark_as_demo=True, size=args.preset)
            demo.make_synthetic_dataset(Path(tmp, "output/demo/clips"), width=512, height=512)
            Path(tmp, "data.json").write_text(json.dumps([{"id": "shapes", "instance_data_dir": "output/demo/clips",
                                                          "resolution": 512, "resolution_type": "pixel",
                                                          "video": {"num_frames": 25}}]))
            data_args = [f"--data_backend_config={Path(tmp, 'data.json')}"]
        try:
            for precision in args.precisions.split(","):
                for offloaded in (False, True):
                    shutil.rmtree(Path(tmp) / "output/demo/clips/.ltx-cache", ignore_errors=True)  # ours, made here
                    gc.collect()
                    malloc_trim()  # the last row's freed heap back to the OS: each row's RSS starts from the process
                    out = f"run-{precision}-{offloaded}"
                    train.main([str(Path(__file__).parent / "configs/demo.toml"), f"--output_dir={out}",
                                f"--device={args.device}", f"--max_train_steps={args.steps}", "--validation_step_interval=0",
                                "--checkpoint_step_interval=0", "--gradient_checkpointing=true",
                                f"--base_model_precision={precision}", f"--text_encoder_precision={precision}",
                                f"--optimizer={args.optimizers.split(',')[0]}", f"--enable_group_offload={offloaded}",
                                *data_args])
                    name = f"{precision.replace('no_change', 'fp32')}{' + group offload' if offloaded else ''}"
                    result[name] = json.loads(Path(out, "memory.json").read_text())["peak_bytes"]
        finally:
            os.chdir(saved)
    phases = list(next(iter(result.values())))
    rows = [(name, *(f"{peaks.get(phase, 0) / 2**20:.0f}" for phase in phases)) for name, peaks in result.items()]
    clips = "128x96x25" if args.preset == "tiny" else "512x512x25"
    shapes = (f"the demo with the {args.preset} model (16 clips {clips}, {args.steps} steps, validation 128x96x25), "
              f"optimizer {args.optimizers.split(',')[0]}, {args.device}")
    return shapes, rows, {"device": device_name(torch.device(args.device)), "command": command_line(),
                          "phases": phases, "rows": result}


# -----------------------------------------------------------------------------
# --tools: what each training-quality tool adds to a step (ours only)

TOOLS = {  # row name -> the keys that turn it on (docs/training-quality.md)
    "plain step": {},
    "+ EMA (every step)": dict(use_ema=True),
    "+ CREPA (DINOv2-giant features, middle block)": dict(crepa_enabled=True),
    "+ scheduled sampling (every clip, 2 steps)": dict(scheduled_sampling_probability=0.999),
    "all three": dict(use_ema=True, crepa_enabled=True, scheduled_sampling_probability=0.999),
}


def bench_tools(args) -> tuple[str, list[tuple], dict]:
    """train.py's step (bench.make_step) with no tool, each tool alone, and all at once, each row built fresh from
    the same random weights: median step time (the rows' steps interleaved, as bench_step times its sides) and the
    row's peak memory (its model, its tools' state, its first step: CUDA max allocated, or the CPU resident set's
    high-water mark, above what the process held before the row), as ratios to the plain step. Scheduled sampling runs at probability ~1 (every clip rolls
    out): its cost at probability p is about p times the extra shown. Then the eval loss: one train.evaluate of
    one cached clip at the 5 default σ, in plain steps. CREPA's features are random (cached ones cost no more)."""
    import gc

    import model as ltx
    from config import Config
    device = torch.device(args.device)
    p = dict(PRESETS[args.preset])
    if args.frames:
        p["grid"] = ((args.frames - 1) // 8 + 1, args.height // 32, args.width // 32)
    dtype = config.DTYPES[args.precision]
    torch.manual_seed(0)
    weights = ltx.LTXTransformer(transformer_config(p)).to(dtype).state_dict()
    batch = step_inputs(p, args.batch, device)
    f, h, w = p["grid"]
    batch["crepa_features"] = torch.randn(args.batch, f * h * w, 1536, generator=torch.Generator().manual_seed(4)
                                          ).half().to(device)
    steps, peaks = {}, {}
    if device.type == "cpu":
        cpu_malloc_threshold(64 * 1024)  # freed tensors go back to the OS: RSS follows live memory
    for name, keys in [("one-time setup", {}), *TOOLS.items()]:  # a first row, unreported, pays torch's setup
        cfg = Config(mixed_precision="bf16" if args.precision == "bf16" else "no", base_model_default_dtype=args.precision,
                     lora_rank=args.rank, gradient_checkpointing=args.checkpointing == "on",
                     crepa_block_index=p["layers"] // 2, quantize_via="accelerator", **keys)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            malloc_trim()
        def build_and_step():  # the row's peak: its model, its tools' state, its first step
            step = make_step(build_ours(p, weights, cfg, device), forward_ours, batch, cfg)
            step()
            return step
        step, peaks[name] = track.peak_during(build_and_step, device)
        for _ in range(args.warmup):
            step()
        steps[name] = step
    if device.type == "cpu":
        cpu_malloc_threshold(32 * 2**20)  # timed at glibc's own ceiling: no page faults for every tensor
    del steps["one-time setup"]
    times = {name: [] for name in TOOLS}
    for _ in range(args.steps):
        for name, step in steps.items():  # interleaved: a busy machine slows every row alike
            times[name].append(step_seconds(step, device))
    seconds = {name: statistics.median(t) for name, t in times.items()}
    eval_seconds = time_eval(p, weights, batch, device, args)
    base = seconds["plain step"]
    rows = [(name, f"{seconds[name] * 1000:.0f}", f"{seconds[name] / base:.2f}x", f"{peaks[name] / 2**20:.0f}",
             f"{peaks[name] / peaks['plain step']:.2f}x" if peaks["plain step"] > 0 else "") for name in TOOLS]
    rows.append(("eval loss: one clip at 5 σ", f"{eval_seconds * 1000:.0f}", f"{eval_seconds / base:.2f}x", "", ""))
    shapes = (f"preset {args.preset} ({p['layers']} blocks, {p['heads']}x{p['head_dim']} heads), {f * h * w} latent "
              f"tokens, batch {args.batch}, LoRA r{args.rank}, {args.precision}, checkpointing {args.checkpointing}, "
              f"{device.type}")
    result = {name: {"step_seconds": seconds[name], "peak_bytes": peaks[name]} for name in TOOLS}
    result["eval one clip"] = {"seconds": eval_seconds}
    return shapes, rows, {"preset": args.preset, "device": device_name(device), "command": command_line(),
                          "rows": result}


def time_eval(p: dict, weights: dict, batch: dict, device: torch.device, args) -> float:
    """Median seconds of train.evaluate over one clip cached as train.py caches it (its latents and caption files)."""
    from config import Config
    cfg = Config(mixed_precision="bf16" if args.precision == "bf16" else "no", base_model_default_dtype=args.precision,
                 lora_rank=args.rank)
    model = build_ours(p, weights, cfg, device)
    f, h, w = p["grid"]
    with tempfile.TemporaryDirectory(prefix="ltx-bench-") as tmp:
        clip = data.Sample("bench", Path(tmp, "clip.mp4"), "", w * 32, h * 32, (f - 1) * 8 + 1,
                           latent_file=Path(tmp, "latents.safetensors"), text_file=Path(tmp, "text.safetensors"))
        data.write_cache_file({"latents": batch["latents"][0]}, clip.latent_file)
        data.write_cache_file({"prompt_embeds": batch["prompt_embeds"][0],
                               "prompt_attention_mask": batch["prompt_attention_mask"][0]}, clip.text_file)

        def evaluate():
            train.evaluate(model, lambda flow, grid: forward_ours(model, flow, grid), [clip], cfg, ranks.Dist(), device)
        evaluate()
        return statistics.median(step_seconds(evaluate, device) for _ in range(args.steps))


# -----------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}"


def command_line() -> str:
    return "python " + " ".join(sys.argv)


def print_table(title: str, header: tuple[str, ...], rows: list[tuple], how: str) -> None:
    print(f"\n### {title}\n\n`{command_line()}` on {how}\n")
    print("| | " + " | ".join(header) + " |\n" + "|---" * (len(header) + 1) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", action="store_true", help="clips -> latent cache: data.py vs a naive loop")
    parser.add_argument("--clips", type=int, default=12, help="--data: synthetic clips to write")
    parser.add_argument("--size", default="640x360", help="--data: clip WxH")
    parser.add_argument("--resolution", type=int, default=288, help="--data: training shorter side")
    parser.add_argument("--repeats", type=int, default=3, help="--data: timed runs per measurement (median shown)")
    parser.add_argument("--frames", type=int, default=0, help="video frames per clip (8k+1); the step benchmark "
                        "takes --height x --width with it instead of the preset's grid; --data: 49 if not given")
    parser.add_argument("--height", type=int, default=512, help="video height with --frames")
    parser.add_argument("--width", type=int, default=768, help="video width with --frames")
    parser.add_argument("--preset", choices=list(PRESETS), default="medium", help="transformer and clip shape")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                        help="bf16: bf16 base, fp32 LoRA, bf16 autocast (train.py's defaults)")
    parser.add_argument("--checkpointing", choices=["on", "off"], default="on")
    parser.add_argument("--checkpointing-interval", type=int, default=1, help="ours recomputes only every Nth "
                        "block (gradient_checkpointing_interval; the reference recomputes them all)")
    parser.add_argument("--compile", action="store_true", help="ours with compile = true, against the reference "
                        "compiled too (on CUDA the compiled reference is always timed); --memory: every row but the "
                        "offloaded ones compiled")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (the median is shown)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side before the timed ones (after "
                        "the first, which checks the loss, and one that measures memory)")
    parser.add_argument("--memory", action="store_true", help="ours only: step peak memory and time for each base "
                        "precision x optimizer, against bf16 + adamw")
    parser.add_argument("--whole-run", action="store_true", help="--memory: train.py's whole run on the demo, each "
                        "phase's peak, per base precision, with and without group offload")
    parser.add_argument("--offload", action="store_true", help="--memory: each precision also with the blocks "
                        "group-offloaded (one block a group, streams on CUDA; needs --checkpointing on)")
    parser.add_argument("--precisions", default=",".join(MEMORY_PRECISIONS), help="--memory: base_model_precision values")
    parser.add_argument("--optimizers", default=",".join(MEMORY_OPTIMIZERS), help="--memory: optimizer values")
    parser.add_argument("--tools", action="store_true", help="ours only: what EMA, CREPA, scheduled sampling and "
                        "the eval loss each add to a step (docs/training-quality.md)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    if args.data:
        import av
        args.frames = args.frames or 49
        with tempfile.TemporaryDirectory(prefix="ltx-bench-") as tmp:
            shapes, rows = bench_data(args, Path(tmp))
        print_table(f"Data: clips to cached latents: {shapes}", ("frames/s", "clips/s"), rows,
                    f"{device_name(torch.device('cpu'))}, PyAV {av.__version__}; median of {args.repeats} run(s)")
        return
    if args.tools:
        shapes, rows, result = bench_tools(args)
        print_table(f"Training-quality tools: {shapes}", ("ms/step", "time vs plain", "peak MiB",
                    "memory vs plain"), rows, f"{result['device']}; median of {args.steps} interleaved steps after "
                    f"{args.warmup} warm-up; peak: model + tools' state + a step, " +
                    ("CUDA max allocated" if args.device.startswith("cuda") else
                     "CPU resident-set high-water mark above the process before the row"))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.memory and args.whole_run:
        shapes, rows, result = bench_whole_run(args)
        print_table(f"Memory: a whole run, each phase's peak MiB: {shapes}", tuple(result["phases"]), rows,
                    f"{result['device']}; " + ("CUDA max allocated" if args.device.startswith("cuda") else
                                               "CPU: the process's resident set (all of it: Python and torch too)"))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.memory:
        shapes, rows, result = bench_memory(args)
        print_table(f"Memory: precision x optimizer: {shapes}", ("step peak MiB", "vs bf16 + adamw", "ms/step",
                    "time vs bf16 + adamw", "output error vs bf16"), rows,
                    f"{result['device']}; " + ("CUDA max allocated" if args.device.startswith("cuda") else
                                               "CPU: resident-set high-water mark above the process before the row"))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return
    shapes, rows, result = bench_step(args)
    print_table(f"One training step: {shapes}", ("ms/step", "tokens/s", "step peak MiB", "TFLOP/s", "MFU"), rows,
                f"{result['device']}; median of {args.steps} interleaved steps after {args.warmup} warm-up")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
