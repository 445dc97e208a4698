"""Migrating from SimpleTuner: its config.json, read as one more config source, mapped by meaning to Config's keys.

    python train.py --simpletuner_config config/config.json [--write_toml out.toml] [--key=value ...]

    simpletuner_values(path)  ->  (Config keys, its global dataset keys), with a table of every key it read logged
    with_dataset_defaults(values, defaults)  ->  the values with those dataset keys in each dataset that sets none

config.parse_config calls both for --simpletuner_config (it imports this module there: this one imports config).
Every key of theirs is one row of the logged table, in three groups:
    mapped       a key Config (or a dataset table) has is taken as it is, SimpleTuner's "true" / "1e-4" strings
                 read as the key's type and other trainers' value names translated where ours differ (int8-quanto ->
                 int8-torchao in quant.ALIASES; SIMPLETUNER_VALUES below); renamed keys go to ours (SIMPLETUNER_RENAMED)
    ignored      they change nothing here: the reason is printed (SIMPLETUNER_IGNORED, or an unsupported key set off)
    unsupported  they would change what SimpleTuner trains and this trainer does not do it: the run goes on without
                 them, and the table says so (SIMPLETUNER_UNSUPPORTED, and keys this trainer has no setting for)
The global dataset keys (resolution, resolution_type, crop, ... set once for every dataset, as SimpleTuner allows)
go into each image / video dataset of the data_backend_config the run ends up with that does not set them.
--write_toml out.toml (train.py) writes the Config this import ends with as a TOML file of ours, datasets
included, to read and edit from then on. The multidatabackend.json itself is read by config (data_backend_config).
"""

import typing
from typing import Literal

import config
import data
import quant


SIMPLETUNER_RENAMED = {  # theirs -> ours
    "checkpointing_steps": "checkpoint_step_interval", "validation_steps": "validation_step_interval",
    "text_encoder_1_precision": "text_encoder_precision", "validation_num_video_frames": "validation_num_frames",
    "eval_steps_interval": "eval_step_interval",
}
SIMPLETUNER_VALUES = {  # (our key, their value) -> ours
    ("lr_scheduler", "constant_with_warmup"): "constant",  # our constant warms up with lr_warmup_steps too
    ("attention_mechanism", "diffusers"): "sdpa",  # diffusers' default attention is PyTorch's SDPA
    ("attention_mechanism", "sageattention-int8-fp16-triton"): "sageattention",
    ("attention_mechanism", "sageattention-int8-fp16-cuda"): "sageattention",
    ("attention_mechanism", "sageattention-int8-fp8-cuda"): "sageattention",
}
SIMPLETUNER_IGNORED = {
    "model_type": "lora, the one kind this trainer trains",
    "model_family": "ltxvideo, the one model this trainer trains",
    "offload_during_startup": "ours always keeps one frozen model at a time on the GPU while caching",
    "disable_benchmark": "SimpleTuner's pre-training benchmark; ours renders the base with validation_on_startup",
    "validation_prompt_library": "SimpleTuner's built-in prompts; ours renders validation_prompt and "
                                 "user_prompt_library",
    "ignore_final_epochs": "ours always stops at max_train_steps",
    "vae_cache_ondemand": "ours caches every latent before training",
    "allow_tf32": "torch's default matmul precision is used",
    "framerate": "LTX-Video's 25 fps is used for RoPE and the videos",
    "seed_for_each_device": "ours seeds every example from (seed, step, position): the same on any number of GPUs",
    "metadata_update_interval": "SimpleTuner's metadata cache; ours reads the cache files directly",
    "aspect_bucket_alignment": "LTX's VAE fixes it at 32",
    "text_encoder_2_precision": "LTX-Video has one text encoder",
    "text_encoder_3_precision": "LTX-Video has one text encoder",
    "num_validation_videos": "ours renders each prompt once per resolution",
}
SIMPLETUNER_UNSUPPORTED = {
    "lora_init_type": "ours starts B at zero and A random (kaiming), as PEFT's default",
    "use_dora": "DoRA is not built",
    "validation_torch_compile": "validation runs eagerly",
    "group_offload_type": "leaf-level offload is not built; ours offloads whole blocks (block_level)",
}


def simpletuner_values(path: str, log=print) -> tuple[dict, dict]:
    """A SimpleTuner config.json ({"--key": value} or {"key": value}) -> (Config keys, its global dataset keys:
    resolution, resolution_type, crop, ... for with_dataset_defaults), with the mapping table logged. Paths in it
    are read from the folder you run in, as SimpleTuner reads them (run from your SimpleTuner folder)."""
    raw = config.read_json(path, "simpletuner_config")
    if not isinstance(raw, dict):
        raise config.config_error(f"simpletuner_config {path} must be a JSON object of settings")
    theirs = {k.lstrip("-"): v for k, v in raw.items()}
    if "pretrained_vae_model_name_or_path" in theirs and \
            theirs["pretrained_vae_model_name_or_path"] == theirs.get("pretrained_model_name_or_path"):
        del theirs["pretrained_vae_model_name_or_path"]  # SimpleTuner's way to say the model's own vae/; ours is ""
    if theirs.get("model_family", "ltxvideo") != "ltxvideo" or theirs.get("model_type", "lora") != "lora":
        raise config.config_error(f"simpletuner_config {path} trains model_family = {theirs.get('model_family')!r}, "
                                  f"model_type = {theirs.get('model_type')!r}; this trainer trains LoRAs of "
                                  f"LTX-Video (ltxvideo, lora) only")
    kinds, dataset_kinds = typing.get_type_hints(config.Config), typing.get_type_hints(data.Dataset)
    ours, dataset_defaults, rows = {}, {}, []  # rows: (mapped | ignored | unsupported, their key, what became of it)
    for key, value in theirs.items():
        target = SIMPLETUNER_RENAMED.get(key, key)
        if key in SIMPLETUNER_UNSUPPORTED:
            off = value in (False, "false", "", None, 0, "block_level")  # off, or what ours does: nothing is lost
            rows.append(("ignored", key, f"off ({SIMPLETUNER_UNSUPPORTED[key]})") if off else
                        ("unsupported", key, SIMPLETUNER_UNSUPPORTED[key]))
        elif key in SIMPLETUNER_IGNORED and target not in kinds:
            rows.append(("ignored", key, SIMPLETUNER_IGNORED[key]))
        elif target in kinds:
            value = SIMPLETUNER_VALUES.get((target, value), value)
            if target in ("base_model_precision", "text_encoder_precision"):
                value = quant.ALIASES.get(value, value)  # int8-quanto -> int8-torchao: the same weights in int8
            kind = kinds[target]
            if isinstance(value, str) and kind is not str and typing.get_origin(kind) is not Literal:
                value = config.typed(kind, value, target, path, from_text=True)  # "true", "1e-4"
            ours[target] = value
            rows.append(("mapped", key, f"{target} = {config.toml_value(value)}"))
        elif key in dataset_kinds and key != "id":
            kind = dataset_kinds[key]
            if isinstance(value, str) and kind is not str and typing.get_origin(kind) is not Literal:
                value = config.typed(kind, value, key, path, from_text=True)  # "false", "800", as for Config keys
            dataset_defaults[key] = value
            rows.append(("mapped", key, f"each dataset's {key} = {config.toml_value(value)}, where it sets none"))
        else:
            rows.append(("unsupported", key, "no such setting in this trainer"))
    log(f"{path} (SimpleTuner), key by key:")
    width = max(len(key) for _, key, _ in rows) if rows else 0
    for kind in ("mapped", "ignored", "unsupported"):
        for _, key, what in [r for r in rows if r[0] == kind]:
            log(f"  {kind:<11}  {key:<{width}}  {what}")
    return ours, dataset_defaults


def with_dataset_defaults(values: dict, defaults: dict, log=print) -> dict:
    """SimpleTuner's global dataset keys go into each image / video dataset of the data_backend_config the run
    ends up with (the file's, or one given later on the command line) that does not set them, as SimpleTuner
    applies them; the datasets then travel as [[datasets]] tables (so --write_toml writes them out). Datasets
    written as [[datasets]] tables set their own keys: there the defaults are said to be unused."""
    if not values.get("data_backend_config"):
        log(f"SimpleTuner's dataset keys {', '.join(defaults)} are not used: the datasets come from [[datasets]] "
            f"tables, which set their own")
        return values
    entries = config.load_backend_file(values["data_backend_config"])
    datasets = [{**{k: v for k, v in defaults.items() if e.get("dataset_type", "video") != "text_embeds"}, **e}
                for e in entries]
    return {**{k: v for k, v in values.items() if k != "data_backend_config"}, "datasets": datasets}
