"""LoKr: LyCORIS' lokr (lycoris-lora, the reference SimpleTuner trains with) on the same layers and weights, the file
ComfyUI reads, and the demo trained with a LyCORIS JSON config."""

import copy
import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn as nn

import checkpoint
import config
import lora
import prepare
from conftest import DEMO_CONFIG, read_log, run_in_process
from test_lora import comfy_name, comfyui_weights, read, run, tiny_base

# the example: factor 16 in attention, 8 in the feed-forward, linear_dim so large that every w2 is whole
EXAMPLE = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
           "apply_preset": {"target_module": ["Attention", "FeedForward"],
                            "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}}}}
LOW_RANK = {"algo": "lokr", "multiplier": 0.7, "linear_dim": 2, "linear_alpha": 3, "factor": 2,
            "apply_preset": {"target_module": ["Attention", "FeedForward"],
                             "module_algo_map": {"FeedForward": {"factor": 4}}}}


def write_json(tmp_path, raw, name="lycoris.json"):
    (tmp_path / name).write_text(json.dumps(raw))
    return str(tmp_path / name)


def test_factorization_is_lycoris():
    from lycoris.functional import factorization
    for dim in range(1, 300):
        for factor in (-1, 0, 1, 2, 3, 4, 7, 8, 16, 1000):
            assert lora.factorization(dim, factor) == factorization(dim, factor), (dim, factor)


def randomize(params, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


# (out, in, factor, linear_dim, linear_alpha): whole w2 by its size (dim >= max(b, d) / 2), low-rank w2,
# factor -1 (nearest the square root), rank 1, and linear_dim far above the layer's size
SHAPES = [(48, 64, 8, 4, 2.0), (96, 32, -1, 2, 3.0), (64, 128, 4, 1, 0.5), (30, 20, 16, 10000, 1.0), (64, 64, -1, 3, 0)]


@pytest.mark.parametrize("out_f,in_f,factor,dim,alpha", SHAPES)
def test_lokr_linear_is_lycoris_lokr(out_f, in_f, factor, dim, alpha):
    """The same nn.Linear wrapped by LyCORIS' LokrModule and by ours: the same factor names and shapes, the same
    alpha buffer and scale, both the base at init, and the same output once the factors hold the same random values."""
    from lycoris.modules.lokr import LokrModule
    torch.manual_seed(1)
    base = nn.Linear(in_f, out_f)
    ours_base = copy.deepcopy(base)
    theirs = LokrModule("m", base, multiplier=0.7, lora_dim=dim, alpha=alpha, factor=factor)
    theirs.apply_to()
    spec = lora.LoKrSpec(dim=dim, alpha=alpha, factor=factor, multiplier=0.7, targets=("Wrapper",))
    wrapper = type("Wrapper", (nn.Module,), {})()
    wrapper.linear = ours_base
    lora.inject_lokr(wrapper, spec)
    ours = wrapper.linear
    x = torch.randn(3, 5, in_f)
    torch.testing.assert_close(ours(x), ours_base(x), atol=0, rtol=0)  # one factor starts at zero
    theirs_sd = theirs.state_dict()
    ours_sd = {k: v for k, v in ours.state_dict().items() if k not in ("weight", "bias")}
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}
    assert ours.alpha.item() == theirs.alpha.item() and ours.scale == pytest.approx(theirs.scale)
    assert ("lokr_w2" in ours_sd) == (dim >= 10000 or ours.rank is None)
    randomize([p for n, p in ours.named_parameters() if n.startswith("lokr_")])
    with torch.no_grad():
        theirs.load_state_dict({k: ours_sd[k] for k in theirs_sd})
        expected, got = base(x), ours(x)
    assert (got - ours_base(x)).abs().max() > 1e-2  # the factors matter
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def lycoris_network(model, raw):
    """LyCORIS' own network on `model` from a JSON config, as SimpleTuner builds it (preset, then the network)."""
    from lycoris import LycorisNetwork
    LycorisNetwork.apply_preset({"target_module": raw["apply_preset"]["target_module"], "target_name": [],
                                 "module_algo_map": raw["apply_preset"]["module_algo_map"], "name_algo_map": {},
                                 "exclude_name": [], "lora_prefix": "lycoris"})
    network = LycorisNetwork(model, multiplier=raw["multiplier"], lora_dim=raw["linear_dim"],
                             alpha=raw["linear_alpha"], network_module=raw["algo"], factor=raw["factor"])
    network.apply_to()
    return network


@pytest.mark.parametrize("raw", [EXAMPLE, LOW_RANK], ids=["example", "low_rank"])
def test_lycoris_config_wraps_what_lycoris_wraps(tmp_path, raw):
    """One JSON config, applied by LyCORIS to diffusers-named modules and by inject_lokr to model.py's: the same
    layers, per-class factors, keys and shapes (LyCORIS' names are ours with lycoris_ and _ for .), and the same model
    output with the same factor values."""
    ours, ref = tiny_base(), tiny_base()
    names = lora.inject_lokr(ours, lora.read_lycoris_config(write_json(tmp_path, raw)))
    network = lycoris_network(ref, raw)
    theirs = network.state_dict()
    mine = {f"lycoris_{n.replace('.', '_')}.{k}": v for n, layer in lora.lora_layers(ours).items()
            for k, v in layer.state_dict().items() if k not in ("weight", "bias")}
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(mine[k].item() == v.item() for k, v in theirs.items() if k.endswith(".alpha"))
    assert len(names) == 2 * 10  # every attention and feed-forward linear of both blocks
    randomize(lora.lora_parameters(ours))
    with torch.no_grad():
        network.load_state_dict({k: mine[k] for k in theirs})
        expected, got = run(ref), run(ours)
    assert (got - run(tiny_base())).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def trained_lokr(tmp_path, raw):
    model = tiny_base()
    lora.inject_lokr(model, lora.read_lycoris_config(write_json(tmp_path, raw)))
    randomize(lora.lora_parameters(model))
    return model


# ComfyUI's rule for a LoKr file on LTXV, restated from its source (comfy/lora.py model_lora_keys_unet and load_lora,
# comfy/weight_adapter/lokr.py): an LTXV model maps only "diffusion_model.<m>" and "lora_unet_<m with _>" module
# names (LTX-Video's original names, which keep every block linear's diffusers name); for each it reads <x>.alpha
# and <x>.lokr_w1 plus <x>.lokr_w2, or <x>.lokr_w2_a and <x>.lokr_w2_b, and adds strength · s · kron(w1, w2) to the
# weight, s = alpha / (w2_b's rows) when w2 is low-rank, else 1. Keys no module takes are logged and ignored.
def comfyui_lokr_apply(weights: dict, tensors: dict) -> tuple[dict, list[str]]:
    patched, loaded = dict(weights), set()
    for key in weights:
        x = key[:-len(".weight")]
        if x + ".lokr_w1" not in tensors:
            continue
        w1 = tensors[x + ".lokr_w1"]
        if x + ".lokr_w2" in tensors:
            w2, s, parts = tensors[x + ".lokr_w2"], 1.0, (".lokr_w1", ".lokr_w2", ".alpha")
        else:
            w2 = tensors[x + ".lokr_w2_a"] @ tensors[x + ".lokr_w2_b"]
            s = tensors[x + ".alpha"].item() / tensors[x + ".lokr_w2_b"].shape[0]
            parts = (".lokr_w1", ".lokr_w2_a", ".lokr_w2_b", ".alpha")
        patched[key] = patched[key] + s * torch.kron(w1, w2)
        loaded |= {x + p for p in parts}
    return patched, sorted(set(tensors) - loaded)


def in_comfyui(path) -> tuple[nn.Module, list[str]]:
    """The tiny base model with the LoKr file merged by ComfyUI's rule, and the keys ComfyUI would not load."""
    base = tiny_base()
    patched, not_loaded = comfyui_lokr_apply(comfyui_weights(base), read(path)[0])
    base.load_state_dict({k: patched["diffusion_model." + comfy_name(k)] for k in base.state_dict()})
    return base, not_loaded


@pytest.mark.parametrize("raw", [EXAMPLE, LOW_RANK], ids=["example", "low_rank"])
def test_lokr_file_has_comfyuis_keys_and_loads_back(tmp_path, raw):
    model = trained_lokr(tmp_path, raw)
    path = tmp_path / "lora.safetensors"
    lora.save_lora(model, path)
    tensors, meta = read(path)
    w2 = ("lokr_w2",) if raw is EXAMPLE else ("lokr_w2_a", "lokr_w2_b")
    block = {k for k in tensors if k.startswith("diffusion_model.transformer_blocks.0.")}
    assert block == {f"diffusion_model.transformer_blocks.0.{m}.{p}" for p in ("lokr_w1", *w2, "alpha")
                     for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                               "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")}
    assert json.loads(meta["ltx_lora"])["type"] == "lokr"
    merged, not_loaded = in_comfyui(path)
    assert not_loaded == []
    with torch.no_grad():
        expected = run(model)
        torch.testing.assert_close(run(merged), expected, atol=1e-5, rtol=1e-5)
        other = tiny_base()
        assert lora.apply_file(other, path) == sorted(lora.lora_layers(model))
        torch.testing.assert_close(run(other), expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(lora.LoRAError, match="diffusers loads no LoKr"):
        lora.save_lora(model, path, fmt="diffusers")
    with pytest.raises(lora.LoRAError, match="LoKr factors"):
        lora.read_lora_file(path)


def test_lycoris_own_file_loads_here(tmp_path):
    """A file as LyCORIS writes it (SimpleTuner): lycoris_<name with _> keys, loaded by apply_file, the same output."""
    from safetensors.torch import save_file
    ref = tiny_base()
    network = lycoris_network(ref, LOW_RANK)
    randomize(network.parameters())
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp_path / "theirs.safetensors"))
    other = tiny_base()
    lora.apply_file(other, tmp_path / "theirs.safetensors", scale=LOW_RANK["multiplier"])
    with torch.no_grad():
        torch.testing.assert_close(run(other), run(ref), atol=1e-5, rtol=1e-5)


def test_adapter_state_and_parameters_cover_lokr(tmp_path):
    model = trained_lokr(tmp_path, LOW_RANK)
    params = lora.lora_parameters(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if ".lokr_" in n} and len(params) == 3 * 20
    state = lora.adapter_state(model)
    assert len(state) == len(params) and all(".lokr_" in k for k in state)
    other = tiny_base()
    lora.inject_lokr(other, lora.read_lycoris_config(tmp_path / "lycoris.json"))
    lora.load_adapter_state(other, state)
    with torch.no_grad():
        assert torch.equal(run(other), run(model))


@pytest.mark.parametrize("raw,message", [
    (None, "needs lycoris_config"),
    ({"algo": "loha"}, "asks for algo 'loha'; only \"lokr\" is supported"),
    ({"algo": "lokr", "decompose_both": True}, "decompose_both is not supported"),
    ({"algo": "lokr", "apply_preset": {"module_algo_map": {"FeedForward": {"algo": "lora"}}}}, "algo = 'lora'"),
    ({"algo": "lokr", "factor": "16"}, "factor is not"),
    ({"algo": "lokr", "linear_alpha": float("nan")}, "linear_alpha must be a finite number >= 0.*got linear_alpha nan"),
    ({"algo": "lokr", "multiplier": float("inf")}, "multiplier a finite number > 0.*multiplier inf"),
    ({"algo": "lokr", "multiplier": 0}, "multiplier a finite number > 0.*multiplier 0"),  # it would train nothing
    ({"algo": "lokr", "apply_preset": {"target_module": "Attention"}}, "target_module must be a list of class names"),
    ({"algo": "lokr", "apply_preset": {"target_module": ["Attention", "Atention"]}},
     "target class\\(es\\) Atention are not in the LTX transformer \\(its classes: .*FeedForward"),
    ("missing", "does not exist"),
    ("{not json", "is not a readable JSON file"),
])
def test_lycoris_config_errors_are_one_sentence(tmp_path, raw, message):
    args = ["--lora_type=lycoris"]
    if raw == "missing":
        args.append(f"--lycoris_config={tmp_path / 'nothing.json'}")
    elif isinstance(raw, str):
        (tmp_path / "bad.json").write_text(raw)
        args.append(f"--lycoris_config={tmp_path / 'bad.json'}")
    elif raw is not None:
        args.append(f"--lycoris_config={write_json(tmp_path, raw)}")
    with pytest.raises(SystemExit, match=message) as error:
        config.parse_config(args)
    assert str(error.value).startswith("config error: ") and "\n" not in str(error.value)


def test_demo_trains_lokr_and_resumes_exactly(demo_folder, monkeypatch):
    """The demo with lora_type = "lycoris": the loss falls, lora.safetensors holds LyCORIS' keys under ComfyUI's
    names and loads back into a fresh model with the trained output, and a resume from step 20 repeats steps 21-30."""
    from safetensors.torch import load_file
    json_path = write_json(demo_folder, EXAMPLE)
    args = [DEMO_CONFIG, "--lora_type=lycoris", f"--lycoris_config={json_path}", "--max_train_steps=30",
            "--checkpoint_step_interval=10", "--lr_warmup_steps=5", "--learning_rate=3e-3", "--validation_prompt=",
            "--eval_step_interval=0"]
    run_in_process(demo_folder, "train.py", *args, "--output_dir=first")
    log = read_log(demo_folder / "first/log.jsonl")
    first, last = (sum(r["loss"] for r in rs) / 8 for rs in (log[:8], log[-8:]))
    assert last < 0.85 * first, (first, last)
    tensors = load_file(demo_folder / "first/lora.safetensors")
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"lokr_w1", "lokr_w2", "alpha"}
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in tensors)
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith("lokr_w2"))  # trained, not zeros

    import train
    monkeypatch.chdir(demo_folder)  # the config's paths are relative to where the run started
    cfg = config.parse_config([str(demo_folder / "first/config.toml")])
    load = lambda: train.ltx.load_transformer(*config.transformer_source(cfg), torch.float32)  # noqa: E731
    trained = prepare.prepare_model(load(), cfg, torch.device("cpu"))
    state = torch.load(demo_folder / "first/checkpoints/step-30/training_state.pt", weights_only=True)
    lora.load_adapter_state(trained, state["adapters"])
    fresh = load()
    lora.apply_file(fresh, demo_folder / "first/lora.safetensors")
    torch.manual_seed(0)
    x, text = torch.randn(1, 12, fresh.config.in_channels), torch.randn(1, 5, fresh.config.caption_channels)
    inputs = (x, text, torch.tensor([500.0]), torch.ones(1, 5, dtype=torch.bool), 1, 3, 4, (8 / 25, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(*inputs), trained.eval()(*inputs), atol=1e-6, rtol=1e-6)

    (demo_folder / "resumed/checkpoints").mkdir(parents=True)
    shutil.copytree(demo_folder / "first/checkpoints/step-20", demo_folder / "resumed/checkpoints/step-20")
    result = run_in_process(demo_folder, "train.py", *args, "--output_dir=resumed", "--resume_from_checkpoint=latest")
    assert "resumed from" in result.stdout
    resumed = read_log(demo_folder / "resumed/log.jsonl")
    assert [r["step"] for r in resumed] == list(range(21, 31))
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in log[20:]]
    again = load_file(demo_folder / "resumed/lora.safetensors")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    rendered = run_in_process(demo_folder, "sample.py", "--config", "first/config.toml", "--prompt", "a square",
                              "--resolution", "64x64", "--num_frames", "9", "--steps", "2", "--out", "lokr.mp4")
    assert "with first/lora.safetensors" in rendered.stdout and (demo_folder / "lokr.mp4").stat().st_size > 0


@pytest.mark.parametrize("change, said", [({"linear_alpha": 4}, "linear_alpha 1 -> 4"),
                                          ({"multiplier": 0.5}, "multiplier 1.0 -> 0.5"),
                                          ({"factor": 8}, "factor 16 -> 8")])
def test_a_resume_with_another_lokr_definition_is_refused_before_caching(tmp_path, change, said):
    first = config.Config(lora_type="lycoris", lycoris_config=write_json(tmp_path, EXAMPLE), lora_format="universal")
    folder = tmp_path / "step-2"
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"step": 2, "adapter": checkpoint.adapter_definition(first),
                                                  "config": dataclasses.asdict(first)}))
    assert checkpoint.check_resume(folder, first)["step"] == 2  # the same definition resumes
    changed = dataclasses.replace(first, lycoris_config=write_json(tmp_path, {**EXAMPLE, **change}, "other.json"))
    with pytest.raises(SystemExit, match=f"its adapters were defined otherwise \\({said}\\)"):
        checkpoint.check_resume(folder, changed)
    plain = dataclasses.replace(first, lora_type="standard")
    with pytest.raises(SystemExit, match="lora_type 'lycoris' -> 'standard'"):
        checkpoint.check_resume(folder, plain)


def test_adapters_of_other_shapes_are_a_lora_error_not_a_size_traceback():
    model = tiny_base()
    lora.inject_lokr(model, lora.LoKrSpec(dim=1, factor=4, targets=("Attention",)))
    state = lora.adapter_state(model)
    other = tiny_base()
    lora.inject_lokr(other, lora.LoKrSpec(dim=1, factor=2, targets=("Attention",)))
    with pytest.raises(lora.LoRAError, match="the saved adapters have other shapes than this model's"):
        lora.load_adapter_state(other, state)
