"""Our transformer against diffusers' LTXVideoTransformer3DModel on tiny random configs."""

import copy
import subprocess
import sys

import pytest
import torch

import demo
import model as ltx
from conftest import REPO, perturb, tiny_diffusers_transformer

SCALE = (8 / 25, 32, 32)


def ours_from(ref) -> ltx.LTXTransformer:
    ours = ltx.LTXTransformer(ltx.config_from_json(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def inputs(batch=2, frames=3, height=2, width=4, channels=8, caption=12, text_len=7):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, frames * height * width, channels, generator=gen)
    text = torch.randn(batch, text_len, caption, generator=gen)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[0, 4:] = False  # padding in one sample: the −10000 bias must matter
    return x, text, mask, (frames, height, width)


def test_parameter_names_and_shapes_match_diffusers():
    ref = tiny_diffusers_transformer()
    ours = ltx.LTXTransformer(ltx.config_from_json(dict(ref.config)))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


# The released transformers' shapes (their config.json): the 2B models (0.9.0 to 0.9.6) and the 13B ones (0.9.7, 0.9.8)
FULL_SIZE = {"2b": dict(num_layers=28, num_attention_heads=32, attention_head_dim=64, cross_attention_dim=2048),
             "13b": dict(num_layers=48, num_attention_heads=32, attention_head_dim=128, cross_attention_dim=4096)}


@pytest.mark.parametrize("size", FULL_SIZE)
def test_full_size_models_have_diffusers_names_and_shapes(size):
    """On the meta device (no weights allocated): the 2B and 13B module trees are diffusers' exactly."""
    from diffusers import LTXVideoTransformer3DModel
    with torch.device("meta"):
        ref = LTXVideoTransformer3DModel(in_channels=128, out_channels=128, caption_channels=4096, **FULL_SIZE[size])
        ours = ltx.LTXTransformer(ltx.config_from_json(dict(ref.config)))
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    billions = sum(v.numel() for v in shapes.values()) / 1e9
    assert (1.8 < billions < 2.1) if size == "2b" else (12.5 < billions < 14)


@pytest.mark.parametrize("head_dim", [8, 6])  # inner dim 16 needs RoPE padding (16 % 6 = 4), 12 does not
@pytest.mark.parametrize("per_token", [False, True])
def test_forward_matches_diffusers(head_dim, per_token):
    ref = tiny_diffusers_transformer(head_dim=head_dim)
    ours = ours_from(ref)
    x, text, mask, (f, h, w) = inputs()
    t = torch.rand(2, f * h * w) * 1000 if per_token else torch.tensor([300.0, 700.0])
    with torch.no_grad():
        expected = ref(x, text, t, mask, num_frames=f, height=h, width=w, rope_interpolation_scale=SCALE,
                       return_dict=False)[0]
        got = ours(x, text, t, mask, f, h, w, SCALE)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_checkpointing_and_compile_change_nothing_but_speed(checkpointing):
    """compile = true compiles every block with fullgraph=True (a graph break would be an error, so the LoRA
    function, the complex RoPE and checkpointing must all trace); with or without it, and with or without gradient
    checkpointing (every block but the last recomputed, or every other one), outputs and adapter gradients are
    eager's."""
    import lora
    eager = ours_from(tiny_diffusers_transformer(layers=4)).train()
    lora.inject(eager, rank=4)
    perturb(eager, seed=3)
    variants = {"eager": eager, "checkpointed": copy.deepcopy(eager), "compiled": copy.deepcopy(eager)}
    variants["every other block"] = copy.deepcopy(eager)
    variants["every other block"].checkpointing_interval = 2
    for name in ("checkpointed", "compiled", "every other block"):
        variants[name].gradient_checkpointing = checkpointing
    ltx.compile_blocks(variants["compiled"])
    x, text, mask, (f, h, w) = inputs()
    grads = {}
    for name, model in variants.items():
        out = model(x, text, torch.tensor([300.0, 700.0]), mask, f, h, w, SCALE)
        out.square().mean().backward()
        grads[name] = [out.detach()] + [p.grad for p in lora.lora_parameters(model)]
    for name in ("checkpointed", "compiled", "every other block"):
        for got, expected in zip(grads[name], grads["eager"]):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_per_token_timesteps_are_used_per_token():
    ours = ours_from(tiny_diffusers_transformer())
    x, text, mask, (f, h, w) = inputs()
    t = torch.full((2, f * h * w), 500.0)
    t_first_frame_clean = t.clone()
    t_first_frame_clean[:, : h * w] = 0.0
    with torch.no_grad():
        a = ours(x, text, t, mask, f, h, w, SCALE)
        b = ours(x, text, t_first_frame_clean, mask, f, h, w, SCALE)
        c = ours(x, text, t[:, 0], mask, f, h, w, SCALE)
    torch.testing.assert_close(a, c)  # a constant per-token timestep is the per-sample one
    assert (a - b).abs().max() > 1e-3


def test_text_mask_changes_output():
    ours = ours_from(tiny_diffusers_transformer())
    x, text, mask, (f, h, w) = inputs()
    with torch.no_grad():
        masked = ours(x, text, torch.tensor([300.0, 300.0]), mask, f, h, w, SCALE)
        unmasked = ours(x, text, torch.tensor([300.0, 300.0]), torch.ones_like(mask), f, h, w, SCALE)
    assert (masked[0] - unmasked[0]).abs().max() > 1e-4
    torch.testing.assert_close(masked[1], unmasked[1])  # sample 1 had no padding


def test_rope_matches_diffusers():
    from diffusers.models.transformers.transformer_ltx import LTXVideoRotaryPosEmbed
    for dim in (16, 12, 2048):
        ref = LTXVideoRotaryPosEmbed(dim)
        cos_ref, sin_ref = ref(torch.zeros(1, 1, dim), 3, 4, 5, SCALE)
        cos, sin = ltx.rope_frequencies(dim, 3, 4, 5, SCALE, torch.device("cpu"))
        torch.testing.assert_close(cos, cos_ref)
        torch.testing.assert_close(sin, sin_ref)


def test_gradient_checkpointing_gives_the_same_gradients():
    ref = tiny_diffusers_transformer()
    grads = []
    for checkpointing in (False, True):
        ours = ours_from(ref).train()
        ours.gradient_checkpointing = checkpointing
        x, text, mask, (f, h, w) = inputs()
        x.requires_grad_(True)
        ours(x, text, torch.tensor([300.0, 700.0]), mask, f, h, w, SCALE).square().mean().backward()
        grads.append([x.grad] + [p.grad for p in ours.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_unsupported_architecture_is_refused():
    with pytest.raises(ltx.ModelError, match="patch_size"):
        ltx.config_from_json({"patch_size": 2})


@pytest.mark.parametrize("shard", [False, True])
def test_load_transformer_from_saved_folder(tmp_path, shard):
    ref = tiny_diffusers_transformer()
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="20KB" if shard else "10GB")
    if shard:
        assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    for path, sub in ((str(tmp_path), "transformer"), (str(tmp_path / "transformer"), "none")):
        ours = ltx.load_transformer(path, sub, torch.float32)
        assert not any(p.requires_grad for p in ours.parameters())
        for k, v in ref.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v), k
    assert ltx.load_transformer(str(tmp_path), "transformer", torch.bfloat16).proj_in.weight.dtype == torch.bfloat16


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ltx.ModelError, match="does not exist"):
        ltx.load_transformer(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(ltx.ModelError, match="transformer"):
        ltx.load_transformer(str(tmp_path))


def test_latent_helpers_match_the_pipeline(tiny_pipeline_dir):
    from diffusers import LTXPipeline
    vae = ltx.load_vae(str(tiny_pipeline_dir))
    z = torch.randn(2, vae.config.latent_channels, 3, 4, 5)
    packed = ltx.pack_latents(z)
    torch.testing.assert_close(packed, LTXPipeline._pack_latents(z))
    torch.testing.assert_close(ltx.unpack_latents(packed, 3, 4, 5), z)
    norm = ltx.normalize_latents(z, vae)
    expected = LTXPipeline._normalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    torch.testing.assert_close(norm, expected)
    assert (norm - z).abs().max() > 1e-3  # the tiny VAE's mean / std are not the identity
    torch.testing.assert_close(ltx.denormalize_latents(norm, vae), z, atol=1e-5, rtol=1e-5)
    assert ltx.vae_ratios(vae) == (32, 8)


def test_tiny_pipeline_loads_through_the_real_path(tiny_pipeline_dir):
    transformer = ltx.load_transformer(str(tiny_pipeline_dir))
    tokenizer, encoder = ltx.load_text_encoder(str(tiny_pipeline_dir))
    emb, mask = ltx.encode_prompts(tokenizer, encoder, ["a red circle moving left", ""])
    assert emb.shape == (2, 128, transformer.config.caption_channels) and mask.shape == (2, 128)
    assert mask[0].sum() > mask[1].sum() >= 1  # the empty prompt still has its end-of-sequence token
    vae = ltx.load_vae(str(tiny_pipeline_dir))
    latents = ltx.encode_video(vae, torch.rand(1, 3, 17, 64, 96) * 2 - 1)
    assert latents.shape == (1, transformer.config.in_channels, 3, 2, 3)


def test_text_dim_is_read_from_the_config_alone(tiny_pipeline_dir, monkeypatch):
    import huggingface_hub
    _, encoder = ltx.load_text_encoder(str(tiny_pipeline_dir))
    assert ltx.text_dim(str(tiny_pipeline_dir)) == encoder.config.d_model == 16
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns: calls.append(allow_patterns) or str(tiny_pipeline_dir))
    assert ltx.text_dim("org/model") == 16 and calls == [["*.json"]]  # a hub id: its json files, no weights


def test_tiny_pipeline_is_deterministic(tmp_path):
    import hashlib
    digests = []
    for name in ("a", "b"):
        folder = demo.make_tiny_pipeline(tmp_path / name, seed=0)
        digests.append({p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(folder.rglob("*.safetensors"))})
    assert digests[0] == digests[1] and len(digests[0]) >= 3


def test_no_import_cycles_and_model_needs_no_demo_code():
    # each module imports only the ones below it: model <- lora, data <- config <- sample <- train; demo.py
    # imports model.py for DEMO_MARK, never the other way round
    check = ("import sys, importlib\n"
             "for name, never in [('model', {'demo', 'config', 'sample', 'train'}), ('config', {'sample', 'train'}),\n"
             "                    ('sample', {'train', 'demo'})]:\n"
             "    importlib.import_module(name)\n"
             "    assert not never & set(sys.modules), (name, never & set(sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_load_vae_equals_diffusers_from_pretrained(tiny_pipeline_dir):
    from diffusers import AutoencoderKLLTXVideo
    ours = ltx.load_vae(str(tiny_pipeline_dir))
    ref = AutoencoderKLLTXVideo.from_pretrained(str(tiny_pipeline_dir), subfolder="vae")
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    assert ltx.load_vae(str(tiny_pipeline_dir), dtype=torch.bfloat16).latents_std.dtype == torch.bfloat16


# -----------------------------------------------------------------------------
# Single files in Lightricks' original layout

ORIGINAL_NAMES = {"proj_in": "patchify_proj", "time_embed": "adaln_single", "norm_q": "q_norm", "norm_k": "k_norm"}


def original_layout(state: dict) -> dict:
    """diffusers' names -> Lightricks' (the inverse of diffusers' single-file conversion), as ComfyUI users hold
    them: model.diffusion_model.patchify_proj..., with a VAE key beside them."""
    out = {}
    for key, tensor in state.items():
        for ours, theirs in ORIGINAL_NAMES.items():
            key = key.replace(ours, theirs)
        out[f"model.diffusion_model.{key}"] = tensor.contiguous()
    return {**out, "vae.encoder.conv_in.conv.bias": torch.zeros(4)}


def test_a_single_file_in_lightricks_layout_loads_as_its_folder(tmp_path):
    import json
    from safetensors.torch import save_file
    ref = tiny_diffusers_transformer()
    path = tmp_path / "ltxv-tiny.safetensors"
    save_file(original_layout(ref.state_dict()), path, metadata={"config": json.dumps({"transformer": dict(ref.config)})})
    ours = ltx.load_transformer(str(path))
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in ref.state_dict().items())
    x, text, mask, grid = inputs()
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():  # the same model as from its diffusers weights, to the bit
        assert torch.equal(ours(x, text, t, mask, *grid, SCALE), ours_from(ref)(x, text, t, mask, *grid, SCALE))
    save_file(original_layout(ref.state_dict()), path)  # no config, and not a released width: one sentence
    with pytest.raises(ltx.ModelError, match="is 16 wide, not a released LTX-Video size"):
        ltx.load_transformer(str(path))
    save_file({"vae.encoder.conv_in.conv.bias": torch.zeros(4)}, path)
    with pytest.raises(ltx.ModelError, match="holds no LTX-Video transformer"):
        ltx.load_transformer(str(path))


def test_a_released_size_without_a_config_is_read_from_its_shapes(tmp_path):
    """The 2B shapes (only the tensors the config is read from, in bf16): 28 layers, 32 x 64, cross 2048."""
    from safetensors.torch import save_file
    empty = lambda *shape: torch.zeros(shape, dtype=torch.bfloat16)
    save_file({"model.diffusion_model.patchify_proj.weight": empty(2048, 128),
               "model.diffusion_model.proj_out.weight": empty(128, 2048),
               "model.diffusion_model.caption_projection.linear_1.weight": empty(2048, 4096),
               "model.diffusion_model.transformer_blocks.0.attn1.to_q.weight": empty(1, 1),
               "model.diffusion_model.transformer_blocks.0.attn2.to_k.weight": empty(2048, 2048),
               "model.diffusion_model.transformer_blocks.27.attn1.to_q.weight": empty(1, 1)}, tmp_path / "2b.safetensors")
    cfg, _ = ltx.read_single_file(tmp_path / "2b.safetensors", torch.float32)
    assert cfg == ltx.TransformerConfig()  # the 2B defaults: 28 layers, 32 heads of 64, cross-attention 2048
