"""A SimpleTuner LTX-Video config.json (the shape of SimpleTuner's own LTX quickstart) trains through
--simpletuner_config unchanged, says what it did with every key, and --write_toml writes the same run as ours."""

import json

import pytest

import config
from conftest import read_log, run_in_process
from simpletuner import simpletuner_values  # (`simpletuner` below is a fixture)


def simpletuner_files(folder, model, clips) -> str:
    """config/config.json + config/ltxvideo/multidatabackend.json as SimpleTuner's LTX quickstart writes them (paths
    relative to the folder SimpleTuner runs in), the model and clips swapped for tiny local ones, 6 steps."""
    (folder / "config/ltxvideo").mkdir(parents=True)
    (folder / "config/ltxvideo/multidatabackend.json").write_text(json.dumps([
        {"id": "disney-black-and-white", "type": "local", "dataset_type": "video", "crop": False,
         "resolution": 96, "minimum_image_size": 96, "maximum_image_size": 96, "target_downsample_size": 96,
         "cache_dir_vae": "cache/vae/ltxvideo/disney-black-and-white", "instance_data_dir": str(clips),
         "disabled": False, "caption_strategy": "textfile", "metadata_backend": "discovery", "repeats": 0,
         "video": {"num_frames": 25, "min_frames": 25}},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": "cache/text/ltxvideo", "disabled": False, "write_batch_size": 128}]))
    (folder / "config/ltxvideo/lycoris_config.json").write_text(json.dumps({
        "algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
        "apply_preset": {"target_module": ["Attention", "FeedForward"],
                         "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}}}}))
    (folder / "config/config.json").write_text(json.dumps({
        "lora_type": "lycoris", "lycoris_config": "config/ltxvideo/lycoris_config.json", "report_to": "tensorboard",
        "tracker_project_name": "lora-training", "tracker_run_name": "ltxvideo-adamW",
        "resume_from_checkpoint": "latest", "quantize_via": "cpu",
        "data_backend_config": "config/ltxvideo/multidatabackend.json", "aspect_bucket_rounding": 2, "seed": 42,
        "minimum_image_size": 0, "disable_benchmark": False, "offload_during_startup": True,
        "output_dir": "output/ltxvideo", "max_train_steps": 6, "num_train_epochs": 0, "checkpointing_steps": 3,
        "checkpoints_total_limit": 5, "hub_model_id": "ltxvideo-disney", "push_to_hub": "false",
        "push_checkpoints_to_hub": "false", "attention_mechanism": "diffusers", "use_dora": "true", "model_type": "lora", "pretrained_model_name_or_path": str(model),
        "pretrained_vae_model_name_or_path": str(model), "model_family": "ltxvideo", "train_batch_size": 2,
        "gradient_checkpointing": True, "gradient_accumulation_steps": 1, "caption_dropout_probability": 0.1,
        "resolution_type": "pixel", "resolution": 800, "validation_seed": 42, "validation_step_interval": 100,
        "validation_resolution": "64x64", "validation_negative_prompt": "worst quality, blurry",
        "validation_guidance": 3.0, "validation_num_inference_steps": 2, "validation_num_video_frames": 9,
        "validation_prompt": "a red circle moving left", "mixed_precision": "no", "base_model_default_dtype": "fp32",
        "optimizer": "adamw_bf16", "learning_rate": 0.00005, "max_grad_norm": 0.0, "grad_clip_method": "value",
        "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2, "base_model_precision": "int8-quanto",
        "vae_batch_size": 1, "compress_disk_cache": True, "use_ema": True, "ema_validation": "ema_only",
        "ema_update_interval": 2, "delete_problematic_images": "true", "disable_bucket_pruning": True,
        "lora_rank": 8, "flow_schedule_shift": 1, "validation_prompt_library": False, "ignore_final_epochs": True,
        "--user_prompt_library_typo": "x"}))  # SimpleTuner's older files spell keys with "--"
    return "config/config.json"


@pytest.fixture(scope="module")
def simpletuner(demo_run, tmp_path_factory):
    import demo
    cwd = tmp_path_factory.mktemp("simpletuner")
    model = demo.make_tiny_pipeline(cwd / "models/tiny-ltx", seed=0)  # unmarked: a "real" model to this trainer
    return cwd, simpletuner_files(cwd, model, demo_run[0] / "output/demo/clips")


def test_a_simpletuner_config_trains_unchanged_and_says_what_it_did(simpletuner):
    cwd, path = simpletuner
    result = run_in_process(cwd, "train.py", "--simpletuner_config", path)
    out = result.stdout
    table = {tuple(line.split(None, 2)[:2]): line.split(None, 2)[2] for line in out.splitlines()
             if line.startswith("  ") and len(line.split(None, 2)) == 3}
    assert table["mapped", "checkpointing_steps"] == "checkpoint_step_interval = 3"
    assert table["mapped", "base_model_precision"] == 'base_model_precision = "int8-torchao"'  # by meaning
    assert "blocks int8-torchao" in out  # the start-up summary's precision line
    assert table["mapped", "lr_scheduler"] == 'lr_scheduler = "constant"'  # constant_with_warmup: ours warms up too
    assert table["mapped", "resolution_type"] == "each dataset's resolution_type = \"pixel\", where it sets none"
    assert table["mapped", "delete_problematic_images"] == "delete_problematic_images = true"  # "true", a string
    assert table["ignored", "model_family"].startswith("ltxvideo")
    assert table["mapped", "push_to_hub"] == "push_to_hub = false"  # "false", a string
    assert table["mapped", "attention_mechanism"] == 'attention_mechanism = "sdpa"'  # diffusers' default is SDPA
    assert table["unsupported", "use_dora"] == "DoRA is not built"
    assert table["unsupported", "user_prompt_library_typo"] == "no such setting in this trainer"
    assert ("mapped", "pretrained_vae_model_name_or_path") not in table  # the model's own VAE: ours by default
    log = read_log(cwd / "output/ltxvideo/log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 7))
    assert (cwd / "output/ltxvideo/lora_ema.safetensors").exists()  # use_ema
    assert any((cwd / "output/ltxvideo/tensorboard").iterdir())  # report_to
    from safetensors.torch import load_file
    assert any(k.endswith(".lokr_w1") for k in load_file(cwd / "output/ltxvideo/lora.safetensors"))  # lycoris
    assert sorted(p.name for p in (cwd / "output/ltxvideo/samples/step-6").iterdir()) == \
        ["validation-64x64-ema.mp4", "validation-64x64-ema.png"]  # ema_validation = ema_only, 9 frames
    assert (cwd / "cache/vae/ltxvideo/disney-black-and-white").is_dir()  # its cache folders, as it names them


def test_write_toml_writes_the_same_run_as_ours(simpletuner, monkeypatch):
    cwd, path = simpletuner
    monkeypatch.chdir(cwd)
    run_in_process(cwd, "train.py", "--simpletuner_config", path, "--write_toml", "mine.toml", "--lora_rank=4")
    imported = config.parse_config(["--simpletuner_config", path, "--lora_rank=4"], log=lambda m: None)
    assert config.parse_config(["mine.toml"]) == imported
    assert imported.datasets[0]["resolution_type"] == "pixel" and imported.datasets[0]["resolution"] == 96
    assert not (cwd / "output/ltxvideo/config.toml").read_text().count("lora_rank = 4")  # nothing was trained


def test_global_dataset_keys_reach_a_data_backend_config_given_on_the_command_line(tmp_path, capsys):
    """SimpleTuner's global dataset keys (strings as SimpleTuner writes them too) go into the datasets of the
    data_backend_config the run ends with, also one given on the command line; with [[datasets]] tables of ours
    they are said to be unused, never printed "mapped" and dropped."""
    backend = tmp_path / "multidatabackend.json"
    backend.write_text(json.dumps([{"id": "clips", "instance_data_dir": "clips", "video": {"num_frames": 25}},
                                   {"id": "clips-square", "instance_data_dir": "clips", "resolution": 96}]))
    st = tmp_path / "config.json"
    st.write_text(json.dumps({"--resolution": "64", "--resolution_type": "pixel", "--crop": "false",
                              "--max_train_steps": 6}))
    cfg = config.parse_config(["--simpletuner_config", str(st), f"--data_backend_config={backend}"])
    assert [(d["id"], d["resolution"], d["resolution_type"], d["crop"]) for d in cfg.datasets] == \
        [("clips", 64.0, "pixel", False), ("clips-square", 96, "pixel", False)]
    from conftest import write_config
    tables = write_config(tmp_path, "")
    capsys.readouterr()
    cfg = config.parse_config(["--simpletuner_config", str(st), tables])
    assert "SimpleTuner's dataset keys resolution, resolution_type, crop are not used: the datasets come from " \
           "[[datasets]] tables" in capsys.readouterr().out


@pytest.mark.parametrize("value, row", [("block_level", ("ignored", "off (leaf-level")),
                                        ("leaf_level", ("unsupported", "leaf-level offload is not built"))])
def test_group_offload_type_is_what_ours_does_or_said_unsupported(tmp_path, value, row):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"--group_offload_type": value}))
    said = []
    simpletuner_values(str(path), said.append)
    line = next(l for l in said if l.startswith("  ") and "group_offload_type" in l).split(None, 2)
    assert line[0] == row[0] and line[2].startswith(row[1])


def test_other_models_are_refused_in_one_sentence(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"--model_family": "flux", "--model_type": "lora"}))
    with pytest.raises(SystemExit, match="trains LoRAs of LTX-Video"):
        config.parse_config([f"--simpletuner_config={path}"], log=lambda m: None)
    with pytest.raises(SystemExit, match="does not exist"):
        config.parse_config([f"--simpletuner_config={tmp_path / 'nope.json'}"], log=lambda m: None)
