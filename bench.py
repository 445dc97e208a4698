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
    parser.add_argument("--clips", type=int, default=12, help="synthetic clips to write")
    parser.add_argument("--frames", type=int, default=49, help="frames per clip; training takes the first 8k+1")
    parser.add_argument("--size", default="640x360", help="clip WxH")
    parser.add_argument("--resolution", type=int, default=288, help="training shorter side (the bucket picks W)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is shown")
    args = parser.parse_args()
    if not args.data:
        parser.error("say which benchmark to run: --data")
    if args.data:
        with tempfile.TemporaryDirectory(prefix="ltx-bench-") as tmp:
            print_table("Data: clips to cached latents", *bench_data(args, Path(tmp)), args.repeats)


if __name__ == "__main__":
    main()
