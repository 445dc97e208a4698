"""What a user owns is never moved, overwritten or mixed up, and every mistake is one sentence: the output
folder (one run at a time, a finished run kept), damaged checkpoints and logs, the demo's random model, bad
numbers and paths, and bugs that must show their traceback."""

import json
import multiprocessing
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import config
import model as ltx
import optim
import outputs
import prepare
import track
import train
from conftest import DEMO_CONFIG, link_demo, read_log, run_in_process, write_config

FAST = ["--max_train_steps=6", "--checkpoint_step_interval=2", "--checkpoints_total_limit=0",
        "--disable_validation=true"]


def backend_config(tmp_path: Path, clips: Path, cache: Path | None = None, **video) -> Path:
    """configs/demo.toml with its [[datasets]] table replaced by a SimpleTuner multidatabackend.json."""
    entry = {"id": "shapes", "instance_data_dir": str(clips), "resolution": 96, "resolution_type": "pixel",
             "video": video}
    backend = tmp_path / "backend.json"
    backend.write_text(json.dumps([{**entry, **({"cache_dir_vae": str(cache)} if cache else {})}]))
    demo_toml = Path(DEMO_CONFIG).read_text()
    config_file = tmp_path / "backend.toml"
    config_file.write_text(f'data_backend_config = "{backend}"\n' + demo_toml[:demo_toml.index("[[datasets]]")])
    return config_file


def one_sentence(result: subprocess.CompletedProcess) -> str:
    """The error a refused run printed: no traceback, one line."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [l for l in result.stderr.splitlines() if l.strip() and "it/s" not in l and "%|" not in l]
    return lines[-1]


@pytest.fixture(scope="module")
def demo(demo_run, tmp_path_factory) -> Path:
    """A folder where the demo ran 6 steps: its tiny model, clips and cache (linked: see link_demo), and a finished
    run in output/demo with checkpoints at steps 2, 4 and 6."""
    cwd = link_demo(demo_run[0], tmp_path_factory.mktemp("safety"))
    run_in_process(cwd, "train.py", DEMO_CONFIG, *FAST)
    return cwd


def copy_run(demo: Path, to: Path) -> Path:
    shutil.copytree(demo / "output/demo", to, ignore=shutil.ignore_patterns("tiny-ltx", "clips", ".lock"))
    return to


# -----------------------------------------------------------------------------
# The output folder

def test_a_fresh_run_into_a_finished_run_refuses_and_keeps_it_whole(demo, tmp_path):
    out = copy_run(demo, tmp_path / "run")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = run_in_process(demo, "train.py", DEMO_CONFIG, *FAST, f"--output_dir={out}", expect=1)
    message = one_sentence(refused)
    assert f"output_dir {out} holds a run already" in message and "--resume_from_checkpoint=latest" in message
    assert "--overwrite_output_dir=true" in message
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # untouched


def test_overwrite_output_dir_clears_the_old_run_first_so_nothing_mixes(demo, tmp_path):
    out = copy_run(demo, tmp_path / "run")
    (out / "my-notes.txt").write_text("mine")  # not the run's: stays
    result = run_in_process(demo, "train.py", DEMO_CONFIG, "--max_train_steps=3", "--checkpoint_step_interval=1",
                            "--checkpoints_total_limit=2", "--disable_validation=true", f"--output_dir={out}",
                            "--overwrite_output_dir=true")
    assert "overwrite_output_dir: removed the previous run" in result.stdout
    # the old step-4 / step-6 are gone, so pruning kept the new run's own newest two
    assert [p.name for p in outputs.list_checkpoints(out)] == ["step-2", "step-3"]
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2, 3]
    assert (out / "my-notes.txt").read_text() == "mine"
    assert "overwrite_output_dir = false" in (out / "config.toml").read_text()  # rerunning it keeps this run
    both = run_in_process(demo, "train.py", DEMO_CONFIG, f"--output_dir={out}", "--overwrite_output_dir=true",
                          "--resume_from_checkpoint=latest", expect=1)
    assert "choose one" in one_sentence(both)


def test_latest_resumes_a_finished_run_but_never_restarts_one_without_checkpoints(demo, tmp_path):
    out = copy_run(demo, tmp_path / "run")
    shutil.rmtree(out / "checkpoints")  # a run saved with checkpoint_step_interval = 0: only its LoRA
    refused = run_in_process(demo, "train.py", DEMO_CONFIG, *FAST, f"--output_dir={out}",
                             "--resume_from_checkpoint=latest", expect=1)
    assert "holds a finished run (lora.safetensors) with no checkpoint to resume from" in one_sentence(refused)


def test_resuming_another_folders_checkpoint_never_replaces_a_run_and_carries_its_log(demo, tmp_path):
    finished, other = copy_run(demo, tmp_path / "finished"), copy_run(demo, tmp_path / "other")
    before = {p.relative_to(finished): p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    refused = run_in_process(demo, "train.py", DEMO_CONFIG, *FAST, f"--output_dir={finished}",
                             f"--resume_from_checkpoint={other / 'checkpoints/step-2'}", expect=1)
    assert "is another folder's checkpoint: continuing it here would replace that run" in one_sentence(refused)
    assert {p.relative_to(finished): p.read_bytes() for p in finished.rglob("*") if p.is_file()
            and p.name != ".lock"} == before
    fresh = tmp_path / "fresh"
    run_in_process(demo, "train.py", DEMO_CONFIG, *FAST, f"--output_dir={fresh}",
                   f"--resume_from_checkpoint={other / 'checkpoints/step-2'}")
    log, theirs = read_log(fresh / "log.jsonl"), read_log(other / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and log[:2] == theirs[:2]  # steps 1-2 are the other run's


def test_overwrite_output_dir_removes_what_the_run_wrote_and_says_so_and_nothing_else(demo, tmp_path):
    out = copy_run(demo, tmp_path / "run")
    theirs = [out / "tensorboard/events.out.tfevents.1.other-run", out / "wandb/run-other/files/log.txt",
              out / "samples/favourites/keep.mp4", out / "checkpoints/README.txt"]
    for path in theirs:  # another run's logs and a user's files in the folders a run writes to
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not this run's")
    (out / "loss.png").write_bytes(b"the run's plot")  # recorded by name: the run's, even when it changed
    result = run_in_process(demo, "train.py", DEMO_CONFIG, *FAST[:3], "--max_train_steps=1", "--disable_validation=true",
                            f"--output_dir={out}", "--overwrite_output_dir=true")
    said = next(l for l in result.stdout.splitlines() if l.startswith("overwrite_output_dir: removed"))
    assert "lora.safetensors" in said and "checkpoints/{step-2, step-4, step-6}" in said and "loss.png" in said
    assert "tensorboard" not in said and "wandb" not in said and "favourites" not in said
    assert all(path.read_text() == "not this run's" for path in theirs)
    assert [p.name for p in outputs.list_checkpoints(out)] == ["step-1"]  # the new run's own, at its end


@pytest.mark.parametrize("name", ["config.toml", "memory.json", "loss.png", "data_report.json", "lora.safetensors",
                                  "lora_ema.safetensors"])  # (a resume without EMA removes the run's own EMA)
def test_a_run_never_replaces_a_file_of_yours_named_like_its_outputs(demo, tmp_path, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("# mine, with my comments")
    refused = run_in_process(demo, "train.py", DEMO_CONFIG, *FAST, f"--output_dir={out}", expect=1)
    assert f"holds {name}, which this trainer did not write" in one_sentence(refused)
    assert (out / name).read_text() == "# mine, with my comments"


def test_a_lora_edited_after_the_run_is_yours_and_overwrite_output_dir_keeps_it(demo, tmp_path):
    out = copy_run(demo, tmp_path / "run")
    (out / "lora.safetensors").write_bytes((out / "checkpoints/step-2/lora.safetensors").read_bytes())  # replaced
    refused = run_in_process(demo, "train.py", DEMO_CONFIG, *FAST, f"--output_dir={out}",
                             "--overwrite_output_dir=true", expect=1)
    assert "holds lora.safetensors, which this trainer did not write (or which changed since it did)" \
        in one_sentence(refused)
    assert (out / "lora.safetensors").read_bytes() == (out / "checkpoints/step-2/lora.safetensors").read_bytes()
    assert outputs.list_checkpoints(out)  # nothing was removed


def test_write_toml_writes_a_new_file_only_and_never_overwrite_output_dir(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(demo)
    mine = tmp_path / "mine.toml"
    mine.write_text("# my file")
    for target, message in [(mine, "exists; give a new file name"), (tmp_path, "is a folder")]:
        with pytest.raises(SystemExit, match=message):
            train.main([DEMO_CONFIG, f"--write_toml={target}"])
    assert mine.read_text() == "# my file"
    written = tmp_path / "new.toml"
    train.main([DEMO_CONFIG, "--overwrite_output_dir=true", f"--write_toml={written}"])
    assert "overwrite_output_dir = false" in written.read_text()
    assert "overwrite_output_dir = true is not written" in capsys.readouterr().out
    assert config.parse_config([str(written)]).overwrite_output_dir is False


def test_old_runs_without_a_record_are_adopted_as_they_stand(demo, tmp_path):
    out = copy_run(demo, tmp_path / "run")
    (out / outputs.OUTPUTS).unlink()  # a run written before the record existed
    result = run_in_process(demo, "train.py", DEMO_CONFIG, *FAST[:3], "--max_train_steps=1",
                            "--disable_validation=true", f"--output_dir={out}", "--overwrite_output_dir=true")
    assert "overwrite_output_dir: removed the previous run" in result.stdout and (out / "lora.safetensors").exists()


def hold_lock(out: Path, held) -> None:
    lock = outputs.lock_output_dir(out)  # noqa: F841 -- held until the process is killed
    held.set()
    time.sleep(60)


def test_a_second_run_into_a_locked_output_dir_refuses_naming_the_pid(demo, tmp_path):
    out = tmp_path / "busy"
    fork = multiprocessing.get_context("fork")  # another process that holds the lock, without importing torch again
    held = fork.Event()
    holder = fork.Process(target=hold_lock, args=(out, held))
    holder.start()
    try:
        assert held.wait(60)
        refused = run_in_process(demo, "train.py", DEMO_CONFIG, *FAST, f"--output_dir={out}", expect=1)
        assert one_sentence(refused) == (f"output_dir {out} is in use by another run (PID {holder.pid}); wait for it "
                                         f"to end, stop it, or choose another output_dir")
        assert not (out / "config.toml").exists()  # refused before writing anything
    finally:
        holder.kill()  # SIGKILL: the OS drops the lock with the process, nothing stale is left
        holder.join()
    run_in_process(demo, "train.py", DEMO_CONFIG, "--max_train_steps=1", "--checkpoint_step_interval=0",
                   "--disable_validation=true", f"--output_dir={out}")
    assert (out / "lora.safetensors").exists()


# -----------------------------------------------------------------------------
# Damaged checkpoints and logs

def damage(folder: Path, how: str) -> str:
    """Breaks one checkpoint as a crash, a full disk or a stray edit would; returns the file it names."""
    if how == "truncated lora":
        blob = (folder / "lora.safetensors").read_bytes()
        (folder / "lora.safetensors").write_bytes(blob[:len(blob) // 2])
        return "lora.safetensors"
    if how == "garbage state":
        (folder / "training_state.pt").write_bytes(os.urandom(300))
        return "training_state.pt"
    if how == "bad meta":
        (folder / "meta.json").write_text("{not json")
        return "meta.json"
    (folder / "rng-0.pt").unlink()  # a missing per-rank RNG file breaks exact resume
    return "rng-0.pt"


@pytest.mark.parametrize("how", ["truncated lora", "garbage state", "bad meta", "missing rng"])
def test_latest_skips_a_damaged_checkpoint_and_resumes_from_the_newest_complete_one(demo, tmp_path, how):
    out = copy_run(demo, tmp_path / "run")
    named = damage(out / "checkpoints/step-6", how)
    said = []
    cfg = config.Config(output_dir=str(out), resume_from_checkpoint="latest")
    assert checkpoint.find_resume_folder(cfg, out, log=said.append) == out / "checkpoints/step-4"
    assert len(said) == 1 and said[0].startswith("skipping checkpoint step-6: ") and named in said[0]
    cfg.resume_from_checkpoint = str(out / "checkpoints/step-6")  # named explicitly: one sentence
    with pytest.raises(SystemExit, match=f"cannot resume from {out / 'checkpoints/step-6'}: .*{named}"):
        checkpoint.find_resume_folder(cfg, out)


def test_resume_from_a_damaged_checkpoint_says_so_and_a_partial_log_line_is_dropped(demo, tmp_path):
    out = copy_run(demo, tmp_path / "run")
    damage(out / "checkpoints/step-6", "truncated lora")
    damage(out / "checkpoints/step-4", "garbage state")
    with open(out / "log.jsonl", "a") as log:
        log.write('{"step": 7, "loss": 0.5, "l')  # a crash mid-write
    explicit = run_in_process(demo, "train.py", DEMO_CONFIG, *FAST, f"--output_dir={out}",
                              f"--resume_from_checkpoint={out / 'checkpoints/step-4'}", expect=1)
    assert one_sentence(explicit) == (f"cannot resume from {out / 'checkpoints/step-4'}: "
                                      f"{out / 'checkpoints/step-4/training_state.pt'} is damaged (it differs from "
                                      f"what manifest.json recorded when it was saved)")
    resumed = run_in_process(demo, "train.py", DEMO_CONFIG, *FAST, f"--output_dir={out}",
                             "--resume_from_checkpoint=latest", "--max_train_steps=8")
    assert "skipping checkpoint step-6" in resumed.stdout and "skipping checkpoint step-4" in resumed.stdout
    assert f"resumed from {out / 'checkpoints/step-2'} at step 2" in resumed.stdout
    assert "dropped 1 damaged line(s)" in resumed.stdout
    assert [r["step"] for r in read_log(out / "log.jsonl")] == list(range(1, 9))


def test_log_lines_are_strict_json_with_non_finite_numbers_as_null():
    line = track.json_line({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-4})
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in the log"))
    assert record == {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-4, "nonfinite": ["loss", "grad_norm"]}


def test_resume_past_max_train_steps_and_with_other_adapters_is_refused_before_caching(demo, tmp_path, monkeypatch):
    out = copy_run(demo, tmp_path / "run")
    monkeypatch.chdir(demo)
    monkeypatch.setattr(prepare, "prepare_data", lambda *a, **k: pytest.fail("cached before refusing"))
    config = DEMO_CONFIG
    lokr = tmp_path / "lokr.json"
    lokr.write_text('{"algo": "lokr", "factor": 4}')
    for args, message in [(["--max_train_steps=4"], "it is at step 6, past max_train_steps = 4"),
                          (["--lora_rank=8"], r"its adapters were defined otherwise \(lora_rank 16 -> 8\)"),
                          (["--lora_type=lycoris", f"--lycoris_config={lokr}", "--lora_format=universal"],
                           r"its adapters were defined otherwise \(lora_type 'standard' -> 'lycoris'\)")]:
        with pytest.raises(SystemExit, match=f"cannot resume from {out / 'checkpoints/step-6'}: {message}"):
            train.main([config, f"--output_dir={out}", "--resume_from_checkpoint=latest", *args])


def test_resume_from_an_earlier_checkpoint_of_the_same_folder_would_mix_runs_and_is_refused(demo, tmp_path):
    out = copy_run(demo, tmp_path / "run")
    cfg = config.Config(output_dir=str(out), resume_from_checkpoint=str(out / "checkpoints/step-2"))
    with pytest.raises(SystemExit, match="also holds the later checkpoints step-4, step-6"):
        checkpoint.find_resume_folder(cfg, out)


# -----------------------------------------------------------------------------
# The demo's random model never stands in for the real one

def test_demo_needs_a_folder_path_and_a_real_run_refuses_the_demo_model(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="must then be a folder path, not a hub id like 'Lightricks/LTX-Video-0.9.5'"):
        config.parse_config([write_config(tmp_path, "demo = true\n")])  # the default model path is the hub id
    assert not (tmp_path / "Lightricks").exists()
    # a folder named like the hub id that holds the demo's model (as an older version wrote it)
    shutil.copytree(demo / "output/demo/tiny-ltx", tmp_path / "Lightricks/LTX-Video-0.9.5")
    assert ltx.is_demo_model("Lightricks/LTX-Video-0.9.5")
    config_file = write_config(tmp_path, "")
    with pytest.raises(SystemExit, match="is the folder of the demo's tiny random model, not LTX-Video"):
        config.parse_config([config_file])
    with pytest.raises(SystemExit, match="pretrained_vae_model_name_or_path .* demo's tiny random model"):
        config.parse_config([config_file, f"--pretrained_vae_model_name_or_path={demo / 'output/demo/tiny-ltx/vae'}",
                            "--pretrained_model_name_or_path=org/real-model"])
    refused = run_in_process(tmp_path, "sample.py", "--model", "Lightricks/LTX-Video-0.9.5", "--prompt", "x", "--out",
                             "x.mp4", expect=2)
    assert "is the demo's tiny random model" in refused.stderr


def test_the_demo_model_still_loads_in_diffusers(demo):
    from diffusers import LTXPipeline
    pipe = LTXPipeline.from_pretrained(str(demo / "output/demo/tiny-ltx"))  # the mark is a key diffusers ignores
    assert pipe.transformer.config.num_layers == 2


# -----------------------------------------------------------------------------
# Numbers, paths and sizes: refused or said, never silently changed

@pytest.mark.parametrize("arg, message", [
    ("--learning_rate=inf", "the command line: 'learning_rate' must be a finite number, got 'inf'"),
    ("--flow_schedule_shift=nan", "the command line: 'flow_schedule_shift' must be a finite number"),
    ("--max_grad_norm=nan", "the command line: 'max_grad_norm' must be a finite number"),
    ("--validation_resolution=-128x96", "validation_resolution '-128x96': width and height must be 1 to 8192 pixels"),
    ("--validation_num_frames=-5", "validation_num_frames and validation_num_inference_steps must be >= 1"),
])
def test_non_finite_and_negative_numbers_are_refused_when_the_config_is_read(tmp_path, arg, message):
    with pytest.raises(SystemExit, match=message):
        config.parse_config([write_config(tmp_path, ""), arg])


def test_toml_infinity_and_dataset_nan_are_refused(tmp_path):
    with pytest.raises(SystemExit, match=": 'learning_rate' must be a finite number"):
        config.parse_config([write_config(tmp_path, "learning_rate = inf\n")])
    with pytest.raises(SystemExit, match="'resolution' must be a finite number"):
        config.parse_config([write_config(tmp_path, '[[datasets]]\ninstance_data_dir = "clips"\nresolution = nan\n',
                                         data=False)])


def test_a_lora_that_went_non_finite_is_never_reported_done(demo, tmp_path, monkeypatch):
    """An update can make the weights NaN after a finite loss (here: an infinite LR at step 2)."""
    monkeypatch.chdir(demo)
    real = optim.lr_at
    monkeypatch.setattr(optim, "lr_at", lambda step, cfg, total: float("inf") if step == 1 else real(step, cfg, total))
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="the LoRA holds NaN or inf values after step 3, so it was not written"):
        train.main([DEMO_CONFIG, "--max_train_steps=3", "--checkpoint_step_interval=1",
                    "--disable_validation=true", f"--output_dir={out}"])
    assert not (out / "lora.safetensors").exists()
    assert [p.name for p in outputs.list_checkpoints(out)] == ["step-1"]  # no checkpoint of NaN weights


def test_a_failure_after_training_began_saves_the_last_whole_step_and_resumes_from_it(demo, tmp_path, monkeypatch):
    """Validation breaks at step 3 (as nf4 did on AVX512-bf16 CPUs): the traceback shows, step 3 is saved as a
    checkpoint first, and resuming from it finishes the run with the very LoRA of a run that never failed."""
    import sample
    from safetensors.torch import load_file

    def broken(*args, **kwargs):
        raise RuntimeError("validation broke on purpose")
    monkeypatch.setattr(sample, "render_validation", broken)
    out = tmp_path / "run"
    failed = run_in_process(demo, "train.py", DEMO_CONFIG, *FAST[:3], "--validation_step_interval=3",
                            f"--output_dir={out}", expect=1)
    assert "RuntimeError: validation broke on purpose" in failed.stderr
    assert f"the run failed after step 3 (the traceback follows); the LoRA and training state of step 3 are saved " \
           f"in {out / 'checkpoints/step-3'}" in failed.stdout
    assert [p.name for p in outputs.list_checkpoints(out)] == ["step-2", "step-3"] and not (out / "lora.safetensors").exists()
    monkeypatch.undo()
    run_in_process(demo, "train.py", DEMO_CONFIG, *FAST, f"--output_dir={out}", "--resume_from_checkpoint=latest")
    a, b = load_file(out / "lora.safetensors"), load_file(demo / "output/demo/lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_save_that_fails_after_a_failure_shows_both_tracebacks(demo, tmp_path, monkeypatch):
    """The first error is the one raised; the failing save (which may be a bug of ours) shows its own traceback
    too, never just a line."""
    import sample

    def broken(*args, **kwargs):
        raise RuntimeError("validation broke on purpose")

    def no_disk(*args, **kwargs):
        raise RuntimeError("the disk broke on purpose")
    monkeypatch.setattr(sample, "render_validation", broken)
    monkeypatch.setattr(checkpoint, "save_checkpoint", no_disk)
    out = tmp_path / "run"
    failed = run_in_process(demo, "train.py", DEMO_CONFIG, *FAST[:1], "--checkpoint_step_interval=0",
                            "--validation_step_interval=3", f"--output_dir={out}", expect=1)
    assert "the run failed after step 3, and saving its checkpoint failed too:" in failed.stdout
    assert "RuntimeError: the disk broke on purpose" in failed.stderr and "in no_disk" in failed.stderr
    assert failed.stderr.rstrip().endswith("RuntimeError: validation broke on purpose")
    assert not outputs.list_checkpoints(out)


def test_home_folder_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config_file = write_config(tmp_path, '[[datasets]]\ninstance_data_dir = "~/clips"\n', data=False)
    cfg = config.parse_config([config_file, "--output_dir=~/runs/x"])
    assert cfg.output_dir == str(tmp_path / "runs/x")
    assert config.dataset_entries(cfg)[0][0].instance_data_dir == str(tmp_path / "clips")


def test_a_validation_image_that_is_not_an_image_is_refused_up_front(tmp_path):
    (tmp_path / "first.png").write_text("not a picture")
    with pytest.raises(SystemExit, match="validation_image .*first.png: not an image Pillow recognizes"):
        config.parse_config([write_config(tmp_path, f'validation_image = "{tmp_path / "first.png"}"\n')])


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        config.parse_config([write_config(tmp_path, f'output_dir = "{tmp_path / "taken"}"\n')])


def test_validation_sizes_and_frames_are_rounded_once_and_said(demo, tmp_path):
    result = run_in_process(demo, "train.py", DEMO_CONFIG, "--max_train_steps=1", "--checkpoint_step_interval=0",
                            f"--output_dir={tmp_path / 'v'}", "--validation_resolution=100x90",
                            "--validation_num_frames=10", "--validation_num_inference_steps=1")
    assert result.stdout.count("validation_resolution 100x90 rounded to 96x96") == 1
    assert result.stdout.count("validation_num_frames 10 rounded down to 9") == 1
    assert (tmp_path / "v/samples/step-1/validation-96x96.mp4").exists()


# -----------------------------------------------------------------------------
# Tracebacks where a sentence belongs, and sentences where a traceback belongs

def test_settings_that_skip_most_clips_stop_the_run_and_move_nothing(demo, tmp_path):
    clips = demo / "output/demo/clips"
    before = sorted(p.name for p in clips.iterdir())
    refused = run_in_process(demo, "train.py", str(backend_config(tmp_path, clips, num_frames=49)),
                             "--delete_problematic_images=true", f"--output_dir={tmp_path / 'q'}", expect=1)
    message = one_sentence(refused)
    assert "dataset 'shapes': 16 of its 16 files would be skipped, which looks like wrong settings" in message
    assert "too short: 25 frames, min_frames is 49" in message
    assert sorted(p.name for p in clips.iterdir()) == before and not (clips.resolve().parent / "quarantine").exists()


def test_a_bug_shows_its_traceback_and_moves_nothing(demo, tmp_path, monkeypatch):
    """A shape bug in resizing, with quarantine on: a traceback naming the line, not 'error: ...' or bad clips."""
    clips = demo / "output/demo/clips"
    before = sorted(p.name for p in clips.iterdir())
    config = backend_config(tmp_path, clips, cache=tmp_path / "cache", num_frames=25)  # nothing cached: it decodes

    def buggy(frames, width, height, crop):
        h, w = frames.shape

    monkeypatch.setattr(train.data, "resize_and_crop", buggy)
    result = run_in_process(demo, "train.py", str(config), "--delete_problematic_images=true",
                            f"--output_dir={tmp_path / 'bug'}", expect=1)
    assert "Traceback" in result.stderr and "h, w = frames.shape" in result.stderr
    assert "ValueError: too many values to unpack" in result.stderr
    assert sorted(p.name for p in clips.iterdir()) == before and not (clips.resolve().parent / "quarantine").exists()


def test_a_read_only_cache_folder_names_the_setting(demo, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    config = backend_config(tmp_path, demo / "output/demo/clips", cache=tmp_path / "a-file/cache", num_frames=25)
    refused = run_in_process(demo, "train.py", str(config), f"--output_dir={tmp_path / 'ro'}", expect=1)
    message = one_sentence(refused)
    assert message.startswith(f"error: cannot create the cache folder {tmp_path / 'a-file/cache'}")
    assert "set cache_dir_vae of dataset 'shapes'" in message


def test_demo_with_a_simpletuner_dataset_file(demo, tmp_path):
    clips = tmp_path / "fresh-clips"  # empty: the demo writes its synthetic clips here
    run_in_process(demo, "train.py", str(backend_config(tmp_path, clips, num_frames=25)), "--max_train_steps=1",
                   "--checkpoint_step_interval=0", "--disable_validation=true", f"--output_dir={tmp_path / 'st'}")
    assert len(list(clips.glob("*.mp4"))) == 16 and (tmp_path / "st/lora.safetensors").exists()


def test_ctrl_c_while_caching_says_the_cache_is_intact(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(demo)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.data, "cache_samples", interrupted)
    with pytest.raises(SystemExit, match="interrupted while preparing the data; every cache file is written whole"):
        train.main([DEMO_CONFIG, f"--output_dir={tmp_path / 'c'}"])


@pytest.mark.parametrize("args", [["--help"], []])  # no arguments at all: the usage, not "no data"
def test_help_prints_the_usage_and_where_the_keys_are(tmp_path, args):
    result = run_in_process(tmp_path, "train.py", *args)
    assert "python train.py configs/demo.toml [--key=value ...]" in result.stdout
    assert "docs/configuration.md" in result.stdout and not (tmp_path / "output").exists()


def test_long_captions_are_counted_once_per_dataset(demo, tmp_path):
    clips = tmp_path / "long"
    shutil.copytree(demo / "output/demo/clips", clips, ignore=shutil.ignore_patterns(".ltx-cache"))
    for caption in sorted(clips.glob("*.txt"))[:3]:
        caption.write_text("a red circle moving left " * 40)  # 200 words: far past 128 tokens
    result = run_in_process(demo, "train.py", str(backend_config(tmp_path, clips, num_frames=25)),
                            "--max_train_steps=1", "--checkpoint_step_interval=0", "--disable_validation=true",
                            f"--output_dir={tmp_path / 'lc'}")
    said = [l for l in result.stdout.splitlines() if "longer than T5's 128 tokens" in l]
    assert len(said) == 1 and said[0].startswith("dataset 'shapes': 3 caption(s) are longer than T5's 128 tokens")


@pytest.mark.parametrize("args, message", [
    (["--lora", "{not_lora}"], "is not a complete safetensors file"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--num_frames", "-5"], "--num_frames must be at least 1, got -5"),
    (["--image", "{not_image}"], "photo.png: not an image Pillow recognizes"),
    (["--resolution", "768x512,512x512"], "--resolution takes one WxH"),
    (["--lora", "{lora}", "--out", "{lora}"], "must end in .mp4"),
    (["--out", "{old_mp4}"], "exists; give a new file name, or add --overwrite to replace it"),
    (["--out", "{folder}"], "is a folder; give the mp4 file to write"),
    (["--lora_scale", "nan"], "--lora_scale must be a finite number, got nan"),
    (["--guidance", "inf"], "--guidance must be a finite number, got inf"),
])
def test_sample_cli_mistakes_are_one_sentence(demo, tmp_path, args, message):
    (tmp_path / "notes.safetensors").write_text("these are notes")
    (tmp_path / "photo.png").write_text("not a picture")
    (tmp_path / "old.mp4").write_bytes(b"an earlier video")
    lora = demo / "output/demo/lora.safetensors"
    kept = {p: p.read_bytes() for p in (lora, tmp_path / "old.mp4")}
    args = [a.format(not_lora=tmp_path / "notes.safetensors", not_image=tmp_path / "photo.png", lora=lora,
                     old_mp4=tmp_path / "old.mp4", folder=tmp_path) for a in args]
    result = run_in_process(demo, "sample.py", "--demo", "--model", "output/demo/tiny-ltx", "--prompt", "x", "--out",
                            str(tmp_path / "x.mp4"), *args, expect=None)
    assert result.returncode != 0 and message in one_sentence(result), result.stderr[-2000:]
    assert not (tmp_path / "x.mp4").exists() and all(p.read_bytes() == b for p, b in kept.items())
