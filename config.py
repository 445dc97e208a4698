"""Every setting of a run, read one way: defaults < TOML file < --key=value on the command line.

    Config                  the run's keys, one per line with its default and meaning
    parse_config(argv)  ->  a checked Config        (errors name the file and the nearest valid key)
    dataset_entries(cfg) -> data.Dataset entries    (from [[datasets]] tables or SimpleTuner's JSON file)
    to_toml(cfg)        ->  the resolved config.toml a run writes, which parse_config reads back unchanged
    python config.py        rewrites docs/configuration.md's key tables from Config and data.Dataset (a test compares)

    --simpletuner_config=X  a SimpleTuner config.json as one more source (simpletuner.py maps its keys by meaning)

Owns: Config, the one typed reader of keys for Config and data.Dataset (types, choices as Literal, nearest-key
hints, paths with ~), every check that can run before a model loads, the dtype table, the transformer source.
Does not: load models or data.
"""

import dataclasses
import difflib
import inspect
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

import crepa
import data
import lora
import model as ltx
import quant


PRECISIONS = quant.PRECISIONS + tuple(quant.ALIASES)  # other trainers' names are translated (quant.resolve)


@dataclass
class Config:
    # --- model ---
    pretrained_model_name_or_path: str = "Lightricks/LTX-Video-0.9.5"  # hub id or local folder in diffusers layout
    pretrained_transformer_model_name_or_path: str = ""  # a fine-tune's folder, hub id or single .safetensors; "" = the model's
    pretrained_transformer_subfolder: str = "transformer"  # its subfolder; "none" = the folder itself
    pretrained_vae_model_name_or_path: str = ""  # VAE from elsewhere; "" = the model's vae/ subfolder
    demo: bool = False  # create the tiny random model and the synthetic dataset at the configured paths if missing
    # --- data: [[datasets]] tables (keys in data.Dataset) or a SimpleTuner multidatabackend.json ---
    datasets: list[dict] = field(default_factory=list)  # one table per dataset: see docs/datasets.md
    data_backend_config: str = ""  # path to a SimpleTuner multidatabackend.json, instead of [[datasets]]
    aspect_bucket_rounding: int = 2  # decimals the aspect ratio is rounded to when forming buckets
    disable_bucket_pruning: bool = False  # keep buckets smaller than one batch (topped up by repeating samples)
    vae_batch_size: int = 1  # clips per VAE call while caching
    vae_enable_tiling: bool = False  # encode large frames tile by tile: less memory while caching
    compress_disk_cache: bool = False  # gzip the cache files (~2x smaller latents, slower to read)
    delete_problematic_images: bool = False  # move unusable files to a quarantine/ folder beside the dataset
    caption_dropout_probability: float = 0.0  # chance a caption trains as the empty prompt (for CFG)
    i2v_probability: float = 1.0  # chance an i2v-eligible clip trains with its first frame as the condition
    # --- LoRA ---
    lora_rank: int = 16  # adapter rank r
    lora_alpha: float = 0.0  # scale is alpha / r; 0 = alpha equals the rank
    lora_dropout: float = 0.0  # dropout on the adapter input
    lora_target_modules: list[str] = field(default_factory=lambda: list(lora.DEFAULT_TARGETS))  # module-name suffixes
    lora_format: Literal[lora.FORMATS] = "universal"  # lora.safetensors layout; universal: ComfyUI and diffusers
    lora_type: Literal["standard", "lycoris"] = "standard"  # standard: LoRA | lycoris: LoKr from lycoris_config
    lycoris_config: str = ""  # LyCORIS JSON (algo "lokr", factor, linear_dim, apply_preset); docs/lora-files.md
    # --- optimisation ---
    train_batch_size: int = 1  # clips per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_train_steps: int = 0  # optimizer steps; 0 = num_train_epochs passes over the data
    num_train_epochs: int = 1  # used when max_train_steps = 0
    optimizer: str = "adamw"  # the update rule: a name in optim.OPTIMIZERS, e.g. adamw_bf16 (docs/memory.md)
    learning_rate: float = 1e-4  # peak LR; Lion wants 3-10x less than the AdamW family
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"  # linear and cosine decay to 0 at the last step
    lr_warmup_steps: int = 0  # linear warm-up from 0 before the schedule
    adam_weight_decay: float = 1e-2  # decoupled weight decay on the adapter weights
    max_grad_norm: float = 1.0  # clip threshold; 0 = no clipping
    grad_clip_method: Literal["norm", "value"] = "norm"  # norm: rescale the global norm | value: clamp each
    # --- the noise levels σ training sees (train.sample_sigmas; docs/training-quality.md) ---
    flow_weighting_scheme: Literal["logit_normal", "uniform", "mode"] = "logit_normal"  # how σ is drawn
    logit_mean: float = 0.0  # logit_normal: σ = sigmoid(N(logit_mean, logit_std)); < 0 favours low noise
    logit_std: float = 1.0  # logit_normal: spread; larger reaches the ends (σ near 0 and 1) more often
    mode_scale: float = 1.29  # mode: in [-1, 1.75]; > 0 favours the middle, < 0 the ends (SD3's default 1.29)
    flow_schedule_shift: float = 1.0  # σ' = kσ / (1 + (k−1)σ); k > 1 trains more at high noise
    flow_schedule_auto_shift: bool = False  # k from each clip's token count, as the sampler's resolution shift
    # --- training-quality tools (docs/training-quality.md) ---
    use_ema: bool = False  # keep an exponential moving average of the LoRA: lora_ema.safetensors beside the LoRA
    ema_decay: float = 0.999  # θ_ema <- d·θ_ema + (1−d)·θ; the average spans about 1/(1−d) updates
    ema_update_interval: int = 1  # update the average every N optimizer steps
    ema_device: Literal["accelerator", "cpu"] = "accelerator"  # where the average lives; cpu saves its memory
    ema_validation: Literal["none", "ema_only", "comparison"] = "comparison"  # validation videos from the EMA too
    eval_dataset_id: str = ""  # id of a [[datasets]] entry scored for the eval loss and never trained on
    eval_fraction: float = 0.0  # or: this share of each dataset's files held out for the eval loss
    eval_step_interval: int = 100  # eval loss every N steps (and before the first, and after the last)
    eval_sigmas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # the fixed σ grid
    crepa_enabled: bool = False  # CREPA: align one block's hidden states with DINOv2 features across frames
    crepa_block_index: int = 8  # the transformer block whose output is aligned (0-based; 0.9.5 has 28)
    crepa_lambda: float = 0.5  # weight of the CREPA term added to the flow-matching loss
    crepa_adjacent_distance: int = 1  # also align with the features of latent frames up to this far away
    crepa_adjacent_tau: float = 1.0  # a neighbour Δ frames away weighs exp(−|Δ|/tau)
    crepa_model: str = "dinov2_vitg14"  # frozen encoder: dinov2_vitg14 | dinov2_vits14 (less memory) | folder | hub id
    crepa_encoder_image_size: int = 518  # frames resized to about this² pixels for the encoder (224 for vits14)
    scheduled_sampling_probability: float = 0.0  # chance a clip's x_t comes from the model's own rollout
    scheduled_sampling_steps: int = 2  # Euler steps of that rollout, no grad
    scheduled_sampling_sigma_offset: float = 0.1  # the rollout starts at σ + offset (at most 1)
    # --- precision and memory ---
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto (cuda if available) | cuda | cpu
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"  # autocast dtype: bf16 | fp16 | no
    base_model_default_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # frozen weights: transformer, VAE, T5
    base_model_precision: Literal[PRECISIONS] = "no_change"  # the transformer blocks' weights (docs/memory.md)
    text_encoder_precision: Literal[PRECISIONS] = "no_change"  # T5's, while it caches captions
    quantize_via: Literal["cpu", "accelerator"] = "cpu"  # cpu: full weights never fill the GPU | accelerator
    gradient_checkpointing: bool = True  # recompute each block but the last in backward: ~1/3 the memory, ~1.35x time
    gradient_checkpointing_interval: int = 1  # recompute only every Nth block: more memory, less time (bench.py)
    enable_group_offload: bool = False  # blocks' frozen weights live off the GPU, a group at a time on it (offload.py)
    group_offload_blocks_per_group: int = 1  # blocks per group: fewer, larger copies
    group_offload_use_stream: bool = True  # copy the next group on a side CUDA stream while this one computes
    group_offload_to_disk_path: str = ""  # an existing folder for the offloaded weights as mapped files; "" = CPU memory
    enable_model_cpu_offload: bool = False  # validation: the transformer leaves the GPU while the VAE decodes
    attention_mechanism: Literal[tuple(ltx.ATTENTION_BACKENDS)] = "sdpa"  # sdpa | sageattention (inference) | flash
    compile: bool = False  # torch.compile each transformer block: faster steps after a one-off compile (CPU: needs g++)
    # --- validation: videos rendered while training (sample.py) ---
    validation_prompt: str = ""  # rendered at every validation; "" and no prompt library = no validation
    user_prompt_library: str = ""  # JSON file {nickname: prompt}: each rendered too, its file named by nickname
    validation_negative_prompt: str = ltx.NEGATIVE_PROMPT  # the negative prompt of classifier-free guidance
    validation_guidance: float = 3.0  # CFG scale; 1 = no guidance
    validation_num_inference_steps: int = 30  # Euler steps per video
    validation_resolution: str = "768x512"  # one or more WxH, comma separated: "1280x768,768x512"
    validation_num_frames: int = 49  # frames per video (8k+1)
    validation_seed: int = 0  # the same noise at every validation, so the videos compare across steps
    validation_step_interval: int = 0  # render every N steps and after the last; 0 = after the last only
    validation_on_startup: bool = False  # also render before training starts: the baseline to compare with
    validation_image: str = ""  # first frame for image-to-video validation; "" = text-to-video
    disable_validation: bool = False  # render nothing
    # --- output ---
    output_dir: str = "output/lora"  # config.toml, log.jsonl, checkpoints/, lora.safetensors; one run at a time
    overwrite_output_dir: bool = False  # a fresh run may replace the run in output_dir (its checkpoints, log, LoRA)
    seed: int = 0  # data order, noise and LoRA init
    checkpoint_step_interval: int = 500  # save every N optimizer steps; 0 = only the final LoRA
    checkpoints_total_limit: int = 3  # keep the newest N checkpoints; 0 = keep all
    push_to_hub: bool = False  # upload the LoRA, config.toml and a model card to hub_model_id when done
    hub_model_id: str = ""  # "user/name", or "name" under your account; "" = the output_dir's folder name
    push_checkpoints_to_hub: bool = False  # also upload each checkpoint's LoRA files to checkpoints/step-N/
    hub_private: bool = False  # create the hub repo private
    resume_from_checkpoint: str = ""  # "" = fresh run | latest | path to a checkpoints/step-N folder
    max_nonfinite_steps: int = 5  # stop after this many NaN / inf steps in a row (each one is skipped)
    # --- tracking: log.jsonl and loss.png always; these add to them (docs/tracking.md) ---
    report_to: str = "none"  # none | jsonl | tensorboard | wandb (track.REPORTS); log.jsonl is always written
    tracker_project_name: str = "ltx-lora"  # the wandb project
    tracker_run_name: str = ""  # the run's name in TensorBoard, wandb and webhooks; "" = the output_dir's name
    webhook_config: str = ""  # JSON file naming a Discord or raw webhook (SimpleTuner's format); "" = no posts
    webhook_reporting_interval: int = 100  # post progress every N steps (start, validation, errors and the end always)


# Keys that name files or folders (in Config and in data.Dataset): a leading ~ is the home folder, as in a shell.
PATH_KEYS = ("crepa_model", "lycoris_config", "group_offload_to_disk_path", "pretrained_model_name_or_path", "pretrained_transformer_model_name_or_path",
             "pretrained_vae_model_name_or_path", "data_backend_config", "user_prompt_library", "validation_image",
             "output_dir", "resume_from_checkpoint", "instance_data_dir", "cache_dir_vae", "cache_dir",
             "webhook_config")
DTYPES = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)
# Keys SimpleTuner defines that mean nothing here: a SimpleTuner dataloader file loads, and says what it ignores.
SIMPLETUNER_KEYS_IGNORED = {
    "metadata_backend", "skip_file_discovery", "preserve_data_backend_cache", "scan_for_errors", "hash_filenames",
    "cache_file_suffix", "crop_aspect_buckets", "prepend_instance_prompt", "only_instance_prompt",
    "caption_filter_list", "vae_cache_clear_each_epoch", "is_regularisation_data", "is_regularization_data",
    "parquet", "huggingface", "aws_bucket_name", "aws_region_name", "aws_endpoint_url", "aws_access_key_id",
    "aws_secret_access_key", "aws_data_prefix", "conditioning", "conditioning_data", "max_num_samples",
    "start_epoch", "start_step", "end_epoch", "end_step", "image_embeds", "text_embeds", "cache_dir_text",
}
DATA_KEYS = ("datasets", "data_backend_config")  # two ways to name the data: a later source's one replaces both


def config_error(message: str) -> SystemExit:
    return SystemExit(f"config error: {message}")


# -----------------------------------------------------------------------------
# Reading keys: one typed reader for Config and data.Dataset

def type_name(kind) -> str:
    """int, str, ... by name; generics as written (list[float]: a generic's __name__ would say only 'list')."""
    return kind.__name__ if typing.get_origin(kind) is None else str(kind)


def typed(kind, value, name: str, where: str, from_text: bool):
    """A TOML / JSON value checked against a field's type, or a command-line string (from_text) parsed to it.
    Handles bool, int, float (finite), str, Literal choices, list[...] (comma-separated on the command line),
    dict, and `X | None` (none or an empty string on the command line)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        if value is None or (from_text and value.strip().lower() in ("", "none")):
            return None
        (kind,) = [a for a in args if a is not type(None)]
        return typed(kind, value, name, where, from_text)
    if origin is Literal:
        if value in args:
            return value
        raise config_error(f"{where}: {name} = {value!r}; choose one of {', '.join(map(str, args))}")
    if origin is list:
        if from_text and args[0] is not dict:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [typed(args[0], v, f"{name}[{i}]", where, from_text) for i, v in enumerate(value)]
    elif kind is dict and isinstance(value, dict):
        return value
    elif kind is bool:
        if isinstance(value, bool):
            return value
        if from_text and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and value.strip().lstrip("-").isdigit():
            return int(value)
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif from_text:
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and not math.isfinite(number):
            raise config_error(f"{where}: '{name}' must be a finite number, got {value!r}")
        if number is not None:
            return number
    elif kind is str and isinstance(value, str):
        return os.path.expanduser(value) if name in PATH_KEYS else value
    raise config_error(f"{where}: '{name}' must be {type_name(kind)}, got {value!r}")


def read_keys(cls, values: dict, where: str, from_text: bool = False, ignored=frozenset(), log=print) -> dict:
    """{key: raw value} -> {key: typed value} for the dataclass `cls`; an unknown key names the nearest one."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    typed_values = {}
    for key, value in values.items():
        if key in ignored:
            log(f"{where}: '{key}' is a SimpleTuner key ltx-lora does not use; ignored")
            continue
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            raise config_error(f"{where}: unknown key '{key}'" + (f"; did you mean '{near[0]}'?" if near else ""))
        if value is None and not from_text:  # SimpleTuner files write null for "unset"
            continue
        typed_values[key] = typed(fields[key].type, value, key, where, from_text)
    return typed_values


# -----------------------------------------------------------------------------
# The run's config: defaults < TOML < --key=value

def flatten_toml(table: dict, prefix: str = "") -> dict:
    """[lora] rank = 16  ->  {'lora_rank': 16}: a table name is a key prefix."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten_toml(value, f"{prefix}{key}_"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_toml(path: str) -> dict:
    import tomli
    if not Path(path).is_file():
        raise config_error(f"config file {path} does not exist")
    with open(path, "rb") as fh:
        try:
            return flatten_toml(tomli.load(fh))
        except tomli.TOMLDecodeError as e:
            raise config_error(f"{path} is not valid TOML: {e}")


def joined(argv: list[str], flag: str) -> list[str]:
    """`flag value` written as two words (as SimpleTuner's docs write it) -> `flag=value`."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag and i + 1 < len(argv):
            out.append(f"{flag}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def parse_command_line(argv: list[str], log=print) -> tuple[Config, str]:
    """train.py's arguments: (the checked Config, the --write_toml file or "")."""
    argv = joined(argv, "--write_toml")
    write_toml = next((a.partition("=")[2] for a in argv if a.startswith("--write_toml=")), "")
    return parse_config([a for a in argv if not a.startswith("--write_toml=")], log), write_toml


def parse_config(argv: list[str], log=print) -> Config:
    """argv: [config.toml ...] [--simpletuner_config=config.json] [--key=value ...]; a later source wins, key by
    key. [[datasets]] and data_backend_config are two spellings of the data: a source that sets one replaces both.
    A SimpleTuner config.json is one more source, read by simpletuner.py (its table of keys goes to `log`)."""
    import simpletuner  # here, not at the top: simpletuner imports config
    values, command_line, dataset_defaults = {}, {}, {}
    for arg in joined(argv, "--simpletuner_config"):
        if arg.startswith("--simpletuner_config="):
            path = arg.partition("=")[2]
            theirs, dataset_defaults = simpletuner.simpletuner_values(path, log)
            values = merge(values, read_keys(Config, theirs, path), path)
        elif arg.startswith("--"):
            key, sep, raw = arg[2:].partition("=")
            if not sep:
                raise config_error(f"'{arg}' must be written --key=value")
            command_line[key.replace("-", "_")] = raw
        else:
            values = merge(values, read_keys(Config, read_toml(arg), arg), arg)
    values = merge(values, read_keys(Config, command_line, "the command line", from_text=True), "the command line")
    if dataset_defaults:
        values = simpletuner.with_dataset_defaults(values, dataset_defaults, log)
    cfg = Config(**values)
    check(cfg)
    for key in ("base_model_precision", "text_encoder_precision"):
        setattr(cfg, key, quant.resolve(getattr(cfg, key), key))
    return cfg


def merge(values: dict, newer: dict, where: str) -> dict:
    if all(newer.get(k) for k in DATA_KEYS):
        raise config_error(f"{where} sets both [[datasets]] and data_backend_config; keep one")
    if any(newer.get(k) for k in DATA_KEYS):
        values = {k: v for k, v in values.items() if k not in DATA_KEYS}
    return {**values, **newer}


def check(cfg: Config) -> None:
    """Every mistake that can be caught before a model loads, each one sentence naming the key."""
    check_numbers(cfg)
    check_methods(cfg)
    check_sources(cfg)
    check_outputs(cfg)
    check_data(cfg)


def check_numbers(cfg: Config) -> None:
    """Numbers each within its range: sizes, steps, probabilities, the σ schedule, the quality tools."""
    import optim  # (they read Config: imported here, once Config exists)
    import track
    for key, table in (("optimizer", optim.OPTIMIZERS), ("report_to", track.REPORTS)):
        if getattr(cfg, key) not in table:
            raise config_error(f"{key} = {getattr(cfg, key)!r}; choose one of {', '.join(table)}")
    positive = ("lora_rank", "train_batch_size", "gradient_accumulation_steps", "vae_batch_size", "learning_rate",
                "gradient_checkpointing_interval", "group_offload_blocks_per_group")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise config_error(f"{key} must be > 0, got {getattr(cfg, key)}")
    for key in ("max_train_steps", "num_train_epochs", "lr_warmup_steps", "max_grad_norm", "checkpoint_step_interval",
                "checkpoints_total_limit", "lora_alpha", "adam_weight_decay", "validation_step_interval", "eval_step_interval", "webhook_reporting_interval"):
        if getattr(cfg, key) < 0:
            raise config_error(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("caption_dropout_probability", "lora_dropout"):
        if not 0 <= getattr(cfg, key) < 1:
            raise config_error(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    if not 0 <= cfg.i2v_probability <= 1:
        raise config_error(f"i2v_probability must be in [0, 1], got {cfg.i2v_probability}")
    if cfg.max_train_steps == 0 and cfg.num_train_epochs == 0:
        raise config_error("set max_train_steps or num_train_epochs above 0")
    if cfg.flow_schedule_shift <= 0 or cfg.logit_std <= 0:
        key = "flow_schedule_shift" if cfg.flow_schedule_shift <= 0 else "logit_std"
        raise config_error(f"{key} must be > 0, got {getattr(cfg, key)}")
    if cfg.flow_schedule_shift > 1000:  # beyond, every σ' rounds to 1 (and 1e300 overflows to NaN steps)
        raise config_error(f"flow_schedule_shift must be <= 1000 (LTX's own shifts are about 1 to 8), got "
                           f"{cfg.flow_schedule_shift:g}")
    if not -1 <= cfg.mode_scale <= 1.75:  # outside, σ(u) is not monotonic and leaves [0, 1]
        raise config_error(f"mode_scale must be in [-1, 1.75], got {cfg.mode_scale}")
    if cfg.flow_schedule_auto_shift and cfg.flow_schedule_shift != 1.0:
        raise config_error("flow_schedule_auto_shift picks the shift from each clip's size; leave flow_schedule_shift "
                           "at 1 with it (or turn auto shift off)")
    for key in ("ema_decay", "eval_fraction", "scheduled_sampling_probability"):
        if not 0 <= getattr(cfg, key) < 1:
            raise config_error(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    for key in ("ema_update_interval", "scheduled_sampling_steps", "max_nonfinite_steps"):
        if getattr(cfg, key) < 1:
            raise config_error(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if not 0 < cfg.scheduled_sampling_sigma_offset <= 1:
        raise config_error(f"scheduled_sampling_sigma_offset must be in (0, 1], got "
                           f"{cfg.scheduled_sampling_sigma_offset}")
    if not cfg.eval_sigmas or not all(0 < x <= 1 for x in cfg.eval_sigmas):
        raise config_error(f"eval_sigmas must be one or more σ in (0, 1], got {cfg.eval_sigmas}")
    for key in ("crepa_block_index", "crepa_lambda", "crepa_adjacent_distance"):
        if getattr(cfg, key) < 0:
            raise config_error(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.crepa_adjacent_tau <= 0 or not 14 <= cfg.crepa_encoder_image_size <= 2048:
        raise config_error("crepa_adjacent_tau must be > 0 and crepa_encoder_image_size 14 (one DINOv2 patch) to "
                           "2048 (DINOv2 was trained at 518)")


def check_methods(cfg: Config) -> None:
    """The adapters, the hub, offload and compile: combinations that cannot work, and what each needs."""
    if cfg.crepa_enabled and not os.path.isdir(crepa.encoder_source(cfg.crepa_model)) \
            and not ltx.looks_like_hub_id(crepa.encoder_source(cfg.crepa_model)):
        raise config_error(f"crepa_model = {cfg.crepa_model!r} is neither one of {', '.join(crepa.MODELS)}, a folder, "
                           f"nor a hub id like 'facebook/dinov2-small'")
    if cfg.push_to_hub or cfg.push_checkpoints_to_hub:
        check_hub(cfg)
    if cfg.eval_dataset_id and cfg.eval_fraction:
        raise config_error("eval_dataset_id and eval_fraction are two ways to choose the eval clips; set one")
    if cfg.lora_type == "lycoris":
        if not cfg.lycoris_config:
            raise config_error('lora_type = "lycoris" needs lycoris_config, the path to a LyCORIS JSON such as '
                               '{"algo": "lokr", "factor": 16} (docs/lora-files.md)')
        try:
            spec = lora.read_lycoris_config(cfg.lycoris_config)
        except lora.LoRAError as e:
            raise config_error(str(e))
        classes = {type(m).__name__ for m in probe_model().modules()}
        unknown = [c for c in spec.targets if c not in classes]
        if unknown:
            raise config_error(f"lycoris_config {cfg.lycoris_config}: target class(es) {', '.join(unknown)} are not in "
                               f"the LTX transformer (its classes: {', '.join(sorted(classes))})")
        if cfg.lora_format == "diffusers":
            raise config_error('diffusers loads no LoKr file; with lora_type = "lycoris" set lora_format = "universal"')
    if cfg.lora_format == "universal":
        targeted = [n for n, m in probe_model().named_modules()
                    if isinstance(m, torch.nn.Linear) and lora.matches(n, cfg.lora_target_modules)]
        if lora.renamed_in_comfyui(targeted):
            raise config_error(lora.universal_refusal(lora.renamed_in_comfyui(targeted)))
    if cfg.enable_group_offload:
        if cfg.enable_model_cpu_offload:
            raise config_error("enable_group_offload and enable_model_cpu_offload are two ways to offload the "
                               "transformer; choose one (group offload keeps validation under training's peak too)")
        if not cfg.gradient_checkpointing:
            raise config_error("enable_group_offload needs gradient_checkpointing = true: without recompute, backward "
                               "keeps every block's weights on the GPU and offloading saves nothing")
        if cfg.compile:
            raise config_error("enable_group_offload and compile = true do not go together yet (the offload hooks "
                               "run around each block); turn one off")
        if cfg.group_offload_to_disk_path and cfg.base_model_precision != "no_change":
            raise config_error(f"group_offload_to_disk_path keeps plain tensors (safetensors), not "
                               f"{cfg.base_model_precision} weights; leave it empty to offload them to CPU memory, "
                               f"where they take 2-4x less than bf16")
        if cfg.group_offload_to_disk_path:
            check_offload_folder(cfg.group_offload_to_disk_path)
    if cfg.compile and cfg.attention_mechanism != "sdpa":
        raise config_error(f"compile = true traces SDPA attention only; use attention_mechanism = \"sdpa\" with it, "
                           f"or turn compile off to use {cfg.attention_mechanism}")


def check_sources(cfg: Config) -> None:
    """The device, the checkpoint to resume, the models' sources."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise config_error('device = "cuda" but torch sees no CUDA GPU; set device = "auto" or "cpu"')
    if cfg.overwrite_output_dir and cfg.resume_from_checkpoint:
        raise config_error(f"overwrite_output_dir = true starts over, resume_from_checkpoint = "
                           f"{cfg.resume_from_checkpoint!r} continues: choose one "
                           f"(--resume_from_checkpoint= starts over)")
    if cfg.resume_from_checkpoint not in ("", "latest") and not Path(cfg.resume_from_checkpoint).is_dir():
        raise config_error(f"resume_from_checkpoint = {cfg.resume_from_checkpoint!r} is not a checkpoint folder")
    if cfg.demo and ltx.looks_like_hub_id(cfg.pretrained_model_name_or_path):
        raise config_error(f"demo = true writes a tiny random model to pretrained_model_name_or_path, which must then "
                           f"be a folder path, not a hub id like {cfg.pretrained_model_name_or_path!r}; "
                           f"configs/demo.toml uses \"output/demo/tiny-ltx\"")
    for key in ("pretrained_model_name_or_path", "pretrained_transformer_model_name_or_path",
                "pretrained_vae_model_name_or_path"):
        value = getattr(cfg, key)
        demo_made = cfg.demo and key == "pretrained_model_name_or_path"
        single_file = key == "pretrained_transformer_model_name_or_path" and ltx.is_single_file(value)
        if value and not (demo_made or single_file or os.path.isdir(value) or ltx.looks_like_hub_id(value)):
            raise config_error(f"{key} = {value!r} is neither a folder nor a hub id like 'Lightricks/LTX-Video-0.9.5'"
                               + (" nor a .safetensors file" if key.startswith("pretrained_transformer") else ""))
        if value and not cfg.demo and os.path.isdir(value) and ltx.is_demo_model(value):
            raise config_error(f"{key} = {value!r} is the folder of the demo's tiny random model, not LTX-Video; set "
                               f"demo = true to train on it, or move that folder away to use the real model")


def check_outputs(cfg: Config) -> None:
    """output_dir, validation, the prompt library and webhook files."""
    output_dir = Path(cfg.output_dir).absolute()
    if output_dir.exists() and not output_dir.is_dir():
        raise config_error(f"output_dir = {cfg.output_dir!r} is a file, not a folder")
    existing = next(p for p in [output_dir, *output_dir.parents] if p.exists())
    if not existing.is_dir():
        raise config_error(f"output_dir = {cfg.output_dir!r} cannot be made: {existing} is a file")
    if not data.writable(existing):
        raise config_error(f"output_dir = {cfg.output_dir!r} cannot be written ({existing} is not writable)")
    try:
        parse_resolutions(cfg.validation_resolution)
    except ValueError as e:
        raise config_error(f"validation_{e}")
    if cfg.validation_num_frames < 1 or cfg.validation_num_inference_steps < 1:
        raise config_error("validation_num_frames and validation_num_inference_steps must be >= 1")
    if cfg.validation_image:
        try:
            data.read_image(Path(cfg.validation_image))
        except OSError as e:  # missing, or no permission
            raise config_error(f"validation_image {cfg.validation_image} cannot be read ({e.strerror or e})")
        except data.BadFile as e:
            raise config_error(f"validation_image {cfg.validation_image}: {e}")
    validation_prompts(cfg)  # a missing or malformed prompt library stops here
    webhooks(cfg)  # and a missing or malformed webhook file


def check_data(cfg: Config) -> None:
    """The datasets: present, readable, never around output_dir, the eval set among them."""
    if not cfg.datasets and not cfg.data_backend_config:
        raise config_error("no data: add [[datasets]] tables (see configs/demo.toml) or data_backend_config")
    datasets = dataset_entries(cfg, log=lambda message: None)[0]
    for ds in datasets:  # the run's videos, loss.png and checkpoints would be found as clips and images
        if Path(cfg.output_dir).resolve().is_relative_to(Path(ds.instance_data_dir).resolve()):
            raise config_error(f"output_dir = {cfg.output_dir!r} is inside dataset '{ds.id}''s instance_data_dir "
                               f"{ds.instance_data_dir!r}: what the run writes there would become training data; "
                               f"put output_dir elsewhere")
    if cfg.eval_dataset_id:
        ids = [ds.id for ds in datasets]
        if cfg.eval_dataset_id not in ids:
            raise config_error(f"eval_dataset_id = {cfg.eval_dataset_id!r} names no dataset; the ids are "
                               f"{', '.join(ids)}")
        if len(ids) == 1:
            raise config_error(f"eval_dataset_id = {cfg.eval_dataset_id!r} is the only dataset, so nothing is left "
                               f"to train on; add a training dataset or use eval_fraction")


# -----------------------------------------------------------------------------
# The data: [[datasets]] tables or SimpleTuner's multidatabackend.json, read into data.Dataset entries

def dataset_entries(cfg: Config, log=print) -> tuple[list[data.Dataset], data.Dataset | None]:
    """(the enabled image / video datasets, the text_embeds entry to use or None)."""
    if cfg.data_backend_config:
        return parse_datasets(load_backend_file(cfg.data_backend_config), cfg.data_backend_config, log)
    return parse_datasets(cfg.datasets, "[[datasets]]", log)


def read_json(path: str, key: str):
    """The JSON file a key names, or a one-sentence config error naming the key and the file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise config_error(f"{key} {path} does not exist")
    except json.JSONDecodeError as e:
        raise config_error(f"{key} {path} is not valid JSON: {e}")


def load_backend_file(path: str) -> list[dict]:
    """SimpleTuner's multidatabackend.json: a JSON list of dataset objects."""
    entries = read_json(path, "data_backend_config")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise config_error(f"data_backend_config {path} must be a JSON list of dataset objects")
    return entries


def parse_datasets(entries: list[dict], source: str, log=print) -> tuple[list[data.Dataset], data.Dataset | None]:
    if not entries:
        raise config_error(f"{source}: no datasets; add a [[datasets]] table with an instance_data_dir")
    parsed = [parse_dataset(e, source, i, log) for i, e in enumerate(entries)]
    ids = [ds.id for ds in parsed]
    if len(set(ids)) != len(ids):
        raise config_error(f"{source}: dataset ids must be unique, got {ids}")
    text = [ds for ds in parsed if ds.dataset_type == "text_embeds" and not ds.disabled]
    media = [ds for ds in parsed if ds.dataset_type != "text_embeds" and not ds.disabled]
    if not media:
        raise config_error(f"{source}: every image / video dataset is disabled" if len(text) < len(parsed) else
                           f"{source} has only a text_embeds entry (where captions are cached); add an image or "
                           f"video dataset with an instance_data_dir")
    if not any(ds.probability > 0 for ds in media):
        raise config_error(f"{source}: every dataset has probability 0, so no batch could be drawn")
    return media, next((ds for ds in text if ds.default), text[0] if text else None)


def parse_dataset(entry: dict, source: str, position: int, log=print) -> data.Dataset:
    """One entry (a TOML [[datasets]] table or a JSON object) -> a checked data.Dataset. The video keys sit in
    its `video` table (video = { num_frames = 49 }), and only there."""
    name = str(entry.get("id") or f"#{position + 1}")
    where = f"{source}, dataset '{name}'"
    if entry.get("type", "local") != "local":  # SimpleTuner's storage backends
        raise config_error(f"{where}: type = {entry['type']!r}; only local folders are read (type = \"local\")")
    entry = {k: v for k, v in entry.items() if k != "type"}
    video = {} if entry.get("video") is None else entry["video"]  # null = no video keys, like any null
    if not isinstance(video, dict):
        raise config_error(f"{where}: 'video' must be a table of video keys")
    video_keys = {k: v for k, v in video.items() if k in data.VIDEO_KEYS}
    for key in video.keys() - video_keys.keys():
        near = difflib.get_close_matches(key, data.VIDEO_KEYS, n=1, cutoff=0.5)
        raise config_error(f"{where}: unknown video key '{key}'" + (f"; did you mean '{near[0]}'?" if near else ""))
    flat = {k: v for k, v in entry.items() if k != "video"}
    for key in flat.keys() & set(data.VIDEO_KEYS):  # also when the video table sets it too: never silently dropped
        raise config_error(f"{where}: '{key}' belongs in the video table: video = {{ {key} = {entry[key]!r} }}")
    ds = data.Dataset(**read_keys(data.Dataset, {**flat, **video_keys}, where, ignored=SIMPLETUNER_KEYS_IGNORED,
                                  log=log))
    ds.id = name
    if ds.min_frames == 0:  # the frames a clip trains on: num_frames as the VAE takes it (8k+1)
        ds.min_frames = data.round_frames(ds.num_frames)
    check_dataset(ds, where)
    return ds


MAX_SIDE = 8192  # pixels: beyond any LTX video (4K is 3840x2160); a typo past it would allocate terabytes


def check_dataset(ds: data.Dataset, where: str) -> None:
    def error(message: str) -> SystemExit:
        return config_error(f"{where}: {message}")
    if "/" in ds.id or "\\" in ds.id or ds.id in (".", ".."):  # it names the quarantine/<id> folder
        raise error(f"id {ds.id!r} must be a plain name (no '/', '\\', '.' or '..'): it names the dataset's "
                    f"quarantine/<id> folder and its entries in the report")
    if ds.dataset_type == "text_embeds":
        return
    if not ds.instance_data_dir:
        raise error("instance_data_dir is missing")
    if ds.caption_strategy == "instanceprompt" and not ds.instance_prompt:
        raise error("caption_strategy = 'instanceprompt' needs an instance_prompt")
    if ds.resolution <= 0 or ds.probability < 0 or ds.repeats < 0:
        raise error("resolution must be > 0, probability and repeats >= 0")
    side = math.sqrt(ds.resolution * 1e6) if ds.resolution_type == "area" else ds.resolution
    if side > MAX_SIDE:
        raise error(f"resolution = {ds.resolution:g} ({ds.resolution_type}) is over {MAX_SIDE} pixels a side; "
                    f"resolution_type {ds.resolution_type!r} reads it as "
                    + ("megapixels" if ds.resolution_type == "area" else "pixels"))
    if ds.num_frames < 1 or ds.min_frames > ds.num_frames:
        raise error(f"num_frames = {ds.num_frames}, min_frames = {ds.min_frames}: need 1 <= min_frames <= num_frames")
    if ds.max_frames and ds.max_frames < ds.min_frames:
        raise error(f"max_frames = {ds.max_frames} is below min_frames = {ds.min_frames}")
    if ds.frame_interval <= 0 or ds.frame_interval % 8:
        raise error(f"frame_interval = {ds.frame_interval}; LTX needs 8k+1 frames, so use a multiple of 8")
    if ds.maximum_image_size and not ds.target_downsample_size:
        raise error("maximum_image_size needs target_downsample_size (the size large sources are brought down to)")


# -----------------------------------------------------------------------------
# Small readers other files share

def parse_resolutions(text: str) -> list[tuple[int, int]]:
    """'1280x768,768x512' -> [(1280, 768), (768, 512)]: positive integers, as written (see sample.video_shape)."""
    sizes = []
    for part in text.split(","):
        try:
            width, height = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"resolution {part.strip()!r}: write it as WIDTHxHEIGHT, e.g. 768x512")
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            raise ValueError(f"resolution {part.strip()!r}: width and height must be 1 to {MAX_SIDE} pixels")
        sizes.append((width, height))
    return sizes


def transformer_source(cfg: Config) -> tuple[str, str | None]:
    """Where the transformer loads from: a fine-tune named on its own, else the model's transformer/ folder."""
    if cfg.pretrained_transformer_model_name_or_path:
        return cfg.pretrained_transformer_model_name_or_path, cfg.pretrained_transformer_subfolder
    return cfg.pretrained_model_name_or_path, "transformer"


def validation_prompts(cfg: Config) -> list[tuple[str, str]]:
    """(nickname, prompt) pairs to render: validation_prompt, then the prompt library's entries."""
    if cfg.disable_validation:
        return []
    prompts = [("validation", cfg.validation_prompt)] if cfg.validation_prompt else []
    if cfg.user_prompt_library:
        library = read_json(cfg.user_prompt_library, "user_prompt_library")
        if not isinstance(library, dict) or not all(isinstance(v, str) for v in library.values()):
            raise config_error(f"user_prompt_library {cfg.user_prompt_library} must be a JSON object "
                               f"{{\"nickname\": \"prompt\", ...}}")
        prompts += list(library.items())
    files = {}  # file name -> the nickname it came from: two nicknames for one file would overwrite each other
    for nickname, _ in prompts:
        name = data.safe_name(nickname)
        if name in files:
            raise config_error(f"user_prompt_library {cfg.user_prompt_library}: the nicknames {files[name]!r} and "
                               f"{nickname!r} both name the file {name}-WxH.mp4 (validation_prompt's is "
                               f"'validation'); rename one")
        files[name] = nickname
    return prompts


def probe_model() -> torch.nn.Module:
    """A one-block LTX transformer of width 2: every module name and class of the real one (they do not depend
    on the size), for checking adapter targets before any model loads."""
    return ltx.LTXTransformer(ltx.TransformerConfig(in_channels=1, out_channels=1, num_attention_heads=1,
                                                    attention_head_dim=2, cross_attention_dim=2, num_layers=1,
                                                    caption_channels=1))


def lora_alpha(cfg: Config) -> float:
    """LoRA's alpha: lora_alpha, or the rank when it is 0 (a scale alpha / rank of 1)."""
    return cfg.lora_alpha or cfg.lora_rank


def hub_token() -> str | None:
    """The Hugging Face token huggingface_hub would use (HF_TOKEN, or the one `hf auth login` saved)."""
    from huggingface_hub import get_token
    return get_token()


def hub_repo(cfg: Config) -> str:
    """The hub repo push_to_hub uploads to: hub_model_id, or the output_dir's folder name."""
    return cfg.hub_model_id or Path(cfg.output_dir).resolve().name


def check_hub(cfg: Config) -> None:
    """push_to_hub's repo id and token, checked before any work rather than at the first upload."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    repo = hub_repo(cfg)
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        whose = "hub_model_id" if cfg.hub_model_id else "the hub repo id (the output_dir's folder name by default)"
        raise config_error(f"{whose} {repo!r} is not a valid hub repo id ({str(e).splitlines()[0]}); set "
                           f"hub_model_id = \"user/name\" (letters, digits, '-', '_' and '.')")
    if not hub_token():
        raise config_error("push_to_hub needs a Hugging Face token, checked now rather than after training: run "
                           "`hf auth login` or set HF_TOKEN")


def check_offload_folder(path: str) -> None:
    """group_offload_to_disk_path must be a folder that exists and is writable (each run makes its own folder in
    it, removed at the end): created by the run, a typo would leave a tree of folders behind."""
    folder = Path(path)
    if not folder.exists():
        raise config_error(f"group_offload_to_disk_path = {path!r} does not exist; create it (on a fast disk with "
                           f"room for the frozen weights) or leave it empty to offload to CPU memory")
    if not folder.is_dir():
        raise config_error(f"group_offload_to_disk_path = {path!r} is a file, not a folder")
    if not data.writable(folder):
        raise config_error(f"group_offload_to_disk_path = {path!r} is not writable here; choose a folder you can "
                           f"write to")



WEBHOOK_URL_KEYS = {"discord": "webhook_url", "raw": "callback_url"}  # SimpleTuner's names: its files work here


def webhooks(cfg: Config) -> list[dict]:
    """The webhook_config file's entries (one JSON object, or a list of them), each checked:
        {"webhook_type": "discord", "webhook_url": "https://discord.com/api/webhooks/..."}
        {"webhook_type": "raw", "callback_url": "http://...", "timeout": 10}
    Optional: message_prefix (before every message), timeout (seconds per post). Other keys of a SimpleTuner file
    (log_level, ...) are ignored. Errors never show the URL: it holds the webhook's secret."""
    if not cfg.webhook_config:
        return []
    where = f"webhook_config {cfg.webhook_config}"
    entries = read_json(cfg.webhook_config, "webhook_config")
    entries = entries if isinstance(entries, list) else [entries]
    for entry in entries:
        kind = entry.get("webhook_type") if isinstance(entry, dict) else None
        if kind not in WEBHOOK_URL_KEYS:
            raise config_error(f'{where}: each entry needs "webhook_type": "discord" or "raw", got {kind!r}')
        url = entry.get(WEBHOOK_URL_KEYS[kind])
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise config_error(f'{where}: a {kind} webhook needs "{WEBHOOK_URL_KEYS[kind]}": an http(s) URL')
        timeout = entry.get("timeout", 10)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
            raise config_error(f'{where}: "timeout" must be a number of seconds in (0, 600], got {timeout!r}')
    return entries


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # a JSON string is a valid TOML string


def to_toml(cfg: Config) -> str:
    """Flat `key = value` lines (datasets as inline tables) that parse_config reads back to the same Config."""
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in dataclasses.asdict(cfg).items())


def write_new_toml(path: Path, cfg: Config) -> None:
    """--write_toml: the config as a TOML of ours, in a file that must not exist yet (it may be the very file the
    config was read from). overwrite_output_dir is written false: a file that reruns must never wipe a run."""
    if path.is_dir():
        raise SystemExit(f"--write_toml {path} is a folder; give the name of a new .toml file")
    if cfg.overwrite_output_dir:
        print("overwrite_output_dir = true is not written: every run of the file would delete the run before it")
    try:
        with open(path, "x") as f:  # "x": never replaces a file, even one made a moment ago
            f.write(to_toml(dataclasses.replace(cfg, overwrite_output_dir=False)))
    except FileExistsError:
        raise SystemExit(f"--write_toml {path} exists; give a new file name (nothing was written)")
    except OSError as e:
        raise SystemExit(f"--write_toml {path} cannot be written ({e.strerror or e})")
    print(f"wrote {path}: train with python train.py {path}")


# -----------------------------------------------------------------------------
# docs/configuration.md's key tables, generated from the dataclasses' source (python config.py rewrites them)

def key_table(cls) -> str:
    """A markdown table of a settings dataclass: each `# ...` comment line becomes a section row, each field
    its name, default (as TOML) and trailing comment."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for line in inspect.getsource(cls).splitlines()[1:]:
        line = line.strip()
        name = line.split(":")[0]
        if line.startswith("# "):
            rows.append(f"| *{line.strip('# -')}* | | |")
        elif name in fields:
            f = fields[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            meaning = line.split("  # ", 1)[1].replace("|", "\\|")
            rows.append(f"| `{name}` | `{toml_value(default)}` | {meaning} |")
    return "\n".join(rows) + "\n"


def with_key_tables(markdown: str) -> str:
    """The markdown with the table after each `<!-- keys: Config -->` / `<!-- keys: Dataset -->` marker regenerated."""
    out, lines, i = [], markdown.splitlines(keepends=True), 0
    while i < len(lines):
        out.append(lines[i])
        marker = lines[i].strip()
        i += 1
        if marker in ("<!-- keys: Config -->", "<!-- keys: Dataset -->"):
            while i < len(lines) and lines[i].startswith("|"):  # the old table
                i += 1
            out.append(key_table(Config if marker.endswith("Config -->") else data.Dataset))
    return "".join(out)


if __name__ == "__main__":
    doc = Path(__file__).with_name("docs") / "configuration.md"
    doc.write_text(with_key_tables(doc.read_text()))
    print(f"rewrote the key tables in {doc}")
