"""sample.py against diffusers' LTX pipelines, validation during training, and the CLI."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import lora
import model as ltx
import sample
from conftest import DEMO_CONFIG, read_log, run_in_process

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def parts(tiny_pipeline_dir):
    folder = str(tiny_pipeline_dir)
    tokenizer, encoder = ltx.load_text_encoder(folder)
    return dict(folder=folder, transformer=ltx.load_transformer(folder), vae=ltx.load_vae(folder),
                text=ltx.encode_prompts(tokenizer, encoder, [PROMPT]),
                negative=ltx.encode_prompts(tokenizer, encoder, [ltx.NEGATIVE_PROMPT]),
                scheduler=ltx.load_scheduler_config(folder))


def ours(parts, width, height, frames, image=None, guidance=3.0, seed=0, transformer=None):
    return sample.generate(transformer or parts["transformer"], parts["vae"], parts["text"], parts["negative"],
                           width=width, height=height, num_frames=frames, steps=4, guidance=guidance,
                           generator=torch.Generator().manual_seed(seed), image=image, scheduler=parts["scheduler"])


def theirs(pipe, **kwargs):
    return pipe(prompt=PROMPT, negative_prompt=ltx.NEGATIVE_PROMPT, num_inference_steps=4, decode_timestep=0.05,
                decode_noise_scale=0.025, generator=torch.Generator().manual_seed(0), output_type="pt",
                **kwargs).frames[0]


@pytest.mark.parametrize("size", [(64, 64, 9), (96, 64, 17)])
@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_text_to_video_matches_ltx_pipeline(parts, size, guidance):
    from diffusers import LTXPipeline
    pipe = LTXPipeline.from_pretrained(parts["folder"])
    width, height, frames = size
    expected = theirs(pipe, width=width, height=height, num_frames=frames, guidance_scale=guidance)
    got = ours(parts, width, height, frames, guidance=guidance)
    assert got.shape == (frames, 3, height, width)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got - ours(parts, width, height, frames, guidance=guidance, seed=1)).abs().max() > 1e-3


def test_image_to_video_matches_ltx_image_to_video_pipeline(parts):
    from diffusers import LTXImageToVideoPipeline
    pipe = LTXImageToVideoPipeline.from_pretrained(parts["folder"])
    pixels = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    expected = theirs(pipe, image=Image.fromarray(pixels), width=96, height=64, num_frames=17, guidance_scale=3.0)
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    got = ours(parts, 96, 64, 17, image=image)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got - ours(parts, 96, 64, 17)).abs().max() > 1e-3  # the image changes the video


def test_generate_leaves_the_model_as_it_found_it_and_matches_diffusers_with_a_lora(parts, tmp_path):
    from diffusers import LTXPipeline
    transformer = ltx.load_transformer(parts["folder"])
    lora.inject(transformer, rank=4)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora.lora_parameters(transformer):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    transformer.train()
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    got = ours(parts, 64, 64, 9, transformer=transformer)
    assert transformer.training and all(p.requires_grad for p in lora.lora_parameters(transformer))
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())
    lora.save_lora(transformer, tmp_path / "lora.safetensors")
    pipe = LTXPipeline.from_pretrained(parts["folder"])
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    torch.testing.assert_close(got, theirs(pipe, width=64, height=64, num_frames=9, guidance_scale=3.0),
                               atol=1e-4, rtol=0)
    assert (got - ours(parts, 64, 64, 9)).abs().max() > 1e-3  # the LoRA matters


def test_sigma_schedules():
    plain = sample.sampling_sigmas(4, 100, {"use_dynamic_shifting": False, "shift": 1.0})
    torch.testing.assert_close(plain, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = sample.sampling_sigmas(4, 100, {"shift": 3.0})
    assert (shifted[1:4] > plain[1:4]).all() and shifted[0] == 1 and shifted[-1] == 0
    from diffusers import FlowMatchEulerDiscreteScheduler
    for config in [dict(use_dynamic_shifting=True, base_image_seq_len=1024, max_image_seq_len=4096, base_shift=0.95,
                        max_shift=2.05, shift_terminal=0.1), dict(use_dynamic_shifting=False, shift=2.0)]:
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        mu = 0.95 + (2.05 - 0.95) * (2000 - 1024) / (4096 - 1024)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=mu)
        torch.testing.assert_close(sample.sampling_sigmas(8, 2000, dict(scheduler.config)), scheduler.sigmas)


def test_safe_names_and_resolutions():
    assert data.safe_name("cats / dogs at night") == "cats_dogs_at_night"
    assert data.safe_name("../../etc") == "etc" and data.safe_name("///") == "prompt"
    assert config.parse_resolutions("1280x768, 770x500") == [(1280, 768), (770, 500)]
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        config.parse_resolutions("768 by 512")
    with pytest.raises(ValueError, match="must be 1 to 8192 pixels"):
        config.parse_resolutions("-128x96")
    said = []
    assert sample.video_shape([(1280, 768), (770, 500), (100, 90)], 10, said.append) == \
        ([(1280, 768), (768, 512), (96, 96)], 9)  # the nearest multiple of 32, not always down
    assert said == ["resolution 770x500 rounded to 768x512 (LTX's VAE needs multiples of 32)",
                    "resolution 100x90 rounded to 96x96 (LTX's VAE needs multiples of 32)",
                    "num_frames 10 rounded down to 9 (LTX's VAE needs 8k+1 frames)"]


def decoded(path: Path) -> tuple[int, int, int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), stream.codec_context.width, stream.codec_context.height


def test_validation_writes_videos_at_the_expected_steps(demo_folder, tmp_path):
    library = tmp_path / "library.json"
    library.write_text(json.dumps({"cats / dogs": "a cat chasing a dog", "still": "a still yellow square"}))
    first_frame = tmp_path / "first.png"
    Image.fromarray(np.full((80, 100, 3), 200, np.uint8)).save(first_frame)
    args = ["--max_train_steps=4", "--validation_step_interval=2", "--validation_on_startup=true",
            f"--user_prompt_library={library}", "--validation_resolution=64x64,96x64", "--validation_num_frames=9",
            "--validation_num_inference_steps=2", f"--validation_image={first_frame}", "--output_dir=run"]
    run_in_process(demo_folder, "train.py", DEMO_CONFIG, *args)
    samples = tmp_path / "run/samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-0", "step-2", "step-4"]
    names = {"validation", "cats_dogs", "still"}
    expected = {f"{n}-{w}x{h}.{ext}" for n in names for w, h in [(64, 64), (96, 64)] for ext in ("mp4", "png")}
    for step in ("step-0", "step-2", "step-4"):
        assert {p.name for p in (samples / step).iterdir()} == expected
    assert decoded(samples / "step-4/cats_dogs-96x64.mp4") == (9, 96, 64)
    assert Image.open(samples / "step-4/cats_dogs-96x64.png").size == (4 * 96, 64)
    log = read_log(tmp_path / "run/log.jsonl")
    assert [("samples" in r) for r in log] == [False, True, False, True]
    assert log[-1]["samples"][0].endswith(".mp4")


def test_cli_renders_with_a_runs_lora(demo_folder, tmp_path):
    run_in_process(demo_folder, "train.py", DEMO_CONFIG, "--max_train_steps=3", "--disable_validation=true")
    assert not (tmp_path / "output/demo/samples").exists()  # validation disabled
    out = tmp_path / "clip.mp4"
    result = run_in_process(demo_folder, "sample.py", "--config", "output/demo/config.toml", "--prompt",
                            "a green square moving up", "--resolution", "96x64", "--num_frames", "17", "--steps", "3",
                            "--out", str(out))
    assert "with output/demo/lora.safetensors" in result.stdout
    assert decoded(out) == (17, 96, 64)
    comfy = tmp_path / "comfy.safetensors"  # a LoRA from elsewhere, in ComfyUI key format, on a bare model
    from safetensors.torch import load_file, save_file
    save_file({k.replace("transformer.", "diffusion_model.", 1): v
               for k, v in load_file(tmp_path / "output/demo/lora.safetensors").items()}, str(comfy))
    run_in_process(demo_folder, "sample.py", "--demo", "--model", "output/demo/tiny-ltx", "--lora", str(comfy),
                   "--prompt", "a square", "--resolution", "64x64", "--num_frames", "9", "--steps", "2", "--out",
                   str(tmp_path / "comfy.mp4"))
    assert decoded(tmp_path / "comfy.mp4") == (9, 64, 64)


@pytest.mark.parametrize("library", [{"cats / dogs": "a", "cats_dogs": "b"}, {"validation": "another prompt"}])
def test_nicknames_that_name_one_file_are_refused_before_they_overwrite_each_other(tmp_path, library):
    path = tmp_path / "library.json"
    path.write_text(json.dumps(library))
    cfg = config.Config(validation_prompt="a cat", user_prompt_library=str(path))
    with pytest.raises(SystemExit, match="both name the file .*; rename one"):
        config.validation_prompts(cfg)
