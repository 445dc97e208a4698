"""Data: everything between a folder of clips and a batch of cached tensors.

Owns dataset discovery (video + same-stem .txt caption), PyAV decoding,
resize/crop to the training resolution, the on-disk latent + text-embedding
cache, the batch order of each epoch, and the synthetic demo dataset.
It never runs a model except through the two encode callables handed to
`build_cache`, so it knows nothing about the VAE, T5 or the transformer.
"""

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import av
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

VIDEO_EXTS = (".mp4", ".mov", ".webm", ".mkv")


@dataclass
class Clip:
    video: Path
    caption: str


# -----------------------------------------------------------------------------
# shapes the LTX VAE accepts

def round_resolution(width: int, height: int) -> tuple[int, int]:
    # the VAE compresses 32x spatially, so each side must be a multiple of 32
    return max(32, width // 32 * 32), max(32, height // 32 * 32)


def round_frames(num_frames: int) -> int:
    # the causal VAE keeps the first frame and compresses the rest 8x in time
    return max(1, (num_frames - 1) // 8 * 8 + 1)


# -----------------------------------------------------------------------------
# discovery and decoding

def find_clips(folder: str | Path) -> list[Clip]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"dataset folder {folder} does not exist; check the dataset path in your config.")
    videos = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTS), key=lambda p: p.name)
    if not videos:
        raise ValueError(f"no videos ({', '.join(VIDEO_EXTS)}) found in {folder}; add clips or point the config at another folder.")
    clips = []
    for video in videos:
        caption = video.with_suffix(".txt")
        if not caption.is_file():
            raise ValueError(f"video {video} has no caption; write one line describing it to {caption}.")
        clips.append(Clip(video, caption.read_text(encoding="utf-8").strip()))
    return clips


def resize_and_crop(frame: torch.Tensor, width: int, height: int) -> torch.Tensor:
    # scale so the frame covers width x height (no squashing, no borders), then cut the centre;
    # [N, 3, H, W] float in, [N, 3, height, width] out
    h, w = frame.shape[-2:]
    scale = max(width / w, height / h)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        frame = F.interpolate(frame, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frame[..., top:top + height, left:left + width]


def load_frames(path: str | Path, num_frames: int, width: int, height: int) -> torch.Tensor:
    """First `num_frames` frames of a video as float32 [3, num_frames, height, width] in [-1, 1]."""
    arrays = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream; remove it from the dataset.")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # let FFmpeg decode on all cores (frame + slice threads)
            for frame in container.decode(stream):
                arrays.append(frame.to_ndarray(format="rgb24"))  # [H, W, 3] uint8
                if len(arrays) == num_frames:
                    break
    except av.FFmpegError as e:
        raise ValueError(f"could not decode {path} ({e}); re-encode it (e.g. to H.264 mp4) or remove it.") from e
    if len(arrays) < num_frames:
        raise ValueError(f"{path} has {len(arrays)} frames but {num_frames} are needed; lower num_frames or remove the clip.")
    # torch only after decoding: interleaved, torch's spinning OpenMP threads starve FFmpeg's (3-4x slower);
    # frame by frame, so only one frame at a time is float at full size
    frames = [resize_and_crop(torch.from_numpy(a).permute(2, 0, 1)[None].float(), width, height)[0] for a in arrays]
    video = torch.stack(frames, dim=1)  # [3, F, H, W]
    return (video / 127.5 - 1.0).clamp(-1.0, 1.0)


# -----------------------------------------------------------------------------
# the synthetic demo dataset: clips whose captions are fully predictable from the pixels

SHAPE_COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "yellow": (240, 220, 40),
                "white": (245, 245, 245), "orange": (250, 140, 20), "cyan": (40, 220, 230)}
BACKGROUND_COLORS = {"black": (10, 10, 10), "dark blue": (15, 25, 90), "dark gray": (60, 60, 60),
                     "dark purple": (60, 20, 80), "dark green": (15, 60, 25)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


# per-codec quality settings: visually lossless for these small clips
CODEC_OPTIONS = {"libx264": {"crf": "18", "preset": "veryfast"}, "mpeg4": {"qscale": "2"}}


def write_video(path: str | Path, frames: np.ndarray, fps: int, codec: str = "libx264") -> None:
    """Write uint8 [F, H, W, 3] RGB frames as an mp4 (yuv420p, so any player opens it)."""
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = CODEC_OPTIONS[codec]
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the frames the encoder holds back


def draw_shape(shape: str, cx: float, cy: float, r: float, width: int, height: int) -> np.ndarray:
    """Boolean [height, width] mask of a shape with centre (cx, cy) and half-size r."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2
    if shape == "square":
        return (abs(x - cx) <= r) & (abs(y - cy) <= r)
    # triangle pointing up: half-width grows from 0 at the apex to r at the base
    return (y >= cy - r) & (y <= cy + r) & (abs(x - cx) <= (y - cy + r) / 2)


def render_clip(rng: random.Random, num_frames: int, width: int, height: int) -> tuple[np.ndarray, str]:
    shape, color, direction = rng.choice(SHAPES), rng.choice(list(SHAPE_COLORS)), rng.choice(list(DIRECTIONS))
    bg_name, gradient = rng.choice(list(BACKGROUND_COLORS)), rng.random() < 0.5
    bg = np.empty((height, width, 3), np.float32)
    bg[:] = BACKGROUND_COLORS[bg_name]
    if gradient:  # brighten towards the bottom so the background is not flat but never as bright as a shape
        bg *= np.linspace(0.6, 1.8, height, dtype=np.float32)[:, None, None]
    r = 0.18 * min(width, height)
    # the shape travels edge to edge along its direction, so the motion dominates the clip
    dx, dy = DIRECTIONS[direction]
    start = np.array([rng.uniform(r, width - r), rng.uniform(r, height - r)])
    start[0] = start[0] if dx == 0 else (r if dx > 0 else width - r)
    start[1] = start[1] if dy == 0 else (r if dy > 0 else height - r)
    travel = np.array([dx * (width - 2 * r), dy * (height - 2 * r)])
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        cx, cy = start + travel * i / max(1, num_frames - 1)
        frame = bg.copy()
        frame[draw_shape(shape, cx, cy, r, width, height)] = SHAPE_COLORS[color]
        frames[i] = frame.clip(0, 255)
    article = "an" if color[0] in "aeiou" else "a"
    caption = f"{article} {color} {shape} moving {direction} on a {bg_name}{' gradient' if gradient else ''} background"
    return frames, caption


def make_synthetic_dataset(folder: str | Path, n: int = 16, num_frames: int = 25, width: int = 128,
                           height: int = 96, fps: int = 25, seed: int = 0) -> list[Clip]:
    """n procedurally generated clips with captions, deterministic from the seed.

    If the folder already holds any clips they are returned as they are (nothing is
    regenerated, whatever the arguments): delete the folder to get a new set.
    """
    folder = Path(folder)
    if folder.is_dir() and any(p.suffix.lower() in VIDEO_EXTS for p in folder.iterdir()):
        return find_clips(folder)
    if width % 2 or height % 2:
        raise ValueError(f"synthetic clips need an even width and height for yuv420p, got {width}x{height}.")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)  # a private RNG: the global ones stay untouched
    for i in range(n):
        frames, caption = render_clip(rng, num_frames, width, height)
        video = folder / f"clip_{i:04d}.mp4"
        # caption first, video renamed into place last: a crash never leaves a video without its caption
        video.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        # MPEG-4 part 2, not H.264: x264's output varies run to run under CPU load (measured: 2-4
        # variants in 30 encodes of one clip), FFmpeg's own mpeg4 encoder gives the same bytes every time
        write_video(video.with_suffix(".tmp"), frames, fps, codec="mpeg4")
        os.replace(video.with_suffix(".tmp"), video)
    return find_clips(folder)


# -----------------------------------------------------------------------------
# the latent + text cache

def cache_key(clip: Clip, width: int, height: int, num_frames: int, encoder_id: str) -> str:
    # everything that changes the cached tensors; mtime/size catch an edited video without reading it
    stat = clip.video.stat()
    fields = [str(clip.video.resolve()), stat.st_size, stat.st_mtime_ns, width, height, num_frames, encoder_id, clip.caption]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]


def empty_prompt_file(cache_dir: str | Path, encoder_id: str) -> Path:
    """Where the embedding of "" (trained on for caption dropout) is cached for these encoders."""
    return Path(cache_dir) / f"empty_prompt-{hashlib.sha256(encoder_id.encode()).hexdigest()[:16]}.safetensors"


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    # safetensors only validates on load, so a half-written file must never carry the final name
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def build_cache(clips: list[Clip], cache_dir: str | Path,
                encode_video: Callable[[torch.Tensor], torch.Tensor],
                encode_text: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
                num_frames: int, width: int, height: int, encoder_id: str) -> list[Path]:
    """Encode every clip not cached yet; return one safetensors file per clip, in clip order.

    encode_video: [1, 3, F, H, W] in [-1, 1] -> normalised latents [1, C, f, h, w].
    encode_text: list of captions -> (embeddings [B, L, D], attention mask [B, L]).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = [cache_dir / f"{cache_key(c, width, height, num_frames, encoder_id)}.safetensors" for c in clips]
    todo = {path: clip for clip, path in zip(clips, paths) if not path.exists()}  # a dict: a repeated clip is encoded once
    with torch.no_grad():
        empty = empty_prompt_file(cache_dir, encoder_id)
        if not empty.exists():
            embeds, mask = encode_text([""])
            save_atomic({"prompt_embeds": embeds[0], "prompt_attention_mask": mask[0]}, empty)
        # text first (fast, small) and held in memory; then each clip's file is written as soon as
        # its latents exist, so an interrupted latent pass (the slow one) keeps the work it finished
        texts = {}
        for path, clip in tqdm(todo.items(), desc="caching text", disable=not todo):
            embeds, mask = encode_text([clip.caption])
            texts[path] = {"prompt_embeds": embeds[0], "prompt_attention_mask": mask[0]}
        for path, clip in tqdm(todo.items(), desc="caching latents", disable=not todo):
            video = load_frames(clip.video, num_frames, width, height)
            latents = encode_video(video[None])[0]
            save_atomic({"latents": latents, **texts.pop(path)}, path,
                        metadata={"video": str(clip.video), "caption": clip.caption})
    return paths


def load_cached(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# -----------------------------------------------------------------------------
# batching

def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a pure function of its arguments, so a resumed run gets the same order."""
    if num_items < batch_size:
        raise ValueError(f"the dataset has {num_items} items but batch_size is {batch_size}; lower batch_size or add clips.")
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)  # own generator: global RNG use elsewhere can't shift it
    order = torch.randperm(num_items, generator=generator).tolist()
    # drop the last partial batch so every step sees the same batch shape
    return [order[i:i + batch_size] for i in range(0, num_items - batch_size + 1, batch_size)]


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
