"""Shared fixtures: tiny random models built offline, never downloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that tries to download fails instead of hanging

import pytest
import torch


def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Random offsets on every parameter, so ones / zeros initialisations cannot hide a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module


def tiny_diffusers_transformer(heads: int = 2, head_dim: int = 8, layers: int = 2, channels: int = 8, caption: int = 12):
    from diffusers import LTXVideoTransformer3DModel
    torch.manual_seed(0)
    ref = LTXVideoTransformer3DModel(in_channels=channels, out_channels=channels, num_attention_heads=heads,
                                     attention_head_dim=head_dim, cross_attention_dim=heads * head_dim,
                                     num_layers=layers, caption_channels=caption)
    return perturb(ref).eval()


DATA = '\n[[datasets]]\ninstance_data_dir = "clips"\n'  # the least data a config needs


def write_config(tmp_path, text: str, data: bool = True) -> str:
    """A config file; with `data`, a dataset table is appended (TOML tables must come after plain keys)."""
    path = tmp_path / "x.toml"
    path.write_text(text + (DATA if data else ""))
    return str(path)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """The tiny random LTX pipeline in diffusers layout, as the demo writes it."""
    import demo
    return demo.make_tiny_pipeline(tmp_path_factory.mktemp("tiny-ltx") / "model", seed=0)
