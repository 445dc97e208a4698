"""attention_mechanism: which calls each kernel takes (stand-ins for the CUDA-only packages record them and compute
SDPA), that the result is SDPA's, and the one-sentence refusals where a kernel cannot run."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

import config
import model as ltx
from conftest import DEMO_CONFIG


def tiny_model() -> ltx.LTXTransformer:
    torch.manual_seed(0)
    cfg = ltx.TransformerConfig(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                cross_attention_dim=16, num_layers=2, caption_channels=6)
    return ltx.LTXTransformer(cfg).to(torch.bfloat16)


def inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2 * 2 * 3, 4, generator=gen).bfloat16()
    text = torch.randn(1, 5, 6, generator=gen).bfloat16()
    mask = torch.tensor([[True, True, True, False, False]])  # padded caption: cross-attention needs its mask
    return x, text, torch.full((1,), 500.0), mask, 2, 2, 3, (8 / 25, 32, 32)


@pytest.fixture
def kernels(monkeypatch):
    """sageattention.sageattn and flash_attn.flash_attn_func as the packages lay them out, computing SDPA."""
    calls = []

    def sageattn(q, k, v, tensor_layout, is_causal):
        assert tensor_layout == "HND" and not is_causal
        calls.append(("sage", q.shape))
        return F.scaled_dot_product_attention(q, k, v)

    def flash_attn_func(q, k, v):  # [B, S, heads, head_dim]
        calls.append(("flash", q.shape))
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=sageattn))
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    return calls


def test_sageattention_runs_the_unmasked_calls_without_grad_only(kernels):
    m = tiny_model()
    with torch.no_grad():
        reference = m(*inputs())
        ltx.set_attention(m, "sageattention")
        out = m(*inputs())
    assert [name for name, _ in kernels] == ["sage", "sage"]  # each block's self-attention; cross-attention is masked
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    kernels.clear()
    m(*inputs()).float().sum().backward()  # training: SageAttention has no backward, SDPA runs
    assert kernels == []


def test_flash_runs_the_unmasked_calls_forward_and_backward(kernels):
    m = tiny_model()
    for p in m.parameters():
        p.requires_grad_(True)
    m(*inputs()).float().sum().backward()
    reference = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    ltx.set_attention(m, "flash")
    m(*inputs()).float().sum().backward()
    assert [name for name, _ in kernels] == ["flash", "flash"]
    assert all(torch.equal(p.grad, r) for p, r in zip(m.parameters(), reference))


def test_kernels_that_cannot_run_here_are_refused_in_one_sentence(monkeypatch):
    ltx.check_attention("sdpa", torch.device("cpu"))
    with pytest.raises(SystemExit, match="runs on CUDA GPUs only"):
        ltx.check_attention("flash", torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "sageattention", None)  # not installed
    with pytest.raises(SystemExit, match="needs the sageattention package"):
        ltx.check_attention("sageattention", torch.device("cuda"))
    with pytest.raises(SystemExit, match="compile = true traces SDPA attention only"):
        config.parse_config([DEMO_CONFIG, "--compile=true", "--attention_mechanism=flash"])
