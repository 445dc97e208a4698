"""A mixed folder as users bring it, trained end to end: several aspect ratios and lengths, an image
dataset, broken files; both bucket strategies; a mid-epoch resume; a second run over a full cache."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import prepare
import ranks
from conftest import read_log, run_in_process


def moving_bar(frames: int, width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    video = np.zeros((frames, height, width, 3), np.uint8)
    video[:] = rng.integers(0, 80, 3, dtype=np.uint8)
    for i in range(frames):
        x = int(i / max(1, frames - 1) * (width - 16))
        video[i, :, x:x + 16] = rng.integers(150, 255, 3, dtype=np.uint8)
    return video


@pytest.fixture(scope="module")
def mixed(tiny_pipeline_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    (root / "tiny-ltx").symlink_to(tiny_pipeline_dir)
    videos, images = root / "videos", root / "images"
    videos.mkdir()
    images.mkdir()
    clips = [(160, 96, 33), (160, 96, 33), (150, 90, 41), (96, 160, 25), (96, 160, 25), (96, 160, 34),
             (128, 128, 41), (128, 128, 41), (128, 128, 17), (96, 64, 9)]  # the last is too short
    for i, (w, h, f) in enumerate(clips):
        data.write_video(videos / f"clip_{i}.mp4", moving_bar(f, w, h, i), 25, codec="mpeg4")
        (videos / f"clip_{i}.txt").write_text(f"a bright bar sliding right, clip {i}")
    (videos / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (videos / "corrupt.txt").write_text("noise")
    (videos / "zero.mp4").write_bytes(b"")
    (videos / "zero.txt").write_text("nothing")
    (videos / "notes.mov").write_text("this is a text file with a video extension")
    (videos / "notes.txt").write_text("notes")
    for i, (w, h) in enumerate([(100, 70), (100, 70), (64, 96), (64, 96)]):
        pixels = np.random.default_rng(10 + i).integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"still_{i}.png")
        (images / f"still_{i}.txt").write_text(f"a still picture number {i}")
    return root


def run_config(root: Path, out: Path, strategy: str, steps: int) -> Path:
    path = out.parent / f"{out.name}.toml"
    path.write_text(f'''
pretrained_model_name_or_path = "{root / 'tiny-ltx'}"
output_dir = "{out}"
device = "cpu"
mixed_precision = "no"
base_model_default_dtype = "fp32"
gradient_checkpointing = false
train_batch_size = 2
max_train_steps = {steps}
learning_rate = 1e-3
checkpoint_step_interval = 3
checkpoints_total_limit = 0
vae_batch_size = 2
lora_rank = 4

[[datasets]]
id = "clips"
instance_data_dir = "{root / 'videos'}"
resolution = 96
resolution_type = "pixel_area"
crop = true
video = {{ num_frames = 25, min_frames = 17, bucket_strategy = "{strategy}", frame_interval = 8 }}

[[datasets]]
id = "stills"
dataset_type = "image"
instance_data_dir = "{root / 'images'}"
resolution = 64
resolution_type = "pixel"
probability = 0.5

[[datasets]]
id = "text"
dataset_type = "text_embeds"
default = true
cache_dir = "{root / 'text-cache'}"
''')
    return path


@pytest.mark.parametrize("strategy", ["aspect_ratio", "resolution_frames"])
def test_mixed_folder_trains_resumes_mid_epoch_and_reuses_the_cache(mixed, tmp_path, strategy):
    out = tmp_path / "run"
    first = run_in_process(tmp_path, "train.py", str(run_config(mixed, out, strategy, steps=6)))

    report = json.loads((out / "data_report.json").read_text())
    skipped = {Path(p["file"]).name: p["problem"] for p in report["skipped"]}
    assert set(skipped) == {"corrupt.mp4", "zero.mp4", "notes.mov", "clip_9.mp4"}, skipped
    assert "too short" in skipped["clip_9.mp4"] and "0 bytes" in skipped["zero.mp4"]
    assert "skipped 4 unusable file(s)" in first.stdout

    log = read_log(out / "log.jsonl")
    buckets = {r["bucket"] for r in log}
    assert len(log) == 6 and all(np.isfinite(r["loss"]) for r in log)
    if strategy == "aspect_ratio":  # every clip at 25 frames (17 for the 17-frame one), images at 1
        assert all(b.endswith(("@25", "@17", "@1")) for b in buckets), buckets
    else:  # each clip keeps its own length, rounded down to 1 + 8k
        assert all(int(b.split("@")[1]) in (1, 17, 25, 33, 41) for b in buckets), buckets
    meta = json.loads((out / "checkpoints/step-3/meta.json").read_text())
    assert meta["data_cursor"]["batch"] > 0  # step 3 is mid-epoch: the resume below starts inside an epoch

    # resume from step 3 in a fresh folder: steps 4-6 see the same batches and noise, bit for bit
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints/step-3", resumed / "checkpoints/step-3")
    second = run_in_process(tmp_path, "train.py", str(run_config(mixed, resumed, strategy, steps=6)),
                            "--resume_from_checkpoint=latest")
    again = read_log(resumed / "log.jsonl")
    assert [(r["step"], r["bucket"], r["loss"]) for r in again] == [(r["step"], r["bucket"], r["loss"]) for r in log[3:]]
    from safetensors.torch import load_file
    a, b = load_file(out / "lora.safetensors"), load_file(resumed / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the second run found every latent and caption cached: nothing was encoded again
    assert "caching latents" in first.stderr
    assert "caching latents" not in second.stderr and "caching text" not in second.stderr


def test_a_run_whose_every_bucket_is_pruned_stops_with_a_clear_message(mixed, tmp_path):
    cfg = config.parse_config([str(run_config(mixed, tmp_path / "pruned", "aspect_ratio", steps=1)), "--train_batch_size=6"])
    cfg.datasets[1]["repeats"] = 1  # 4 stills x 2 passes fill a batch of 6, but each 2-still bucket cannot
    with pytest.raises(SystemExit, match="pruned; lower train_batch_size or set disable_bucket_pruning"):
        prepare.prepare_data(cfg, ranks.Dist(), torch.device("cpu"), tmp_path / "pruned")
    cfg.disable_bucket_pruning = True
    samples, _, buckets, *_ = prepare.prepare_data(cfg, ranks.Dist(), torch.device("cpu"), tmp_path / "kept")
    assert len(buckets) >= 4 and all(len(b.samples) < 6 for b in buckets)
