"""LoRALinear, inject, merge, and files that diffusers' LTX pipeline loads."""

import json

import pytest
import torch
import torch.nn as nn

import lora
import model as ltx
from conftest import perturb, tiny_diffusers_transformer

SCALE = (8 / 25, 32, 32)


def tiny_ours(**inject_kwargs) -> ltx.LTXTransformer:
    ref = tiny_diffusers_transformer()
    ours = ltx.LTXTransformer(ltx.config_from_json(dict(ref.config)))
    ours.load_state_dict(ref.state_dict())
    lora.inject(ours, **inject_kwargs)
    return ours.eval()


def randomize_adapters(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def run(model, batch=2, f=3, h=2, w=4):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(batch, f * h * w, 8, generator=gen)
    text = torch.randn(batch, 5, 12, generator=gen)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    return model(x, text, torch.tensor([250.0, 800.0][:batch]), mask, f, h, w, SCALE)


def test_lora_linear_keeps_base_parameters_and_starts_as_identity():
    base = perturb(nn.Linear(6, 5))
    weight = base.weight
    layer = lora.LoRALinear(base, rank=4, alpha=8)
    assert layer.weight is weight  # shared, not copied
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x))  # B = 0
    assert layer.lora_A.weight.abs().sum() > 0 and layer.scale == 2.0


def test_inject_default_targets_every_attention_and_ff_linear():
    model = tiny_ours(rank=4)
    names = set(lora.lora_layers(model))
    per_block = [f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")] + ["ff.net.0.proj", "ff.net.2"]
    assert names == {f"transformer_blocks.{b}.{p}" for b in range(2) for p in per_block}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}


def test_inject_custom_targets_and_error():
    model = tiny_ours(targets=["attn1.to_q", "to_v"], rank=2)
    assert len(lora.lora_layers(model)) == 2 * 3
    with pytest.raises(lora.LoRAError, match="matched no"):
        lora.inject(ltx.LTXTransformer(ltx.TransformerConfig(num_layers=1, num_attention_heads=1, attention_head_dim=6,
                                                             in_channels=4, out_channels=4, cross_attention_dim=6,
                                                             caption_channels=4)), targets=["to_nothing"])


def test_injected_model_is_the_base_until_trained_and_only_adapters_get_grads():
    ref = tiny_diffusers_transformer()
    model = tiny_ours(rank=4)
    x = torch.randn(2, 24, 8)
    text, mask = torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)
    t = torch.tensor([250.0, 800.0])
    with torch.no_grad():
        expected = ref(x, text, t, mask, num_frames=3, height=2, width=4, rope_interpolation_scale=SCALE)[0]
    out = model.train()(x, text, t, mask, 3, 2, 4, SCALE)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for p in lora.lora_parameters(model))  # B = 0 but dL/dB is not


def test_merge_equals_unmerged_and_unmerge_restores():
    model = tiny_ours(rank=4, alpha=2.0)
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = run(model)
        lora.merge(model)
        merged = run(model)
        lora.unmerge(model)
        again = run(model)
    assert (unmerged - run_base(model)).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, unmerged)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)


def run_base(model):
    saved = {n: layer.lora_B.weight.clone() for n, layer in lora.lora_layers(model).items()}
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.zero_()
        out = run(model)
        for n, layer in lora.lora_layers(model).items():
            layer.lora_B.weight.copy_(saved[n])
    return out


def test_save_load_round_trip(tmp_path):
    model = tiny_ours(rank=4, alpha=8.0)
    randomize_adapters(model)
    path = tmp_path / "lora.safetensors"
    lora.save_lora(model, path, {"base_model": "tiny"})
    other = tiny_ours(rank=4)  # alpha defaults to the rank; the file's alpha wins
    lora.load_lora(other, path)
    with torch.no_grad():
        torch.testing.assert_close(run(other), run(model), atol=0, rtol=0)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert not any(k.endswith(".alpha") for k in keys)
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == 8.0
    assert json.loads(meta["ltx_lora"])["base_model"] == "tiny"


def test_load_accepts_comfyui_keys_and_rejects_mismatches(tmp_path):
    from safetensors.torch import save_file
    model = tiny_ours(rank=4)
    randomize_adapters(model)
    comfy = {k.replace("transformer.", "diffusion_model.", 1): v for k, v in lora.lora_state_dict(model).items()}
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    other = tiny_ours(rank=4)
    lora.load_lora(other, tmp_path / "comfy.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(run(other), run(model))
    with pytest.raises(lora.LoRAError, match="rank 4"):
        lora.load_lora(tiny_ours(rank=8), tmp_path / "comfy.safetensors")
    with pytest.raises(lora.LoRAError, match="missing"):
        lora.load_lora(tiny_ours(rank=4, targets=list(lora.DEFAULT_TARGETS) + ["proj_out"]), tmp_path / "comfy.safetensors")


@pytest.mark.parametrize("alpha", [4.0, 12.0])
def test_diffusers_pipeline_loads_our_file_and_agrees(tiny_pipeline_dir, tmp_path, alpha):
    from diffusers import LTXPipeline
    ours = ltx.load_transformer(str(tiny_pipeline_dir))
    lora.inject(ours, rank=4, alpha=alpha)
    randomize_adapters(ours)
    lora.save_lora(ours, tmp_path / "lora.safetensors")

    pipe = LTXPipeline.from_pretrained(str(tiny_pipeline_dir))
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    cfg = ours.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3 * 2 * 3, cfg.in_channels, generator=gen)
    text = torch.randn(1, 9, cfg.caption_channels, generator=gen)
    mask = torch.ones(1, 9, dtype=torch.bool)
    t = torch.tensor([600.0])
    with torch.no_grad():
        theirs = pipe.transformer(x, text, t, mask, num_frames=3, height=2, width=3, rope_interpolation_scale=SCALE,
                                  return_dict=False)[0]
        mine = ours.eval()(x, text, t, mask, 3, 2, 3, SCALE)
        for layer in lora.lora_layers(ours).values():
            layer.lora_B.weight.zero_()
        base = ours(x, text, t, mask, 3, 2, 3, SCALE)
    assert (mine - base).abs().max() > 1e-3  # the LoRA changes the output, so agreement means something
    torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-5)
