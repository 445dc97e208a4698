"""Unit tests for data.py: dataset entries, the size and frame rules, planning real files (and reporting the bad
ones), decoding, demo.py's synthetic set, the caches, buckets and the epoch plan. Every file is written here, small."""

import copy
import dataclasses
import gc
import gzip
import json
import multiprocessing
import os
import random
import re
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import config
import data
import demo

W, H, FRAMES = 64, 64, 17  # small synthetic clips keep the whole file fast
LTX = data.CacheShape(spatial=32, temporal=8, latent_channels=128, text_tokens=128, text_dim=4096)  # the real model


# -----------------------------------------------------------------------------
# Files for the tests

def ramp_frames(n: int, width: int, height: int, offset: int = 0) -> np.ndarray:
    """n flat grey frames, frame i of brightness 10 + offset + 6 i: which frame was decoded can be told apart."""
    values = np.clip(10 + offset + 6 * np.arange(n), 0, 255).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (n, height, width, 3)).copy()


def write_clip(path: Path, width: int = W, height: int = H, frames: int = FRAMES, fps: int = 25,
               caption: str | None = "a clip", offset: int = 0) -> Path:
    """A ramp clip (mpeg4: the same bytes every time) and, unless caption is None, its .txt caption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data.write_video(path, ramp_frames(frames, width, height, offset), fps, codec="mpeg4")
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def write_cut_clip(path: Path, frames: int = 20, caption: str = "a cut clip") -> Path:
    """A noise clip with its index (moov) at the front, cut in half: it probes fine, then decoding runs dry."""
    rgb = np.random.default_rng(0).integers(0, 256, (frames, H, W, 3), dtype=np.uint8)
    full = path.with_name("full-" + path.name)
    with av.open(str(full), mode="w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.options = W, H, "yuv420p", {"qscale": "2"}
        for frame in rgb:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")))
        container.mux(stream.encode(None))
    blob = full.read_bytes()
    full.unlink()
    path.write_bytes(blob[:len(blob) // 2])
    path.with_suffix(".txt").write_text(caption)
    return path


def png_pixels(width: int, height: int) -> np.ndarray:
    return np.random.default_rng(width * 1000 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_png(path: Path, width: int, height: int, caption: str = "an image") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:  # image2 muxer from the extension: one PNG
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(png_pixels(width, height), format="rgb24")))
        container.mux(stream.encode(None))
    path.with_suffix(".txt").write_text(caption)
    return path


def band_video(width: int, height: int, vertical: bool) -> np.ndarray:
    """4 frames of four equal bands: green | red | blue | green (left to right, or top to bottom)."""
    colors = np.array([(0, 255, 0), (255, 0, 0), (0, 0, 255), (0, 255, 0)], np.uint8)
    along = height if vertical else width
    bands = colors[np.arange(along) * 4 // along]  # [along, 3]
    frame = np.broadcast_to(bands[:, None] if vertical else bands[None], (height, width, 3))
    return np.stack([frame] * 4)


def make_dataset(folder: Path, **keys) -> data.Dataset:
    """A checked Dataset 'd' over folder; video keys may be given flat here, they go into the video table."""
    video = {k: keys.pop(k) for k in list(keys) if k in data.VIDEO_KEYS}
    return config.parse_dataset({"id": "d", "instance_data_dir": str(folder), "resolution": 64, **keys,
                               "video": video}, "test", 0, log=lambda message: None)


def plan(ds: data.Dataset, seed: int = 0, rounding: int = 2, quarantine: bool = False):
    report = data.Report(Path(ds.instance_data_dir).parent / "out" / "data_report.json", quarantine)
    return data.plan_samples(ds, rounding, seed, report), report


def by_name(samples: list[data.Sample]) -> dict[str, data.Sample]:
    return {s.path.name: s for s in samples}


def decoded_indices(video: torch.Tensor, reference: torch.Tensor) -> list[int]:
    """For each frame of video [3, F, H, W], the index of the closest frame of reference [3, N, H, W]."""
    diff = (video[:, :, None] - reference[:, None]).abs().mean(dim=(0, 3, 4))  # [F, N]
    return diff.argmin(dim=1).tolist()


def full_decode(path: Path, frames: int) -> torch.Tensor:
    return data.load_sample(data.Sample("d", path, "", W, H, frames))


class FakeEncoders:
    """Counting stand-ins for the VAE and T5 whose outputs identify their inputs."""

    def __init__(self, stride: int = 32):
        self.stride = stride
        self.batches: list[tuple[int, ...]] = []  # the shape of each encode_video call
        self.text_calls: list[list[str]] = []

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        assert video.dim() == 5 and video.shape[1] == 3 and video.dtype == torch.float32
        self.batches.append(tuple(video.shape))
        return video[:, :, ::8, ::self.stride, ::self.stride].clone()  # [B, 3, f, h, w] at the VAE's compression

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        assert not torch.is_grad_enabled()
        self.text_calls.append(list(captions))
        embeds = torch.stack([torch.full((16, 8), float(len(c))) for c in captions])
        return embeds, torch.ones(len(captions), 16, dtype=torch.int64)

    @property
    def videos(self) -> int:
        return sum(shape[0] for shape in self.batches)

    @property
    def captions(self) -> list[str]:
        return [c for call in self.text_calls for c in call]


def cache_setup(tmp_path: Path, captions=("a red ball", "a blue box", "shared", "shared"), sizes=None):
    """Clips (distinct ramps) with the given captions, planned at 64 px: (samples, datasets by id, report)."""
    folder = tmp_path / "clips"
    for i, caption in enumerate(captions):
        width, height = sizes[i] if sizes else (W, H)
        write_clip(folder / f"clip{i}.mp4", width, height, caption=caption, offset=10 * i)
    ds = make_dataset(folder, cache_dir_vae=str(tmp_path / "vae"), num_frames=FRAMES)
    samples, report = plan(ds)
    assert len(samples) == len(captions)
    return samples, {ds.id: ds}, report


def run_cache(samples, datasets, report, fake: FakeEncoders | None = None, **options) -> FakeEncoders:
    fake = fake or FakeEncoders()
    ds = next(iter(datasets.values()))
    args = dict(vae={"model": "vae-test"}, text={"model": "t5-test"}, text_dir=Path(ds.cache_dir_vae).parent / "text",
                compress=False, vae_batch_size=1, text_batch_size=64, report=report,
                shape=data.CacheShape(spatial=fake.stride, temporal=8, latent_channels=3, text_tokens=16, text_dim=8))
    data.cache_samples(samples, datasets, fake.encode_video, fake.encode_text, **{**args, **options})
    return fake


def fake_samples(dataset: str, shape: tuple[int, int, int], n: int, i2v: bool = False) -> list[data.Sample]:
    """Samples that name no real file, for the bucket and plan tests."""
    w, h, f = shape
    return [data.Sample(dataset, Path(f"{dataset}_{w}x{h}x{f}_{i}.mp4"), "c", w, h, f, i2v=i2v) for i in range(n)]


# -----------------------------------------------------------------------------
# Dataset entries: TOML tables and SimpleTuner's multidatabackend.json

SIMPLETUNER = [
    {"id": "disney", "type": "local", "dataset_type": "video", "instance_data_dir": "d",
     "caption_strategy": "textfile", "resolution": 480, "resolution_type": "pixel_area", "crop": False,
     "crop_style": "center", "crop_aspect": "preserve", "repeats": 0, "metadata_backend": "discovery",
     "cache_dir_vae": "c",
     "video": {"num_frames": 49, "min_frames": 49, "is_i2v": True, "bucket_strategy": "aspect_ratio"}},
    {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "type": "local", "cache_dir": "t",
     "write_batch_size": 128},
]
SOURCE = "multidatabackend.json"


def entries(**changes) -> list[dict]:
    """SIMPLETUNER with changes to its first entry; a dict for `video` is merged into its video table."""
    result = copy.deepcopy(SIMPLETUNER)
    for key, value in changes.items():
        if key == "video" and isinstance(value, dict):
            result[0]["video"].update(value)
        else:
            result[0][key] = value
    return result


def parse(items: list[dict]):
    return config.parse_datasets(items, SOURCE, log=lambda message: None)


def test_simpletuner_file_loads_as_it_is(tmp_path):
    path = tmp_path / SOURCE
    path.write_text(json.dumps(SIMPLETUNER))
    messages = []
    media, text = config.parse_datasets(config.load_backend_file(str(path)), str(path), messages.append)
    assert [d.id for d in media] == ["disney"]
    d = media[0]
    assert (d.dataset_type, d.instance_data_dir, d.cache_dir_vae) == ("video", "d", "c")
    assert d.resolution_type == "pixel_area"
    assert d.resolution == 480 and isinstance(d.resolution, float)
    assert (d.num_frames, d.min_frames, d.is_i2v, d.bucket_strategy, d.crop) == (49, 49, True, "aspect_ratio", False)
    assert (text.id, text.cache_dir, text.write_batch_size, text.default) == ("text-embeds", "t", 128, True)
    assert messages == [f"{path}, dataset 'disney': 'metadata_backend' is a SimpleTuner key ltx-lora does not use; "
                        f"ignored"]  # once, naming the file and the entry


@pytest.mark.parametrize("change, message", [
    (dict(resolutoin=480), "unknown key 'resolutoin'; did you mean 'resolution'?"),
    (dict(video={"num_frame": 49}), "unknown video key 'num_frame'; did you mean 'num_frames'?"),
    (dict(fps=12), "'fps' belongs in the video table: video = { fps = 12 }"),
    (dict(num_frames=17), "'num_frames' belongs in the video table"),  # even though the table sets it too
    (dict(video="49"), "'video' must be a table of video keys"),
    (dict(resolution="480"), "'resolution' must be float, got '480'"),
    (dict(crop="false"), "'crop' must be bool, got 'false'"),
    (dict(repeats=1.5), "'repeats' must be int, got 1.5"),
    (dict(repeats=True), "'repeats' must be int, got True"),
    (dict(video={"num_frames": 49.0}), "'num_frames' must be int, got 49.0"),
    (dict(resolution_type="pixels"), "resolution_type = 'pixels'; choose one of pixel_area, pixel, area"),
    (dict(crop_style="left"), "crop_style = 'left'; choose one of center, random"),
    (dict(video={"bucket_strategy": "frames"}), "bucket_strategy = 'frames'; choose one of aspect_ratio, "
                                                "resolution_frames"),
    (dict(dataset_type="audio"), "dataset_type = 'audio'"),
    (dict(video={"frame_interval": 12}), "frame_interval = 12; LTX needs 8k+1 frames, so use a multiple of 8"),
    (dict(video={"frame_interval": 0}), "frame_interval = 0"),
    (dict(video={"num_frames": 17, "min_frames": 25}), "need 1 <= min_frames <= num_frames"),
    (dict(video={"max_frames": 20}), "max_frames = 20 is below min_frames = 49"),
    (dict(caption_strategy="instanceprompt"), "caption_strategy = 'instanceprompt' needs an instance_prompt"),
    (dict(instance_data_dir=""), "instance_data_dir is missing"),
    (dict(resolution=0), "resolution must be > 0"),
    (dict(maximum_image_size=1024), "maximum_image_size needs target_downsample_size"),
])
def test_bad_entry_names_file_dataset_and_problem(change, message):
    with pytest.raises(SystemExit) as error:
        parse(entries(**change))
    assert str(error.value).startswith(f"config error: {SOURCE}, dataset 'disney': "), error.value
    assert message in str(error.value), error.value


def test_min_frames_defaults_to_num_frames():
    def video(**keys):
        return parse([{"id": "a", "instance_data_dir": "d", "video": keys}])[0][0]
    assert (video(num_frames=17).min_frames, video(num_frames=17, min_frames=0).min_frames) == (17, 17)
    assert video(num_frames=17, min_frames=9).min_frames == 9
    assert video().min_frames == data.Dataset.num_frames == 49


def test_null_means_the_default():
    d = parse(entries(resolution=None, crop=None, repeats=None, crop_style=None,
                      video={"num_frames": None, "min_frames": None, "is_i2v": None}))[0][0]
    assert (d.resolution, d.crop, d.repeats, d.crop_style) == (512.0, False, 0, "center")
    assert (d.num_frames, d.min_frames, d.is_i2v) == (49, 49, True)
    assert parse(entries(video=None))[0][0].num_frames == 49  # a null video table is no video keys
    assert parse([{"id": None, "instance_data_dir": "d"}])[0][0].id == "#1"


def test_entry_list_rules():
    with pytest.raises(SystemExit, match="dataset ids must be unique"):
        parse([{"id": "a", "instance_data_dir": "d"}, {"id": "a", "instance_data_dir": "e"}])
    with pytest.raises(SystemExit, match="every image / video dataset is disabled"):
        parse(entries(disabled=True))
    with pytest.raises(SystemExit, match="no datasets"):
        parse([])
    with pytest.raises(SystemExit, match=re.escape("dataset '#2': unknown key 'colour'")):  # unnamed: its position
        parse([{"id": "a", "instance_data_dir": "d"}, {"instance_data_dir": "e", "colour": 1}])
    media, text = parse([{"id": "a", "instance_data_dir": "d", "disabled": True},
                         {"id": "b", "instance_data_dir": "d", "caption_strategy": "instanceprompt",
                          "instance_prompt": "a cat"},
                         {"id": "t1", "dataset_type": "text_embeds", "cache_dir": "x"},
                         {"id": "t2", "dataset_type": "text_embeds", "cache_dir": "y", "default": True}])
    assert [d.id for d in media] == ["b"] and media[0].instance_prompt == "a cat"
    assert text.id == "t2"  # the default one, not the first
    assert parse([{"id": "a", "instance_data_dir": "d"}, {"id": "t1", "dataset_type": "text_embeds"}])[1].id == "t1"
    assert parse([{"id": "a", "instance_data_dir": "d"}])[1] is None


def test_load_backend_file_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(SystemExit, match=re.escape(f"{missing} does not exist")):
        config.load_backend_file(str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "a",}]')
    with pytest.raises(SystemExit, match=re.escape(f"{bad} is not valid JSON")):
        config.load_backend_file(str(bad))
    for text in ('{"id": "a"}', '[{"id": "a"}, 3]'):
        bad.write_text(text)
        with pytest.raises(SystemExit, match="must be a JSON list of dataset objects"):
            config.load_backend_file(str(bad))


# -----------------------------------------------------------------------------
# Sizes and frame counts

@pytest.mark.parametrize("frames, expected", [(30, 25), (17, 17), (8, 1), (9, 9), (1, 1), (0, 1), (128, 121),
                                              (121, 121)])
def test_round_frames(frames, expected):
    assert data.round_frames(frames) == expected


def test_size_for_each_resolution_type():
    w, h = data.size_for(1.5, 512, "pixel_area")
    assert w * h == pytest.approx(512 ** 2) and w / h == pytest.approx(1.5)
    assert data.size_for(16 / 9, 480, "pixel") == pytest.approx((480 * 16 / 9, 480))  # the shorter side is 480
    assert data.size_for(9 / 16, 480, "pixel") == pytest.approx((480, 480 * 16 / 9))
    assert data.size_for(1.0, 0.25, "area") == pytest.approx((500, 500))  # 0.25 megapixels
    w, h = data.size_for(2.0, 0.25, "area")
    assert w * h == pytest.approx(0.25e6) and w / h == pytest.approx(2.0)


def test_size_in_units_and_nearest_32():
    assert data.size_in_units(1920, 1080, "pixel") == 1080
    assert data.size_in_units(1920, 1080, "area") == pytest.approx(2.0736)
    assert data.size_in_units(1920, 1080, "pixel_area") == pytest.approx((1920 * 1080) ** 0.5)
    assert [data.nearest_32(x) for x in (10, 47, 50, 100, 853.3, 1000)] == [32, 32, 64, 96, 864, 992]


# -----------------------------------------------------------------------------
# Planning real files

def test_aspect_ratio_buckets_group_by_rounded_aspect(tmp_path):
    folder = tmp_path / "clips"
    write_clip(folder / "a.mp4", 160, 96, caption="  wide one \n")
    write_clip(folder / "b.mp4", 150, 90)  # the same aspect to 2 decimals (1.67)
    write_clip(folder / "c.mp4", 96, 160)
    (folder / "notes.txt").write_text("a caption without a clip is ignored")
    samples, report = plan(make_dataset(folder, num_frames=FRAMES))
    s = by_name(samples)
    assert sorted(s) == ["a.mp4", "b.mp4", "c.mp4"] and report.problems == []
    shape = {name: (x.width, x.height, x.frames) for name, x in s.items()}
    assert shape["a.mp4"] == shape["b.mp4"] == (96, 64, 17)  # 64 px of area at 1.67, in multiples of 32
    assert shape["c.mp4"] == (64, 96, 17)
    assert s["a.mp4"].caption == "wide one" and s["b.mp4"].caption == "a clip"
    assert all(x.crop is None and x.downsample is None and x.step == 1.0 and x.start == 0 for x in samples)
    coarse = by_name(plan(make_dataset(folder, num_frames=FRAMES), rounding=0)[0])["a.mp4"]
    assert (coarse.width, coarse.height) == (96, 32)  # coarser rounding: 1.67 -> 2.0, another bucket


def test_caption_strategies(tmp_path):
    folder = tmp_path / "clips"
    write_clip(folder / "my_cat-video.mp4", caption=None)
    assert plan(make_dataset(folder, caption_strategy="filename", num_frames=FRAMES))[0][0].caption == "my cat video"
    ds = make_dataset(folder, caption_strategy="instanceprompt", instance_prompt="a cat", num_frames=FRAMES)
    assert plan(ds)[0][0].caption == "a cat"
    samples, report = plan(make_dataset(folder, num_frames=FRAMES))  # textfile: there is none
    assert samples == [] and report.problems[0]["problem"] == "missing caption file my_cat-video.txt"


def test_captions_in_any_case_and_utf8_or_utf16_with_a_bom(tmp_path):
    folder = tmp_path / "clips"
    texts = {"upper.Mp4": ("upper.TXT", "a cat".encode()), "bom.mp4": ("bom.txt", b"\xef\xbb\xbfa caf\xc3\xa9"),
             "utf16.mp4": ("utf16.txt", "a caf\u00e9 \u732b".encode("utf-16")),  # with its BOM
             "latin1.mp4": ("latin1.txt", "a caf\u00e9".encode("latin-1"))}
    for clip, (caption, raw) in texts.items():
        write_clip(folder / clip, caption=None)
        (folder / caption).write_bytes(raw)
    samples, report = plan(make_dataset(folder, num_frames=FRAMES))
    assert {n: s.caption for n, s in by_name(samples).items()} == {"upper.Mp4": "a cat", "bom.mp4": "a caf\u00e9",
                                                                   "utf16.mp4": "a caf\u00e9 \u732b"}
    assert [(Path(p["file"]).name, p["problem"], p["broken"]) for p in report.problems] == [
        ("latin1.mp4", "caption file latin1.txt is neither UTF-8 nor UTF-16 with a BOM; save it as UTF-8", False)]


def test_resolution_frames_gives_each_clip_its_own_length_and_size(tmp_path):
    folder = tmp_path / "clips"
    write_clip(folder / "long.mp4", 160, 96, frames=40)
    write_clip(folder / "mid.mp4", 64, 64, frames=20)
    write_clip(folder / "short.mp4", 64, 64, frames=12)
    ds = make_dataset(folder, bucket_strategy="resolution_frames", num_frames=9)
    s = by_name(plan(ds, rounding=0)[0])
    assert {n: x.frames for n, x in s.items()} == {"long.mp4": 33, "mid.mp4": 17, "short.mp4": 9}
    assert (s["long.mp4"].width, s["long.mp4"].height) == (96, 64)  # its own 1.67, not rounded to 2.0
    assert (s["mid.mp4"].width, s["mid.mp4"].height) == (64, 64)
    ds16 = make_dataset(folder, bucket_strategy="resolution_frames", num_frames=17, frame_interval=16)
    assert {n: x.frames for n, x in by_name(plan(ds16)[0]).items()} == {"long.mp4": 33, "mid.mp4": 17}
    # aspect_ratio: every clip at num_frames (rounded to 8k+1)
    s = by_name(plan(make_dataset(folder, num_frames=9))[0])
    assert {n: x.frames for n, x in s.items()} == {"long.mp4": 9, "mid.mp4": 9, "short.mp4": 9}


def test_short_clips_are_skipped_with_a_report_line(tmp_path):
    folder = tmp_path / "clips"
    write_clip(folder / "ok.mp4", frames=17)
    write_clip(folder / "tiny.mp4", frames=9)
    samples, report = plan(make_dataset(folder, num_frames=17))
    assert [s.path.name for s in samples] == ["ok.mp4"]
    assert report.problems == [{"dataset": "d", "file": str(folder / "tiny.mp4"),
                                "problem": "too short: 9 frames, min_frames is 17", "broken": False}]
    # min_frames below num_frames keeps it, at fewer frames
    samples, report = plan(make_dataset(folder, num_frames=17, min_frames=9))
    assert {n: s.frames for n, s in by_name(samples).items()} == {"ok.mp4": 17, "tiny.mp4": 9}
    assert report.problems == []


def test_num_frames_not_8k_plus_1_is_rounded_and_noted(tmp_path):
    write_clip(tmp_path / "clips" / "a.mp4", frames=20)
    samples, report = plan(make_dataset(tmp_path / "clips", num_frames=20, min_frames=17))
    assert samples[0].frames == 17
    assert report.notes == ["dataset 'd': num_frames 20 rounded down to 17 (LTX's VAE needs 8k+1 frames)"]


def test_num_frames_rounded_down_is_what_min_frames_defaults_to(tmp_path):
    """num_frames = 30 on 25-frame clips: rounded down to 25, and the clips are used, not 'too short, min 30'."""
    write_clip(tmp_path / "clips" / "a.mp4", frames=25)
    ds = make_dataset(tmp_path / "clips", num_frames=30)
    samples, report = plan(ds)
    assert ds.min_frames == 25 and [s.frames for s in samples] == [25] and report.problems == []
    assert report.notes == ["dataset 'd': num_frames 30 rounded down to 25 (LTX's VAE needs 8k+1 frames)"]


def test_max_frames_trims_first(tmp_path):
    write_clip(tmp_path / "clips" / "a.mp4", frames=40)

    def planned(**keys):
        return plan(make_dataset(tmp_path / "clips", num_frames=49, min_frames=9, **keys))[0][0]
    assert planned().frames == 33
    assert planned(max_frames=20).frames == 17
    assert planned(max_frames=20, bucket_strategy="resolution_frames").frames == 17
    assert planned(bucket_strategy="resolution_frames").frames == 33
    ds = make_dataset(tmp_path / "clips", num_frames=49, min_frames=9, max_frames=20, frame_sample="random")
    starts = {plan(ds, seed=seed)[0][0].start for seed in range(12)}
    assert starts <= set(range(4)) and len(starts) > 1  # the 17-frame window stays inside the first 20 frames


def test_random_start_is_in_range_stable_and_read_from_there(tmp_path):
    path = write_clip(tmp_path / "clips" / "a.mp4", frames=40)
    ds = make_dataset(tmp_path / "clips", num_frames=17, frame_sample="random")
    starts = [plan(ds, seed=seed)[0][0].start for seed in range(10)]
    assert all(0 <= s <= 40 - 17 for s in starts)
    assert len(set(starts)) > 1  # really random across seeds...
    assert [plan(ds, seed=seed)[0][0].start for seed in range(10)] == starts  # ...and stable for a seed
    assert plan(make_dataset(tmp_path / "clips", num_frames=17))[0][0].start == 0  # frame_sample = "start"
    sample = next(plan(ds, seed=seed)[0][0] for seed in range(10) if starts[seed] > 0)
    assert decoded_indices(data.load_sample(sample), full_decode(path, 40)) == list(range(sample.start,
                                                                                           sample.start + 17))


def test_fps_resampling_uses_every_other_frame_at_half_the_rate(tmp_path):
    path = write_clip(tmp_path / "clips" / "a.mp4", frames=40, fps=24)
    write_clip(tmp_path / "clips" / "b.mp4", frames=20, fps=24)
    samples, report = plan(make_dataset(tmp_path / "clips", num_frames=17, fps=12))
    s = by_name(samples)["a.mp4"]
    assert s.step == 2.0 and s.frames == 17
    assert data.frame_indices(s) == list(range(0, 33, 2))  # 33 source frames for 17, not 17
    assert decoded_indices(data.load_sample(s), full_decode(path, 40)) == list(range(0, 33, 2))
    assert [p["problem"] for p in report.problems] == ["too short: 10 frames, min_frames is 17"]  # 20 at 24 fps
    plain = by_name(plan(make_dataset(tmp_path / "clips", num_frames=17))[0])["a.mp4"]
    assert plain.step == 1.0 and data.frame_indices(plain) == list(range(17))


def test_minimum_image_size_skips_small_sources(tmp_path):
    folder = tmp_path / "clips"
    write_clip(folder / "small.mp4", 64, 64)
    write_clip(folder / "big.mp4", 160, 96)
    samples, report = plan(make_dataset(folder, minimum_image_size=100, num_frames=FRAMES))
    assert [s.path.name for s in samples] == ["big.mp4"]  # sqrt(160 * 96) = 124 >= 100
    assert report.problems[0]["problem"] == "smaller than minimum_image_size (64 < 100 in pixel_area)"
    samples, _ = plan(make_dataset(folder, resolution_type="pixel", minimum_image_size=90, num_frames=FRAMES))
    assert [s.path.name for s in samples] == ["big.mp4"]  # shorter side 96 >= 90, 64 < 90
    samples, _ = plan(make_dataset(folder, resolution_type="pixel", minimum_image_size=97, num_frames=FRAMES))
    assert samples == []


def test_maximum_image_size_downsamples_large_sources_first(tmp_path):
    folder = tmp_path / "clips"
    write_clip(folder / "small.mp4", 64, 64)
    write_clip(folder / "big.mp4", 160, 96)
    samples, _ = plan(make_dataset(folder, maximum_image_size=100, target_downsample_size=80, num_frames=FRAMES))
    s = by_name(samples)
    assert s["small.mp4"].downsample is None
    assert s["big.mp4"].downsample == (103, 62)  # 80 px of area at 160:96
    video = data.load_sample(s["big.mp4"])
    assert video.shape == (3, 17, 64, 96) and video.abs().max() <= 1


def test_crop_square_and_random_crop_position(tmp_path):
    write_clip(tmp_path / "clips" / "a.mp4", 160, 96)
    square = plan(make_dataset(tmp_path / "clips", crop=True, crop_aspect="square", num_frames=FRAMES))[0][0]
    assert (square.width, square.height, square.crop) == (64, 64, (0.5, 0.5))
    preserve = plan(make_dataset(tmp_path / "clips", crop=True, num_frames=FRAMES))[0][0]
    assert (preserve.width, preserve.height, preserve.crop) == (96, 64, (0.5, 0.5))
    ds = make_dataset(tmp_path / "clips", crop=True, crop_style="random", num_frames=FRAMES)
    crop = plan(ds, seed=0)[0][0].crop
    assert all(0 <= c <= 1 for c in crop) and crop != (0.5, 0.5)
    assert plan(ds, seed=0)[0][0].crop == crop  # the same window for the same seed and file
    assert plan(ds, seed=1)[0][0].crop != crop
    aspects = {data.nearest_32(w) / data.nearest_32(h) for a in data.SQUARE_AND_COMMON_ASPECTS
               for w, h in [data.size_for(a, 64, "pixel_area")]}
    ds = make_dataset(tmp_path / "clips", crop=True, crop_aspect="random", num_frames=FRAMES)
    picked = {(s.width / s.height) for seed in range(8) for s in plan(ds, seed=seed)[0]}
    assert picked <= aspects and len(picked) > 1


def test_images_are_one_frame_samples_and_only_clips_are_i2v(tmp_path):
    write_png(tmp_path / "images" / "wide.png", 80, 48)
    write_png(tmp_path / "images" / "square.png", 48, 48)
    ds = make_dataset(tmp_path / "images", dataset_type="image", is_i2v=True)
    s = by_name(plan(ds)[0])
    assert sorted(s) == ["square.png", "wide.png"]
    assert all(x.frames == 1 and x.i2v is False for x in s.values())
    assert (s["wide.png"].width, s["wide.png"].height) == (96, 64)
    assert data.load_sample(s["wide.png"]).shape == (3, 1, 64, 96)
    exact = data.load_sample(data.Sample("d", s["wide.png"].path, "", 80, 48, 1))  # at its own size: lossless
    assert torch.equal(((exact[:, 0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8),
                       torch.from_numpy(png_pixels(80, 48)))
    write_clip(tmp_path / "clips" / "a.mp4")
    assert plan(make_dataset(tmp_path / "clips", num_frames=FRAMES, is_i2v=True))[0][0].i2v is True
    assert plan(make_dataset(tmp_path / "clips", num_frames=FRAMES, is_i2v=False))[0][0].i2v is False
    assert plan(make_dataset(tmp_path / "clips", num_frames=1, is_i2v=True))[0][0].i2v is False  # 1 frame: no


def test_missing_or_empty_folder_is_an_error(tmp_path):
    with pytest.raises(data.DataError, match=re.escape(f"instance_data_dir {tmp_path / 'nope'} does not exist")):
        plan(make_dataset(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.png").write_bytes(b"an image is not a video")
    with pytest.raises(data.DataError, match="no video files"):
        plan(make_dataset(tmp_path / "empty"))


# -----------------------------------------------------------------------------
# Bad input: every unusable file reported once (or moved aside), every good one used

BAD = {"corrupt.mp4": "not a readable video", "half.mp4": "not a readable video", "zero.mp4": "empty file (0 bytes)",
       "notes.mov": "not a readable video", "locked.mp4": "unreadable (file permissions)",
       "nocap.mp4": "missing caption file nocap.txt", "emptycap.mp4": "empty caption file emptycap.txt"}
BAD["good_0.MOV"] = "not a readable video"
BROKEN = {"corrupt.mp4", "half.mp4", "zero.mp4", "notes.mov", "cut.mp4", "good_0.MOV"}  # the only ones moved
GOOD = ["clip_é漢字.mp4"] + [f"good_{i}.mp4" for i in range(8)]  # more good files than bad: not a settings mistake


@pytest.mark.parametrize("quarantine", [False, True])
def test_bad_files_are_reported_once_and_good_ones_used(tmp_path, monkeypatch, quarantine):
    folder = tmp_path / "data" / "clips"
    for i, name in enumerate(GOOD):
        write_clip(folder / name, caption=f"good clip {i}", offset=10 * i)
    (folder / "corrupt.mp4").write_bytes(random.Random(0).randbytes(5000))
    (folder / "corrupt.txt").write_text("random bytes")
    blob = write_clip(folder / "whole.mp4").read_bytes()  # mpeg4 in mp4: the index is at the end...
    (folder / "whole.mp4").unlink()
    (folder / "half.mp4").write_bytes(blob[:len(blob) // 2])  # ...so the first half has none
    (folder / "half.TXT").write_text("first half")  # its caption in upper case: found, and moved along
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "zero.txt").write_text("zero bytes")
    (folder / "notes.mov").write_text("this is a text file\n" * 20)
    (folder / "notes.txt").write_text("a text file")
    write_clip(folder / "locked.mp4", caption="locked")
    write_clip(folder / "nocap.mp4", caption=None)
    (folder / "good_0.MOV").write_text("a broken twin of good_0.mp4, sharing its caption")
    write_clip(folder / "emptycap.mp4", caption=" \n")
    write_cut_clip(folder / "cut.mp4")  # probes fine, fails to decode
    earlier = tmp_path / "data" / "quarantine" / "d" / "zero.mp4"  # quarantined by an earlier run: kept
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier zero.mp4")
    access = os.access  # root reads anything: pretend the permissions say no
    monkeypatch.setattr(data.os, "access", lambda p, mode, *a, **k: Path(p).name != "locked.mp4" and access(p, mode,
                                                                                                            *a, **k))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    ds = make_dataset(folder, num_frames=FRAMES, cache_dir_vae=str(tmp_path / "vae"))
    samples, report = plan(ds, quarantine=quarantine)
    assert sorted(s.path.name for s in samples) == sorted(GOOD + ["cut.mp4"])
    assert by_name(samples)["clip_é漢字.mp4"].caption == "good clip 0"
    assert set(before) == {p.name for p in folder.iterdir()}  # planning moves nothing

    run_cache(samples, {ds.id: ds}, report)
    assert sorted(s.path.name for s in data.cached(samples)) == sorted(GOOD)
    assert set(before) == {p.name for p in folder.iterdir()}  # nor does caching
    report.check_mostly_usable()  # 9 of 18 skipped: not more than half
    report.move_broken({ds.id: ds})
    report.write()
    written = json.loads(report.path.read_text())["skipped"]
    names = Counter(Path(e["file"]).name for e in written)
    assert names == Counter(list(BAD) + ["cut.mp4"])  # each bad file exactly once
    for e in written:
        name = Path(e["file"]).name
        assert e["dataset"] == "d" and e["file"] == str(folder / name) and e["broken"] == (name in BROKEN)
        if name == "cut.mp4":
            assert re.fullmatch(r"decoded \d+ of the 17 frames needed \(truncated file\?\)", e["problem"]), e
        else:
            assert e["problem"].startswith(BAD[name]), e
        caption = next((p for p in before if p != name and Path(p).stem == Path(name).stem), None)
        caption = None if name == "good_0.MOV" else caption  # good_0.txt is good_0.mp4's too: it stays
        target = tmp_path / "data" / "quarantine" / "d" / (name if name != "zero.mp4" else "zero-1.mp4")
        if quarantine and name in BROKEN:
            assert e["moved_to"] == str(target) and not (folder / name).exists()
            assert target.read_bytes() == before[name]  # moved whole, never deleted
            if caption:  # moved along, under the clip's new name
                assert not (folder / caption).exists()
                assert target.with_suffix(Path(caption).suffix).read_bytes() == before[caption]
        else:  # kept where it is: a missing caption or unreadable permissions is not a broken file
            assert "moved_to" not in e and (folder / name).exists() and not target.exists()
            assert caption is None or (folder / caption).exists()
    assert earlier.read_bytes() == b"an earlier zero.mp4"  # never overwritten
    assert all((folder / name).exists() for name in GOOD)  # the good files never move
    assert (folder / "good_0.txt").read_text() == "good clip 1"  # nor the caption a broken twin shared


def test_a_dataset_mostly_unusable_for_this_runs_settings_stops_and_nothing_moves(tmp_path):
    """num_frames = 49 on 25-frame clips skips every clip: that is a settings mistake, not 16 bad files."""
    folder = tmp_path / "data" / "clips"
    for i in range(4):
        write_clip(folder / f"clip_{i}.mp4", frames=25)
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    (folder / "broken.txt").write_text("broken")
    before = sorted(p.name for p in folder.iterdir())
    ds = make_dataset(folder, num_frames=49)
    samples, report = plan(ds, quarantine=True)
    assert samples == []
    with pytest.raises(data.DataError, match=r"dataset 'd': 5 of its 5 files would be skipped, which looks like wrong "
                                             r"settings .* nothing was moved\. First reasons: broken\.mp4: not a "
                                             r"readable video .*; clip_0\.mp4: too short: 25 frames, min_frames is 49"):
        report.check_mostly_usable()
    assert sorted(p.name for p in folder.iterdir()) == before and not (tmp_path / "data" / "quarantine").exists()
    ok, report = plan(make_dataset(folder, num_frames=25), quarantine=True)  # the right setting: only one is bad
    report.check_mostly_usable()
    report.move_broken({"d": make_dataset(folder)})
    assert len(ok) == 4 and (tmp_path / "data" / "quarantine" / "d" / "broken.mp4").exists()
    assert (tmp_path / "data" / "quarantine" / "d" / "broken.txt").read_text() == "broken"


def test_a_bug_while_decoding_is_a_traceback_not_a_bad_file(tmp_path, monkeypatch):
    """A one-character bug in resizing must not mark clips unusable (and, with quarantine, move them)."""
    folder = tmp_path / "clips"
    for i in range(3):
        write_clip(folder / f"clip_{i}.mp4")
    ds = make_dataset(folder, num_frames=FRAMES, cache_dir_vae=str(tmp_path / "vae"))
    samples, report = plan(ds, quarantine=True)

    def buggy_resize(frames, width, height, crop):
        h, w = frames.shape  # a shape bug: too many values to unpack
        return frames

    monkeypatch.setattr(data, "resize_and_crop", buggy_resize)
    with pytest.raises(ValueError, match="too many values to unpack"):
        run_cache(samples, {ds.id: ds}, report)
    assert report.problems == [] and sorted(p.name for p in folder.glob("*.mp4")) == [f"clip_{i}.mp4" for i in range(3)]


# -----------------------------------------------------------------------------
# Decoding

def test_write_then_load_keeps_frame_count_and_range(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)
    data.write_video(tmp_path / "noise.mp4", frames, fps=25)
    assert data.probe(tmp_path / "noise.mp4") == (48, 32, 9, 25.0)
    video = data.load_sample(data.Sample("d", tmp_path / "noise.mp4", "", 48, 32, 9))
    assert video.shape == (3, 9, 32, 48) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert video.min() < -0.8 and video.max() > 0.8  # uses the whole range, not e.g. [0, 1]
    expected = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1
    # noise loses detail in yuv420p (chroma at half size), but each frame's mean survives
    assert (video.mean(dim=(0, 2, 3)) - expected.mean(dim=(0, 2, 3))).abs().max() < 0.03


def test_frame_window_start_and_step_pick_the_right_frames(tmp_path):
    path = write_clip(tmp_path / "ramp.mp4", frames=40)
    reference = full_decode(path, 40)
    assert decoded_indices(reference, reference) == list(range(40))  # the frames can be told apart
    window = data.load_sample(data.Sample("d", path, "", W, H, 9, start=5))
    assert decoded_indices(window, reference) == list(range(5, 14))
    strided = data.load_sample(data.Sample("d", path, "", W, H, 9, start=3, step=2.0))
    assert decoded_indices(strided, reference) == list(range(6, 23, 2))
    brightness = (strided.mean(dim=(0, 2, 3)) + 1) * 127.5
    assert torch.allclose(brightness, 10 + 6 * torch.arange(6, 23, 2).float(), atol=5)


@pytest.mark.parametrize("vertical", [False, True])
def test_centre_crop_covers_then_keeps_the_centre(tmp_path, vertical):
    # a 2:1 (or 1:2) clip cropped to a square must keep the two middle bands (red, blue) only;
    # squashing would show the green outer bands, a corner crop would show green and red
    size = (64, 128) if vertical else (128, 64)
    data.write_video(tmp_path / "bands.mp4", band_video(*size, vertical=vertical), fps=25)
    video = data.load_sample(data.Sample("d", tmp_path / "bands.mp4", "", 32, 32, 4, crop=(0.5, 0.5)))
    assert video.shape == (3, 4, 32, 32)
    frame = video[:, 0] if not vertical else video[:, 0].transpose(1, 2)  # bands now run left to right
    red, blue = frame[:, 16, 4], frame[:, 16, 27]
    assert red[0] > 0.7 and red[1] < -0.7 and red[2] < -0.7, red
    assert blue[2] > 0.7 and blue[0] < -0.7 and blue[1] < -0.7, blue
    assert frame[1, :, 2:30].max() < -0.5  # no green anywhere away from the edges
    assert frame[0, 16, 14] > 0 and frame[0, 16, 17] < 0  # the red / blue border sits in the middle


def test_crop_none_squashes_and_crop_position_moves_the_window(tmp_path):
    data.write_video(tmp_path / "bands.mp4", band_video(128, 64, vertical=False), fps=25)

    def frame(crop):
        return data.load_sample(data.Sample("d", tmp_path / "bands.mp4", "", 32, 32, 4, crop=crop))[:, 0]
    squashed = frame(None)  # all four bands, each 8 px wide
    assert squashed[1, 16, 2] > 0.7 and squashed[0, 16, 12] > 0.7 and squashed[2, 16, 20] > 0.7
    assert squashed[1, 16, 29] > 0.7
    left, right = frame((0.0, 0.5)), frame((1.0, 0.5))
    assert left[1, 16, 4] > 0.7 and left[0, 16, 27] > 0.7  # green | red
    assert right[2, 16, 4] > 0.7 and right[1, 16, 27] > 0.7  # blue | green


def test_truncated_clip_says_how_many_frames_were_decoded(tmp_path):
    path = write_cut_clip(tmp_path / "cut.mp4")
    assert data.probe(path)[2] == 20  # the container still promises all of them
    with pytest.raises(data.BadFile, match=r"decoded \d+ of the 17 frames needed \(truncated file\?\)"):
        data.load_sample(data.Sample("d", path, "", W, H, 17))
    (tmp_path / "noise.mp4").write_bytes(random.Random(1).randbytes(3000))
    with pytest.raises(data.BadFile, match="could not decode"):
        data.load_sample(data.Sample("d", tmp_path / "noise.mp4", "", W, H, 1))


# -----------------------------------------------------------------------------
# The synthetic dataset

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> list[Path]:
    return demo.make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n=4, num_frames=FRAMES, width=W,
                                       height=H, seed=0)


def caption_of(video: Path) -> str:
    return video.with_suffix(".txt").read_text().strip()


def synthetic_frames(video: Path) -> torch.Tensor:
    return data.load_sample(data.Sample("d", video, "", W, H, FRAMES))


def test_synthetic_is_deterministic(synthetic, tmp_path):
    same = demo.make_synthetic_dataset(tmp_path / "same", n=4, num_frames=FRAMES, width=W, height=H, seed=0)
    other = demo.make_synthetic_dataset(tmp_path / "other", n=4, num_frames=FRAMES, width=W, height=H, seed=1)
    assert [p.name for p in synthetic] == [f"clip_{i:04d}.mp4" for i in range(4)]
    assert [caption_of(p) for p in same] == [caption_of(p) for p in synthetic]
    assert [caption_of(p) for p in other] != [caption_of(p) for p in synthetic]
    for a, b, c in zip(synthetic, same, other):
        va = synthetic_frames(a)
        assert torch.equal(va, synthetic_frames(b))
        assert not torch.equal(va, synthetic_frames(c))


def test_synthetic_reuses_existing_clips(synthetic):
    folder = synthetic[0].parent
    mtimes = [p.stat().st_mtime_ns for p in synthetic]
    again = demo.make_synthetic_dataset(folder, n=4, seed=123)  # another seed: still the existing clips
    assert again == synthetic
    assert [p.stat().st_mtime_ns for p in again] == mtimes
    assert not list(folder.glob("*.tmp"))


def test_synthetic_odd_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="even width and height"):
        demo.make_synthetic_dataset(tmp_path / "odd", n=1, width=65, height=64)
    assert not (tmp_path / "odd").exists()


def test_synthetic_shape_moves_as_captioned(synthetic):
    pattern = re.compile(r"an? (\w+) (circle|square|triangle) moving (left|right|up|down) on an? [a-z ]+ background")
    for path in synthetic:
        caption = caption_of(path)
        match = pattern.fullmatch(caption)
        assert match, caption
        video = synthetic_frames(path)
        first, last = video[:, 0], video[:, -1]
        assert (first - last).abs().mean() > 0.05  # frames differ substantially, not by codec noise

        def centre(frame: torch.Tensor) -> torch.Tensor:
            # shapes are bright (a channel >= 200/255), backgrounds dark: threshold the brightest channel
            y, x = torch.nonzero(frame.max(0).values > 0.45, as_tuple=True)
            return torch.stack([x.float().mean(), y.float().mean()])

        dx, dy = (centre(last) - centre(first)).tolist()
        direction = match.group(3)
        moved = {"left": -dx / W, "right": dx / W, "up": -dy / H, "down": dy / H}[direction]
        assert moved > 0.4, (caption, dx, dy)  # crosses a good part of the frame the captioned way


# -----------------------------------------------------------------------------
# The caches

def test_first_run_encodes_each_sample_and_caption_once(tmp_path):
    samples, datasets, report = cache_setup(tmp_path)
    fake = run_cache(samples, datasets, report, text_batch_size=2)
    assert fake.videos == 4 and sorted(fake.captions) == ["a blue box", "a red ball", "shared"]
    assert [len(call) for call in fake.text_calls] == [2, 1]  # text_batch_size captions per call
    assert samples[2].text_file == samples[3].text_file  # one caption, one file
    assert len({s.latent_file for s in samples}) == 4 and len({s.text_file for s in samples}) == 3
    assert all(s.latent_file.parent == tmp_path / "vae" and s.text_file.parent == tmp_path / "text" for s in samples)
    for s in samples:  # file i holds sample i
        latents = data.read_cache_file(s.latent_file)
        assert set(latents) == {"latents"} and latents["latents"].shape == (3, 3, 2, 2)
        assert torch.equal(latents["latents"], data.load_sample(s)[:, ::8, ::32, ::32])
        text = data.read_cache_file(s.text_file)
        assert text["prompt_embeds"].shape == (16, 8) and text["prompt_embeds"][0, 0] == len(s.caption)
        assert text["prompt_attention_mask"].shape == (16,)
    assert data.cached(samples) == samples and report.problems == []
    assert not list(tmp_path.rglob("*.tmp"))
    samples[3].text_file.unlink()  # cached means both files: the shared caption's two samples drop out
    assert data.cached(samples) == samples[:2]
    samples[0].latent_file.unlink()
    assert data.cached(samples) == samples[1:2]


def test_rerun_encodes_nothing_and_a_touched_file_only_itself(tmp_path):
    samples, datasets, report = cache_setup(tmp_path)
    run_cache(samples, datasets, report)
    first = [s.latent_file for s in samples]
    fake = run_cache(samples, datasets, report)
    assert fake.videos == 0 and fake.captions == [] and [s.latent_file for s in samples] == first

    stat = samples[1].path.stat()
    os.utime(samples[1].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    fake = run_cache(samples, datasets, report)
    assert fake.videos == 1 and fake.captions == []  # its caption did not change
    assert [a != s.latent_file for a, s in zip(first, samples)] == [False, True, False, False]
    assert torch.equal(data.read_cache_file(samples[1].latent_file)["latents"],
                       data.load_sample(samples[1])[:, ::8, ::32, ::32])


VAE = {"model": "vae-test", "dtype": "bfloat16", "tiling": False}
T5 = {"model": "t5-test", "dtype": "bfloat16", "precision": "no_change", "tokens": 128}


@pytest.mark.parametrize("change", [{"vae": {**VAE, "model": "another-vae"}}, {"vae": {**VAE, "dtype": "float32"}},
                                    {"vae": {**VAE, "tiling": True}}, {"text": {**T5, "model": "another-t5"}},
                                    {"text": {**T5, "dtype": "float32"}}, {"text": {**T5, "precision": "nf4-bnb"}},
                                    {"text": {**T5, "tokens": 256}}],
                         ids=["vae", "vae-dtype", "tiling", "t5", "t5-dtype", "t5-precision", "tokens"])
def test_every_encoder_setting_is_in_the_key_and_a_change_is_said_once(tmp_path, capsys, change):
    """Files made another way (an nf4 T5, a VAE in float32, tiled) are never read as this run's: they are encoded
    again, once, with one line naming what changed; switching back reuses the first files and says nothing."""
    samples, datasets, report = cache_setup(tmp_path)
    run_cache(samples, datasets, report, vae=VAE, text=T5)
    first = {s.latent_file for s in samples} | {s.text_file for s in samples}
    capsys.readouterr()
    report.echo = True
    kind, settings = next(iter(change.items()))
    fake = run_cache(samples, datasets, report, **{"vae": VAE, "text": T5, **change})
    changed = next(k for k in settings if settings[k] != (VAE if kind == "vae" else T5)[k])
    said = [line for line in capsys.readouterr().out.splitlines() if "encoded again" in line]
    if kind == "vae":
        assert fake.videos == 4 and fake.captions == []
        assert said == [f"4 latents file(s) in {tmp_path / 'vae'} are encoded again: the cached ones were made with "
                        f"other settings ({changed} {VAE[changed]!r} -> {settings[changed]!r}); they stay, and are "
                        f"used again if those settings come back"]
    else:
        assert fake.videos == 0 and sorted(fake.captions) == ["a blue box", "a red ball", "shared"]
        assert len(said) == 1 and said[0].startswith(f"3 text file(s) in {tmp_path / 'text'} are encoded again")
    assert not ({s.latent_file for s in samples} | {s.text_file for s in samples}) >= first
    folder = tmp_path / ("vae" if kind == "vae" else "text")
    assert json.loads((folder / data.ENCODERS).read_text())["latents" if kind == "vae" else "text"] == settings
    fake = run_cache(samples, datasets, report, vae=VAE, text=T5)  # back: the first files, nothing encoded
    assert fake.videos == 0 and fake.captions == [] and "encoded again" not in capsys.readouterr().out
    assert {s.latent_file for s in samples} | {s.text_file for s in samples} == first


def test_changed_clip_size_reencodes(tmp_path):
    samples, datasets, report = cache_setup(tmp_path)
    run_cache(samples, datasets, report)
    for s in samples:
        s.width = 96
    fake = run_cache(samples, datasets, report)
    assert fake.videos == 4 and fake.captions == []
    assert data.read_cache_file(samples[0].latent_file)["latents"].shape == (3, 3, 2, 3)


def test_default_cache_folders(tmp_path):
    samples, datasets, report = cache_setup(tmp_path)
    ds = dataclasses.replace(datasets["d"], cache_dir_vae="")
    run_cache(samples, {"d": ds}, report, text_dir=None)
    default = tmp_path / "clips" / ".ltx-cache"
    assert all(s.latent_file.parent == default and s.text_file.parent == default for s in samples)
    assert len(data.cached(samples)) == 4
    assert len(plan(make_dataset(tmp_path / "clips", num_frames=FRAMES))[0]) == 4  # the cache folder is no clip


def test_compressed_cache_reads_back_equal_and_smaller(tmp_path):
    samples, datasets, report = cache_setup(tmp_path)
    run_cache(samples, datasets, report, FakeEncoders(stride=4))
    plain = [(s.latent_file, s.text_file) for s in samples]
    gz = {"d": dataclasses.replace(datasets["d"], cache_dir_vae=str(tmp_path / "vae-gz"))}
    run_cache(samples, gz, report, FakeEncoders(stride=4), compress=True, text_dir=tmp_path / "text-gz")
    for (latent, text), s in zip(plain, samples):
        assert s.latent_file.name.endswith(".safetensors.gz") and s.text_file.name.endswith(".safetensors.gz")
        for a, b in ((latent, s.latent_file), (text, s.text_file)):
            x, y = data.read_cache_file(a), data.read_cache_file(b)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
            assert b.stat().st_size < a.stat().st_size / 2, (a.stat().st_size, b.stat().st_size)
            assert gzip.decompress(b.read_bytes()) == a.read_bytes()
    assert data.cached(samples) == samples


@pytest.mark.parametrize("compress", [False, True])
def test_broken_cache_files_are_detected_and_rebuilt(tmp_path, compress):
    samples, datasets, report = cache_setup(tmp_path)
    run_cache(samples, datasets, report, compress=compress)
    files = [f for s in samples for f in (s.latent_file, s.text_file)]
    assert all(data.cache_file_ok(f) for f in files)
    good = {f: f.read_bytes() for f in files}
    cut, garbage, flipped = samples[0].latent_file, samples[0].text_file, samples[1].latent_file
    cut.write_bytes(good[cut][:len(good[cut]) // 2])
    garbage.write_bytes(random.Random(0).randbytes(300))
    if compress:  # a valid gzip header over broken deflate data
        damaged = bytearray(good[flipped])
        damaged[20:40] = bytes(b ^ 0xFF for b in damaged[20:40])
        flipped.write_bytes(bytes(damaged))
    else:  # a header length that would ask for exabytes
        flipped.write_bytes(b"this is not a safetensors file at all" * 4)
    for f in files:
        assert data.cache_file_ok(f) == (f not in (cut, garbage, flipped)), f
    fake = run_cache(samples, datasets, report, compress=compress)
    assert fake.videos == 2 and fake.captions == ["a red ball"]  # exactly the broken ones
    assert all(data.cache_file_ok(f) for f in files)
    for f in (cut, garbage, flipped):
        x, y = read_blob(good[f], compress), data.read_cache_file(f)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def read_blob(blob: bytes, compress: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load
    return load(gzip.decompress(blob) if compress else blob)


def test_vae_batches_hold_one_shape_and_at_most_vae_batch_size(tmp_path):
    sizes = [(W, H)] * 5 + [(160, 96)] * 2
    samples, datasets, report = cache_setup(tmp_path, captions=[f"clip {i}" for i in range(7)], sizes=sizes)
    fake = run_cache(samples, datasets, report, vae_batch_size=3)
    assert sorted(fake.batches) == sorted([(3, 3, 17, 64, 64), (2, 3, 17, 64, 64), (2, 3, 17, 64, 96)])
    for s in samples:  # batching never mixes up which latents belong to which sample
        assert torch.equal(data.read_cache_file(s.latent_file)["latents"], data.load_sample(s)[:, ::8, ::32, ::32])


def test_ranks_encode_disjoint_halves(tmp_path):
    samples, datasets, report = cache_setup(tmp_path, captions=[f"clip {i}" for i in range(5)])
    done = []
    for rank in (0, 1):  # each rank into its own folder, so one cannot skip what the other wrote
        ds = {"d": dataclasses.replace(datasets["d"], cache_dir_vae=str(tmp_path / f"vae{rank}"))}
        fake = run_cache(samples, ds, report, rank=rank, world_size=2, text_dir=tmp_path / f"text{rank}")
        done.append({i for i, s in enumerate(samples) if s.latent_file.exists()})
        assert fake.videos == len(done[-1]) and len(fake.captions) == len(done[-1])
    assert not done[0] & done[1] and done[0] | done[1] == set(range(5)) and {len(d) for d in done} == {2, 3}
    for rank in (0, 1):  # into one folder, as under torchrun: together they cache everything
        run_cache(samples, datasets, report, rank=rank, world_size=2)
    assert data.cached(samples) == samples
    fake = run_cache(samples, datasets, report)
    assert fake.videos == 0 and fake.captions == []


def test_cached_text_is_encoded_once_and_rebuilt_when_broken(tmp_path):
    fake = FakeEncoders()
    first = data.cached_text(["", "a validation prompt"], fake.encode_text, tmp_path / "text", {"model": "t5-test"})
    assert fake.text_calls == [["", "a validation prompt"]]
    assert first[""]["prompt_embeds"].shape == (16, 8) and first[""]["prompt_embeds"].abs().max() == 0
    assert set(first[""]) == {"prompt_embeds", "prompt_attention_mask"}
    again = data.cached_text([""], fake.encode_text, tmp_path / "text", {"model": "t5-test"})
    assert len(fake.text_calls) == 1 and torch.equal(again[""]["prompt_embeds"], first[""]["prompt_embeds"])
    file = data.text_file_for("", tmp_path / "text", {"model": "t5-test"}, compress=False)
    file.write_bytes(file.read_bytes()[:20])
    data.cached_text(["", "a validation prompt"], fake.encode_text, tmp_path / "text", {"model": "t5-test"})
    assert fake.text_calls[-1] == [""] and data.cache_file_ok(file)  # only the broken one again


def test_a_crash_while_writing_leaves_no_file(tmp_path, monkeypatch):
    samples, datasets, report = cache_setup(tmp_path)

    def write_half_then_die(self, blob):
        with open(self, "wb") as f:
            f.write(blob[:len(blob) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(data.Path, "write_bytes", write_half_then_die)
    with pytest.raises(OSError, match="disk full"):
        run_cache(samples, datasets, report)
    assert not [p for p in tmp_path.rglob("*") if ".safetensors" in p.name]  # neither final nor temporary
    monkeypatch.undo()
    fake = run_cache(samples, datasets, report)
    assert fake.videos == 4 and data.cached(samples) == samples


def write_many(path: Path, tensor: torch.Tensor) -> None:
    for _ in range(200):
        data.write_cache_file({"x": tensor}, path)


def test_concurrent_writers_of_one_file_both_succeed(tmp_path):
    # two ranks caching the same caption (or the empty prompt) write the same file at once
    path = tmp_path / "text.safetensors"
    tensors = [torch.full((64, 64), float(i)) for i in range(2)]
    # a forked child must not inherit garbage that is still to be collected: a PyAV decoder left in a reference
    # cycle (a bad-file test's traceback holds its frame) waits, when freed, for its frame threads, which exist
    # only in the parent, so a collection in the child hangs it (seen once more tests ran in this process)
    gc.collect()
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=write_many, args=(path, t)) for t in tensors]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=60)
    assert [w.exitcode for w in writers] == [0, 0]
    assert data.cache_file_ok(path) and data.read_cache_file(path)["x"][0, 0] in (0.0, 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["text.safetensors"]


# -----------------------------------------------------------------------------
# Buckets and the epoch plan

def plan_datasets(**datasets) -> dict[str, data.Dataset]:
    """Datasets by id from {id: (repeats, probability)}."""
    return {name: data.Dataset(id=name, instance_data_dir="x", repeats=r, probability=p)
            for name, (r, p) in datasets.items()}


def shapes_of(batch: list[int], samples: list[data.Sample]) -> set[tuple[int, int, int]]:
    return {(samples[i].width, samples[i].height, samples[i].frames) for i in batch}


def test_pruning_drops_a_small_bucket_and_notes_it(tmp_path):
    samples = fake_samples("a", (64, 64, 17), 5) + fake_samples("a", (96, 64, 17), 2)
    datasets = plan_datasets(a=(0, 1.0))
    report = data.Report(tmp_path / "data_report.json", False)
    buckets = data.make_buckets(samples, datasets, 4, True, report)
    assert [b.shape for b in buckets] == [(64, 64, 17)] and buckets[0].samples == [0, 1, 2, 3, 4]
    assert len(report.notes) == 1 and "dataset 'a': bucket 96x64@17 has 2 sample(s)" in report.notes[0]
    report.write()
    assert json.loads(report.path.read_text())["notes"] == report.notes

    report = data.Report(tmp_path / "data_report.json", False)
    kept = data.make_buckets(samples, datasets, 4, False, report)
    assert [b.shape for b in kept] == [(64, 64, 17), (96, 64, 17)] and report.notes == []
    batches = data.epoch_plan(kept, datasets, 4, seed=0, epoch=0)
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)  # 5 -> one full batch, 2 -> topped up
    small = next(b for b in batches if shapes_of(b, samples) == {(96, 64, 17)})
    assert Counter(small) == {5: 2, 6: 2}

    repeated = plan_datasets(a=(1, 1.0))  # 2 samples x 2 passes fill a batch of 4: kept
    assert len(data.make_buckets(samples, repeated, 4, True, data.Report(tmp_path / "r.json", False))) == 2


def test_repeats_add_passes_per_epoch():
    samples = fake_samples("a", (64, 64, 17), 8)
    for repeats, expected in ((0, 2), (1, 4), (2, 6)):
        datasets = plan_datasets(a=(repeats, 1.0))
        buckets = data.make_buckets(samples, datasets, 4, True, data.Report(Path("unused.json"), False))
        batches = data.epoch_plan(buckets, datasets, 4, seed=0, epoch=0)
        assert len(batches) == expected and all(len(b) == 4 for b in batches)
        assert Counter(i for b in batches for i in b) == {i: 1 + repeats for i in range(8)}


def test_every_batch_holds_one_shape():
    samples = (fake_samples("a", (64, 64, 17), 7) + fake_samples("a", (96, 64, 17), 6) +
               fake_samples("a", (64, 64, 9), 5))
    datasets = plan_datasets(a=(0, 1.0))
    buckets = data.make_buckets(samples, datasets, 3, True, data.Report(Path("unused.json"), False))
    batches = data.epoch_plan(buckets, datasets, 3, seed=0, epoch=0)
    assert len(batches) == 2 + 2 + 1 and all(len(b) == 3 for b in batches)
    assert all(len(shapes_of(b, samples)) == 1 for b in batches)
    assert len({frozenset(shapes_of(b, samples)) for b in batches}) == 3
    assert len({i for b in batches for i in b}) == 15  # no sample twice without repeats


def test_plan_is_a_pure_function_of_seed_and_epoch():
    samples = fake_samples("a", (64, 64, 17), 30) + fake_samples("b", (96, 64, 17), 20)
    datasets = plan_datasets(a=(0, 1.0), b=(1, 2.0))
    buckets = data.make_buckets(samples, datasets, 2, True, data.Report(Path("unused.json"), False))
    torch.manual_seed(1)
    random.seed(1)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    plan_a = data.epoch_plan(buckets, datasets, 2, seed=7, epoch=3)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state  # draws nothing
    torch.manual_seed(2)
    random.seed(2)
    assert data.epoch_plan(buckets, datasets, 2, seed=7, epoch=3) == plan_a
    assert data.epoch_plan(buckets, datasets, 2, seed=7, epoch=4) != plan_a
    assert data.epoch_plan(buckets, datasets, 2, seed=8, epoch=3) != plan_a
    assert len(plan_a) == 15 + 20


def test_batches_are_shuffled_within_and_across_buckets():
    samples = fake_samples("a", (64, 64, 17), 12) + fake_samples("a", (96, 64, 17), 12)
    datasets = plan_datasets(a=(0, 1.0))
    buckets = data.make_buckets(samples, datasets, 3, True, data.Report(Path("unused.json"), False))
    epochs = [data.epoch_plan(buckets, datasets, 3, seed=0, epoch=e) for e in range(2)]
    # each epoch cuts the buckets into other batches...
    assert {frozenset(b) for b in epochs[0]} != {frozenset(b) for b in epochs[1]}
    for batches in epochs:  # ...and the two shapes take turns instead of one bucket after the other
        shapes = [next(iter(shapes_of(b, samples))) for b in batches]
        assert len(shapes) == 8 and sum(a != b for a, b in zip(shapes, shapes[1:])) >= 2, shapes


def test_probability_zero_is_never_drawn_and_three_to_one_mixes_early():
    samples = fake_samples("a", (64, 64, 17), 1000) + fake_samples("b", (64, 64, 17), 1000)
    report = data.Report(Path("unused.json"), False)
    datasets = plan_datasets(a=(0, 1.0), b=(0, 0.0))
    batches = data.epoch_plan(data.make_buckets(samples, datasets, 1, True, report), datasets, 1, seed=0, epoch=0)
    assert len(batches) == 1000 and all(samples[i].dataset == "a" for b in batches for i in b)

    datasets = plan_datasets(a=(0, 3.0), b=(0, 1.0))
    batches = data.epoch_plan(data.make_buckets(samples, datasets, 1, True, report), datasets, 1, seed=0, epoch=0)
    assert len(batches) == 2000  # every batch is used once, whatever the mix
    early = [samples[b[0]].dataset for b in batches[:400]]
    assert 0.68 < early.count("a") / 400 < 0.82, early.count("a")  # 3:1 -> 0.75


def test_load_batch_stacks_the_cached_tensors(tmp_path):
    samples = fake_samples("a", (64, 64, 17), 2)
    samples[0].i2v = True
    for i, s in enumerate(samples):
        s.latent_file, s.text_file = tmp_path / f"latent{i}.safetensors", tmp_path / f"text{i}.safetensors.gz"
        data.write_cache_file({"latents": torch.full((8, 3, 2, 2), float(i))}, s.latent_file)
        data.write_cache_file({"prompt_embeds": torch.full((16, 4), float(i)),
                               "prompt_attention_mask": torch.ones(16, dtype=torch.int64)}, s.text_file)
    batch = data.load_batch(samples)
    assert set(batch) == {"latents", "prompt_embeds", "prompt_attention_mask", "i2v"}
    assert batch["latents"].shape == (2, 8, 3, 2, 2) and batch["latents"][:, 0, 0, 0, 0].tolist() == [0.0, 1.0]
    assert batch["prompt_embeds"].shape == (2, 16, 4) and batch["prompt_embeds"][1, 0, 0] == 1.0
    assert batch["prompt_attention_mask"].shape == (2, 16) and batch["prompt_attention_mask"].dtype == torch.int64
    assert batch["i2v"].dtype == torch.bool and batch["i2v"].tolist() == [True, False]


def test_planned_clips_end_to_end_to_a_batch(tmp_path):
    samples, datasets, report = cache_setup(tmp_path)
    samples[1].i2v = False
    run_cache(samples, datasets, report)
    samples = data.cached(samples)
    buckets = data.make_buckets(samples, datasets, 2, True, report)
    batches = data.epoch_plan(buckets, datasets, 2, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    batch = data.load_batch([samples[i] for i in batches[0]])
    assert batch["latents"].shape == (2, 3, 3, 2, 2) and batch["prompt_embeds"].shape == (2, 16, 8)
    assert batch["i2v"].tolist() == [samples[i].i2v for i in batches[0]]


def test_resolution_frames_skips_clips_that_round_below_min_frames(tmp_path):
    # 12 frames at frame_interval 16 round down to 1 frame: below min_frames 9, so skipped, not a 1-frame "video"
    folder = tmp_path / "clips"
    folder.mkdir()
    data.write_video(folder / "short.mp4", np.zeros((12, 64, 64, 3), np.uint8), 25, codec="mpeg4")
    (folder / "short.txt").write_text("short")
    ds = data.Dataset(id="d", instance_data_dir=str(folder), num_frames=9, min_frames=9,
                      bucket_strategy="resolution_frames", frame_interval=16)
    report = data.Report(tmp_path / "report.json", quarantine=False)
    assert data.plan_samples(ds, 2, 0, report) == []
    assert "round down to 1" in report.problems[0]["problem"]


def test_all_zero_probabilities_are_refused():
    entries = [{"id": "a", "instance_data_dir": "x", "probability": 0}, {"id": "b", "instance_data_dir": "y", "probability": 0}]
    with pytest.raises(SystemExit, match="probability 0"):
        config.parse_datasets(entries, "cfg", log=lambda m: None)


def test_too_little_free_disk_stops_before_any_encoding(tmp_path, monkeypatch):
    folder = tmp_path / "clips"
    folder.mkdir()
    data.write_video(folder / "a.mp4", np.zeros((17, 64, 96, 3), np.uint8), 25, codec="mpeg4")
    (folder / "a.txt").write_text("a")
    ds = data.Dataset(id="d", instance_data_dir=str(folder), num_frames=17, resolution=64, resolution_type="pixel")
    report = data.Report(tmp_path / "r.json", quarantine=False)
    samples = data.plan_samples(ds, 2, 0, report)
    calls = []
    encode_video = lambda v: calls.append(v) or v[:, :, ::8, ::32, ::32]
    encode_text = lambda c: calls.append(c) or (torch.zeros(len(c), 4, 2), torch.ones(len(c), 4))
    real = data.shutil.disk_usage
    monkeypatch.setattr(data.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(data.DataError, match=r"caching needs about .* GB in .* but only 0.0 GB are free"):
        data.cache_samples(samples, {"d": ds}, encode_video, encode_text, {"model": "v"}, {"model": "t"}, None, False, 1, 8, report, LTX)
    assert calls == []  # refused before encoding anything
    monkeypatch.setattr(data.shutil, "disk_usage", real)
    data.cache_samples(samples, {"d": ds}, encode_video, encode_text, {"model": "v"}, {"model": "t"}, None, False, 1, 8, report, LTX)
    assert len(calls) == 2 and data.cached(samples) == samples


def test_free_space_is_estimated_from_the_shape_it_is_handed(tmp_path, monkeypatch):
    sample = data.Sample("d", tmp_path / "a.mp4", "a", 96, 64, 17, latent_file=tmp_path / "latents/a.safetensors")
    text_file = tmp_path / "text/a.safetensors"
    free, usage = {}, data.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(data.shutil, "disk_usage", lambda folder: usage._replace(free=free[folder]))

    def fits(shape: data.CacheShape, latent_bytes: int, text_bytes: int) -> bool:
        free.update({sample.latent_file.parent: latent_bytes, text_file.parent: text_bytes})
        try:
            data.check_free_space([sample], {text_file}, shape)
            return True
        except data.DataError:
            return False

    plenty = 10 ** 12
    # LTX: (17 - 1) / 8 + 1 = 3 latent frames of 64/32 x 96/32 = 18 latent pixels, 128 channels; 128 x 4096 T5
    # numbers and the mask; 4 bytes each
    cases = [(LTX, 18 * 128 * 4, 128 * 4097 * 4),
             (dataclasses.replace(LTX, latent_channels=256), 18 * 256 * 4, 128 * 4097 * 4),
             (dataclasses.replace(LTX, spatial=16, temporal=4), 5 * 4 * 6 * 128 * 4, 128 * 4097 * 4),
             (dataclasses.replace(LTX, text_tokens=64, text_dim=768), 18 * 128 * 4, 64 * 769 * 4)]
    for shape, latent_bytes, text_bytes in cases:
        assert fits(shape, latent_bytes, plenty) and not fits(shape, latent_bytes - 1, plenty), shape
        assert fits(shape, plenty, text_bytes) and not fits(shape, plenty, text_bytes - 1), shape
