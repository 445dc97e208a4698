"""Config: defaults < TOML < --key=value, errors that name the nearest key, the resolved file."""

import dataclasses
from pathlib import Path

import pytest

import config
import data
from conftest import DEMO_CONFIG, REPO, write_config
from config import Config, parse_config


def test_defaults_toml_and_command_line_precedence(tmp_path):
    path = write_config(tmp_path, 'learning_rate = 3e-4\nlora_rank = 8\n[lora]\nalpha = 4.0\n')
    cfg = parse_config([path, "--lora_rank=32", "--gradient_checkpointing=false"])
    assert cfg.datasets == [{"instance_data_dir": "clips"}]
    assert cfg.learning_rate == 3e-4  # TOML over default
    assert cfg.lora_rank == 32  # command line over TOML
    assert cfg.lora_alpha == 4.0  # [lora] alpha is lora_alpha
    assert cfg.gradient_checkpointing is False and Config().gradient_checkpointing is True
    assert cfg.seed == Config().seed  # untouched keys keep their defaults


def test_list_values_from_toml_and_command_line(tmp_path):
    path = write_config(tmp_path, 'lora_target_modules = ["to_q", "to_v"]\n')
    assert parse_config([path]).lora_target_modules == ["to_q", "to_v"]
    assert parse_config([write_config(tmp_path, ""), "--lora_target_modules=to_k, ff.net.2"]).lora_target_modules == \
        ["to_k", "ff.net.2"]


def test_unknown_key_names_the_nearest(tmp_path):
    with pytest.raises(SystemExit, match="unknown key 'lora_rnak'.*did you mean 'lora_rank'"):
        parse_config([write_config(tmp_path, "lora_rnak = 4\n")])
    with pytest.raises(SystemExit, match="the command line: unknown key 'lora_rnak'.*'lora_rank'"):
        parse_config(["--lora_rnak=4"])
    with pytest.raises(SystemExit, match="unknown key 'lora_ranks'"):
        parse_config([write_config(tmp_path, "[lora]\nranks = 4\n")])


@pytest.mark.parametrize("text", ['lora_rank = "big"\n', "lora_rank = 4.5\n", "gradient_checkpointing = 1\n",
                                  "learning_rate = true\n", 'vae_batch_size = "two"\n'])
def test_wrong_types_are_errors(tmp_path, text):
    with pytest.raises(SystemExit, match="must be"):
        parse_config([write_config(tmp_path, text)])


@pytest.mark.parametrize("arg, message", [("--lora_rank=0", "lora_rank must be > 0"),
                                          ("--learning_rate=-1", "learning_rate must be > 0"),
                                          ("--lr_scheduler=step", "choose one of constant, linear, cosine"),
                                          ("--mixed_precision=fp8", "choose one of"),
                                          ("--i2v_probability=2", "i2v_probability must be in \\[0, 1\\]"),
                                          ("--caption_dropout_probability=1.5", "in \\[0, 1\\)"),
                                          ("--resume_from_checkpoint=/no/such/step-9", "not a checkpoint folder"),
                                          ("--lora_rank", "--key=value"),
                                          ("--lora_format=kohya", "choose one of universal, diffusers, comfyui"),
                                          ("--lora_target_modules=to_q,linear_1", "time_embed.emb.timestep_embedder"
                                           ".linear_1, which ComfyUI calls adaln_single.+lora_format = \"comfyui\"")])
def test_bad_values_are_refused_before_anything_loads(arg, message):
    with pytest.raises(SystemExit, match=message):
        parse_config([arg])


@pytest.mark.parametrize("arg, message", [
    ("--max_nonfinite_steps=0", "max_nonfinite_steps must be >= 1, got 0"),  # 0 stopped every healthy run at step 1
    ("--flow_schedule_shift=1e300", "flow_schedule_shift must be <= 1000"),
    ("--flow_schedule_shift=nan", "'flow_schedule_shift' must be a finite number")])
def test_values_that_would_end_a_run_in_non_finite_steps_are_refused(arg, message):
    with pytest.raises(SystemExit, match=message):
        parse_config([arg])


def test_group_offload_to_disk_path_is_an_existing_writable_folder_checked_at_start(tmp_path):
    offload = ["--enable_group_offload=true", "--gradient_checkpointing=true"]
    (tmp_path / "a-file").write_text("")
    for path, message in ((tmp_path / "no/such/folder", "does not exist; create it"),
                          (tmp_path / "a-file", "is a file, not a folder"),
                          ("/proc", "is not writable here")):  # root passes os.access there, a real write fails
        with pytest.raises(SystemExit, match=f"group_offload_to_disk_path = '{path}' {message}"):
            parse_config([*offload, f"--group_offload_to_disk_path={path}"])
    assert not (tmp_path / "no").exists()  # nothing is created at start
    cfg = parse_config([DEMO_CONFIG, *offload, f"--group_offload_to_disk_path={tmp_path}"])
    assert cfg.group_offload_to_disk_path == str(tmp_path)


def test_the_write_checks_write_for_real(tmp_path):
    assert data.writable(tmp_path) and not data.writable(tmp_path / "missing") and not data.writable(Path("/proc"))
    with pytest.raises(SystemExit, match="output_dir = '/proc/run' cannot be written"):
        parse_config(["--output_dir=/proc/run"])


@pytest.mark.parametrize("args, message", [
    (["--output_dir=runs/my run"], r"the hub repo id \(the output_dir's folder name by default\) 'my run' is not a "
                                   r"valid hub repo id"),
    (["--hub_model_id=me/a/b"], "hub_model_id 'me/a/b' is not a valid hub repo id")])
def test_a_hub_repo_id_the_hub_would_refuse_stops_the_run_at_start(monkeypatch, args, message):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    with pytest.raises(SystemExit, match=message + r".*set hub_model_id = \"user/name\""):
        parse_config(["--push_to_hub=true", *args])
    assert parse_config([DEMO_CONFIG, "--push_to_hub=true", "--hub_model_id=me/disney-style"]).push_to_hub


def test_lora_format_comfyui_or_diffusers_allows_modules_the_tools_name_differently(tmp_path):
    path = write_config(tmp_path, "")
    for fmt in ("comfyui", "diffusers"):
        assert parse_config([path, f"--lora_format={fmt}", "--lora_target_modules=to_q,proj_in"]).lora_format == fmt
    assert parse_config([path, "--lora_target_modules=to_q,proj_out"]).lora_format == "universal"  # same in both


def test_missing_config_file_and_bad_toml(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        parse_config([str(tmp_path / "nope.toml")])
    with pytest.raises(SystemExit, match="not valid TOML"):
        parse_config([write_config(tmp_path, "lora_rank = \n")])
    with pytest.raises(SystemExit, match="no data"):
        parse_config([write_config(tmp_path, "lora_rank = 4\n", data=False)])


def test_resolved_config_round_trips(tmp_path):
    datasets = '[[datasets]]\nid = "a \\"quoted\\" name"\ninstance_data_dir = "clips"\nvideo = { num_frames = 25 }\n' \
               '[[datasets]]\nid = "t"\ndataset_type = "text_embeds"\ncache_dir = "t"\n'
    cfg = parse_config([write_config(tmp_path, datasets, data=False), "--lora_target_modules=to_q,to_k",
                        "--lora_alpha=3", "--gradient_checkpointing=no"])
    assert cfg.datasets[0]["video"] == {"num_frames": 25} and len(cfg.datasets) == 2
    path = tmp_path / "resolved.toml"
    path.write_text(config.to_toml(cfg))
    assert parse_config([str(path)]) == cfg


def test_dataset_errors_are_config_errors(tmp_path):
    with pytest.raises(SystemExit, match="dataset 'a'.*unknown key 'resolutoin'.*did you mean 'resolution'"):
        parse_config([write_config(tmp_path, '[[datasets]]\nid = "a"\ninstance_data_dir = "x"\nresolutoin = 5\n',
                                   data=False)])
    backend = tmp_path / "multidatabackend.json"
    backend.write_text('[{"id": "b", "instance_data_dir": "x", "metadata_backend": "discovery", "repeats": 0}]')
    cfg = parse_config([write_config(tmp_path, f'data_backend_config = "{backend}"\n', data=False)])
    assert config.dataset_entries(cfg, log=lambda m: None)[0][0].id == "b"
    with pytest.raises(SystemExit, match="x.toml sets both \\[\\[datasets\\]\\] and data_backend_config"):
        parse_config([write_config(tmp_path, f'data_backend_config = "{backend}"\n')])


@pytest.mark.parametrize("table, message", [
    ('id = "s3"\ntype = "aws"', "dataset 's3': type = 'aws'; only local folders are read"),
    ('id = "../../../escaped"', "id '../../../escaped' must be a plain name"),  # quarantine/<id> left quarantine/
    ('id = "/tmp/elsewhere"', "id '/tmp/elsewhere' must be a plain name"),
    ('id = ".."', "id '..' must be a plain name"),
    ('id = "a"\nresolution = 1e6\nresolution_type = "pixel"', "resolution = 1e\\+06 \\(pixel\\) is over 8192 pixels"),
    ('id = "a"\nresolution = 512\nresolution_type = "area"', "is over 8192 pixels a side.*reads it as megapixels")])
def test_a_dataset_id_that_is_a_path_or_an_absurd_size_is_refused(tmp_path, table, message):
    with pytest.raises(SystemExit, match=message):
        parse_config([write_config(tmp_path, f'[[datasets]]\n{table}\ninstance_data_dir = "x"\n', data=False)])


def test_an_output_dir_inside_a_dataset_is_refused(tmp_path):
    """With caption_strategy = "filename" its loss.png and sample videos would train."""
    table = f'[[datasets]]\nid = "d"\ninstance_data_dir = "{tmp_path / "clips"}"\ncaption_strategy = "filename"\n'
    with pytest.raises(SystemExit, match=f"output_dir = '{tmp_path / 'clips/run'}' is inside dataset 'd''s "
                                         f"instance_data_dir"):
        parse_config([write_config(tmp_path, f'output_dir = "{tmp_path / "clips/run"}"\n' + table, data=False)])
    assert parse_config([write_config(tmp_path, f'output_dir = "{tmp_path / "run"}"\n' + table, data=False)])


def test_a_backend_file_with_only_a_text_embeds_entry_says_so(tmp_path):
    backend = tmp_path / "multidatabackend.json"
    backend.write_text('[{"id": "text", "dataset_type": "text_embeds", "cache_dir": "cache/text"}]')
    with pytest.raises(SystemExit, match="has only a text_embeds entry \\(where captions are cached\\); add an image "
                                         "or video dataset"):
        parse_config([write_config(tmp_path, f'data_backend_config = "{backend}"\n', data=False)])


@pytest.mark.parametrize("arg, message", [
    ("--validation_resolution=100000x512", "validation_resolution '100000x512': width and height must be 1 to 8192"),
    ("--crepa_encoder_image_size=100000", "crepa_encoder_image_size 14 \\(one DINOv2 patch\\) to 2048")])
def test_sizes_past_any_video_are_refused(arg, message):
    with pytest.raises(SystemExit, match=message):
        parse_config([DEMO_CONFIG, arg])


def test_command_line_wins_for_the_data_and_list_float_and_optional_keys(tmp_path):
    backend = tmp_path / "multidatabackend.json"
    backend.write_text('[{"id": "b", "instance_data_dir": "x"}]')
    toml = write_config(tmp_path, "")  # with [[datasets]] id = "clips"
    cfg = parse_config([toml, f"--data_backend_config={backend}"])
    assert cfg.datasets == [] and config.dataset_entries(cfg, log=lambda m: None)[0][0].id == "b"
    assert parse_config([DEMO_CONFIG, toml]).datasets == [{"instance_data_dir": "clips"}]

    @dataclasses.dataclass
    class Keys:  # the kinds of keys new capabilities bring
        weights: list[float] = dataclasses.field(default_factory=list)
        limit: int | None = None
    assert config.read_keys(Keys, {"weights": [0.1, 1], "limit": 3}, "x.toml") == {"weights": [0.1, 1.0], "limit": 3}
    assert config.read_keys(Keys, {"weights": "0.1, 0.9", "limit": "none"}, "cli", from_text=True) == \
        {"weights": [0.1, 0.9], "limit": None}
    with pytest.raises(SystemExit, match="cli: 'weights\\[1\\]' must be float, got 'x'"):
        config.read_keys(Keys, {"weights": "0.1,x"}, "cli", from_text=True)
    with pytest.raises(SystemExit, match="'limit' must be int, got 2.5"):
        config.read_keys(Keys, {"limit": 2.5}, "x.toml")


def test_shipped_configs_parse():
    demo = parse_config([DEMO_CONFIG])
    assert demo.demo and demo.lora_rank == 16 and demo.mixed_precision == "no"
    disney = parse_config([str(REPO / "configs/disney.toml")])
    assert disney.pretrained_model_name_or_path == "Lightricks/LTX-Video-0.9.5" and disney.lora_rank == 16


def test_every_config_key_has_a_comment():
    import inspect
    source = inspect.getsource(Config)
    for field in Config.__dataclass_fields__:
        line = next(l for l in source.splitlines() if l.strip().startswith(f"{field}:"))
        assert "#" in line, field


def test_docs_key_tables_are_generated_from_the_dataclasses_and_current():
    doc = (REPO / "docs/configuration.md").read_text()
    import data
    assert config.with_key_tables(doc) == doc, "run: python config.py"
    for cls in (Config, data.Dataset):
        table = config.key_table(cls)
        assert table in doc and table.count("\n| `") == len(dataclasses.fields(cls)), cls
    assert "| `grad_clip_method` | `\"norm\"` | norm: rescale the global norm \\| value: clamp each |" in doc


def test_readme_has_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert "pip install -r requirements.txt && python train.py configs/demo.toml" in readme
    assert "pip install -r requirements-dev.txt && python -m pytest" in readme
    ci = (REPO / ".ci/run").read_text()
    assert "pip install -q -r requirements-dev.txt && python -m pytest" in ci
