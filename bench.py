"""Benchmarks: our code against a reference doing the same work, on the same inputs, in one run.

    python bench.py --data        # clips -> latent cache: data.py vs a naive loop (CPU, under a minute)

--data writes --clips synthetic H.264 clips (libx264 via data.write_video: a panning noise texture with film
grain and a moving disc, so the codec does real work) with captions into a temp folder, then times, on the same
files and the same training shape (the bucket data.plan_samples gives at --resolution):
  ours      data.plan_samples + data.cache_samples into a fresh cache: FFmpeg threads, decoding on a thread
            pool, stopping at the last frame needed, uint8 torch resize into one float tensor
  naive     one clip at a time: av.open, decode every frame (thread_type left at PyAV's default, SLICE, which
            is one thread for x264's one-slice frames), frame.to_image() + PIL resize, stack, save_file
  reuse     plan_samples + cache_samples again over the full cache: every file a hit
The VAE and T5 are replaced by near-free fakes (a strided slice, zeros), so only data work is timed.
Each figure is the median of --repeats runs after one warm-up clip; it prints a markdown table for the README.
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

import av
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import data
import demo


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
        data.cache_samples(samples, {ds.id: ds}, fake_encode_video, fake_encode_text, vae_id="fake", text_id="fake",
                           text_dir=cache / "text", compress=False, vae_batch_size=1, text_batch_size=64,
                           report=report, shape=FAKE_SHAPE)
    assert not report.problems and len(data.cached(samples)) == len(samples), report.problems


def naive(samples: list[data.Sample], cache: Path) -> None:
    """The first-attempt script: decode everything, PIL-resize frame by frame, keep the first F, save."""
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
# --step (the default): one training step, ours vs diffusers + peft

# transformer shape and one clip's latent grid (frames, height, width) and text tokens
PRESETS = {
    "tiny": dict(layers=2, heads=2, head_dim=8, channels=8, caption=16, grid=(2, 4, 4), text=8),
    "medium": dict(layers=4, heads=8, head_dim=64, channels=128, caption=4096, grid=(4, 16, 16), text=128),
    "ltx-0.9.5": dict(layers=28, heads=32, head_dim=64, channels=128, caption=4096, grid=(16, 16, 24), text=128),
}


def build_pair(p: dict, rank: int, dtype: torch.dtype, checkpointing: bool, device: torch.device):
    """Ours (model.py + lora.py) and the reference (diffusers + peft) on identical weights and identical adapters."""
    from diffusers import LTXVideoTransformer3DModel
    from peft import LoraConfig

    import lora
    import model as ltx
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
    ref.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(lora.DEFAULT_TARGETS),
                               init_lora_weights=True))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            theirs = ref.get_submodule(name)
            for ab in "AB":  # B random too, so the first step's gradients flow through both
                weight = torch.randn(getattr(layer, f"lora_{ab}").weight.shape, generator=gen) * 0.02
                getattr(layer, f"lora_{ab}").weight.copy_(weight)
                getattr(theirs, f"lora_{ab}")["default"].weight.data = weight.to(device, torch.float32)
    ours.gradient_checkpointing = checkpointing
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


def training_step(model, forward, batch: dict, cfg, params, optimizer, scaler, dtype) -> float:
    """train.py's step: flow-matching inputs, forward under autocast, the loss, backward, clip, AdamW."""
    import train
    empty = {"prompt_embeds": torch.zeros_like(batch["prompt_embeds"][0]),
             "prompt_attention_mask": batch["prompt_attention_mask"][0]}
    flow = train.flow_matching_inputs(batch, empty, cfg, [train.example_seed(0, 0, j) for j in range(len(batch["i2v"]))])
    with torch.autocast(flow.x_t.device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = forward(model, flow, batch["latents"].shape[2:])
    loss = train.flow_matching_loss(pred, flow)
    scaler.scale(loss).backward()
    loss_value, _, _ = train.optimizer_step(params, optimizer, scaler, loss.detach(), cfg, train.Dist())
    return loss_value


def forward_ours(model, flow, grid):
    dtype = model.proj_in.weight.dtype
    return model(flow.x_t.to(dtype), flow.text.to(dtype), flow.timestep, flow.text_mask, *grid, (8 / 25, 32, 32))


def forward_reference(model, flow, grid):
    dtype = model.proj_in.weight.dtype
    return model(flow.x_t.to(dtype), flow.text.to(dtype), flow.timestep, flow.text_mask, num_frames=grid[0],
                 height=grid[1], width=grid[2], rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)[0]




def memory_now(device: torch.device) -> int:
    """Bytes in use: CUDA's allocated memory, or this process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmRSS")).split()[1]) * 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the kernel's way to reset VmHWM to the current RSS


def peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM")).split()[1]) * 1024


def timed_step(run, device: torch.device) -> tuple[float, float, int]:
    """(loss, seconds, bytes the step needed above what was in use before it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    before = memory_now(device)
    reset_peak(device)
    t0 = time.perf_counter()
    loss = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss, time.perf_counter() - t0, peak(device) - before


def bench_step(args) -> tuple[str, list[tuple[str, str, str]], dict]:
    from config import Config
    import lora
    device = torch.device(args.device)
    p = dict(PRESETS[args.preset])
    if args.frames:
        p["grid"] = ((args.frames - 1) // 8 + 1, args.height // 32, args.width // 32)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    ours, ref = build_pair(p, args.rank, dtype, args.checkpointing == "on", device)
    batch = step_inputs(p, args.batch, device)
    cfg = Config(mixed_precision=args.precision if args.precision == "bf16" else "no")
    sides = {}
    for name, model, forward in (("ours", ours, forward_ours), ("reference", ref, forward_reference)):
        params = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, fused=device.type == "cuda")
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        sides[name] = lambda model=model, forward=forward, params=params, optimizer=optimizer, scaler=scaler: \
            training_step(model, forward, batch, cfg, params, optimizer, scaler, dtype)
    first = {name: run() for name, run in sides.items()}  # also the first warm-up step
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    same = abs(first["ours"] - first["reference"]) <= tolerance * abs(first["reference"])
    print(f"first step's loss: ours {first['ours']:.6f}, reference {first['reference']:.6f}: "
          f"{'the same work' if same else 'DIFFERENT'}")
    if not same:
        raise SystemExit("the two sides do not compute the same loss; timing them would compare different work")
    for _ in range(args.warmup - 1):
        for run in sides.values():
            run()
    times, memory = {name: [] for name in sides}, {name: [] for name in sides}
    for _ in range(args.steps):  # interleaved, so a change in the machine's load hits both alike
        for name, run in sides.items():
            _, seconds, extra = timed_step(run, device)
            times[name].append(seconds)
            memory[name].append(extra)
    t = {name: statistics.median(v) for name, v in times.items()}
    m = {name: max(v) for name, v in memory.items()}
    tokens = args.batch * p["grid"][0] * p["grid"][1] * p["grid"][2]
    shapes = (f"preset {args.preset}: {p['layers']} blocks, {p['heads']}x{p['head_dim']} heads, {tokens} latent tokens, "
              f"{p['text']} text tokens, batch {args.batch}, LoRA r{args.rank} on {len(lora.DEFAULT_TARGETS)} targets, "
              f"{args.precision}, checkpointing {args.checkpointing}, {args.device}")
    rows = [(name, f"{t[name] * 1000:.1f}", f"{tokens / t[name]:.0f}", f"{m[name] / 2**20:.0f}") for name in sides]
    rows.append(("**ours / reference**", f"**{t['ours'] / t['reference']:.2f}x**", "",
                 f"**{m['ours'] / max(m['reference'], 1):.2f}x**"))
    result = {"preset": args.preset, "precision": args.precision, "checkpointing": args.checkpointing,
              "device": args.device, "first_loss": first, "step_seconds": t, "step_peak_bytes": m,
              "step_time_ratio": t["ours"] / t["reference"], "peak_memory_ratio": m["ours"] / max(m["reference"], 1)}
    return shapes, rows, result


# -----------------------------------------------------------------------------

def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def print_table(title: str, shapes: str, rows: list[tuple[str, str, str]], repeats: int) -> None:
    print(f"\n### {title}: {shapes}\n")
    print(f"`python {' '.join(sys.argv)}` on {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"PyAV {av.__version__}; median of {repeats} run(s)\n")
    print("| | frames/s | clips/s |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", action="store_true", help="clips -> latent cache: data.py vs a naive loop")
    parser.add_argument("--clips", type=int, default=12, help="--data: synthetic clips to write")
    parser.add_argument("--frames", type=int, default=0, help="--data: frames per clip (default 49); the step "
                        "benchmark: video frames (8k+1) instead of the preset's")
    parser.add_argument("--size", default="640x360", help="--data: clip WxH")
    parser.add_argument("--resolution", type=int, default=288, help="--data: training shorter side")
    parser.add_argument("--repeats", type=int, default=3, help="--data: timed runs per measurement (median shown)")
    parser.add_argument("--preset", choices=list(PRESETS), default="medium", help="transformer and clip shape")
    parser.add_argument("--height", type=int, default=512, help="video height with --frames")
    parser.add_argument("--width", type=int, default=768, help="video width with --frames")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                        help="bf16: bf16 base, fp32 LoRA, autocast (as train.py's defaults)")
    parser.add_argument("--checkpointing", choices=["on", "off"], default="on")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (the median is shown)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    if args.data:
        args.frames = args.frames or 49
        with tempfile.TemporaryDirectory(prefix="ltx-bench-") as tmp:
            print_table("Data: clips to cached latents", *bench_data(args, Path(tmp)), args.repeats)
        return
    shapes, rows, result = bench_step(args)
    print(f"\n### One training step: {shapes}\n")
    print(f"`python {' '.join(sys.argv)}` on {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"median of {args.steps} interleaved steps after {args.warmup} warm-up\n")
    print("| | ms/step | tokens/s | step peak MiB |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
