"""Publishing: the model card and the Hugging Face hub (push_to_hub, push_checkpoints_to_hub).

    model_card(...)    model_card.md: what the LoRA is, how it was trained, how to use it
    push_files(...)    one commit of files to the hub repo; a failure is one line with the `hf upload` that retries
    publish(...)       at the end: the LoRA (+ EMA), config.toml, the last contact sheets and the card
"""

import os
import shlex
from pathlib import Path

import config
import data
import errors
import outputs


def model_card(cfg: config.Config, output_dir: Path, samples: list[data.Sample], total_steps: int,
               images: list[str]) -> str:
    """README.md of the hub repo: what the LoRA is, how it was trained, how to use it; `images` are contact sheets
    uploaded beside it."""
    captions = list(dict.fromkeys(s.caption for s in samples))
    repo = config.hub_repo(cfg)
    base = cfg.pretrained_model_name_or_path
    on_hub = not os.path.isdir(base)  # a local folder's path means nothing to a reader (and is private)
    base_name = base if on_hub else Path(base).name
    prompts = [p for _, p in config.validation_prompts(cfg)]
    settings = {"steps": total_steps, "clips per step": cfg.train_batch_size * cfg.gradient_accumulation_steps,
                "learning rate": f"{cfg.learning_rate:g} ({cfg.lr_scheduler}, {cfg.lr_warmup_steps} warm-up)",
                "LoRA": f"rank {cfg.lora_rank}, alpha {config.lora_alpha(cfg):g}, {len(cfg.lora_target_modules)} "
                        f"target modules" if cfg.lora_type == "standard" else "LoKr (LyCORIS)",
                "optimizer": cfg.optimizer,
                "base precision": f"{cfg.base_model_default_dtype}, blocks {cfg.base_model_precision}",
                "clips": f"{len(samples)} in {len({(s.width, s.height, s.frames) for s in samples})} shape(s): "
                         + ", ".join(sorted({data.shape_name(s.width, s.height, s.frames) for s in samples})),
                "EMA": f"decay {cfg.ema_decay} (lora_ema.safetensors)" if cfg.use_ema else "off",
                "CREPA": f"block {cfg.crepa_block_index}, weight {cfg.crepa_lambda}" if cfg.crepa_enabled else "off"}
    lines = ["---", *([f"base_model: {base}"] if on_hub else []), "library_name: diffusers",
             "tags: [ltx-video, text-to-video, image-to-video, lora, ltx-lora]", "---", "",
             f"# {repo.split('/')[-1]}", "",
             (f"A LoRA of [{base}](https://huggingface.co/{base})" if on_hub else
              f"A LoRA of a local LTX-Video model (`{base_name}`)") + " trained with ltx-lora.", "", "## Prompts", "",
             "Captions it was trained on (use their words):", "", *[f"- {c}" for c in captions[:5]], ""]
    if prompts:
        lines += ["Validation prompts:", "", *[f"- {p}" for p in prompts], ""]
    lines += [f"![samples]({image})" for image in images] + ([""] if images else [])
    lines += ["## Training", "", "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in settings.items()],
              "", "## Use it", "", "diffusers:", "", "```python", "import torch",
              "from diffusers import LTXPipeline", "",
              f'pipe = LTXPipeline.from_pretrained("{base_name}", torch_dtype=torch.bfloat16).to("cuda")',
              f'pipe.load_lora_weights("{repo}", weight_name="lora.safetensors")',
              f'video = pipe(prompt="{(prompts or captions or [""])[0]}", width=768, height=512, num_frames=121).frames[0]',
              "```", "",
              f"ComfyUI: put `lora.safetensors` in `models/loras` and load it with LoraLoaderModelOnly after the LTX-Video "
              f"model ({'the universal format: ComfyUI and diffusers read the same file' if cfg.lora_format == 'universal' else f'lora_format = {cfg.lora_format}'})."]
    return "\n".join(lines) + "\n"


def push_files(files: dict[str, Path], cfg: config.Config, output_dir: Path, message: str, log=print) -> bool:
    """Uploads {path in the repo: local file} to the hub repo in one commit, creating the repo (hub_private) if it is
    missing. A network or hub failure is one line with the command that retries it: training is never lost to an
    upload, and the local files are never touched."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    repo = config.hub_repo(cfg)
    try:
        api = HfApi()
        url = api.create_repo(repo, private=cfg.hub_private, exist_ok=True)
        api.create_commit(url.repo_id, [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                                    for name, path in files.items()], commit_message=message)
    except (OSError, HFValidationError, *HfHubHTTPError.__bases__) as e:  # HTTP, the transport's, a refused id
        retry = " && ".join(f"hf upload {repo} {shlex.quote(str(path))} {shlex.quote(name)}"
                            for name, path in files.items())  # each file to its own name in the repo
        log(f"upload to the hub repo {repo} failed ({errors.first_line(e)}); the files are safe in {output_dir}. "
            f"Retry with: {retry}")
        return False
    log(f"uploaded {', '.join(files)} to {url}")
    return True


def publish(cfg: config.Config, output_dir: Path, samples: list[data.Sample], total_steps: int,
            with_ema: bool) -> None:
    """push_to_hub at the end: the LoRA (and its EMA, when this run kept one), config.toml, the last validation's
    contact sheets, and the model card, written to output_dir/model_card.md (never over a README.md of yours) and
    uploaded as the repo's README.md."""
    names = ["lora.safetensors", *(["lora_ema.safetensors"] if with_ema else []), "config.toml"]
    files = {name: output_dir / name for name in names}
    shown = sorted((output_dir / "samples").glob(f"step-{total_steps}/*.png"))
    files.update({f"samples/{p.name}": p for p in shown})
    (output_dir / "model_card.md").write_text(model_card(cfg, output_dir, samples, total_steps,
                                                         [f"samples/{p.name}" for p in shown]))
    outputs.own(output_dir, "model_card.md")
    files["README.md"] = output_dir / "model_card.md"
    push_files(files, cfg, output_dir, f"ltx-lora: the LoRA after {total_steps} steps")
