"""Unit tests for data.py: rounding, discovery, decoding, the synthetic set, the cache and the batch order."""

import os
import re

import numpy as np
import pytest
import torch

import data

W, H, FRAMES = 64, 64, 17  # small synthetic clips keep the whole file fast


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> list[data.Clip]:
    return data.make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n=4, num_frames=FRAMES, width=W, height=H, seed=0)


def band_video(width: int, height: int, vertical: bool) -> np.ndarray:
    """4 frames of four equal bands: green | red | blue | green (left to right, or top to bottom)."""
    colors = np.array([(0, 255, 0), (255, 0, 0), (0, 0, 255), (0, 255, 0)], np.uint8)
    along = height if vertical else width
    bands = colors[np.arange(along) * 4 // along]  # [along, 3]
    frame = np.broadcast_to(bands[:, None] if vertical else bands[None], (height, width, 3))
    return np.stack([frame] * 4)


# -----------------------------------------------------------------------------
# rounding

@pytest.mark.parametrize("size, expected", [((100, 70), (96, 64)), ((768, 512), (768, 512)), ((20, 33), (32, 32)), ((1920, 1080), (1920, 1056))])
def test_round_resolution(size, expected):
    assert data.round_resolution(*size) == expected


@pytest.mark.parametrize("frames, expected", [(30, 25), (17, 17), (8, 1), (9, 9), (1, 1), (0, 1), (128, 121), (121, 121)])
def test_round_frames(frames, expected):
    assert data.round_frames(frames) == expected


# -----------------------------------------------------------------------------
# discovery

def test_find_clips_sorted_case_insensitive_stripped(tmp_path):
    for stem, ext in [("b", ".MP4"), ("a", ".mov"), ("c", ".webm")]:
        (tmp_path / f"{stem}{ext}").write_bytes(b"not decoded by find_clips")
        (tmp_path / f"{stem}.txt").write_text(f"  caption {stem}\n\n")
    (tmp_path / "notes.txt").write_text("a caption without a video is ignored")
    (tmp_path / "frame.png").write_bytes(b"not a video")
    clips = data.find_clips(tmp_path)
    assert [c.video.name for c in clips] == ["a.mov", "b.MP4", "c.webm"]
    assert [c.caption for c in clips] == ["caption a", "caption b", "caption c"]


def test_find_clips_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        data.find_clips(missing)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        data.find_clips(tmp_path)  # exists but holds no videos
    (tmp_path / "x.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "x.mp4"))):
        data.find_clips(tmp_path)


# -----------------------------------------------------------------------------
# decoding

def test_write_then_load_keeps_frame_count_and_range(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)
    data.write_video(tmp_path / "noise.mp4", frames, fps=25)
    video = data.load_frames(tmp_path / "noise.mp4", 9, 48, 32)
    assert video.shape == (3, 9, 32, 48) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert video.min() < -0.8 and video.max() > 0.8  # uses the whole range, not e.g. [0, 1]


@pytest.mark.parametrize("vertical", [False, True])
def test_load_frames_covers_then_center_crops(tmp_path, vertical):
    # a 2:1 (or 1:2) clip cropped to a square must keep the two middle bands (red, blue) only;
    # squashing would show the green outer bands, a corner crop would show green and red
    size = (64, 128) if vertical else (128, 64)
    data.write_video(tmp_path / "bands.mp4", band_video(*size, vertical=vertical), fps=25)
    video = data.load_frames(tmp_path / "bands.mp4", 4, 32, 32)  # also downscales by 2
    assert video.shape == (3, 4, 32, 32)
    frame = video[:, 0] if not vertical else video[:, 0].transpose(1, 2)  # bands now run left to right
    red, blue = frame[:, 16, 4], frame[:, 16, 27]
    assert red[0] > 0.7 and red[1] < -0.7 and red[2] < -0.7, red
    assert blue[2] > 0.7 and blue[0] < -0.7 and blue[1] < -0.7, blue
    assert frame[1, :, 2:30].max() < -0.5  # no green anywhere away from the edges
    # the red/blue border sits in the middle
    assert frame[0, 16, 14] > 0 and frame[0, 16, 17] < 0


def test_too_short_clip_names_file_and_counts(tmp_path):
    path = tmp_path / "short_clip.mp4"
    data.write_video(path, np.zeros((9, 32, 32, 3), np.uint8), fps=25)
    with pytest.raises(ValueError, match="short_clip.mp4") as error:
        data.load_frames(path, 17, 32, 32)
    assert "9" in str(error.value) and "17" in str(error.value)


def test_undecodable_file_names_file(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"this is not a video" * 100)
    with pytest.raises(ValueError, match="broken.mp4"):
        data.load_frames(path, 1, 32, 32)


# -----------------------------------------------------------------------------
# the synthetic dataset

def test_synthetic_is_deterministic(synthetic, tmp_path):
    same = data.make_synthetic_dataset(tmp_path / "same", n=4, num_frames=FRAMES, width=W, height=H, seed=0)
    other = data.make_synthetic_dataset(tmp_path / "other", n=4, num_frames=FRAMES, width=W, height=H, seed=1)
    assert [c.caption for c in same] == [c.caption for c in synthetic]
    assert [c.caption for c in other] != [c.caption for c in synthetic]
    for a, b, c in zip(synthetic, same, other):
        va = data.load_frames(a.video, FRAMES, W, H)
        assert torch.equal(va, data.load_frames(b.video, FRAMES, W, H))
        assert not torch.equal(va, data.load_frames(c.video, FRAMES, W, H))


def test_synthetic_reuses_existing_clips(synthetic):
    folder = synthetic[0].video.parent
    mtimes = [c.video.stat().st_mtime_ns for c in synthetic]
    again = data.make_synthetic_dataset(folder, n=4, seed=123)  # another seed: still the existing clips
    assert again == synthetic
    assert [c.video.stat().st_mtime_ns for c in again] == mtimes
    assert not list(folder.glob("*.tmp"))


def test_synthetic_shape_moves_as_captioned(synthetic):
    pattern = re.compile(r"an? (\w+) (circle|square|triangle) moving (left|right|up|down) on an? [a-z ]+ background")
    for clip in synthetic:
        match = pattern.fullmatch(clip.caption)
        assert match, clip.caption
        video = data.load_frames(clip.video, FRAMES, W, H)
        first, last = video[:, 0], video[:, -1]
        assert (first - last).abs().mean() > 0.05  # frames differ substantially, not by codec noise

        def centre(frame: torch.Tensor) -> torch.Tensor:
            # shapes are bright (a channel >= 200/255), backgrounds dark: threshold the brightest channel
            y, x = torch.nonzero(frame.max(0).values > 0.45, as_tuple=True)
            return torch.stack([x.float().mean(), y.float().mean()])

        dx, dy = (centre(last) - centre(first)).tolist()
        direction = match.group(3)
        moved = {"left": -dx / W, "right": dx / W, "up": -dy / H, "down": dy / H}[direction]
        assert moved > 0.4, (clip.caption, dx, dy)  # crosses a good part of the frame the captioned way


# -----------------------------------------------------------------------------
# the cache

class FakeEncoders:
    """Counting stand-ins for the VAE and T5 whose outputs identify their inputs."""

    def __init__(self):
        self.videos: list[torch.Tensor] = []
        self.captions: list[str] = []

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        assert video.dim() == 5 and video.shape[:2] == (1, 3)
        self.videos.append(video)
        return video[:, :, ::8, ::32, ::32].clone()  # [1, 3, f, h, w] at the VAE's compression

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        assert not torch.is_grad_enabled()
        self.captions += captions
        embeds = torch.stack([torch.full((8, 4), float(len(c))) for c in captions])
        return embeds, torch.ones(len(captions), 8, dtype=torch.int64)


def run_cache(clips, cache_dir, width=W):
    fake = FakeEncoders()
    paths = data.build_cache(clips, cache_dir, fake.encode_video, fake.encode_text, FRAMES, width, H, "vae-test")
    return fake, paths


def test_cache_files_hold_the_right_tensors(synthetic, tmp_path):
    fake, paths = run_cache(synthetic, tmp_path)
    assert len(fake.videos) == len(synthetic)
    assert sorted(fake.captions) == sorted([""] + [c.caption for c in synthetic])
    assert len(paths) == len(synthetic) and len(set(paths)) == len(paths)
    for clip, path in zip(synthetic, paths):  # clip order: file i holds clip i
        cached = data.load_cached(path)
        assert set(cached) == {"latents", "prompt_embeds", "prompt_attention_mask"}
        assert cached["latents"].shape == (3, (FRAMES - 1) // 8 + 1, H // 32, W // 32)
        assert torch.equal(cached["latents"], data.load_frames(clip.video, FRAMES, W, H)[:, ::8, ::32, ::32])
        assert cached["prompt_embeds"].shape == (8, 4) and cached["prompt_attention_mask"].shape == (8,)
        assert cached["prompt_embeds"][0, 0] == len(clip.caption)
    empty = data.load_cached(data.empty_prompt_file(tmp_path, "vae-test"))
    assert empty["prompt_embeds"].shape == (8, 4) and empty["prompt_embeds"][0, 0] == 0
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_recomputes_only_what_changed(synthetic, tmp_path):
    fake, first = run_cache(synthetic, tmp_path)
    assert len(fake.videos) == len(synthetic)

    fake, second = run_cache(synthetic, tmp_path)
    assert second == first and fake.videos == [] and fake.captions == []

    touched = synthetic[1].video
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    fake, third = run_cache(synthetic, tmp_path)
    assert len(fake.videos) == 1 and fake.captions == [synthetic[1].caption]
    assert [a != b for a, b in zip(first, third)] == [False, True, False, False]

    recaptioned = [data.Clip(c.video, c.caption + " at night") if i == 2 else c for i, c in enumerate(synthetic)]
    fake, fourth = run_cache(recaptioned, tmp_path)
    assert len(fake.videos) == 1 and fake.captions == [recaptioned[2].caption]
    assert [a != b for a, b in zip(third, fourth)] == [False, False, True, False]

    fake, wider = run_cache(synthetic, tmp_path, width=2 * W)
    assert len(fake.videos) == len(synthetic) and "" not in fake.captions  # the empty prompt is kept
    assert not set(wider) & set(third)
    assert data.load_cached(wider[0])["latents"].shape[-1] == 2 * W // 32


def test_interrupted_cache_keeps_finished_clips(synthetic, tmp_path):
    fake = FakeEncoders()

    def crash_on_third(video: torch.Tensor) -> torch.Tensor:
        if len(fake.videos) == 2:
            raise KeyboardInterrupt
        return fake.encode_video(video)

    with pytest.raises(KeyboardInterrupt):
        data.build_cache(synthetic, tmp_path, crash_on_third, fake.encode_text, FRAMES, W, H, "vae-test")
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 + 2  # the empty prompt and two clips, nothing half-written
    fake, paths = run_cache(synthetic, tmp_path)
    assert len(fake.videos) == len(synthetic) - 2
    assert all(p.exists() for p in paths)


def test_crash_while_writing_leaves_no_valid_looking_file(synthetic, tmp_path, monkeypatch):
    def write_half_then_die(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(data, "save_file", write_half_then_die)
    with pytest.raises(OSError):
        run_cache(synthetic, tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    monkeypatch.undo()
    fake, paths = run_cache(synthetic, tmp_path)
    assert len(fake.videos) == len(synthetic) and all(p.exists() for p in paths)


# -----------------------------------------------------------------------------
# batching

def test_epoch_batches_drop_partial_and_cover_once():
    batches = data.epoch_batches(10, 3, seed=0, epoch=0)
    assert len(batches) == 3 and all(len(b) == 3 for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))


def test_epoch_batches_deterministic_and_independent_of_global_rng():
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = data.epoch_batches(50, 4, seed=7, epoch=3)
    assert torch.equal(torch.get_rng_state(), state)  # draws nothing from the global generator
    torch.manual_seed(2)
    assert data.epoch_batches(50, 4, seed=7, epoch=3) == a
    assert data.epoch_batches(50, 4, seed=7, epoch=4) != a
    assert data.epoch_batches(50, 4, seed=8, epoch=3) != a


def test_epoch_batches_too_few_items_is_an_error():
    with pytest.raises(ValueError, match="3 items"):
        data.epoch_batches(3, 4, seed=0, epoch=0)


def test_collate_stacks_each_key():
    items = [{"latents": torch.full((2, 3), float(i)), "mask": torch.ones(5, dtype=torch.int64)} for i in range(3)]
    batch = data.collate(items)
    assert batch["latents"].shape == (3, 2, 3) and batch["mask"].shape == (3, 5)
    assert batch["latents"][:, 0, 0].tolist() == [0.0, 1.0, 2.0]
