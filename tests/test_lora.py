"""LoRALinear, inject, and files that diffusers' LTX pipeline loads."""

import json

import pytest
import torch
import torch.nn as nn

import lora
import model as ltx
from conftest import perturb, tiny_diffusers_transformer

SCALE = (8 / 25, 32, 32)


def tiny_base() -> ltx.LTXTransformer:
    ref = tiny_diffusers_transformer()
    ours = ltx.LTXTransformer(ltx.config_from_json(dict(ref.config)))
    ours.load_state_dict(ref.state_dict())
    return ours.eval()


def tiny_ours(**inject_kwargs) -> ltx.LTXTransformer:
    ours = tiny_base()
    lora.inject(ours, **inject_kwargs)
    return ours


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


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_backward_is_the_derivative_of_its_forward(dropout):
    """LoRAFunction writes its backward out: torch's numerical gradcheck (fp64) on every input, also with the base
    weight and bias trainable and with dropout feeding the adapter (the same mask for both evaluations)."""
    gen = torch.Generator().manual_seed(0)
    x, w, bias = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
                  for shape in ((2, 4, 5), (7, 5), (7,)))
    a, b = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True) for shape in ((3, 5), (7, 3)))
    mask = (torch.rand(2, 4, 5, generator=gen) > dropout).double() / (1 - dropout)

    def layer(x, w, bias, a, b):
        return lora.LoRAFunction.apply(x, w, bias, a, b, 2.0, x * mask if dropout else None)
    assert torch.autograd.gradcheck(layer, (x, w, bias, a, b))


def test_lora_matches_peft_forward_and_gradients():
    """The reference most trainers run: diffusers' transformer with a peft LoRA of the same rank, alpha and
    weights. Outputs and every adapter gradient agree in fp32 (alpha != rank, so the scale is exercised)."""
    from peft import LoraConfig
    ref = tiny_diffusers_transformer()
    ours = tiny_base()
    lora.inject(ours, rank=4, alpha=12)
    ref.requires_grad_(False)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=12, target_modules=list(lora.DEFAULT_TARGETS)))
    randomize_adapters(ours)
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            for ab in "AB":
                getattr(ref.get_submodule(name), f"lora_{ab}")["default"].weight.copy_(
                    getattr(layer, f"lora_{ab}").weight)
    out = run(ours.train())
    gen = torch.Generator().manual_seed(7)
    x, text = torch.randn(2, 24, 8, generator=gen), torch.randn(2, 5, 12, generator=gen)
    expected = ref.train()(x, text, torch.tensor([250.0, 800.0]), torch.ones(2, 5, dtype=torch.bool), num_frames=3,
                           height=2, width=4, rope_interpolation_scale=SCALE, return_dict=False)[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    expected.square().mean().backward()
    for name, layer in lora.lora_layers(ours).items():
        for ab in "AB":
            theirs = getattr(ref.get_submodule(name), f"lora_{ab}")["default"].weight.grad
            torch.testing.assert_close(getattr(layer, f"lora_{ab}").weight.grad, theirs, atol=1e-6, rtol=1e-4)


def test_lora_under_autocast_computes_in_bf16_and_keeps_fp32_gradients():
    """Under bf16 autocast the adapter runs in bf16 (no fp32 copy of the activations) from fp32 master weights,
    whose gradients stay fp32; the output is what the same math gives in bf16."""
    layer = lora.LoRALinear(perturb(nn.Linear(16, 8)), rank=4, alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    bf = [t.to(torch.bfloat16) for t in (x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight)]
    expected = nn.functional.linear(bf[0], bf[1], bf[2]) + (bf[0] @ bf[3].t()) @ bf[4].t()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=0.05, rtol=0.02)
    out.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == layer.lora_B.weight.grad.dtype == torch.float32


def run_base(model):
    saved = {n: layer.lora_B.weight.clone() for n, layer in lora.lora_layers(model).items()}
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.zero_()
        out = run(model)
        for n, layer in lora.lora_layers(model).items():
            layer.lora_B.weight.copy_(saved[n])
    return out


# -----------------------------------------------------------------------------
# Files: each format loads in the tools it is written for, and every common layout loads back here

# ComfyUI's rule for an LTXV LoRA, restated from its comfy/lora.py (model_lora_keys_unet) and
# comfy/weight_adapter/lora.py (v0.8). ComfyUI holds the model's weights under "diffusion_model." with
# LTX-Video's original module names. For each "diffusion_model.<m>.weight" a LoRA may name the module
# "diffusion_model.<m>" or "lora_unet_<m with every . as _>"; for LTXV there is no rule for "transformer." keys.
# A named module x takes its up / down matrices from x.lora_up.weight / x.lora_down.weight or from
# x.lora_B.weight / x.lora_A.weight, and alpha from an x.alpha tensor; safetensors metadata is never read.
# It adds strength * (alpha / rank, or 1 when there is no x.alpha) * up @ down to the weight, and logs every
# key no module took as "lora key not loaded" and ignores it.
COMFY_LTXV_NAMES = (("proj_in", "patchify_proj"), ("time_embed", "adaln_single"))  # comfy/ldm/lightricks/model.py


def comfy_name(name: str) -> str:
    for ours, theirs in COMFY_LTXV_NAMES:
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours):]
    return name


def comfyui_weights(model) -> dict:
    """A base model's weights, keyed as ComfyUI holds LTXV."""
    return {"diffusion_model." + comfy_name(k): v.clone() for k, v in model.state_dict().items()}


def read(path) -> tuple[dict, dict]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def comfyui_apply(weights: dict, lora_file, strength: float = 1.0) -> tuple[dict, list[str]]:
    """Patches ComfyUI-keyed weights as its LoraLoaderModelOnly does; returns them and the keys not loaded."""
    tensors, _ = read(lora_file)
    modules = {}
    for key in weights:
        if key.endswith(".weight"):
            m = key[len("diffusion_model."):-len(".weight")]
            modules["diffusion_model." + m] = modules["lora_unet_" + m.replace(".", "_")] = key
    patched, loaded = dict(weights), set()
    for x, weight in modules.items():
        for up, down in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if x + up in tensors:
                u, d = tensors[x + up], tensors[x + down]
                scale = tensors[x + ".alpha"].item() / d.shape[0] if x + ".alpha" in tensors else 1.0
                patched[weight] = patched[weight] + strength * scale * (u @ d)
                loaded |= {x + up, x + down, x + ".alpha"}
                break
    return patched, sorted(set(tensors) - loaded)


def in_comfyui(lora_file, strength: float = 1.0) -> tuple[ltx.LTXTransformer, list[str]]:
    """The tiny base model with the LoRA merged by ComfyUI's rule, and the keys ComfyUI would not load."""
    base = tiny_base()
    patched, not_loaded = comfyui_apply(comfyui_weights(base), lora_file, strength)
    back = {k: patched["diffusion_model." + comfy_name(k)] for k in base.state_dict()}
    base.load_state_dict(back)
    return base, not_loaded


def trained(alpha: float, targets=lora.DEFAULT_TARGETS) -> ltx.LTXTransformer:
    model = tiny_ours(rank=4, alpha=alpha, targets=list(targets))
    randomize_adapters(model)
    return model


EXTRA = ("proj_in", "time_embed.linear", "proj_out")  # renamed in ComfyUI (two) and not (one)


@pytest.mark.parametrize("fmt,alpha", [("universal", 4.0), ("universal", 10.0), ("comfyui", 4.0), ("comfyui", 10.0)])
def test_comfyui_applies_the_trained_effect(tmp_path, fmt, alpha):
    targets = lora.DEFAULT_TARGETS + (("proj_out",) if fmt == "universal" else EXTRA)
    model = trained(alpha, targets)
    lora.save_lora(model, tmp_path / "lora.safetensors", fmt=fmt)
    merged, not_loaded = in_comfyui(tmp_path / "lora.safetensors")
    assert not_loaded == []
    with torch.no_grad():
        expected = run(model)
        assert (expected - run_base(model)).abs().max() > 1e-3  # the LoRA matters
        torch.testing.assert_close(run(merged), expected, atol=1e-5, rtol=1e-5)
        half, _ = in_comfyui(tmp_path / "lora.safetensors", strength=0.5)
        assert (run(half) - expected).abs().max() > 1e-4  # ComfyUI's strength scales the effect
    tensors, meta = read(tmp_path / "lora.safetensors")
    assert all(k.startswith("diffusion_model.") for k in tensors)
    assert any(k.endswith(".alpha") for k in tensors) == (fmt == "comfyui")  # universal needs none for its scale
    assert json.loads(meta["ltx_lora"])["alpha"] == alpha and json.loads(meta["ltx_lora"])["format"] == fmt


def test_comfyui_loads_nothing_from_diffusers_keys(tmp_path):
    """Why the default changed: ComfyUI skips every key of a `transformer.` file, so the LoRA does nothing there."""
    model = trained(4.0)
    lora.save_lora(model, tmp_path / "lora.safetensors", fmt="diffusers")
    merged, not_loaded = in_comfyui(tmp_path / "lora.safetensors")
    tensors, _ = read(tmp_path / "lora.safetensors")
    assert not_loaded == sorted(tensors) and len(tensors) == 2 * len(lora.lora_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(run(merged), run(tiny_base()), atol=0, rtol=0)


@pytest.mark.parametrize("fmt,alpha", [(f, a) for f in lora.FORMATS for a in (4.0, 12.0)])
def test_diffusers_pipeline_loads_our_file_and_agrees(tiny_pipeline_dir, tmp_path, fmt, alpha):
    from diffusers import LTXPipeline
    ours = ltx.load_transformer(str(tiny_pipeline_dir))
    lora.inject(ours, rank=4, alpha=alpha)
    randomize_adapters(ours)
    lora.save_lora(ours, tmp_path / "lora.safetensors", fmt=fmt)

    pipe = LTXPipeline.from_pretrained(str(tiny_pipeline_dir))
    if fmt == "comfyui":  # its .alpha tensors are for tools that read them; diffusers refuses the file
        with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
            pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
        return
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


def handmade(model, style: str) -> dict[str, torch.Tensor]:
    """The model's adapters in layouts other trainers write."""
    out = {}
    for name, layer in lora.lora_layers(model).items():
        a, b = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()
        alpha = torch.tensor(layer.scale * a.shape[0])
        if style == "bare":  # no prefix, no alpha anywhere: alpha = rank, so the scale sits in B
            out |= {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b * layer.scale}
        elif style == "down_up":
            key = f"diffusion_model.{comfy_name(name)}"
            out |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": alpha}
        elif style == "kohya":
            key = "lora_unet_" + comfy_name(name).replace(".", "_")
            out |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": alpha}
    return out


@pytest.mark.parametrize("form", [*lora.FORMATS, "bare", "down_up", "kohya"])
def test_every_layout_loads_back_with_the_same_effect(tmp_path, form):
    from safetensors.torch import save_file
    model = trained(10.0, lora.DEFAULT_TARGETS + (("proj_out",) if form == "universal" else EXTRA))
    path = tmp_path / "lora.safetensors"
    if form in lora.FORMATS:
        lora.save_lora(model, path, fmt=form)
    else:
        save_file(handmade(model, form), str(path))
    other = tiny_base()
    names = lora.apply_file(other, path)
    assert names == sorted(lora.lora_layers(model))
    exact = form not in ("universal", "bare")  # folding alpha / r into B rounds once
    with torch.no_grad():
        torch.testing.assert_close(run(other), run(model), atol=0 if exact else 1e-6, rtol=0 if exact else 1e-6)
        for layer in lora.lora_layers(other).values():
            layer.scale *= 0.5
        assert (run(other) - run(model)).abs().max() > 1e-4


def test_loading_refuses_what_it_cannot_place(tmp_path):
    from safetensors.torch import save_file
    model = trained(4.0)
    good = lora.file_tensors(model)
    cases = {
        "unknown": ({**good, "diffusion_model.no_such.lora_A.weight": torch.zeros(4, 8),
                     "diffusion_model.no_such.lora_B.weight": torch.zeros(8, 4)}, "'no_such'"),
        "not_lora": ({**good, "diffusion_model.proj_in.weight": torch.zeros(8, 8)}, "'diffusion_model.proj_in.weight'"),
        "no_up": ({k: v for k, v in good.items() if not k.endswith("attn1.to_q.lora_B.weight")}, "attn1.to_q needs"),
        "twice": ({**good, **{k.replace("diffusion_model.", "transformer.", 1): v.clone() for k, v in good.items()}},
                  "both name"),
        "other_size": ({**good, "diffusion_model.proj_out.lora_A.weight": torch.zeros(4, 99),
                        "diffusion_model.proj_out.lora_B.weight": torch.zeros(8, 4)}, "99 -> 8"),
    }
    for case, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / f"{case}.safetensors"))
        with pytest.raises(lora.LoRAError, match=message):
            lora.apply_file(tiny_base(), tmp_path / f"{case}.safetensors")
    for metadata in ("{not json", "[4]"):
        save_file(good, str(tmp_path / "meta.safetensors"), metadata={"lora_adapter_metadata": metadata})
        with pytest.raises(lora.LoRAError, match="lora_adapter_metadata is not the JSON object"):
            lora.apply_file(tiny_base(), tmp_path / "meta.safetensors")


def test_universal_refuses_modules_comfyui_names_otherwise(tmp_path):
    model = trained(4.0, lora.DEFAULT_TARGETS + ("proj_in",))
    with pytest.raises(lora.LoRAError, match="patchify_proj"):
        lora.save_lora(model, tmp_path / "lora.safetensors")
    assert not (tmp_path / "lora.safetensors").exists()


def test_adapter_state_restores_exactly_what_was_trained():
    model = trained(10.0)
    state = lora.adapter_state(model)
    other = tiny_ours(rank=4, alpha=10.0)
    lora.load_adapter_state(other, state)
    assert all(torch.equal(v, lora.adapter_state(other)[k]) for k, v in state.items())
    with pytest.raises(lora.LoRAError, match="missing"):
        lora.load_adapter_state(tiny_ours(rank=4, targets=["to_q"]), {})
