"""Sampling: the rectified-flow Euler sampler as diffusers' LTXPipeline runs it, validation videos during
training, and a command line for generating with a trained LoRA.

    python sample.py --model Lightricks/LTX-Video-0.9.5 --lora output/disney/lora.safetensors \
        --prompt "a black and white cartoon mouse ..." --resolution 768x512 --num_frames 121 --out clip.mp4
    python sample.py --config output/disney/config.toml --prompt "..." --out clip.mp4   # a run's own settings

Owns: the sigma schedule (LTX's resolution-dependent shift where the scheduler config asks for it),
classifier-free guidance with a negative prompt, image-to-video first-frame conditioning, VAE decoding with
LTX's timestep-conditioned decoder, writing mp4 and contact sheets, `render_validation` for train.py, the CLI.
Does not: build models (model.py, lora.py and train.py do).
"""

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import config
import data
import lora
import model as ltx
import offload



# -----------------------------------------------------------------------------
# The sampler

def sampling_sigmas(num_steps: int, seq_len: int, scheduler: dict) -> torch.Tensor:
    """σ for each step, then 0: linspace(1, 1/N, N) shifted as the model's FlowMatchEulerDiscreteScheduler
    config says (resolution-dependent `mu` when use_dynamic_shifting, else a fixed shift), as LTXPipeline."""
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    if scheduler.get("use_dynamic_shifting"):
        shift = resolution_shift(seq_len, scheduler)
        sigmas = shift / (shift + (1 / sigmas - 1))  # = kσ / (1 + (k − 1)σ), written as diffusers does
    else:
        shift = scheduler.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if scheduler.get("shift_terminal"):  # stretch so the last step lands on shift_terminal
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - scheduler["shift_terminal"]))
    return torch.cat([torch.from_numpy(np.asarray(sigmas, np.float32)), torch.zeros(1)])


def resolution_shift(seq_len: int, scheduler: dict) -> float:
    """LTX's resolution-dependent shift k of σ (training's flow_schedule_auto_shift uses it too): μ grows linearly
    with the tokens per clip, from base_shift at base_image_seq_len to max_shift at max_image_seq_len, and
    k = e^μ (time_shift_type "exponential", the default) or μ ("linear"). More tokens, more time at high noise:
    a large clip keeps its coarse structure through more noise than a small one."""
    base_len, max_len = scheduler.get("base_image_seq_len", 256), scheduler.get("max_image_seq_len", 4096)
    base_shift, max_shift = scheduler.get("base_shift", 0.5), scheduler.get("max_shift", 1.15)
    mu = base_shift + (max_shift - base_shift) * (seq_len - base_len) / (max_len - base_len)
    return math.exp(mu) if scheduler.get("time_shift_type", "exponential") == "exponential" else mu


@torch.no_grad()
def generate(transformer, vae, text: tuple[torch.Tensor, torch.Tensor], negative: tuple[torch.Tensor, torch.Tensor], *,
             width: int, height: int, num_frames: int, steps: int = 30, guidance: float = 3.0,
             generator: torch.Generator | None = None, image: torch.Tensor | None = None,
             scheduler: dict | None = None, decode_timestep: float = 0.05, decode_noise_scale: float = 0.025,
             frame_rate: int = ltx.FRAME_RATE, progress: bool = False, model_cpu_offload: bool = False) -> torch.Tensor:
    """One video as float [F, 3, H, W] in [0, 1].

    text / negative: T5 embeddings [1, L, D] and masks [1, L]; guidance <= 1 skips the negative pass.
    image: the first frame [3, H, W] in [-1, 1] for image-to-video: its latent stays clean as frame 0 and
    its tokens get timestep 0, the conditioning the model was trained with.
    The transformer is used as it is (LoRA unmerged, quantized or offloaded) and left in the mode it came in.
    model_cpu_offload: the VAE waits on the CPU while the transformer denoises, and the transformer while the VAE
    decodes (each comes back where it was): the peak is the larger of the two, not their sum.
    """
    was_training = transformer.training
    transformer.eval()
    try:
        latents, (lf, lh, lw) = denoise(transformer, vae, text, negative, width=width, height=height,
                                        num_frames=num_frames, steps=steps, guidance=guidance, generator=generator,
                                        image=image, scheduler=scheduler or {}, frame_rate=frame_rate,
                                        progress=progress, model_cpu_offload=model_cpu_offload)
    finally:
        transformer.train(was_training)
    dtype = transformer.proj_in.weight.dtype
    with offload.alone_on(latents.device, vae, transformer, model_cpu_offload):
        return decode(vae, latents, lf, lh, lw, dtype, generator, decode_timestep, decode_noise_scale)


def denoise(transformer, vae, text, negative, *, width, height, num_frames, steps, guidance, generator, image,
            scheduler, frame_rate, progress, model_cpu_offload=False) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Euler steps from noise (or the image's latent in frame 0) to the packed latents [1, S, C] of a video."""
    device = transformer.proj_in.weight.device
    dtype = transformer.proj_in.weight.dtype  # the base's compute dtype (proj_in never carries an adapter)
    spatial, temporal = ltx.vae_ratios(vae)
    lf, lh, lw = (num_frames - 1) // temporal + 1, height // spatial, width // spatial
    shape = (1, transformer.config.in_channels, lf, lh, lw)

    # start: pure noise, or (i2v) the image's latent in frame 0 and noise after it
    cond_mask = torch.zeros(1, lf * lh * lw, device=device)
    if image is None:
        latents = torch.randn(shape, generator=generator, device=device)
    else:
        with offload.alone_on(device, vae, transformer, model_cpu_offload):
            vae_param = next(vae.parameters())
            posterior = vae.encode(image[None, :, None].to(vae_param.device, vae_param.dtype)).latent_dist
            first = ltx.normalize_latents(posterior.sample(generator).to(device, torch.float32), vae)
        noise = torch.randn(shape, generator=generator, device=device)
        latents = torch.cat([first, noise[:, :, 1:]], dim=2)
        cond_mask[:, :lh * lw] = 1.0
    latents = ltx.pack_latents(latents)  # [1, S, C], float32 throughout the loop

    use_cfg = guidance > 1.0
    context = (torch.cat([negative[0], text[0]]) if use_cfg else text[0]).to(dtype)
    context_mask = torch.cat([negative[1], text[1]]) if use_cfg else text[1]
    rope_scale = ltx.rope_scale(vae, frame_rate)
    sigmas = sampling_sigmas(steps, lf * lh * lw, scheduler).to(device)
    for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        model_input = torch.cat([latents] * 2) if use_cfg else latents
        timestep = (sigmas[i] * ltx.TIMESTEP_SCALE).expand(model_input.shape[0])[:, None] * (1 - cond_mask)  # [B, S]
        velocity = transformer(model_input.to(dtype), context, timestep, context_mask, lf, lh, lw, rope_scale).float()
        if use_cfg:
            uncond, cond = velocity.chunk(2)
            velocity = uncond + guidance * (cond - uncond)
        # Euler step from σ_i to σ_i+1 along the predicted velocity; conditioning tokens stay as they are
        stepped = latents + (sigmas[i + 1] - sigmas[i]) * velocity
        latents = torch.where(cond_mask[..., None].bool(), latents, stepped)
    return latents, (lf, lh, lw)


def decode(vae, latents: torch.Tensor, lf: int, lh: int, lw: int, dtype: torch.dtype, generator,
           decode_timestep: float, decode_noise_scale: float) -> torch.Tensor:
    """Packed latents -> frames [F, 3, H, W] in [0, 1], the decode noise drawn in `dtype` (the transformer's).
    LTX 0.9.1+ VAEs are timestep-conditioned and denoise a little while decoding."""
    device, vae_param = latents.device, next(vae.parameters())
    z = ltx.denormalize_latents(ltx.unpack_latents(latents, lf, lh, lw), vae).to(dtype)
    decode_t = None
    if vae.config.timestep_conditioning:
        noise = torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype)
        z = (1 - decode_noise_scale) * z + decode_noise_scale * noise
        decode_t = torch.tensor([decode_timestep], device=device, dtype=z.dtype)
    video = vae.decode(z.to(vae_param.device, vae_param.dtype), decode_t, return_dict=False)[0]
    return (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 0, 2, 3).cpu()  # [F, 3, H, W]


# -----------------------------------------------------------------------------
# Files: mp4, contact sheets, names

def save_video(frames: torch.Tensor, path: Path, fps: int = ltx.FRAME_RATE) -> None:
    """[F, 3, H, W] in [0, 1] -> H.264 mp4 (yuv420p: plays everywhere)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    data.write_video(path, pixels, fps)


def save_contact_sheet(videos: list[torch.Tensor], path: Path, count: int = 4) -> None:
    """A few frames of each video side by side, one row per video, as a PNG to look at without a player."""
    from PIL import Image
    strips = []
    for frames in videos:
        picks = frames[torch.linspace(0, len(frames) - 1, min(count, len(frames))).round().long()]
        strips.append(torch.cat(list(picks), dim=2))  # [3, H, count * W]
    sheet = torch.cat(strips, dim=1)  # [3, rows * H, count * W]
    Image.fromarray((sheet.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(path)


def video_shape(sizes: list[tuple[int, int]], num_frames: int, log=print) -> tuple[list[tuple[int, int]], int]:
    """Sizes and a frame count as LTX's VAE takes them: each side to the nearest multiple of 32, frames down to
    8k+1. Every change is said once."""
    fitted = [(data.nearest_32(w), data.nearest_32(h)) for w, h in sizes]
    for (w, h), (fw, fh) in zip(sizes, fitted):
        if (w, h) != (fw, fh):
            log(f"resolution {w}x{h} rounded to {fw}x{fh} (LTX's VAE needs multiples of 32)")
    frames = data.round_frames(num_frames)
    if frames != num_frames:
        log(f"num_frames {num_frames} rounded down to {frames} (LTX's VAE needs 8k+1 frames)")
    return fitted, frames


def load_image(path: str, width: int, height: int) -> torch.Tensor:
    """An image file -> [3, height, width] in [-1, 1], upright (EXIF), scaled to cover and centre-cropped."""
    try:
        pixels = torch.from_numpy(data.read_image(Path(path))).permute(2, 0, 1)[None]
    except data.BadFile as e:
        raise data.BadFile(f"image {path}: {e}") from e
    return data.resize_and_crop(pixels, width, height, (0.5, 0.5))[0].float() / 127.5 - 1


# -----------------------------------------------------------------------------
# Validation during training (train.py calls this on rank 0)

class Validation(NamedTuple):
    """What the validation videos of a training run need, gathered once: cached prompt embeddings, sizes, the
    sampler's settings, the VAE."""
    prompts: list[tuple[str, dict]]  # (nickname, cached embedding)
    negative: dict
    sizes: list[tuple[int, int]]
    num_frames: int
    steps: int
    guidance: float
    seed: int
    image_path: str
    shift_config: dict  # the model's scheduler config: the sampler's σ shift
    model_cpu_offload: bool
    vae: torch.nn.Module | None
    versions: list  # (file-name suffix, context that puts those weights in place): the LoRA, its EMA

    @staticmethod
    def of(cfg: config.Config, prompts: list[tuple[str, str]], texts: dict, sizes, num_frames: int,
           shift_config: dict, vae, ema, lora_params: list) -> "Validation":
        """From the run's config and its (nickname, prompt) pairs; the videos show the LoRA, its EMA
        (ema_validation), or both side by side."""
        trained, averaged = ("", contextlib.nullcontext), ("-ema", lambda: ema.applied(lora_params))
        versions = {"none": [trained], "ema_only": [averaged], "comparison": [trained, averaged]}[
            cfg.ema_validation if ema else "none"]
        return Validation([(name, texts[p]) for name, p in prompts],
                          texts.get(cfg.validation_negative_prompt), sizes, num_frames,
                          cfg.validation_num_inference_steps, cfg.validation_guidance, cfg.validation_seed,
                          cfg.validation_image, shift_config, cfg.enable_model_cpu_offload, vae, versions)


def validate(transformer, v: Validation, folder: Path, device: torch.device, step: int, tracker,
             log=print) -> list[str]:
    """A training run's validation at `step` (render_validation into `folder`), each contact sheet handed to the
    tracker (train.py's) after its videos."""
    if not v.prompts:
        return []
    paths = render_validation(transformer, v.vae, v.prompts, v.negative, sizes=v.sizes, num_frames=v.num_frames,
                              steps=v.steps, guidance=v.guidance, seed=v.seed, image_path=v.image_path, folder=folder,
                              scheduler=v.shift_config, device=device, model_cpu_offload=v.model_cpu_offload,
                              versions=v.versions)
    log(f"\nvalidation at step {step}: {', '.join(paths)}")
    per_sheet = len(v.versions)  # each prompt and size: a video per version, then their sheet
    for i in range(0, len(paths), per_sheet):
        for path in map(Path, paths[i:i + per_sheet]):
            tracker.video(step, f"validation_video/{path.stem}", path)
        sheet = Path(paths[i]).with_suffix(".png")
        tracker.image(step, f"validation/{sheet.stem}", sheet)
    return paths


def render_validation(transformer, vae, prompts: list[tuple[str, dict]], negative: dict, *,
                      sizes: list[tuple[int, int]], num_frames: int, steps: int, guidance: float, seed: int,
                      image_path: str, folder: Path, scheduler: dict, device: torch.device,
                      model_cpu_offload: bool = False,
                      versions=(("", contextlib.nullcontext),)) -> list[str]:
    """Renders every (nickname, cached prompt embedding) at every size into folder/<nickname>-<W>x<H>.mp4,
    with a contact-sheet PNG beside each; returns the mp4 paths. The VAE visits the device only meanwhile
    (with model_cpu_offload: only while it decodes, the transformer stepping off meanwhile; see generate).
    versions: (suffix, context) pairs, each rendering with the weights its context puts in place (train.py: the
    LoRA "" and its EMA "-ema"), from the same noise; the contact sheet shows them one row each, in that order."""
    vae_home = next(vae.parameters()).device
    vae.to("cpu" if model_cpu_offload else device)
    paths = []
    try:
        for width, height in sizes:
            image = load_image(image_path, width, height).to(device) if image_path else None  # once per size
            for nickname, text in prompts:
                rows = []
                for suffix, weights in versions:
                    with weights():
                        frames = generate(transformer, vae, as_batch(text, device), as_batch(negative, device),
                                          width=width, height=height, num_frames=num_frames, steps=steps,
                                          guidance=guidance, generator=torch.Generator(device).manual_seed(seed),
                                          image=image, scheduler=scheduler, model_cpu_offload=model_cpu_offload)
                    path = folder / f"{data.safe_name(nickname)}-{width}x{height}{suffix}.mp4"
                    save_video(frames, path)
                    paths.append(str(path))
                    rows.append(frames)
                save_contact_sheet(rows, folder / f"{data.safe_name(nickname)}-{width}x{height}{versions[0][0]}.png")
    finally:
        vae.to(vae_home)
    return paths


def as_batch(cached: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A cached prompt embedding as the (embeddings [1, L, D], mask [1, L]) pair generate takes."""
    return cached["prompt_embeds"][None].to(device), cached["prompt_attention_mask"][None].to(device)


# -----------------------------------------------------------------------------
# The command line

def arguments(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, checked as far as it can be without files or models."""
    parser = argparse.ArgumentParser(description="Generate a video with LTX-Video and a LoRA.")
    parser.add_argument("--model", help="hub id or local diffusers-layout folder (default: the --config run's)")
    parser.add_argument("--config", help="a training run's config.toml: its model, LoRA and validation settings")
    parser.add_argument("--lora", help="LoRA safetensors in any common layout (diffusers, ComfyUI, kohya); "
                        "default with --config: its LoRA")
    parser.add_argument("--lora_scale", type=float, default=1.0, help="strength of the LoRA")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative_prompt", default=None, help=f"default: {ltx.NEGATIVE_PROMPT!r}")
    parser.add_argument("--image", help="first frame: image-to-video")
    parser.add_argument("--resolution", default=None, help="WxH, default 768x512")
    parser.add_argument("--num_frames", type=int, default=None, help="8k+1, default 121")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps, default 30")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale, default 3.0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on CUDA")
    parser.add_argument("--out", required=True, help="the mp4 to write (a new file, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is an mp4 that exists")
    parser.add_argument("--demo", action="store_true", help="allow the demo's tiny random model (implied by the "
                                                            "--config of a demo run)")
    args = parser.parse_args(argv)
    for name in ("model", "config", "lora", "image", "out"):  # ~ is the home folder, as in a shell
        if getattr(args, name):
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.num_frames is not None and args.num_frames < 1:
        parser.error(f"--num_frames must be at least 1, got {args.num_frames}")
    for name in ("lora_scale", "guidance"):
        if getattr(args, name) is not None and not math.isfinite(getattr(args, name)):
            parser.error(f"--{name} must be a finite number, got {getattr(args, name)}")
    check_out(parser, Path(args.out), args.overwrite)
    return parser, args


def main(argv: list[str]) -> None:
    parser, args = arguments(argv)
    defaults = dict(model=None, lora=None, resolution="768x512", num_frames=121, steps=30, guidance=3.0,
                    negative_prompt=ltx.NEGATIVE_PROMPT, transformer=None)
    if args.config:  # a run's own settings, each still overridable on the command line
        cfg = config.parse_config([args.config])
        lora_file = Path(cfg.output_dir) / "lora.safetensors"
        defaults.update(model=cfg.pretrained_model_name_or_path, lora=str(lora_file) if lora_file.exists() else None,
                        resolution=cfg.validation_resolution.split(",")[0], num_frames=cfg.validation_num_frames,
                        steps=cfg.validation_num_inference_steps, guidance=cfg.validation_guidance,
                        negative_prompt=cfg.validation_negative_prompt,
                        # a fine-tuned transformer the run named apart from its model (else --model's own)
                        transformer=config.transformer_source(cfg) if cfg.pretrained_transformer_model_name_or_path
                        else None)
        args.demo = args.demo or cfg.demo
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name]
    model_path = pick("model")
    if not model_path:
        parser.error("give --model (or --config of a training run)")
    if not args.demo and os.path.isdir(model_path) and ltx.is_demo_model(model_path):
        parser.error(f"{model_path} is the demo's tiny random model, not LTX-Video; add --demo to sample from it")
    device = torch.device(args.device)
    dtype = config.DTYPES[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    try:
        sizes = config.parse_resolutions(pick("resolution"))
    except ValueError as e:
        parser.error(f"--{e}")
    if len(sizes) != 1:
        parser.error(f"--resolution takes one WxH, got {pick('resolution')!r}")
    ((width, height),), num_frames = video_shape(sizes, pick("num_frames"))
    if args.image and not Path(args.image).is_file():
        parser.error(f"--image {args.image} does not exist")
    image = load_image(args.image, width, height).to(device) if args.image else None  # a bad image stops us here
    lora_file = pick("lora")
    if lora_file:
        lora.read_adapters(lora_file)  # a file that is neither LoRA nor LoKr stops us before any model loads

    tokenizer, encoder = ltx.load_text_encoder(model_path, dtype)
    encoder.to(device)
    text = ltx.encode_prompts(tokenizer, encoder, [args.prompt])
    negative = ltx.encode_prompts(tokenizer, encoder, [pick("negative_prompt")])
    del encoder
    transformer = ltx.load_transformer(*(defaults["transformer"] or (model_path, "transformer")), dtype)
    if lora_file:
        lora.apply_file(transformer, lora_file, args.lora_scale)
    transformer.to(device)
    vae = ltx.load_vae(model_path, "vae", dtype).to(device)
    frames = generate(transformer, vae, text, negative, width=width, height=height, num_frames=num_frames,
                      steps=pick("steps"), guidance=pick("guidance"), image=image,
                      generator=torch.Generator(device).manual_seed(args.seed),
                      scheduler=ltx.load_scheduler_config(model_path), progress=True)
    save_video(frames, Path(args.out))
    print(f"wrote {args.out}: {num_frames} frames at {width}x{height}" + (f" with {lora_file}" if lora_file else ""))


def check_out(parser: argparse.ArgumentParser, out: Path, overwrite: bool) -> None:
    """--out is checked before any model loads: an mp4 path (so it can never be the LoRA, the image or a config
    it reads), in a folder that can be made, and a new file unless --overwrite replaces an earlier mp4."""
    if out.is_dir():
        parser.error(f"--out {out} is a folder; give the mp4 file to write, e.g. {out / 'video.mp4'}")
    if out.suffix.lower() != ".mp4":
        parser.error(f"--out {out} must end in .mp4 (sample.py writes an H.264 mp4)")
    if out.exists() and not overwrite:
        parser.error(f"--out {out} exists; give a new file name, or add --overwrite to replace it")
    existing = next(p for p in [out.absolute().parent, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not data.writable(existing):
        parser.error(f"--out {out} cannot be written ({existing} is not a writable folder)")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (data.DataError, ltx.ModelError, lora.LoRAError) as error:  # the user's to fix; anything else is a bug
        sys.exit(f"error: {error}")
