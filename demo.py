"""The demo's assets: a tiny random LTX-Video pipeline and a set of synthetic clips, made once where the
demo config points (and built by the tests from the same functions).

Owns: the tiny random pipeline (the 0.9.5 architecture with tiny widths and the real 32x / 8x VAE
compression; a T5 tokenizer from a hand-written vocab, so nothing is downloaded), written in diffusers layout
and, for the demo's own copy, marked with model.DEMO_MARK; the synthetic clips, whose captions say exactly
what moves where; `prepare`, which writes whichever of the two is missing for `demo = true`.
Does not: take part in a real run (model.py loads models, and refuses a folder this file marked; data.py
reads and writes video), or train anything.
"""

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import data
import errors
import model as ltx


# -----------------------------------------------------------------------------
# A tiny random pipeline (0.9.5 architecture, same 32x / 8x VAE compression) for the demo and the tests

# Caption words the tiny tokenizer knows as whole pieces. Anything else falls back to single
# characters, so every ASCII caption tokenizes to real ids (no <unk>) and different captions differ.
TINY_WORDS = """
a an the of and or with in on at to from by for into over under near behind above below is are
it its this that while as up down left right forward backward around through across slowly quickly
red green blue yellow orange purple pink black white gray grey brown dark light bright colorful
circle square triangle ball cube box shape shapes line dot object background foreground
moving moves move rotating rotates spinning falling rising bouncing flying walking running sitting
standing jumping swimming dancing talking looking turning zooming panning camera shot view close
man woman person people child dog cat bird car tree water sky sun cloud clouds city street room
house road forest ocean river mountain grass snow rain fire light lights night day morning
video scene frame image picture cinematic realistic detailed high low quality resolution motion
blurry blur worst best bad good jittery distorted static still noise noisy sharp smooth
big small large tiny long short tall wide top bottom side middle center one two three
""".split()

# Characters every word can be spelt with (lower/upper case, digits, punctuation).
TINY_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&%+")


def tiny_tokenizer():
    """A T5 (unigram) tokenizer from a hand-written vocab: no spiece.model, no download.

    T5 layout: <pad>=0, </s>=1, <unk>=2. Words get a much better log-prob than characters, so the
    unigram model picks whole words when it can and spells the rest out character by character.
    """
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -5.0 - 0.01 * i) for i, w in enumerate(dict.fromkeys(TINY_WORDS))]
    vocab += [("\u2581" + c, -9.0) for c in TINY_CHARS]  # a character that starts a word
    vocab += [(c, -10.0) for c in TINY_CHARS]  # a character inside a word
    # extra_ids=0: no <extra_id_*> sentinels (the encoder never needs them, and they bloat the
    # vocab); model_max_length=128 as the real LTX tokenizer (the pipeline pads to 128 tokens).
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=128)


def tiny_text_encoder(vocab_size: int, d_model: int = 16):
    """A 2-layer T5 v1.1-style encoder (gated-GELU FF, like T5-XXL) with d_model 16 (or as given)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def tiny_vae(latent_channels: int = 8):
    """The LTX 0.9.5 VAE layout (published block types, strides, residual upsamplers,
    timestep-conditioned decoder) with tiny widths; same 32x spatial / 8x temporal compression.

    Spatial: patch 4 x (spatial, spatiotemporal, spatiotemporal) = 4*2*2*2 = 32.
    Temporal: (temporal, spatiotemporal, spatiotemporal) = 2*2*2 = 8.
    """
    from diffusers import AutoencoderKLLTXVideo

    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        # Encoder: 4 x LTXVideo095DownBlock3D (block i maps channels[i] -> channels[i+1]); each
        # downsampler's out channels must divide by its stride volume (4, 2, 8, 8): they do.
        block_out_channels=(4, 8, 8, 16, 16),
        down_block_types=("LTXVideo095DownBlock3D",) * 4,
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        spatio_temporal_scaling=(True, True, True, True),
        layers_per_block=(1, 1, 1, 1, 1),
        # Decoder: channels must double per level, and (8, 16, 32) is the smallest that works:
        # each residual upsampler halves the channels and folds its input into 2x2x2 groups, so
        # the last one needs >= 8 input channels. It dominates the size (~317k of ~364k params).
        decoder_block_out_channels=(8, 16, 32),
        decoder_layers_per_block=(1, 1, 1, 1),
        decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False),
        upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2),
        timestep_conditioning=True,
        patch_size=4, patch_size_t=1, resnet_norm_eps=1e-6, scaling_factor=1.0,
        encoder_causal=True, decoder_causal=False,
        # Explicit: the default formula (patch * 2**sum(scaling)) gives 64 / 16 here, which is wrong.
        spatial_compression_ratio=32, temporal_compression_ratio=8,
    )
    # Non-trivial latent statistics so (z - mean) * scaling_factor / std is really exercised.
    # Both are persistent buffers, so save_pretrained writes them and from_pretrained reads them.
    vae.latents_mean.copy_(0.5 * torch.randn(latent_channels))
    vae.latents_std.copy_(0.5 + torch.rand(latent_channels))
    return vae.eval()


def tiny_transformer(latent_channels: int, caption_channels: int, heads: int = 2, head_dim: int = 8, layers: int = 2):
    """LTXVideoTransformer3DModel with inner dim 2 x 8 = 16 (16 % 6 != 0: RoPE padding is used), or as given."""
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(
        in_channels=latent_channels, out_channels=latent_channels, patch_size=1, patch_size_t=1,
        num_attention_heads=heads, attention_head_dim=head_dim, cross_attention_dim=heads * head_dim,
        num_layers=layers, caption_channels=caption_channels,
    ).eval()


def tiny_dinov2(folder: str | Path, seed: int = 0) -> Path:
    """A random DINOv2 (transformers' Dinov2Model: width 32, 2 layers, patch 14, trained size 56 = 4 x 4 patches)
    in `folder`, for CREPA in the demo and the tests; made once (a folder that holds one is kept)."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    with errors.quiet_imports():
        from transformers import Dinov2Config, Dinov2Model
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=56)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Dinov2Model(config).eval()
    tmp = folder.with_name(folder.name + ".tmp")  # written whole, then renamed: never half a model
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# The demo's model, and bench.py's medium preset as a whole pipeline (its transformer; T5 as wide as its captions)
SIZES = {"tiny": dict(latent_channels=8, d_model=16, heads=2, head_dim=8, layers=2),
         "medium": dict(latent_channels=128, d_model=4096, heads=8, head_dim=64, layers=4)}


@torch.no_grad()
def perturb_constant_params(model: torch.nn.Module) -> None:
    """Add seeded noise to every parameter initialised to one constant (RMSNorm weights = 1,
    zero biases, the VAE's timestep_scale_multiplier = 1000), so that a reimplementation that
    forgets one of them cannot pass a parity test by luck."""
    for p in model.parameters():
        if p.numel() > 0 and bool((p == p.flatten()[0]).all()):
            c = p.flatten()[0].item()
            noise = 0.1 * torch.randn_like(p)
            p.copy_(p * (1 + noise) if c != 0 else noise)


def make_tiny_pipeline(folder: str | Path, seed: int = 0, mark_as_demo: bool = False, size: str = "tiny") -> Path:
    """Write a tiny random LTX-Video 0.9.5-architecture pipeline to `folder` in diffusers layout
    (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/); returns the folder.
    mark_as_demo: the demo's own copy, which runs without demo = true refuse (see model.is_demo_model).
    size: a key of SIZES (the VAE stays tiny in its widths whatever the size)."""
    with errors.quiet_imports():  # the process's first diffusers import (see errors.quiet_imports)
        from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

    folder = Path(folder)
    s = SIZES[size]
    latent_channels, d_model = s["latent_channels"], s["d_model"]
    # fork_rng: seed freely without touching the caller's global RNG. Each part gets its own seed,
    # so changing one part's config does not change the others' weights.
    with torch.random.fork_rng(devices=[]):
        tokenizer = tiny_tokenizer()
        torch.manual_seed(seed * 4 + 0)
        text_encoder = tiny_text_encoder(len(tokenizer), d_model)
        perturb_constant_params(text_encoder)
        torch.manual_seed(seed * 4 + 1)
        vae = tiny_vae(latent_channels)
        perturb_constant_params(vae)
        torch.manual_seed(seed * 4 + 2)
        transformer = tiny_transformer(latent_channels, d_model, s["heads"], s["head_dim"], s["layers"])
        perturb_constant_params(transformer)

    # What diffusers' convert_ltx_to_diffusers.py builds for 0.9.5: no dynamic shifting and every
    # other value at its default (shift 1, so sigmas stay linspace(1, 1/N, N)). The pipeline still
    # computes mu from base/max_image_seq_len and base/max_shift, but the scheduler ignores it.
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False)

    pipe = LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                       tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    if mark_as_demo:
        for config in [folder / "model_index.json", *folder.glob("*/config.json")]:
            config.write_text(json.dumps({**json.loads(config.read_text()), ltx.DEMO_MARK: True}, indent=2,
                                         sort_keys=True))
    return folder


# -----------------------------------------------------------------------------
# The synthetic demo dataset: clips whose captions are fully predictable from the pixels

SHAPE_COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "yellow": (240, 220, 40),
                "white": (245, 245, 245), "orange": (250, 140, 20), "cyan": (40, 220, 230)}
BACKGROUND_COLORS = {"black": (10, 10, 10), "dark blue": (15, 25, 90), "dark gray": (60, 60, 60),
                     "dark purple": (60, 20, 80), "dark green": (15, 60, 25)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


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
                           height: int = 96, fps: int = 25, seed: int = 0) -> list[Path]:
    """n procedurally generated clips with .txt captions, deterministic from the seed; returns the videos.

    If the folder already holds any clips nothing is regenerated, whatever the arguments:
    delete the folder to get a new set.
    """
    folder = Path(folder)
    if folder.is_dir() and any(p.suffix.lower() in data.VIDEO_EXTS for p in folder.iterdir()):
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in data.VIDEO_EXTS)
    if width % 2 or height % 2:
        raise ValueError(f"synthetic clips need an even width and height for yuv420p, got {width}x{height}.")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)  # a private RNG: the global ones stay untouched
    videos = []
    for i in range(n):
        frames, caption = render_clip(rng, num_frames, width, height)
        video = folder / f"clip_{i:04d}.mp4"
        # caption first, video renamed into place last: a crash never leaves a video without its caption
        video.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        # MPEG-4 part 2, not H.264: x264's output varies run to run under CPU load (measured: 2-4
        # variants in 30 encodes of one clip), FFmpeg's own mpeg4 encoder gives the same bytes every time
        data.write_atomic(video, lambda tmp: data.write_video(tmp, frames, fps, codec="mpeg4"))
        videos.append(video)
    return videos


# -----------------------------------------------------------------------------
# What demo = true makes before the run

def prepare(model_dir: Path, clips_dir: Path, seed: int, log: Callable[[str], None] = print) -> None:
    """The tiny random LTX pipeline in model_dir (with a tiny DINOv2 in model_dir/dinov2, for CREPA) and the
    synthetic clips in clips_dir, each made only if missing."""
    if not (model_dir / "model_index.json").exists():
        log(f"demo: writing a tiny random LTX-Video pipeline to {model_dir}")
        make_tiny_pipeline(model_dir, seed=seed, mark_as_demo=True)
    if not (model_dir / "dinov2" / "config.json").exists():
        log(f"demo: writing a tiny random DINOv2 (for CREPA) to {model_dir / 'dinov2'}")
        tiny_dinov2(model_dir / "dinov2", seed=seed)
    if not clips_dir.is_dir() or not any(clips_dir.glob("*.mp4")):
        log(f"demo: writing synthetic clips to {clips_dir}")
        make_synthetic_dataset(clips_dir, seed=seed)
