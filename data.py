"""Data: everything between folders of clips and a batch of cached tensors.

Owns: the Dataset entry (its keys; config.py reads them from [[datasets]] or SimpleTuner's JSON), clip and
image discovery, captions, probing, the frame and size rules (W, H multiples of 32, 8k+1 frames), aspect /
frame buckets, PyAV decoding, resize / crop, writing an mp4, the on-disk latent and text-embedding caches
(sized from the CacheShape it is handed), the data report of skipped files, and the epoch plan (buckets,
repeats, mixing by probability, sharding across ranks).
Does not: run a model except through the two encode callables it is handed, know a model's shapes except
through that CacheShape, or make the demo's synthetic clips (demo.py does).

A run's data, in order:
    config.dataset_entries -> Dataset entries     (errors name the file, the entry and the nearest key)
    plan_samples    -> one Sample per usable file (its bucket W x H x F, frame window, crop; bad files reported)
    cache_samples   -> latents + text embeddings on disk, once (bad decodes reported and dropped)
    make_buckets    -> samples grouped by shape, small buckets pruned
    epoch_plan      -> the global batches of an epoch, a pure function of (seed, epoch)
"""

import codecs
import glob
import gzip
import hashlib
import json
import math
import os
import random
import re
import shutil
import struct
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from tqdm import tqdm

VIDEO_EXTS = (".mp4", ".mov", ".webm", ".mkv")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SQUARE_AND_COMMON_ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16)  # what crop_aspect = "random" picks from


# -----------------------------------------------------------------------------
# Dataset entries

@dataclass
class Dataset:
    id: str = ""  # names the dataset in logs, errors and data_report.json
    dataset_type: Literal["video", "image", "text_embeds"] = "video"  # video | image (trains as 1-frame clips) | text_embeds (where captions cache)
    instance_data_dir: str = ""  # folder of clips (or images) with their captions
    disabled: bool = False  # skip this entry
    caption_strategy: Literal["textfile", "filename", "instanceprompt"] = "textfile"  # textfile: same-named .txt | filename: the file name | instanceprompt
    instance_prompt: str = ""  # the caption of every file with caption_strategy = "instanceprompt"
    resolution: float = 512  # target size, in the unit resolution_type says
    resolution_type: Literal["pixel_area", "pixel", "area"] = "pixel_area"  # pixel_area: side of a square of equal area | pixel: shorter side | area: megapixels
    minimum_image_size: float = 0  # skip sources smaller than this (resolution_type's unit); 0 = keep all
    maximum_image_size: float = 0  # sources larger than this are first downsampled to target_downsample_size
    target_downsample_size: float = 0  # see maximum_image_size
    crop: bool = False  # crop to the bucket's aspect (else resize to it, bending the aspect by at most the rounding)
    crop_style: Literal["center", "random"] = "center"  # center | random (a fixed random window per file)
    crop_aspect: Literal["preserve", "square", "random"] = "preserve"  # preserve: the file's own aspect | square | random: one of 1, 4:3, 3:4, 16:9, 9:16
    repeats: int = 0  # extra passes over this dataset per epoch
    cache_dir_vae: str = ""  # latent cache; "" = <instance_data_dir>/.ltx-cache
    probability: float = 1.0  # relative chance the next batch comes from this dataset
    # the [video] table
    num_frames: int = 49  # frames per clip (rounded down to 8k+1)
    min_frames: int = 0  # shorter clips are skipped; 0 = num_frames
    max_frames: int = 0  # longer clips are trimmed to this first; 0 = no limit
    is_i2v: bool = True  # the first latent frame may serve as the image condition (see i2v_probability)
    bucket_strategy: Literal["aspect_ratio", "resolution_frames"] = "aspect_ratio"  # aspect_ratio: num_frames at rounded aspects | resolution_frames: WxH@F
    frame_interval: int = 8  # resolution_frames: a clip's length is rounded down to 1 + a multiple of this
    frame_sample: Literal["start", "random"] = "start"  # start | random: where the window of frames starts
    fps: float = 0  # resample clips to this frame rate first; 0 = keep the file's rate
    # a text_embeds entry
    cache_dir: str = ""  # where T5 embeddings are cached
    write_batch_size: int = 64  # captions per T5 call
    default: bool = False  # the text_embeds entry to use when there are several


VIDEO_KEYS = ("num_frames", "min_frames", "max_frames", "is_i2v", "bucket_strategy", "frame_interval", "frame_sample",
              "fps")
class DataError(Exception):
    """A data problem the user can fix (a dataset entry, a folder, a setting, too few usable clips): shown as
    one sentence. Anything else raised while reading data is a bug and shows its traceback."""


class BadFile(DataError):
    """One file broken in itself (undecodable, truncated, no video stream): the only kind of file
    `delete_problematic_images` moves aside. A clip that merely does not fit this run's settings is not one."""


# -----------------------------------------------------------------------------
# Shapes the LTX VAE accepts

def nearest_32(x: float) -> int:
    # a computed bucket side: the nearest multiple of 32 keeps the aspect truest (down would squash small sizes)
    return max(32, int(round(x / 32)) * 32)


def round_frames(num_frames: int) -> int:
    # the causal VAE keeps the first frame and compresses the rest 8x in time
    return max(1, (num_frames - 1) // 8 * 8 + 1)


def size_in_units(width: int, height: int, resolution_type: str) -> float:
    """A source's size in the unit of `resolution_type` (for minimum / maximum_image_size)."""
    if resolution_type == "pixel":
        return min(width, height)
    if resolution_type == "area":
        return width * height / 1e6
    return math.sqrt(width * height)


def size_for(aspect: float, resolution: float, resolution_type: str) -> tuple[float, float]:
    """(width, height), unrounded, of the given aspect at the given resolution."""
    if resolution_type == "pixel":
        return (resolution * aspect, resolution) if aspect >= 1 else (resolution, resolution / aspect)
    area = resolution * 1e6 if resolution_type == "area" else resolution ** 2
    return math.sqrt(area * aspect), math.sqrt(area / aspect)


# -----------------------------------------------------------------------------
# Files, captions, problems

@dataclass
class Sample:
    """One training item: which file, which frames, at which size, and where its caches live."""
    dataset: str
    path: Path
    caption: str
    width: int  # the bucket: W x H x F after every rule
    height: int
    frames: int
    start: int = 0  # first frame, in frames at the target rate
    step: float = 1.0  # source frames per target frame (fps resampling)
    crop: tuple[float, float] | None = None  # crop window position (0..1 each way); None = resize without crop
    downsample: tuple[int, int] | None = None  # first bring large sources to this size
    i2v: bool = False  # may train as image-to-video
    latent_file: Path | None = None
    text_file: Path | None = None
    feature_file: Path | None = None  # CREPA's DINOv2 features, when crepa is on


class Report:
    """Files this run does not use: one line each in data_report.json, a summary on the console.

    A skipped file stays where it is. Only files broken in themselves (`broken`: undecodable, zero bytes,
    truncated) are moved aside, and only with `quarantine` (delete_problematic_images), by `move_broken` once
    every file was read. If more than half of a dataset would be skipped, that looks like wrong settings, not
    bad files: `check_mostly_usable` stops the run first, and nothing is moved or skipped.
    """

    def __init__(self, path: Path, quarantine: bool, echo: bool = True):
        self.path, self.quarantine, self.echo = path, quarantine, echo  # echo: print notes (rank 0 only)
        self.problems: list[dict] = []
        self.notes: list[str] = []
        self.files: dict[str, int] = {}  # files found per dataset id

    def skip(self, dataset: Dataset, path: Path, problem: str, broken: bool = False) -> None:
        self.problems.append({"dataset": dataset.id, "file": str(path), "problem": problem, "broken": broken})

    def check_mostly_usable(self) -> None:
        for dataset, found in self.files.items():
            skipped = [p for p in self.problems if p["dataset"] == dataset]
            if 2 * len(skipped) > found:
                reasons = "; ".join(f"{Path(p['file']).name}: {p['problem']}" for p in skipped[:3])
                raise DataError(f"dataset '{dataset}': {len(skipped)} of its {found} files would be skipped, which "
                                f"looks like wrong settings rather than bad files, so the run stops and nothing was "
                                f"moved. First reasons: {reasons}. Check num_frames / min_frames / the sizes and "
                                f"captions (all {len(skipped)} are listed in {self.path})")

    def move_broken(self, datasets: dict[str, Dataset]) -> None:
        """With quarantine: moves each broken file, and its caption, to quarantine/<dataset id>/ beside the
        dataset folder; never overwrites what is there and never deletes."""
        if not self.quarantine:
            return
        for entry in self.problems:
            path = Path(entry["file"])
            if not entry["broken"] or "moved_to" in entry or not path.exists():
                continue
            dataset = entry["dataset"]
            folder = Path(datasets[dataset].instance_data_dir).resolve().parent / "quarantine" / dataset
            target = free_name(folder / path.name)
            caption = caption_file(path)
            if caption and any(p != path and p.suffix.lower() in VIDEO_EXTS + IMAGE_EXTS
                               for p in path.parent.glob(glob_any_case(path.stem) + ".*")):
                caption = None  # clip.mov's caption is also clip.mp4's: it stays with the good one
            try:
                folder.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), target)
                if caption:
                    shutil.move(str(caption), free_name(target.with_suffix(caption.suffix)))
                entry["moved_to"] = str(target)
            except OSError as e:  # a read-only dataset: the file stays, skipped as it would be without quarantine
                entry["not_moved"] = f"could not move it to {folder} ({e.strerror or e})"

    def note(self, message: str) -> None:
        self.notes.append(message)
        if self.echo:
            print(message)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"skipped": self.problems, "notes": self.notes}, indent=2))
        if self.problems:
            print(f"skipped {len(self.problems)} unusable file(s); each is listed in {self.path}")


def free_name(path: Path) -> Path:
    """`path`, or path-1, path-2, ... if it exists: a quarantined file never replaces an earlier one."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def caption_file(path: Path) -> Path | None:
    """The caption beside a file: same name, .txt in any case (clip.Mp4 -> clip.TXT)."""
    exact = path.with_suffix(".txt")
    if exact.is_file():
        return exact
    return next((p for p in sorted(path.parent.glob(glob_any_case(path.stem) + ".[tT][xX][tT]")) if p.is_file()),
                None)


def glob_any_case(text: str) -> str:
    """A glob pattern matching `text` exactly (letters in any case, glob characters escaped)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else glob.escape(c) for c in text)


def read_caption(path: Path) -> str:
    """A caption file's text: UTF-8 (with or without a BOM), or UTF-16 when it starts with a UTF-16 BOM.
    Raises UnicodeDecodeError for anything else (latin-1, say): guessing would train on mangled words."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")
    return raw.decode("utf-8-sig")


def caption_for(ds: Dataset, path: Path) -> tuple[str | None, str]:
    """(caption, problem): the caption text, or None and why there is none."""
    if ds.caption_strategy == "instanceprompt":
        return ds.instance_prompt, ""
    if ds.caption_strategy == "filename":
        return path.stem.replace("_", " ").replace("-", " ").strip(), ""
    text_file = caption_file(path)
    if text_file is None:
        return None, f"missing caption file {path.stem}.txt"
    try:
        caption = read_caption(text_file).strip()
    except UnicodeDecodeError:
        return None, f"caption file {text_file.name} is neither UTF-8 nor UTF-16 with a BOM; save it as UTF-8"
    except OSError as e:
        return None, f"unreadable caption file {text_file.name} ({e.strerror or e})"
    return (caption, "") if caption else (None, f"empty caption file {text_file.name}")


def quarter_turns(degrees: float) -> int:
    """A clip's display rotation as torch.rot90's k (counter-clockwise quarter turns, 0-3), other angles rounded.
    FFmpeg's sign: positive is counter-clockwise, so a phone's portrait clip (stored landscape, shown turned
    90 degrees clockwise: tkhd matrix [0 1; -1 0], the old 'rotate=90' tag) reads -90 and needs k = 3."""
    return round(degrees / 90) % 4


# EXIF Orientation -> the transpose that shows the image upright: ImageOps.exif_transpose's table. Not that
# function itself: it also copies unturned images and re-serializes the EXIF, which fails (struct.error,
# TypeError) on some malformed tags whose pixels are fine.
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                  7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def read_image(path: Path) -> np.ndarray:
    """An image as displayed, [H, W, 3] uint8 RGB. Pillow, not FFmpeg: it reads the EXIF Orientation tag
    (cameras store the sensor's pixels and tag how to turn them), which FFmpeg ignores."""
    try:
        with Image.open(path) as image:
            turn = EXIF_TRANSPOSE.get(image.getexif().get(ExifTags.Base.Orientation))
            if image.mode.startswith("I"):  # 16-bit grey: convert("RGB") would clip it at 255, not scale it
                grey = (np.asarray(image, dtype=np.int32) + 128) >> 8  # rounded, as FFmpeg's swscale did
                image = Image.fromarray(grey.clip(0, 255).astype(np.uint8))
            image = image.convert("RGB")
            return np.array(image if turn is None else image.transpose(turn))  # FLIP_LEFT_RIGHT is 0
    except Image.UnidentifiedImageError as e:  # an OSError too: caught first
        raise BadFile("not an image Pillow recognizes") from e
    except OSError as e:
        if e.errno is not None:  # the OS's (a vanished file, an I/O error), not Pillow's verdict on the bytes
            raise
        raise BadFile(f"could not decode ({e})") from e  # truncated, corrupt data


def probe(path: Path) -> tuple[int, int, int, float]:
    """(width, height, frame count, fps) as displayed (a clip's display rotation, an image's EXIF orientation
    applied, as load_sample applies them), from the container. Decodes a clip's first frame, as PyAV (< 19)
    shows the rotation only on decoded frames (0.7-2x the open's time again: 1080p H.264 45 -> 130 ms on 2
    cores), and all of them when the container has no count."""
    if path.suffix.lower() in IMAGE_EXTS:
        height, width = read_image(path).shape[:2]  # decoded whole, so a broken image is caught here
        return width, height, 1, 25.0
    import av  # here, not at the top: a machine that never touches video needs no PyAV (a GPU lent for tests)
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise BadFile("no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        fps = float(stream.average_rate or stream.guessed_rate or 25)
        frames = stream.frames
        decoded = container.decode(stream)
        first = next(decoded, None)
        if first is None:
            raise BadFile("no decodable frames")
        if quarter_turns(first.rotation) % 2:  # shown turned a quarter: portrait pixels stored landscape
            width, height = height, width
        if not frames:  # webm / mkv often carry no count: count by decoding
            frames = 1 + sum(1 for _ in decoded)
    if width <= 0 or height <= 0 or frames <= 0:
        raise BadFile("no decodable frames")
    return width, height, frames, fps


def plan_samples(ds: Dataset, aspect_rounding: int, seed: int, report: Report) -> list[Sample]:
    """Every usable file of a dataset as a Sample with its bucket size and frame window; the rest reported."""
    folder = Path(ds.instance_data_dir)
    if not folder.is_dir():
        raise DataError(f"dataset '{ds.id}': instance_data_dir {folder} does not exist")
    exts = IMAGE_EXTS if ds.dataset_type == "image" else VIDEO_EXTS
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise DataError(f"dataset '{ds.id}': no {ds.dataset_type} files ({', '.join(exts)}) in {folder}")
    if ds.dataset_type == "video" and round_frames(ds.num_frames) != ds.num_frames:
        report.note(f"dataset '{ds.id}': num_frames {ds.num_frames} rounded down to {round_frames(ds.num_frames)} "
                    f"(LTX's VAE needs 8k+1 frames)")
    report.files[ds.id] = len(files)
    import av
    samples = []
    for path in files:
        rng = random.Random(f"{seed}/{ds.id}/{path.name}")  # per-file choices, stable across runs
        if not os.access(path, os.R_OK):
            report.skip(ds, path, "unreadable (file permissions)")
            continue
        if path.stat().st_size == 0:
            report.skip(ds, path, "empty file (0 bytes)", broken=True)
            continue
        try:
            source = probe(path)
        except (av.FFmpegError, BadFile) as e:  # the decoder's verdict on this one file
            report.skip(ds, path, f"not a readable {ds.dataset_type} ({e})", broken=True)
            continue
        except OSError as e:  # the OS's (a vanished file, an I/O error): skipped, not judged broken
            report.skip(ds, path, f"could not be read ({e.strerror or e})")
            continue
        except Image.DecompressionBombError as e:  # a huge image, or a corrupt header that claims one: not moved
            report.skip(ds, path, f"too large to read safely ({e})")
            continue
        caption, problem = caption_for(ds, path)
        if caption is None:
            report.skip(ds, path, problem)
            continue
        sample = plan_one(ds, path, caption, source, aspect_rounding, rng)
        if isinstance(sample, str):  # fine in itself, but not for this run's settings
            report.skip(ds, path, sample)
        else:
            samples.append(sample)
    return samples


def plan_one(ds: Dataset, path: Path, caption: str, source: tuple[int, int, int, float], aspect_rounding: int,
             rng: random.Random) -> Sample | str:
    """Where the frame and size rules put one file (or why it cannot be used)."""
    src_w, src_h, src_frames, src_fps = source
    size = size_in_units(src_w, src_h, ds.resolution_type)
    if ds.minimum_image_size and size < ds.minimum_image_size:
        return f"smaller than minimum_image_size ({size:g} < {ds.minimum_image_size:g} in {ds.resolution_type})"
    downsample = None
    if ds.maximum_image_size and size > ds.maximum_image_size:
        dw, dh = size_for(src_w / src_h, ds.target_downsample_size, ds.resolution_type)
        downsample = (max(1, round(dw)), max(1, round(dh)))

    # frames: resample to the dataset's fps, trim to max_frames, keep min_frames..num_frames (8k+1)
    frames, start, step = 1, 0, 1.0
    if ds.dataset_type == "video":
        step = src_fps / ds.fps if ds.fps else 1.0
        available = int((src_frames - 1) / step) + 1
        if ds.max_frames:
            available = min(available, ds.max_frames)
        if available < ds.min_frames:
            return f"too short: {available} frames, min_frames is {ds.min_frames}"
        if ds.bucket_strategy == "resolution_frames":
            frames = (available - 1) // ds.frame_interval * ds.frame_interval + 1
            if frames < ds.min_frames:
                return f"too short: {available} frames round down to {frames} (frame_interval {ds.frame_interval}), " \
                       f"min_frames is {ds.min_frames}"
        else:
            frames = round_frames(min(available, ds.num_frames))
        if ds.frame_sample == "random":
            start = rng.randint(0, available - frames)

    # size: the aspect (rounded into buckets, or forced), at the dataset's resolution, in multiples of 32
    aspect = src_w / src_h
    if ds.crop and ds.crop_aspect == "square":
        aspect = 1.0
    elif ds.crop and ds.crop_aspect == "random":
        aspect = rng.choice(SQUARE_AND_COMMON_ASPECTS)
    elif ds.bucket_strategy == "aspect_ratio":
        aspect = round(aspect, aspect_rounding)
    w, h = size_for(aspect, ds.resolution, ds.resolution_type)
    width, height = nearest_32(w), nearest_32(h)
    crop = None
    if ds.crop:
        crop = (rng.random(), rng.random()) if ds.crop_style == "random" else (0.5, 0.5)
    return Sample(ds.id, path, caption, width, height, frames, start, step, crop, downsample,
                  i2v=ds.is_i2v and ds.dataset_type == "video" and frames > 1)


# -----------------------------------------------------------------------------
# Decoding

def resize_and_crop(frames: torch.Tensor, width: int, height: int, crop: tuple[float, float] | None) -> torch.Tensor:
    """[N, 3, H, W] float -> [N, 3, height, width]: scale to cover and cut the window at `crop`
    (fractions of the slack), or, with crop None, scale to exactly width x height."""
    h, w = frames.shape[-2:]
    if crop is None:
        size = (height, width)
    else:
        scale = max(width / w, height / h)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        frames = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
    if crop is None:
        return frames
    top, left = round((size[0] - height) * crop[1]), round((size[1] - width) * crop[0])
    return frames[..., top:top + height, left:left + width]


def frame_indices(sample: Sample) -> list[int]:
    return [round((sample.start + i) * sample.step) for i in range(sample.frames)]


def load_sample(sample: Sample) -> torch.Tensor:
    """The sample's frames as float32 [3, F, H, W] in [-1, 1]."""
    wanted = frame_indices(sample)
    needed, arrays, turns = set(wanted), {}, 0
    if sample.path.suffix.lower() in IMAGE_EXTS:
        arrays[0] = read_image(sample.path)  # already as displayed (EXIF orientation)
    else:
        import av
        try:
            with av.open(str(sample.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"  # FFmpeg decodes on all cores
                for index, frame in enumerate(container.decode(stream)):
                    if index in needed:
                        arrays[index] = frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8, as stored
                        turns = quarter_turns(frame.rotation)  # the stream's display rotation, on every frame
                    if index >= wanted[-1]:
                        break
        except av.FFmpegError as e:
            raise BadFile(f"could not decode ({e})") from e
    if len(arrays) < len(needed):
        raise BadFile(f"decoded {len(arrays)} of the {len(needed)} frames needed (truncated file?)")
    # torch only after decoding: interleaved, torch's spinning OpenMP threads starve FFmpeg's (3-4x slower).
    # Resized as uint8 (torch's fastest CPU path, ~2x float) frame by frame into one preallocated float
    # tensor: no full-size float frame and no second copy of the clip (measured with bench.py --data).
    out = torch.empty(3, len(wanted), sample.height, sample.width)
    for i, index in enumerate(wanted):
        frame = torch.from_numpy(arrays[index]).permute(2, 0, 1)[None]  # [1, 3, H, W] uint8
        if turns:  # turned as displayed before any resize: probe planned the sample's size from that shape
            frame = torch.rot90(frame, turns, dims=(2, 3))
        if sample.downsample:
            frame = F.interpolate(frame, size=sample.downsample[::-1], mode="bilinear", antialias=True)
        out[:, i] = resize_and_crop(frame, sample.width, sample.height, sample.crop)[0]
    return out.div_(127.5).sub_(1.0)


# -----------------------------------------------------------------------------
# Writing video: the sampler's mp4s, the demo's clips

# per-codec quality settings: visually lossless for these small clips
def safe_name(nickname: str) -> str:
    """A prompt-library nickname as a file name: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", nickname).strip("._") or "prompt"


CODEC_OPTIONS = {"libx264": {"crf": "18", "preset": "veryfast"}, "mpeg4": {"qscale": "2"}}


def write_video(path: str | Path, frames: np.ndarray, fps: int, codec: str = "libx264") -> None:
    """Write uint8 [F, H, W, 3] RGB frames as an mp4 (yuv420p, so any player opens it)."""
    import av
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = CODEC_OPTIONS[codec]
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the frames the encoder holds back


# -----------------------------------------------------------------------------
# The caches: one file of latents per sample, one file of T5 embeddings per distinct caption

@dataclass(frozen=True)
class CacheShape:
    """What the models that fill the caches make of a clip and a caption, for sizing the caches before any work."""
    spatial: int  # pixels per latent pixel, each way: the VAE's spatial compression (32 for LTX-Video)
    temporal: int  # frames per latent frame after the first: its temporal compression (8)
    latent_channels: int  # the VAE's latent channels (128)
    text_tokens: int  # T5 tokens per caption (128)
    text_dim: int  # T5's width (4096 for T5-XXL)


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:32]


def clip_identity(sample: Sample) -> tuple:
    # everything about a sample that changes the pixels an encoder sees; size and mtime catch an edited file
    # without reading it
    stat = sample.path.stat()
    return (sample.path.resolve(), stat.st_size, stat.st_mtime_ns, sample.width, sample.height, sample.frames,
            sample.start, sample.step, sample.crop, sample.downsample)


# How an encoder ran: every setting that changes the tensors it caches (which model, its dtype, the VAE's tiling,
# T5's precision and token count, DINOv2's input size), e.g. {"model": "/abs/ltx", "dtype": "bfloat16",
# "tiling": False}. It is part of each cache file's key, so files made another way are never read as these.
Encoder = dict


def encoder_id(encoder: Encoder) -> str:
    return json.dumps(encoder, sort_keys=True)


def latent_key(sample: Sample, vae: Encoder) -> str:
    return digest(*clip_identity(sample), encoder_id(vae))


def latent_cache_dir(ds: Dataset) -> Path:
    return Path(ds.cache_dir_vae or Path(ds.instance_data_dir) / ".ltx-cache")


def text_file_for(caption: str, text_dir: Path, text: Encoder, compress: bool) -> Path:
    return text_dir / f"text-{digest(caption, encoder_id(text))}.safetensors{'.gz' if compress else ''}"


ENCODERS = "encoders.json"  # in each cache folder: the settings each kind of file there was last made with


def note_encoder_change(folder: Path, kind: str, encoder: Encoder, todo: int, report: "Report", rank: int) -> None:
    """Says once, when `todo` files of `kind` (latents, text, crepa_features) are encoded in `folder` under other
    settings than the last run there used, which settings changed; rank 0 records this run's in encoders.json.
    The earlier files stay under their own keys: switching back reuses them."""
    path = folder / ENCODERS
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    before = known.get(kind) if isinstance(known, dict) else None
    if todo and isinstance(before, dict) and before != encoder:
        changed = ", ".join(f"{k} {before.get(k)!r} -> {v!r}" for k, v in encoder.items() if before.get(k) != v)
        report.note(f"{todo} {kind} file(s) in {folder} are encoded again: the cached ones were made with other "
                    f"settings ({changed}); they stay, and are used again if those settings come back")
    if rank == 0 and before != encoder:
        known = {**(known if isinstance(known, dict) else {}), kind: encoder}
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(known, indent=2, sort_keys=True)))


def write_atomic(path: str | Path, write) -> None:
    """write(tmp) fills a temporary file beside `path` (per process: two ranks may write one caption's file),
    renamed over `path` once complete: a reader, or a kill mid-write, never meets half a file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_cache_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors bytes (gzip-compressed for .gz), written whole or not at all."""
    blob = save_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    if path.suffix == ".gz":
        blob = gzip.compress(blob, compresslevel=3)
    write_atomic(path, lambda tmp: tmp.write_bytes(blob))


def read_cache_file(path: str | Path) -> dict[str, torch.Tensor]:
    blob = Path(path).read_bytes()
    return load_bytes(gzip.decompress(blob) if str(path).endswith(".gz") else blob)


def cache_file_ok(path: Path) -> bool:
    """A complete, parseable cache file. A plain file is checked against its header's length (cheap);
    a compressed one is read whole (gzip checks its CRC)."""
    try:
        if path.suffix == ".gz":
            read_cache_file(path)
            return True
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > path.stat().st_size - 8:  # garbage: do not try to read (or allocate) exabytes
                return False
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + header_len + end
    except Exception:  # any way of failing to parse (zlib.error, SafetensorError, a non-dict header...) means rebuild
        return False


def cache_samples(samples: list[Sample], datasets: dict[str, Dataset], encode_video, encode_text,
                  vae: Encoder, text: Encoder, text_dir: Path | None, compress: bool, vae_batch_size: int,
                  text_batch_size: int, report: Report, shape: CacheShape, rank: int = 0,
                  world_size: int = 1) -> None:
    """Names every sample's latent and text cache files and encodes what is missing or broken. Under
    torchrun each rank encodes its own share (every world_size-th sample); a sample whose file does not
    exist afterwards could not be decoded and is in the report (see `cached`).

    encode_video: [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, C, f, h, w].
    encode_text: captions -> (embeddings [B, L, D], attention mask [B, L]).
    vae, text: how those two run (see Encoder), part of every file's key.
    shape: what those two make of a sample (f, h, w, C, L and D above), for the free-space check.
    """
    suffix = ".safetensors.gz" if compress else ".safetensors"
    for ds in {s.dataset for s in samples}:
        setting = f"cache_dir_vae of dataset '{ds}'" + ("" if text_dir else " (or a text_embeds cache_dir)")
        make_cache_dir(latent_cache_dir(datasets[ds]), setting)
    if text_dir:
        make_cache_dir(text_dir, "the text_embeds entry's cache_dir")
    for s in samples:
        cache_dir = latent_cache_dir(datasets[s.dataset])
        s.latent_file = cache_dir / f"{latent_key(s, vae)}{suffix}"
        s.text_file = text_file_for(s.caption, text_dir or cache_dir, text, compress)
    mine = samples[rank::world_size]
    for path in {s.latent_file for s in mine} | {s.text_file for s in mine}:
        if path.exists() and not cache_file_ok(path):  # truncated or corrupt: never used, rebuilt now
            path.unlink()
    for kind, encoder, files in (("latents", vae, {s.latent_file for s in samples}),
                                 ("text", text, {s.text_file for s in samples})):
        for folder in sorted({f.parent for f in files}):
            todo = sum(f.parent == folder and not f.exists() for f in files)
            note_encoder_change(folder, kind, encoder, todo, report, rank)
    check_free_space([s for s in mine if not s.latent_file.exists()],
                     {s.text_file for s in mine if not s.text_file.exists()}, shape)

    with torch.no_grad():
        captions = {s.text_file: s.caption for s in mine if not s.text_file.exists()}
        items = list(captions.items())
        for i in tqdm(range(0, len(items), text_batch_size), desc="caching text", disable=not items):
            chunk = items[i:i + text_batch_size]
            embeds, mask = encode_text([caption for _, caption in chunk])
            for (path, _), e, m in zip(chunk, embeds, mask):
                write_cache_file({"prompt_embeds": e, "prompt_attention_mask": m}, path)
        encode_clips([s for s in mine if not s.latent_file.exists()], encode_video, "latents",
                     lambda s: s.latent_file, vae_batch_size, datasets, report)


def make_cache_dir(folder: Path, setting: str) -> None:
    """Creates a cache folder, or says in one sentence which setting to point at a writable one (a read-only
    dataset folder cannot hold its default .ltx-cache)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache folder {folder} ({e.strerror or e}); set {setting} to a "
                        f"writable folder")
    if not writable(folder):
        raise DataError(f"cannot write to the cache folder {folder} (permission denied); set {setting} to a "
                        f"writable folder")


def writable(folder: Path) -> bool:
    """Whether a file can be created in `folder`, tried for real (root passes every os.access check, yet a
    read-only mount refuses it)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def voxels(sample: Sample, shape: CacheShape) -> int:
    """Latent frames x rows x columns of a sample: its tokens in the transformer."""
    frames = (sample.frames - 1) // shape.temporal + 1
    return frames * (sample.height // shape.spatial) * (sample.width // shape.spatial)


def check_free_space(todo: list[Sample], text_files: set[Path], shape: CacheShape) -> None:
    """Refuses to start caching what the disk cannot hold: every number counted as 4 bytes (fp32, the most a cache
    file stores), the text mask as one more number per token."""
    need: dict[Path, int] = {}
    for s in todo:
        need[s.latent_file.parent] = need.get(s.latent_file.parent, 0) + shape.latent_channels * voxels(s, shape) * 4
    for path in text_files:
        need[path.parent] = need.get(path.parent, 0) + shape.text_tokens * (shape.text_dim + 1) * 4
    refuse_past_free_space(need, "caching", "cache_dir_vae / the text_embeds cache_dir")


def refuse_past_free_space(need: dict[Path, int], what: str, settings: str) -> None:
    """{folder: bytes `what` will write there}, estimated from the shapes before any work: one sentence when a
    disk cannot hold it, naming the `settings` that point elsewhere."""
    for folder, size in need.items():
        free = shutil.disk_usage(folder).free
        if size > free:
            raise DataError(f"{what} needs about {size / 1e9:.1f} GB in {folder} but only {free / 1e9:.1f} GB "
                            f"are free; free some space or point {settings} elsewhere")


def cached(samples: list[Sample]) -> list[Sample]:
    """The samples whose caches exist (on every rank the same answer, once all ranks have cached)."""
    return [s for s in samples if s.latent_file.exists() and s.text_file.exists()
            and (s.feature_file is None or s.feature_file.exists())]


def encode_clips(todo: list[Sample], encode, key: str, file_of, batch_size: int, datasets: dict[str, Dataset],
                 report: Report) -> None:
    """Encodes samples (`encode`: the VAE, or DINOv2 for CREPA) in batches of one shape while worker threads
    decode the next few (PyAV releases the GIL), so the encoder does not wait on decoding and memory holds only
    a few clips. Writes each sample's encoding as {key: tensor} to file_of(sample); a clip that cannot be
    decoded is reported and gets no file."""
    todo = sorted(todo, key=lambda s: (s.width, s.height, s.frames))  # a batch needs one shape
    batches, current = [], []
    for s in todo:
        if current and (len(current) == batch_size or (s.width, s.height, s.frames) !=
                        (current[0].width, current[0].height, current[0].frames)):
            batches.append(current)
            current = []
        current.append(s)
    if current:
        batches.append(current)

    def decode(sample: Sample):
        try:
            return load_sample(sample)
        except (BadFile, OSError) as e:  # anything else is a bug: it surfaces in .result() below
            return e

    queue, upcoming = deque(), iter([s for batch in batches for s in batch])
    lookahead = 2 * batch_size + 2
    bar = tqdm(total=len(todo), desc=f"caching {key}", disable=not todo, unit="clip")
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for batch in batches:
            videos, ok = [], []
            for sample in batch:
                while len(queue) < lookahead and (nxt := next(upcoming, None)) is not None:
                    queue.append(pool.submit(decode, nxt))
                video = queue.popleft().result()
                if isinstance(video, BadFile):
                    report.skip(datasets[sample.dataset], sample.path, str(video), broken=True)
                elif isinstance(video, OSError):
                    report.skip(datasets[sample.dataset], sample.path, f"could not be read ({video.strerror or video})")
                else:
                    videos.append(video)
                    ok.append(sample)
            if ok:
                encoded = encode(torch.stack(videos))
                for sample, z in zip(ok, encoded):
                    write_cache_file({key: z}, file_of(sample))
            bar.update(len(batch))
    bar.close()


def cache_features(samples: list[Sample], datasets: dict[str, Dataset], encode_frames, encoder: Encoder,
                   batch_size: int, report: Report, compress: bool, rank: int = 0, world_size: int = 1,
                   shape: CacheShape | None = None, feature_dim: int = 0) -> None:
    """CREPA's DINOv2 features, cached beside the latents like them: names every sample's feature file and
    encodes this rank's missing or broken ones. Keyed like the latents but by the encoder (`encoder`), not the
    VAE, so turning CREPA on over cached latents encodes only the features. Call it with the samples that
    cache_samples cached (`cached`), so a clip it could not decode is not decoded and reported again.

    encode_frames: [B, 3, F, H, W] in [-1, 1] -> features [B, S, D] (S = f·h·w latent tokens), stored fp16.
    shape, feature_dim: what the VAE and DINOv2 make of a clip, for the free-space check (skipped without them).
    """
    suffix = ".safetensors.gz" if compress else ".safetensors"
    for ds in {s.dataset for s in samples}:
        make_cache_dir(latent_cache_dir(datasets[ds]), f"cache_dir_vae of dataset '{ds}'")
    for s in samples:
        key = digest(*clip_identity(s), encoder_id(encoder))
        s.feature_file = latent_cache_dir(datasets[s.dataset]) / f"crepa-{key}{suffix}"
    mine = samples[rank::world_size]
    for s in mine:
        if s.feature_file.exists() and not cache_file_ok(s.feature_file):  # truncated or corrupt: rebuilt now
            s.feature_file.unlink()
    for folder in sorted({s.feature_file.parent for s in samples}):
        todo = sum(s.feature_file.parent == folder and not s.feature_file.exists() for s in samples)
        note_encoder_change(folder, "crepa_features", encoder, todo, report, rank)
    todo = [s for s in mine if not s.feature_file.exists()]
    if shape and feature_dim:  # the free-space check: one fp16 number per latent token and feature channel
        need: dict[Path, int] = {}
        for s in todo:
            need[s.feature_file.parent] = need.get(s.feature_file.parent, 0) + voxels(s, shape) * feature_dim * 2
        refuse_past_free_space(need, "caching CREPA features", "cache_dir_vae")
    with torch.no_grad():
        encode_clips(todo, lambda video: encode_frames(video).half(), "crepa_features", lambda s: s.feature_file,
                     batch_size, datasets, report)


def cached_text(prompts: list[str], encode_text, text_dir: Path, text: Encoder) -> dict[str, dict[str, torch.Tensor]]:
    """Embeddings of prompts outside the datasets (the empty prompt for caption dropout, validation prompts),
    cached like captions: T5 runs only for the ones not on disk yet."""
    make_cache_dir(text_dir, "a text_embeds entry's cache_dir")
    paths = {p: text_file_for(p, text_dir, text, compress=False) for p in prompts}
    missing = [p for p, path in paths.items() if not cache_file_ok(path)]
    if missing:
        with torch.no_grad():
            embeds, mask = encode_text(missing)
        for p, e, m in zip(missing, embeds, mask):
            write_cache_file({"prompt_embeds": e, "prompt_attention_mask": m}, paths[p])
    return {p: read_cache_file(path) for p, path in paths.items()}


# -----------------------------------------------------------------------------
# Buckets and the epoch plan

@dataclass
class Bucket:
    dataset: str
    shape: tuple[int, int, int]  # W, H, F
    samples: list[int] = field(default_factory=list)  # indices into the run's sample list

    @property
    def name(self) -> str:
        return shape_name(*self.shape)


def shape_name(width: int, height: int, frames: int) -> str:
    """A bucket as people write it: 768x512@121."""
    return f"{width}x{height}@{frames}"


def make_buckets(samples: list[Sample], datasets: dict[str, Dataset], global_batch: int, prune: bool,
                 report: Report) -> list[Bucket]:
    """Samples of one dataset and one shape; buckets that cannot fill one global batch (repeats counted)
    are dropped unless pruning is off, in which case their one batch is topped up by repeating samples."""
    by_key: dict[tuple, Bucket] = {}
    for i, s in enumerate(samples):
        key = (s.dataset, (s.width, s.height, s.frames))
        by_key.setdefault(key, Bucket(*key)).samples.append(i)
    kept = []
    for bucket in sorted(by_key.values(), key=lambda b: (b.dataset, b.shape)):
        n = len(bucket.samples) * (1 + datasets[bucket.dataset].repeats)
        if prune and n < global_batch:
            report.note(f"dataset '{bucket.dataset}': bucket {bucket.name} has {n} sample(s), fewer than one global "
                        f"batch of {global_batch}; dropped (disable_bucket_pruning = true keeps it)")
            continue
        kept.append(bucket)
    return kept


def epoch_plan(buckets: list[Bucket], datasets: dict[str, Dataset], global_batch: int, seed: int,
               epoch: int) -> list[list[int]]:
    """The global batches of one epoch, a pure function of its arguments (so a resume recomputes it).

    Each bucket's samples x (1 + repeats) are shuffled and cut into full batches of one shape; each
    dataset's batches are shuffled; then datasets are interleaved, the next batch coming from a dataset
    with chance proportional to its probability among those with batches left.
    """
    rng = random.Random(f"{seed}/epoch/{epoch}")  # own generator: nothing else can shift it
    per_dataset: dict[str, list[list[int]]] = {}
    for bucket in buckets:
        items = bucket.samples * (1 + datasets[bucket.dataset].repeats)
        rng.shuffle(items)
        if len(items) < global_batch:  # kept only with pruning off: top it up to one full batch
            items = (items * global_batch)[:global_batch]
        batches = [items[i:i + global_batch] for i in range(0, len(items) - global_batch + 1, global_batch)]
        per_dataset.setdefault(bucket.dataset, []).extend(batches)
    for batches in per_dataset.values():
        rng.shuffle(batches)
    plan = []
    remaining = {name: batches for name, batches in per_dataset.items() if datasets[name].probability > 0}
    while remaining:
        names = sorted(remaining)
        name = rng.choices(names, weights=[datasets[n].probability for n in names])[0]
        plan.append(remaining[name].pop())
        if not remaining[name]:
            del remaining[name]
    return plan


def load_batch(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Stacked cached tensors of samples of one shape: latents [B, C, F, H, W], text, mask, i2v [B], and with
    CREPA crepa_features [B, S, D] (fp16)."""
    items = [{**read_cache_file(s.latent_file), **read_cache_file(s.text_file),
              **(read_cache_file(s.feature_file) if s.feature_file else {})} for s in samples]
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    batch["i2v"] = torch.tensor([s.i2v for s in samples])
    return batch
