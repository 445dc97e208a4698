"""CREPA: cross-frame representation alignment, a regulariser added to the flow-matching loss.

Owns: the frozen DINOv2 that describes the clean frames (loaded lazily: only a run whose features are not all
cached builds it), its features on the latent grid, the trainable projection head, the hook that keeps one
transformer block's output, and the alignment loss.
Does not: own the main loss, cache anything (data.cache_features does, through the frame_features it is
handed), or change model.py (the block's output is read with a forward hook).

REPA (Yu et al. 2024, "Representation Alignment for Generation: Training Diffusion Transformers Is Easier Than
You Think") pulls a projection of one block's hidden states towards a frozen self-supervised encoder's features
of the clean image. CREPA (Hwang et al. 2025, "Cross-Frame Representation Alignment for Fine-Tuning Video
Diffusion Models") does it per frame of a video and also towards the neighbouring frames' features, so the
LoRA learns representations that agree across time.

Notation: the latent grid is (F, h, w): F latent frames of h x w tokens, in model.pack_latents' order (frame,
then row, then column). p[b, f, i] is the head's output for token i of latent frame f of clip b, y[b, g, i] the
DINOv2 feature of latent frame g at the same position i. With B clips,

    cos(f, g) = 1 / (B·h·w) · Σ_b Σ_i  <p[b, f, i], y[b, g, i]> / (|p[b, f, i]| · |y[b, g, i]|)

    L = −(1 / F) · Σ_f [ cos(f, f) + Σ_{1 ≤ |Δ| ≤ d, 0 ≤ f + Δ < F} exp(−|Δ| / τ) · cos(f, f + Δ) ]

d is the neighbour distance (crepa_adjacent_distance: 0 = own frame only, plain REPA per frame) and τ the temporal decay (crepa_adjacent_tau).
As in the paper the sum is not divided by the weights: a clip of many frames is not pulled harder per frame,
but frames in the middle (more neighbours) are pulled harder than the two at the ends.

Pixel frames -> latent frames, as LTX's causal VAE groups them (temporal compression t = 8, clips of 8k+1
frames): latent frame 0 comes from pixel frame 0 alone, latent frame j ≥ 1 from pixel frames (j−1)·t+1 .. j·t.
The DINOv2 features of a latent frame are the mean of its pixel frames' features; spatially, DINOv2's patch
grid is average-pooled to the latent grid's h x w.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import errors
import model as ltx

MODELS = {"dinov2_vitg14": "facebook/dinov2-giant", "dinov2_vits14": "facebook/dinov2-small",
          "dinov2_vitb14": "facebook/dinov2-base", "dinov2_vitl14": "facebook/dinov2-large"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2 was trained on ImageNet-normalised pixels
IMAGENET_STD = (0.229, 0.224, 0.225)
FRAMES_PER_CALL = 16  # frames per DINOv2 forward: bounds its activations whatever the clip's length


# -----------------------------------------------------------------------------
# The frozen encoder

def encoder_source(name: str) -> str:
    """A short name (dinov2_vitg14, as torch.hub calls them) -> its hub id; a folder or any other id as it is."""
    return MODELS.get(name, name)


def feature_encoder(name: str, image_size: int, dtype: str) -> dict:
    """What the feature cache's key says about the encoder (a data.Encoder): which one, at what input size, in
    what dtype."""
    return {"model": encoder_source(name), "image_size": image_size, "dtype": dtype}


def feature_dim(name: str) -> int:
    """DINOv2's width (hidden_size: 1536 for giant) from its config.json alone, for sizing the head and the
    cache before any weights are loaded (a run whose features are all cached never loads them)."""
    source = encoder_source(name)
    config = ltx.resolve_folder(source, None, configs_only=True) / "config.json"
    if not config.is_file():
        raise ltx.ModelError(f"no {config}: crepa_model must name a DINOv2 folder or hub id like "
                             f"{MODELS['dinov2_vitg14']}")
    return json.loads(config.read_text())["hidden_size"]


def load_encoder(name: str, device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """transformers' Dinov2Model, frozen and in eval mode, from a local folder (no network) or a hub id."""
    source = encoder_source(name)
    if not Path(source).is_dir() and not ltx.looks_like_hub_id(source):
        raise ltx.ModelError(f"DINOv2 folder {source} does not exist (and it is not a hub id like "
                             f"'{MODELS['dinov2_vitg14']}'); set crepa_model to one of {', '.join(MODELS)}, a hub id "
                             f"or a local folder")
    with errors.quiet_imports():  # transformers is heavy and noisy: imported only when DINOv2 is really needed
        from transformers import Dinov2Model
    try:
        encoder = Dinov2Model.from_pretrained(source, dtype=dtype)
    except OSError as e:  # what transformers raises for a missing repo, a failed download, a folder without weights
        first_line = errors.first_line(e)
        raise ltx.ModelError(f"could not load the DINOv2 encoder {source}: {first_line}; check crepa_model, the "
                             f"network, or download it once with `hf download {source}`")
    return encoder.to(device).eval().requires_grad_(False)


def encoder_size(height: int, width: int, image_size: int, patch: int) -> tuple[int, int]:
    """The frame's size for DINOv2: its own aspect, an area of about image_size², each side a whole number of
    patches (at least one)."""
    scale = image_size / math.sqrt(height * width)
    return (max(1, round(height * scale / patch)) * patch, max(1, round(width * scale / patch)) * patch)


@torch.no_grad()
def frame_features(encoder, video: torch.Tensor, image_size: int, grid: tuple[int, int, int],
                   temporal: int = 8) -> torch.Tensor:
    """Clean clips [B, 3, F, H, W] in [-1, 1] -> DINOv2 features [B, f·h·w, D] float16 on the latent grid
    (f, h, w), in model.pack_latents' token order. See the header for how pixel frames map to latent frames."""
    f, h, w = grid
    batch, _, frames, height, width = video.shape
    if frames != (f - 1) * temporal + 1:
        raise ValueError(f"{frames} pixel frames do not make {f} latent frames at temporal compression {temporal} "
                         f"(the causal VAE needs (f - 1)·{temporal} + 1 frames)")
    param = next(encoder.parameters())
    size = encoder_size(height, width, image_size, encoder.config.patch_size)
    mean = torch.tensor(IMAGENET_MEAN, device=param.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=param.device).view(1, 3, 1, 1)
    pictures = video.transpose(1, 2).flatten(0, 1)  # [B·F, 3, H, W], clip-major
    pooled = []
    for chunk in pictures.split(FRAMES_PER_CALL):
        x = ((chunk.to(param.device, torch.float32) + 1) / 2 - mean) / std
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        # DINOv2 interpolates its position embeddings to any whole number of patches itself (Dinov2Embeddings)
        tokens = encoder(pixel_values=x.to(param.dtype)).last_hidden_state[:, 1:]  # drop the CLS token
        patches = tokens.float().transpose(1, 2).unflatten(2, (size[0] // encoder.config.patch_size, -1))
        pooled.append(F.adaptive_avg_pool2d(patches, (h, w)))  # [n, D, h, w]
    per_frame = torch.cat(pooled).unflatten(0, (batch, frames))  # [B, F, D, h, w]
    rest = per_frame[:, 1:].unflatten(1, (f - 1, temporal)).mean(2)  # latent frames 1.. from t pixel frames each
    latent = torch.cat([per_frame[:, :1], rest], dim=1)  # [B, f, D, h, w]
    return latent.permute(0, 1, 3, 4, 2).flatten(1, 3).half()  # frame, row, column: pack_latents' order


# -----------------------------------------------------------------------------
# The trainable head and the block whose output it reads

class ProjectionHead(nn.Module):
    """REPA's MLP from the transformer's width to DINOv2's: Linear - SiLU - Linear - SiLU - Linear."""

    def __init__(self, dim: int, feature_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim  # 2048 for LTX-Video, REPA's width
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, feature_dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # the block's output is in the base's dtype (bf16); the head's weights stay in theirs (autocast, if on,
        # still runs the matmuls in its dtype)
        return self.net(hidden_states.to(self.net[0].weight.dtype))


class BlockOutput:
    """Keeps the output hidden states [B, S, D] of transformer.transformer_blocks[index] from each training
    forward, for `pop` to hand to the head. model.py knows nothing of it: two hooks do the work.

    Armed by a pre-hook on the transformer's own forward, only when it builds a graph; the block's hook keeps
    the output once and disarms. So with gradient checkpointing, the block's recompute in backward (which runs
    the block again, but not the transformer) keeps nothing, and validation under no_grad keeps nothing."""

    def __init__(self, transformer, index: int):
        count = len(transformer.transformer_blocks)
        if not 0 <= index < count:
            raise ValueError(f"crepa_block_index {index} is out of range: the transformer has {count} blocks "
                             f"(0 to {count - 1})")
        self.armed, self.output = False, None
        self.handles = [transformer.register_forward_pre_hook(self.arm),
                        transformer.transformer_blocks[index].register_forward_hook(self.keep)]

    def arm(self, module, args) -> None:
        self.armed = torch.is_grad_enabled()

    def keep(self, module, args, output) -> None:
        if self.armed:
            self.output, self.armed = output, False

    def pop(self) -> torch.Tensor:
        """The block's output from the last training forward; forgotten here, so only the graph holds it."""
        if self.output is None:
            raise RuntimeError("no block output was captured: pop() once after each transformer forward with "
                               "gradients enabled")
        output, self.output = self.output, None
        return output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.armed, self.output = False, None


# -----------------------------------------------------------------------------
# The loss

def crepa_loss(projected: torch.Tensor, features: torch.Tensor, grid: tuple[int, int, int], distance: int,
               tau: float) -> torch.Tensor:
    """The header's L for projected [B, f·h·w, D] and features of the same shape (any float dtype; fp32 inside)."""
    f = grid[0]
    p = F.normalize(projected.float().unflatten(1, (f, -1)), dim=-1)  # [B, f, h·w, D], unit vectors
    y = F.normalize(features.float().unflatten(1, (f, -1)), dim=-1)
    cos = torch.einsum("bfid,bgid->fg", p, y) / (p.shape[0] * p.shape[2])  # cos[f, g] of the header
    gap = (torch.arange(f)[:, None] - torch.arange(f)[None]).abs().to(cos.device)
    weights = torch.exp(-gap / tau) * (gap <= distance)  # 1 on the diagonal, exp(−|Δ|/τ) within d, else 0
    return -(weights * cos).sum() / f


# -----------------------------------------------------------------------------
# What train.py holds while CREPA is on

class Alignment:
    """The head, the hook on block crepa_block_index, and the CREPA term of a training forward: after the
    transformer's forward, `loss(features, grid)` projects the kept block output and returns L (the header's)."""

    def __init__(self, transformer, cfg, feature_dim: int, device, dtype: torch.dtype):
        count = len(transformer.transformer_blocks)
        if not 0 <= cfg.crepa_block_index < count:  # known only once the model is loaded
            raise SystemExit(f"config error: crepa_block_index = {cfg.crepa_block_index}, but the transformer has "
                             f"{count} blocks (0 to {count - 1})")
        self.block = BlockOutput(transformer, cfg.crepa_block_index)
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.head = ProjectionHead(width, feature_dim).to(device, dtype)
        self.distance, self.tau = cfg.crepa_adjacent_distance, cfg.crepa_adjacent_tau

    def loss(self, features: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        return crepa_loss(self.head(self.block.pop()), features, grid, self.distance, self.tau)
