"""CREPA (crepa.py): the loss against numbers worked out by hand, the pixel-to-latent frame mapping and token order
of the features, the block hook and head through the real transformer with LoRA (with and without gradient
checkpointing), the feature cache in data.py, and demo.py's tiny DINOv2. Tiny random models only, nothing downloaded."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import crepa
import data
import demo
import lora
import model as ltx
from conftest import tiny_diffusers_transformer


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return demo.tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "dinov2")


# -----------------------------------------------------------------------------
# The loss

def test_crepa_loss_matches_the_formula_worked_by_hand():
    # grid (3 frames, 1 x 2 tokens), D = 2. Lengths differ on purpose: only directions count.
    # projected: frames 0 and 1 point along x, frame 2 along y
    projected = torch.tensor([[[2.0, 0], [5, 0], [1, 0], [3, 0], [0, 4], [0, 1]]])
    # features: frame 0 along x at both tokens, frame 1 x then y, frame 2 y at both
    features = torch.tensor([[[3.0, 0], [1, 0], [7, 0], [0, 2], [0, 1], [0, 9]]], dtype=torch.float16)
    # cos(f, g), each the mean of two token cosines:
    #   cos(0, 0) = 1, cos(0, 1) = (1 + 0) / 2 = 0.5, cos(0, 2) = 0
    #   cos(1, 0) = 1, cos(1, 1) = 0.5,               cos(1, 2) = 0
    #   cos(2, 0) = 0, cos(2, 1) = (0 + 1) / 2 = 0.5, cos(2, 2) = 1
    # d = 0: L = −(1 + 0.5 + 1) / 3
    assert crepa.crepa_loss(projected, features, (3, 1, 2), distance=0, tau=1.0).item() == pytest.approx(-2.5 / 3)
    # d = 1, τ = 1: frame 0 adds e⁻¹·cos(0, 1) = 0.5/e, frame 1 adds e⁻¹·(cos(1, 0) + cos(1, 2)) = 1/e,
    # frame 2 adds e⁻¹·cos(2, 1) = 0.5/e:  L = −(2.5 + 2/e) / 3
    expected = -(2.5 + 2 / math.e) / 3
    assert crepa.crepa_loss(projected, features, (3, 1, 2), distance=1, tau=1.0).item() == pytest.approx(expected)
    # d = 2, τ = 2: frame 0 adds e^(−1/2)·0.5 + e⁻¹·0, frame 1 e^(−1/2)·(1 + 0), frame 2 e⁻¹·0 + e^(−1/2)·0.5
    expected = -(2.5 + 2 * math.exp(-0.5)) / 3
    assert crepa.crepa_loss(projected, features, (3, 1, 2), distance=2, tau=2.0).item() == pytest.approx(expected)
    # a batch of two copies is the same mean
    twice = crepa.crepa_loss(projected.repeat(2, 1, 1), features.repeat(2, 1, 1), (3, 1, 2), 1, 1.0)
    assert twice.item() == pytest.approx(-(2.5 + 2 / math.e) / 3)


# -----------------------------------------------------------------------------
# Features: where each latent frame's come from, and in which order

class PatchMeans(nn.Module):
    """A stand-in DINOv2 whose patch tokens are the mean of each 14 x 14 patch (D = 3), after a CLS token."""
    config = SimpleNamespace(patch_size=14)

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # frame_features reads the device and dtype from a parameter

    def forward(self, pixel_values):
        tokens = F.avg_pool2d(pixel_values, 14).flatten(2).transpose(1, 2)
        return SimpleNamespace(last_hidden_state=torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1))


def test_features_are_the_latent_cells_own_pixels_in_pack_latents_order():
    # 17 frames of 56 x 84 px: at image_size 69 (area ≈ 56·84) no resize, 4 x 6 patches pooled 2 x 2 to the
    # latent grid (3, 2, 3), so every feature is exactly its 28 x 28 cell's normalised colour
    gen = torch.Generator().manual_seed(0)
    cells = torch.rand(2, 3, 17, 2, 3, generator=gen) * 2 - 1  # [B, 3, F, h, w] a colour per cell and frame
    video = cells.repeat_interleave(28, dim=3).repeat_interleave(28, dim=4)
    features = crepa.frame_features(PatchMeans(), video, image_size=69, grid=(3, 2, 3))
    assert features.shape == (2, 3 * 2 * 3, 3) and features.dtype == torch.float16
    mean, std = torch.tensor(crepa.IMAGENET_MEAN).view(3, 1, 1, 1), torch.tensor(crepa.IMAGENET_STD).view(3, 1, 1, 1)
    normalised = ((cells + 1) / 2 - mean) / std
    latent = torch.stack([normalised[:, :, 0], normalised[:, :, 1:9].mean(2), normalised[:, :, 9:17].mean(2)], dim=2)
    torch.testing.assert_close(features.float(), ltx.pack_latents(latent), atol=2e-3, rtol=2e-3)


def test_latent_frame_0_sees_pixel_frame_0_alone_and_frame_j_the_next_eight(dinov2_dir):
    encoder = crepa.load_encoder(str(dinov2_dir), "cpu")
    video = torch.rand(1, 3, 17, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    grid = (3, 2, 3)  # what the VAE makes of 17 x 64 x 96: (17 − 1) / 8 + 1 frames of 64/32 x 96/32
    base = crepa.frame_features(encoder, video, 40, grid).float()  # 28 x 42 px: a non-square DINOv2 input
    assert base.shape == (1, 18, 32) and base.abs().sum() > 0
    for pixel_frame, latent_frame in [(0, 0), (1, 1), (8, 1), (9, 2), (16, 2)]:
        changed = video.clone()
        changed[:, :, pixel_frame] = -changed[:, :, pixel_frame]
        diff = (crepa.frame_features(encoder, changed, 40, grid).float() - base).abs().unflatten(1, (3, -1))
        moved = [bool(diff[:, j].max() > 1e-2) for j in range(3)]
        assert moved == [j == latent_frame for j in range(3)], (pixel_frame, moved)
    with pytest.raises(ValueError, match="16 pixel frames do not make 3 latent frames"):
        crepa.frame_features(encoder, video[:, :, :16], 40, grid)


def test_encoder_size_keeps_the_aspect_in_whole_patches():
    assert crepa.encoder_size(480, 832, 518, 14) == (392, 686)  # 28 x 49 patches: 392·686 ≈ 518²
    assert crepa.encoder_size(64, 64, 224, 14) == (224, 224)
    assert crepa.encoder_size(1000, 10, 20, 14) == (196, 14)  # never less than one patch a side


# -----------------------------------------------------------------------------
# The hook and the head through the real transformer with LoRA

def lora_transformer() -> ltx.LTXTransformer:
    ref = tiny_diffusers_transformer()  # heads 2 x 8: width 16, 2 blocks
    ours = ltx.LTXTransformer(ltx.config_from_json(dict(ref.config)))
    ours.load_state_dict(ref.state_dict())
    lora.inject(ours, rank=4)
    with torch.no_grad():  # B = 0 would leave lora_A without gradient
        for p in lora.lora_parameters(ours):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    return ours


def crepa_gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    transformer, head = lora_transformer(), crepa.ProjectionHead(16, 5, hidden=12)
    transformer.gradient_checkpointing = checkpointing
    block = crepa.BlockOutput(transformer, 0)  # block 0 is the one checkpointing recomputes
    gen = torch.Generator().manual_seed(7)
    x, text = torch.randn(2, 3 * 2 * 4, 8, generator=gen), torch.randn(2, 5, 12, generator=gen)
    features = torch.randn(2, 24, 5, generator=gen).half()
    transformer(x, text, torch.tensor([250.0, 800.0]), torch.ones(2, 5, dtype=torch.bool), 3, 2, 4, (8 / 25, 32, 32))
    loss = crepa.crepa_loss(head(block.pop()), features, (3, 2, 4), distance=1, tau=1.0)
    loss.backward()
    assert block.output is None  # the recompute in backward kept nothing
    frozen = [n for n, p in transformer.named_parameters() if not p.requires_grad]
    assert frozen and all(transformer.get_parameter(n).grad is None for n in frozen)
    block.remove()
    named = {f"head.{n}": p for n, p in head.named_parameters()}
    named.update({n: p for n, p in transformer.named_parameters() if p.requires_grad})
    return {n: p.grad for n, p in named.items()}


def test_block_output_sends_gradient_to_lora_and_head_alike_with_checkpointing():
    plain, checkpointed = crepa_gradients(False), crepa_gradients(True)
    assert plain.keys() == checkpointed.keys()
    block0 = [n for n in plain if n.startswith("transformer_blocks.0.") and "lora" in n]
    assert block0 and all(plain[n] is not None and plain[n].abs().sum() > 0 for n in block0)
    assert all(plain[n] is not None and plain[n].abs().sum() > 0 for n in plain if n.startswith("head."))
    # blocks after the hooked one do not shape its output: no gradient reaches them
    assert all(plain[n] is None for n in plain if n.startswith("transformer_blocks.1."))
    for n in plain:
        if plain[n] is not None:
            torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7)


def test_block_output_keeps_nothing_without_gradients_and_checks_its_index():
    transformer = lora_transformer()
    with pytest.raises(ValueError, match="crepa_block_index 2 is out of range: the transformer has 2 blocks"):
        crepa.BlockOutput(transformer, 2)
    block = crepa.BlockOutput(transformer, 1)
    args = (torch.randn(1, 4, 8), torch.randn(1, 5, 12), torch.tensor([500.0]), torch.ones(1, 5, dtype=torch.bool),
            1, 2, 2, (8 / 25, 32, 32))
    with torch.no_grad():  # validation: nothing kept
        transformer(*args)
    assert block.output is None
    transformer(*args)
    assert block.pop().shape == (1, 4, 16) and block.output is None
    with pytest.raises(RuntimeError, match="no block output"):
        block.pop()
    block.remove()
    transformer(*args)
    assert block.output is None


# -----------------------------------------------------------------------------
# The feature cache (data.py)

def fake_features(calls: list):
    def encode_frames(video: torch.Tensor) -> torch.Tensor:  # [B, 3, F, H, W] -> [B, f·h·w, 3], tells clips apart
        assert not torch.is_grad_enabled()
        calls.append(video.shape[0])
        return ltx.pack_latents(video[:, :, ::8, ::32, ::32])
    return encode_frames


def test_feature_cache_is_written_once_beside_untouched_latents_and_rebuilt_when_broken(tmp_path):
    demo.make_synthetic_dataset(tmp_path / "clips", n=3, num_frames=9, width=64, height=64)
    ds = data.Dataset(id="d", instance_data_dir=str(tmp_path / "clips"), num_frames=9, resolution=64)
    report = data.Report(tmp_path / "report.json", quarantine=False)
    samples = data.plan_samples(ds, 2, 0, report)
    datasets = {"d": ds}
    encode_video = lambda v: v[:, :, ::8, ::32, ::32].clone()
    encode_text = lambda c: (torch.zeros(len(c), 4, 2), torch.ones(len(c), 4))
    shape = data.CacheShape(spatial=32, temporal=8, latent_channels=3, text_tokens=4, text_dim=2)
    data.cache_samples(samples, datasets, encode_video, encode_text, {"model": "vae"}, {"model": "t5"}, None, False, 1, 8, report, shape)
    latents = {s.latent_file: (s.latent_file.read_bytes(), s.latent_file.stat().st_mtime_ns) for s in samples}

    calls = []  # crepa turned on over cached latents: only the features are encoded
    data.cache_features(samples, datasets, fake_features(calls), {"model": "dino", "image_size": 64}, 2, report, False, shape=shape,
                        feature_dim=3)
    assert calls == [2, 1] and report.problems == []
    for s in samples:
        assert s.feature_file.parent == s.latent_file.parent and s.feature_file.name.startswith("crepa-")
        stored = data.read_cache_file(s.feature_file)
        assert set(stored) == {"crepa_features"} and stored["crepa_features"].dtype == torch.float16
        expected = ltx.pack_latents(data.load_sample(s)[None, :, ::8, ::32, ::32])[0]
        torch.testing.assert_close(stored["crepa_features"].float(), expected, atol=1e-3, rtol=1e-3)
    assert {s.latent_file: (s.latent_file.read_bytes(), s.latent_file.stat().st_mtime_ns) for s in samples} == latents
    assert data.cached(samples) == samples
    batch = data.load_batch(samples[:2])
    assert batch["crepa_features"].shape == (2, 2 * 2 * 2, 3) and batch["latents"].shape == (2, 3, 2, 2, 2)

    calls.clear()  # a rerun encodes nothing; another encoder or size, everything
    data.cache_features(samples, datasets, fake_features(calls), {"model": "dino", "image_size": 64}, 2, report, False)
    assert calls == []
    first = samples[0].feature_file
    data.cache_features(samples, datasets, fake_features(calls), {"model": "dino", "image_size": 128}, 2, report, False)
    assert calls == [2, 1] and samples[0].feature_file != first

    calls.clear()  # a broken file is encoded again, alone; a missing one drops its sample from cached()
    samples[1].feature_file.write_bytes(samples[1].feature_file.read_bytes()[:50])
    data.cache_features(samples, datasets, fake_features(calls), {"model": "dino", "image_size": 128}, 2, report, False)
    assert calls == [1] and data.cache_file_ok(samples[1].feature_file)
    samples[2].feature_file.unlink()
    assert data.cached(samples) == samples[:2]


def test_feature_cache_refuses_what_the_disk_cannot_hold(tmp_path, monkeypatch):
    demo.make_synthetic_dataset(tmp_path / "clips", n=1, num_frames=9, width=64, height=64)
    ds = data.Dataset(id="d", instance_data_dir=str(tmp_path / "clips"), num_frames=9, resolution=64)
    report = data.Report(tmp_path / "report.json", quarantine=False)
    samples = data.plan_samples(ds, 2, 0, report)
    shape = data.CacheShape(spatial=32, temporal=8, latent_channels=128, text_tokens=128, text_dim=4096)
    need = 2 * 2 * 2 * 1536 * 2  # 2 latent frames of 2 x 2 tokens, 1536 fp16 numbers each
    usage = data.shutil.disk_usage(tmp_path)
    for free, refused in ((need - 1, True), (need, False)):
        monkeypatch.setattr(data.shutil, "disk_usage", lambda folder: usage._replace(free=free))
        calls = []
        if refused:
            with pytest.raises(data.DataError, match="caching CREPA features needs about"):
                data.cache_features(samples, {"d": ds}, fake_features(calls), {"model": "f"}, 1, report, True, shape=shape,
                                    feature_dim=1536)
        else:
            data.cache_features(samples, {"d": ds}, fake_features(calls), {"model": "f"}, 1, report, True, shape=shape,
                                feature_dim=1536)
        assert calls == ([] if refused else [1])


# -----------------------------------------------------------------------------
# The encoder and demo.py's tiny one

def test_tiny_dinov2_loads_from_its_folder_frozen_and_is_made_once(dinov2_dir):
    encoder = crepa.load_encoder(str(dinov2_dir), "cpu")
    assert type(encoder).__name__ == "Dinov2Model" and not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert crepa.feature_dim(str(dinov2_dir)) == encoder.config.hidden_size == 32
    stamp = (dinov2_dir / "model.safetensors").stat().st_mtime_ns
    assert demo.tiny_dinov2(dinov2_dir) == dinov2_dir and (dinov2_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert crepa.encoder_source("dinov2_vitg14") == "facebook/dinov2-giant"
    assert crepa.encoder_source(str(dinov2_dir)) == str(dinov2_dir)
    assert crepa.feature_encoder("dinov2_vitg14", 518, "bfloat16") == {"model": "facebook/dinov2-giant",
                                                                         "image_size": 518, "dtype": "bfloat16"}


def test_a_missing_encoder_folder_is_one_sentence(tmp_path):
    with pytest.raises(ltx.ModelError, match="DINOv2 folder .*nowhere does not exist"):
        crepa.load_encoder(str(tmp_path / "nowhere"), "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ltx.ModelError, match="could not load the DINOv2 encoder"):
        crepa.load_encoder(str(tmp_path / "empty"), "cpu")


def test_demo_prepare_adds_the_dinov2_folder_once(tmp_path, dinov2_dir):
    model_dir, clips = tmp_path / "model", tmp_path / "clips"
    model_dir.mkdir()
    (model_dir / "model_index.json").write_text("{}")  # a pipeline already there: prepare leaves it alone
    demo.make_synthetic_dataset(clips, n=1, num_frames=9, width=64, height=64)
    said = []
    demo.prepare(model_dir, clips, seed=0, log=said.append)
    assert len(said) == 1 and "DINOv2" in said[0] and crepa.feature_dim(str(model_dir / "dinov2")) == 32
    demo.prepare(model_dir, clips, seed=0, log=said.append)
    assert len(said) == 1 and sorted(p.name for p in model_dir.iterdir()) == ["dinov2", "model_index.json"]
