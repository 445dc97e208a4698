"""The LTX-Video transformer in plain PyTorch, and loading the frozen parts around it.

Owns: the DiT (RoPE, AdaLN-single, per-token timesteps, gradient checkpointing) with
exactly diffusers' parameter names, so a diffusers checkpoint or LoRA key addresses the
same module with no remapping; loading transformer / VAE / T5 from a hub id or a local
folder in diffusers layout, refusing the demo's marked model where a real one is meant
(`DEMO_MARK`, `is_demo_model`); latent (un)packing and (un)normalisation as `LTXPipeline` does it.
Does not: train anything, know about LoRA, or build the demo's tiny random pipeline (demo.py does).
"""

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import errors


class ModelError(Exception):
    """A model the user named that cannot be used (missing folder, unsupported config, failed download,
    the demo's random model where a real one is meant): shown as one sentence."""


# LTXPipeline's default frame rate; RoPE positions in time are scaled by vae_temporal_ratio / fps,
# so training must use the value inference uses or the LoRA learns the wrong time scale.
FRAME_RATE = 25
TIMESTEP_SCALE = 1000  # the transformer takes timestep σ·1000 (σ in [0, 1]), in training and sampling
NEGATIVE_PROMPT = "worst quality, inconsistent motion, blurry, jittery, distorted"  # LTX-Video's usual one


# -----------------------------------------------------------------------------
# The transformer

@dataclass
class TransformerConfig:
    in_channels: int = 128  # VAE latent channels (patch size 1, so one token per latent voxel)
    out_channels: int = 128
    num_attention_heads: int = 32
    attention_head_dim: int = 64  # inner dim D = heads * head_dim = 2048 for the 2B model
    cross_attention_dim: int = 2048
    num_layers: int = 28
    caption_channels: int = 4096  # T5-XXL hidden size
    norm_eps: float = 1e-6


# Values every released LTX-Video config has; this implementation supports exactly these.
FIXED_CONFIG = dict(patch_size=1, patch_size_t=1, activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads",
                    norm_elementwise_affine=False, attention_bias=True, attention_out_bias=True)


def config_from_json(cfg: dict) -> TransformerConfig:
    """Reads a diffusers transformer config.json, refusing architectures this file does not implement."""
    for key, value in FIXED_CONFIG.items():
        if key in cfg and cfg[key] != value:
            raise ModelError(f"transformer config has {key}={cfg[key]!r}; ltx-lora implements only {key}={value!r}")
    names = {f.name for f in fields(TransformerConfig)}
    return TransformerConfig(**{k: v for k, v in cfg.items() if k in names})


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    # weightless RMSNorm, computed in fp32 as diffusers does
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[N] -> [N, dim] sinusoidal embedding, cos half first (diffusers' flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class MLP(nn.Module):
    """Linear - activation - Linear, named linear_1 / linear_2 like diffusers' embedders."""

    def __init__(self, dim_in: int, dim: int, act: str):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_1(x)
        h = F.silu(h) if self.act == "silu" else F.gelu(h, approximate="tanh")
        return self.linear_2(h)


class AdaLayerNormSingle(nn.Module):
    """σ·1000 -> (the 6·D modulation shared by all blocks, the D embedding used by the output norm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = nn.Module()  # only a namespace, so keys read time_embed.emb.timestep_embedder.*
        self.emb.timestep_embedder = MLP(256, dim, act="silu")
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.emb.timestep_embedder(timestep_sinusoid(timestep).to(dtype))
        return self.linear(F.silu(embedded)), embedded


def rope_frequencies(dim: int, num_frames: int, height: int, width: int, scale: tuple[float, float, float],
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D RoPE over the (frame, row, column) latent grid: cos, sin of shape [1, F·H·W, dim].

    Positions are scaled to [0, 1]-ish fractions of base sizes (20 frames, 2048 px) and mapped to [-1, 1];
    dim // 6 log-spaced frequencies per axis, each used for one interleaved (real, imag) pair.
    """
    f, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=device) for n in (num_frames, height, width)),
                             indexing="ij")
    grid = torch.stack([f * scale[0] / 20, h * scale[1] / 2048, w * scale[2] / 2048], dim=-1).reshape(1, -1, 3)
    freqs = 10000.0 ** torch.linspace(0.0, 1.0, dim // 6, device=device) * math.pi / 2  # [dim // 6]
    angles = (freqs * (grid.unsqueeze(-1) * 2 - 1)).transpose(-1, -2).flatten(2)  # [1, S, 3 · (dim // 6)]
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    pad = dim % 6  # leftover channels at the front are left unrotated
    if pad:
        cos = torch.cat([torch.ones_like(cos[..., :pad]), cos], dim=-1)
        sin = torch.cat([torch.zeros_like(sin[..., :pad]), sin], dim=-1)
    return cos, sin


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x0, x1) -> (x0·cos − x1·sin, x1·cos + x0·sin) over the full inner dim: the pair
    read as the complex number x0 + i·x1 times e^{iθ} (`rope`, complex [1, S, dim / 2]): one kernel forward and
    back instead of five, with the same products and sums (bitwise equal to the real-valued form)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rope).flatten(-2).to(x.dtype)


def rope_rotations(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(cos, sin) [1, S, dim], each repeated per interleaved pair -> e^{iθ} [1, S, dim / 2] for apply_rope."""
    return torch.complex(cos[..., 0::2], sin[..., 0::2])


# Attention kernels (attention_mechanism). Each is used only where it computes the same thing as SDPA (no mask;
# fp16 / bf16) and where it can (SageAttention has no backward: validation and sampling); every other call is
# SDPA's, so the choice changes how attention runs, never what it means. The packages import on first use;
# check_attention refuses at start-up what this machine cannot run.
ATTENTION_BACKENDS = {"sdpa": None, "sageattention": "sageattention", "flash": "flash_attn"}  # name -> package


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Attention over [B, heads, S, head_dim] tensors (bias: an additive mask, or None)."""
    if backend != "sdpa" and bias is None and q.dtype in (torch.float16, torch.bfloat16):
        if backend == "flash":  # FlashAttention-2: forward and backward, [B, S, heads, head_dim] layout
            from flash_attn import flash_attn_func
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        if backend == "sageattention" and not torch.is_grad_enabled():  # 8-bit QKᵀ, forward only
            from sageattention import sageattn
            return sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def set_attention(model: nn.Module, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend


def check_attention(backend: str, device: torch.device) -> None:
    """Stops the run at start-up, in one sentence, when `backend` cannot run here: its package is missing or the
    device is not a CUDA GPU (both kernels are CUDA-only)."""
    package = ATTENTION_BACKENDS[backend]
    if package is None:
        return
    if device.type != "cuda":
        raise SystemExit(f"attention_mechanism = {backend} runs on CUDA GPUs only, and this run is on the "
                         f"{device.type}; use sdpa")
    errors.need_package(package, f"attention_mechanism = {backend}", "or use sdpa", pip=package.replace("_", "-"))


class Attention(nn.Module):
    """Multi-head attention with RMSNorm on q and k across all heads; RoPE only for self-attention."""
    backend = "sdpa"  # which kernel computes it (attend); set_attention sets it for a whole model

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm_q = nn.RMSNorm(inner, eps=1e-5)
        self.norm_k = nn.RMSNorm(inner, eps=1e-5)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(context_dim, inner)
        self.to_v = nn.Linear(context_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # diffusers' to_out.1 is a parameterless dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, rope=None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.norm_q(self.to_q(x)), self.norm_k(self.to_k(context)), self.to_v(context)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, heads, S, head_dim]
        out = attend(q, k, v, bias, self.backend)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class GELUProj(nn.Module):
    """Linear then tanh-GELU; its own module so the key reads ff.net.0.proj as in diffusers."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """x += gate·attn1(modulate(norm(x)));  x += attn2(x, text);  x += gate·ff(modulate(norm(x)))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.eps = cfg.norm_eps
        self.attn1 = Attention(dim, dim, cfg.num_attention_heads, cfg.attention_head_dim)
        self.attn2 = Attention(dim, cfg.cross_attention_dim, cfg.num_attention_heads, cfg.attention_head_dim)
        self.ff = FeedForward(dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, context, temb, rope, context_bias):
        # temb: [B, 1 or S, 6·D] -> six [B, 1 or S, D] modulations (per token when timesteps are per token)
        ada = self.scale_shift_table + temb.unflatten(-1, (6, -1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada.unbind(dim=2)
        # addcmul(a, b, c) = a + b·c in one pass over the tokens (the same products and sums)
        h = torch.addcmul(shift_msa, rms_norm(x, self.eps), 1 + scale_msa)
        x = torch.addcmul(x, self.attn1(h, rope=rope), gate_msa)
        x = x + self.attn2(x, context, bias=context_bias)  # cross-attention: no norm, no gate, no RoPE
        h = torch.addcmul(shift_mlp, rms_norm(x, self.eps), 1 + scale_mlp)
        return torch.addcmul(x, self.ff(h), gate_mlp)


class LTXTransformer(nn.Module):
    """Tokens [B, S, C] of a latent video, T5 embeddings [B, L, caption_channels] -> velocity [B, S, C]."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.proj_in = nn.Linear(cfg.in_channels, dim)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)
        self.time_embed = AdaLayerNormSingle(dim)
        self.caption_projection = MLP(cfg.caption_channels, dim, act="gelu_tanh")
        self.transformer_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.num_layers)])
        self.proj_out = nn.Linear(dim, cfg.out_channels)
        self.gradient_checkpointing = False
        self.checkpointing_interval = 1  # with checkpointing, blocks 0, N, 2N, ... are recomputed

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_attention_mask: torch.Tensor, num_frames: int, height: int, width: int,
                rope_interpolation_scale: tuple[float, float, float]) -> torch.Tensor:
        """timestep is σ·1000, per sample [B] or per token [B, S] (i2v gives first-frame tokens 0)."""
        batch, dim = hidden_states.shape[0], self.proj_in.out_features
        rope = rope_rotations(*rope_frequencies(dim, num_frames, height, width, rope_interpolation_scale,
                                                hidden_states.device))
        x = self.proj_in(hidden_states)
        # padded text tokens are masked with an additive −10000, as the original model was trained
        context_bias = ((1 - encoder_attention_mask.to(x.dtype)) * -10000.0)[:, None, None, :]
        temb, embedded = self.time_embed(timestep.flatten(), x.dtype)
        temb, embedded = temb.view(batch, -1, temb.shape[-1]), embedded.view(batch, -1, dim)
        context = self.caption_projection(encoder_hidden_states)
        last = len(self.transformer_blocks) - 1
        for i, block in enumerate(self.transformer_blocks):
            # checkpointing keeps only each block's input and recomputes the block in backward; not the last
            # one's, whose activations backward needs at once: keeping them costs no more than recomputing them
            recompute = self.gradient_checkpointing and i % self.checkpointing_interval == 0 and i < last
            if recompute and torch.is_grad_enabled():
                with set_checkpoint_early_stop(False):  # recompute runs each block to its end (offload.py's hooks)
                    x = checkpoint(block, x, context, temb, rope, context_bias, use_reentrant=False)
            else:
                x = block(x, context, temb, rope, context_bias)
        shift, scale = (self.scale_shift_table + embedded[:, :, None]).unbind(dim=2)
        return self.proj_out(torch.addcmul(shift, F.layer_norm(x, (dim,), eps=1e-6), 1 + scale))


def compile_blocks(model: LTXTransformer) -> None:
    """torch.compile each block in place (`compile = true`): its elementwise work (norms, modulation, RoPE, GELU,
    the LoRA's casts) fuses into a few kernels around the matmuls. Parameter names do not change, and every block
    runs the same code at the same shapes, so one compiled graph serves them all. A new clip shape (bucket)
    compiles once more; from the second, torch marks the sizes dynamic."""
    for block in model.transformer_blocks:
        block.compile(fullgraph=True)  # a graph break is an error, not a silent slowdown (tests/test_model.py)


# -----------------------------------------------------------------------------
# Loading: a hub id or a local folder in diffusers layout

def looks_like_hub_id(name: str) -> bool:
    """'org/name', not a path: what resolve_folder downloads when no such folder exists."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def resolve_folder(name_or_path: str, subfolder: str | None, configs_only: bool = False) -> Path:
    """Local folder (or its subfolder) as it is; otherwise a hub id, downloaded (only that subfolder) to the HF cache.
    A subfolder of None, "" or "none" means the folder itself. configs_only: download the json files alone."""
    subfolder = None if subfolder in (None, "", "none") else subfolder
    if os.path.isdir(name_or_path):
        folder = Path(name_or_path) / (subfolder or "")
        if not folder.is_dir():
            raise ModelError(f"{folder} does not exist: expected a diffusers-layout model folder with '{subfolder}/'")
        return folder
    if not looks_like_hub_id(name_or_path):
        raise ModelError(f"model folder {name_or_path} does not exist (and it is not a hub id like 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError
    patterns = ["*.json"] if configs_only else [f"{subfolder}/*" if subfolder else "*", "*.json"]
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=patterns)) / (subfolder or "")
    except (HfHubHTTPError, EntryNotFoundError, HFValidationError) as e:
        first_line = errors.first_line(e)
        raise ModelError(f"could not get {name_or_path} ({subfolder or 'all files'}) from the Hugging Face hub: "
                         f"{first_line}; check the id, the network, or `hf auth login` for gated models")


# demo.py's tiny random pipeline marks its config files with this key (diffusers ignores keys starting with
# "_"), so a run that names a real model can never train on it by mistake.
DEMO_MARK = "_ltx_lora_demo"


def is_demo_model(name_or_path: str) -> bool:
    """Whether a local folder (a pipeline or one of its component folders) is the demo's tiny random model."""
    folder = Path(name_or_path)
    configs = [folder / "model_index.json", folder / "config.json", folder / "transformer" / "config.json"]
    return any(json.loads(f.read_text()).get(DEMO_MARK, False) for f in configs if f.is_file())


def read_safetensors_weights(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers weights folder (one file, or shards listed in an index json), in `dtype`."""
    from safetensors.torch import load_file
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v.to(dtype) for shard in shards for k, v in load_file(folder / shard).items()}
    single = folder / "diffusion_pytorch_model.safetensors"
    if not single.exists():
        raise ModelError(f"no diffusion_pytorch_model.safetensors (or its sharded index) in {folder}")
    return {k: v.to(dtype) for k, v in load_file(single).items()}


def load_transformer(name_or_path: str, subfolder: str | None = "transformer",
                     dtype: torch.dtype = torch.float32) -> LTXTransformer:
    """From a diffusers folder (or hub id) and its subfolder, or from one .safetensors file in Lightricks'
    original layout (read_single_file: the subfolder does not apply)."""
    if is_single_file(name_or_path):
        cfg, weights = read_single_file(Path(name_or_path), dtype)
    else:
        folder = resolve_folder(name_or_path, subfolder)
        cfg = config_from_json(json.loads((folder / "config.json").read_text()))
        weights = read_safetensors_weights(folder, dtype)
    with torch.device("meta"):  # no memory for random init that is overwritten anyway
        model = LTXTransformer(cfg)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.requires_grad_(False)


def is_single_file(name_or_path: str) -> bool:
    return str(name_or_path).endswith(".safetensors") and os.path.isfile(name_or_path)


RELEASED_WIDTHS = {2048: 32, 4096: 32}  # the released transformers' inner width -> attention heads (2B, 13B)


def read_single_file(path: Path, dtype: torch.dtype) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """A transformer saved as one file in Lightricks' original layout (patchify_proj, adaln_single, q_norm, ...;
    the VAE's vae.* keys may sit beside it), renamed by diffusers' own single-file conversion. Its config is
    the one Lightricks writes in the file's metadata ("config": {"transformer": {...}}), else read from the
    weights' shapes; only the head count cannot be, and it is 32 in every released size."""
    from safetensors import safe_open
    with errors.quiet_imports():
        from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers
    with safe_open(str(path), "pt") as f:
        # (as diffusers' conversion keeps them: the VAE's tensors beside it are never read)
        metadata, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys() if "vae" not in k}
    weights = convert_ltx_transformer_checkpoint_to_diffusers(tensors)
    if "proj_in.weight" not in weights or "transformer_blocks.0.attn1.to_q.weight" not in weights:
        raise ModelError(f"{path} holds no LTX-Video transformer in Lightricks' layout (patchify_proj, "
                         f"transformer_blocks.N.attn1 ...) nor in diffusers'")
    saved = json.loads(metadata.get("config", "{}")).get("transformer") if metadata.get("config") else None
    if saved:
        return config_from_json(saved), {k: v.to(dtype) for k, v in weights.items()}
    inner, in_channels = weights["proj_in.weight"].shape
    if inner not in RELEASED_WIDTHS:
        raise ModelError(f"{path} is {inner} wide, not a released LTX-Video size (2048 or 4096), and has no config "
                         f"in its metadata to tell its attention heads; save it with its config")
    heads = RELEASED_WIDTHS[inner]
    layers = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("transformer_blocks."))
    cfg = TransformerConfig(in_channels=in_channels, out_channels=weights["proj_out.weight"].shape[0],
                            num_attention_heads=heads, attention_head_dim=inner // heads,
                            cross_attention_dim=weights["transformer_blocks.0.attn2.to_k.weight"].shape[1],
                            num_layers=layers,
                            caption_channels=weights["caption_projection.linear_1.weight"].shape[1])
    return cfg, {k: v.to(dtype) for k, v in weights.items()}


def load_vae(name_or_path: str, subfolder: str | None = "vae", dtype: torch.dtype = torch.float32):
    """diffusers' AutoencoderKLLTXVideo, built on the meta device and filled from its safetensors like the
    transformer (no random init of 1.2 B parameters first, and no need for accelerate)."""
    with errors.quiet_imports():
        from diffusers import AutoencoderKLLTXVideo
    folder = resolve_folder(name_or_path, subfolder)
    with torch.device("meta"):
        vae = AutoencoderKLLTXVideo.from_config(AutoencoderKLLTXVideo.load_config(folder))
    vae.load_state_dict(read_safetensors_weights(folder, dtype), strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def load_text_encoder(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(T5 tokenizer, T5 encoder), frozen, from the pipeline's tokenizer/ and text_encoder/ folders."""
    with errors.quiet_imports():
        from transformers import T5EncoderModel, T5TokenizerFast
    tokenizer = T5TokenizerFast.from_pretrained(str(resolve_folder(name_or_path, "tokenizer")))
    encoder = T5EncoderModel.from_pretrained(str(resolve_folder(name_or_path, "text_encoder")), torch_dtype=dtype)
    return tokenizer, encoder.eval().requires_grad_(False)


def text_dim(name_or_path: str) -> int:
    """T5's width (d_model: 4096 for T5-XXL), read from text_encoder/config.json: no weights are loaded or
    downloaded, so a run whose captions are all cached still never touches T5."""
    config = resolve_folder(name_or_path, "text_encoder", configs_only=True) / "config.json"
    if not config.is_file():
        raise ModelError(f"no {config}: expected the T5 text encoder in text_encoder/ of a diffusers-layout pipeline")
    return json.loads(config.read_text())["d_model"]


def load_scheduler_config(name_or_path: str) -> dict:
    """The pipeline's scheduler settings (sigma shift), which sampling follows as LTXPipeline does."""
    return json.loads((resolve_folder(name_or_path, "scheduler") / "scheduler_config.json").read_text())


# -----------------------------------------------------------------------------
# Text and latents exactly as LTXPipeline prepares them

TEXT_TOKENS = 128  # LTXPipeline's max_sequence_length: captions are padded or cut to this many T5 tokens


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_length: int = TEXT_TOKENS):
    """T5 embeddings [B, max_length, D] and attention mask [B, max_length]; the encoder itself sees no mask."""
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    embeds = text_encoder(tokens.input_ids.to(device))[0]
    return embeds, tokens.attention_mask.bool().to(device)


def prompt_lengths(tokenizer, prompts: list[str]) -> list[int]:
    """Tokens of each prompt before encode_prompts cuts it to max_length (the end token counted)."""
    return [len(ids) for ids in tokenizer(prompts, add_special_tokens=True).input_ids]


def vae_ratios(vae) -> tuple[int, int]:
    """(spatial, temporal) compression of the VAE: (32, 8) for every released LTX-Video VAE."""
    return vae.spatial_compression_ratio, vae.temporal_compression_ratio


def rope_scale(vae, frame_rate: float = FRAME_RATE) -> tuple[float, float, float]:
    """RoPE's (time, height, width) interpolation scale: seconds per latent frame, pixels per latent pixel."""
    spatial, temporal = vae_ratios(vae)
    return (temporal / frame_rate, spatial, spatial)


def normalize_latents(z: torch.Tensor, vae) -> torch.Tensor:
    """[B, C, F, H, W] raw VAE latents -> the N(0, 1)-ish space the transformer works in."""
    mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    std = vae.latents_std.view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    return (z - mean) * vae.config.scaling_factor / std


def denormalize_latents(z: torch.Tensor, vae) -> torch.Tensor:
    mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    std = vae.latents_std.view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    return z * std / vae.config.scaling_factor + mean


@torch.no_grad()
def encode_video(vae, video: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] pixels in [-1, 1] -> normalised latents [B, C, (F−1)/8+1, H/32, W/32] (the posterior mean)."""
    param = next(vae.parameters())
    z = vae.encode(video.to(param.device, param.dtype)).latent_dist.mode()
    return normalize_latents(z.float(), vae)


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> tokens [B, F·H·W, C] in (F, H, W) row-major order (patch size 1)."""
    return z.flatten(2).transpose(1, 2)


def unpack_latents(tokens: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
    """Tokens [B, F·H·W, C] -> [B, C, F, H, W]."""
    return tokens.transpose(1, 2).unflatten(2, (num_frames, height, width))
