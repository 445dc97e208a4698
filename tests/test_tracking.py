"""Trackers and progress: TensorBoard, wandb (offline), the no-op tracker, loss.png, the start-up summary, webhooks
(a local HTTP server stands in for Discord and for a raw endpoint)."""

import glob
import http.server
import json
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DEMO_CONFIG, read_log, run_in_process, run_script

# a few steps, a tiny validation video at the last one (and every 2nd with --validation_step_interval=2)
SHORT = [DEMO_CONFIG, "--max_train_steps=4", "--validation_num_inference_steps=2", "--validation_resolution=64x64",
         "--validation_num_frames=9", "--validation_step_interval=2", "--checkpoint_step_interval=0"]
SECRET = "/api/webhooks/1234/s3cr3t-t0ken"  # the part of a webhook URL that must never be printed


class Endpoint:
    """An HTTP server on 127.0.0.1 in a thread that records every POST (path, headers, body) and answers as
    `behaviour` says: "ok" (204), "fail" (500), or "hang" (answers nothing until the test ends)."""

    def __init__(self, behaviour: str = "ok"):
        self.posts, self.released = [], threading.Event()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.posts.append((self.path, dict(self.headers), body))
                if behaviour == "hang":
                    endpoint.released.wait(60)
                    return
                self.send_response(204 if behaviour == "ok" else 500)
                self.end_headers()

            def log_message(self, *args):  # quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads, self.server.block_on_close = True, False
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}{SECRET}"

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def json_posts(self) -> list[dict]:
        return [json.loads(body) for _, _, body in self.posts]


@pytest.fixture
def endpoint():
    made = []

    def make(behaviour: str = "ok") -> Endpoint:
        made.append(Endpoint(behaviour))
        return made[-1]

    yield make
    for e in made:
        e.close()


def webhook_file(tmp_path: Path, *entries: dict) -> str:
    path = tmp_path / "webhook.json"
    path.write_text(json.dumps(entries[0] if len(entries) == 1 else list(entries)))
    return str(path)


# -----------------------------------------------------------------------------
# TensorBoard, loss.png, the summary, a raw webhook: one short run

@pytest.fixture(scope="module")
def tensorboard_run(demo_run, tmp_path_factory):
    cwd, _ = demo_run
    folder = tmp_path_factory.mktemp("tracked")
    server = Endpoint("ok")
    hook = webhook_file(folder, {"webhook_type": "raw", "callback_url": server.url, "message_prefix": "[box]"})
    result = run_in_process(cwd, "train.py", *SHORT, "--report_to=tensorboard", f"--webhook_config={hook}",
                            "--webhook_reporting_interval=2", "--eval_fraction=0.25", "--eval_step_interval=2",
                            "--checkpoint_step_interval=2", f"--output_dir={folder / 'out'}")
    yield folder / "out", result, server
    server.close()


def test_tensorboard_holds_every_steps_scalars_and_the_contact_sheets(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _, _ = tensorboard_run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    log = read_log(out / "log.jsonl")
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in log if "loss" in r])
    assert [e.step for e in events.Scalars("lr")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval_loss")] == [0, 2, 4]  # the baseline before the first step too
    assert {"grad_norm", "it_per_s", "peak_memory_mib/training_step"} <= set(events.Tags()["scalars"])
    sheets = events.Images("validation/validation-64x64")
    assert [s.step for s in sheets] == [2, 4] and (sheets[0].width, sheets[0].height) == (4 * 64, 64)


def test_loss_png_is_drawn_and_the_summary_says_what_runs(tensorboard_run):
    out, result, _ = tensorboard_run
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (out / "loss.png.tmp").exists()
    said = result.stdout
    for fact in ("training a LoRA on 1 x cpu", "(folder); transformer from", "rank 16, alpha 16 on to_q",
                 "12 samples in 1 buckets (128x96@25)", "4 clip(s) held out for the eval loss",
                 "4 steps of 4 clips", f"outputs    {out.resolve()}", "TensorBoard in",
                 "raw webhook http://127.0.0.1…"):
        assert fact in said, fact
    assert "s per step over the first 3: about" in said and "peak resident memory so far" in said
    assert SECRET not in said + result.stderr


def test_a_raw_webhook_hears_start_progress_validation_and_the_end_in_order(tensorboard_run):
    out, _, server = tensorboard_run
    posts = server.json_posts()
    assert [(p["event"], p.get("step")) for p in posts] == [
        ("start", None), ("validation", 2), ("progress", 2), ("validation", 4), ("progress", 4), ("finish", 4)]
    assert all(p["message"].startswith("[box] out: ") and p["run"] == "out" for p in posts)
    progress = posts[2]
    log = read_log(out / "log.jsonl")
    assert progress["loss"] == log[2]["loss"] and progress["lr"] == log[2]["lr"]
    assert progress["eval_loss"] == log[2]["eval_loss"]
    assert posts[1]["image"] == str(out.resolve() / "samples/step-2/validation-64x64.png")
    assert posts[1]["videos"] == [str(out.resolve() / "samples/step-2/validation-64x64.mp4")]
    assert {path for path, _, _ in server.posts} == {SECRET}


# -----------------------------------------------------------------------------
# wandb, offline

def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline run's .wandb file: a LevelDB-style log (after a 7-byte header, 32 KiB blocks
    of records, each a 7-byte header: crc32, length, type (1 whole, 2 first, 3 middle, 4 last), then bytes) of
    wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2
    data, rows, pos, pending = run_file.read_bytes(), [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
            pending = b""
    return rows


def test_wandb_offline_keeps_the_history_and_the_media(demo_run, tmp_path, monkeypatch):
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    run_in_process(demo_run[0], "train.py", *SHORT, "--max_train_steps=2", "--report_to=wandb",
                   "--tracker_project_name=tests", "--tracker_run_name=offline-check", f"--output_dir={out}")
    (run_dir,) = [Path(p) for p in glob.glob(str(out / "wandb/offline-run-*"))]
    history = wandb_history(next(run_dir.glob("*.wandb")))
    losses = {row["_step"]: row["loss"] for row in history if "loss" in row}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in read_log(out / "log.jsonl")})
    assert [row["_step"] for row in history if row.get("validation/validation-64x64/_type") == "image-file"] == [2]
    assert [row["_step"] for row in history if row.get("validation_video/validation-64x64/_type") == "video-file"] \
        == [2]
    assert list(run_dir.glob("files/media/images/**/*.png")) and list(run_dir.glob("files/media/videos/**/*.mp4"))


def test_wandb_without_a_login_is_one_sentence_before_any_work(demo_run, tmp_path, monkeypatch):
    for name in ("HOME", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))  # no key saved by `wandb login` there
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    # a process of its own: wandb keeps its settings for the life of a process (an offline run here before)
    result = run_script(demo_run[0], "train.py", *SHORT, "--report_to=wandb", f"--output_dir={out}", expect=1)
    assert result.stderr.strip().splitlines()[-1:] == [
        'report_to = "wandb" could not start a wandb run (No API key configured. Use `wandb login` to log in.): run '
        '`wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to keep the run on disk and `wandb sync` it '
        'later']
    assert "Traceback" not in result.stderr
    assert not (out / "log.jsonl").exists() and not (out / "checkpoints").exists()


# -----------------------------------------------------------------------------
# The no-op tracker, optional packages

@pytest.mark.parametrize("report_to", ["none", "jsonl"])  # jsonl: log.jsonl alone, which is always written
def test_report_to_none_and_no_matplotlib_write_only_the_log_and_say_so_once(demo_run, tmp_path, monkeypatch,
                                                                             report_to):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails as if it were not installed
    out = tmp_path / "out"
    result = run_in_process(demo_run[0], "train.py", *SHORT, "--max_train_steps=2", "--checkpoint_step_interval=1",
                            f"--report_to={report_to}", f"--output_dir={out}")
    assert result.stdout.count("matplotlib is not installed") == 1
    assert not (out / "loss.png").exists() and not (out / "tensorboard").exists() and not (out / "wandb").exists()
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2] and (out / "lora.safetensors").exists()


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_stops_the_run_before_any_work(demo_run, tmp_path, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)
    result = run_in_process(demo_run[0], "train.py", DEMO_CONFIG, f"--report_to={package}",
                            f"--output_dir={tmp_path / 'out'}", expect=1)
    assert f"pip install {package}" in result.stderr and not (tmp_path / "out").exists()


def test_overwriting_a_run_clears_its_own_tracker_outputs_and_keeps_the_rest(demo_run, tmp_path):
    """A run's TensorBoard events are recorded as its outputs: overwrite_output_dir removes them (and redraws
    loss.png); whatever else is in tensorboard/ (another run's logs, your notes) stays."""
    out = tmp_path / "out"
    args = [*SHORT, "--max_train_steps=1", "--disable_validation=true", "--report_to=tensorboard",
            f"--output_dir={out}"]
    run_in_process(demo_run[0], "train.py", *args)
    (first,) = out.glob("tensorboard/events.out.tfevents.*")
    (out / "tensorboard/notes.txt").write_text("mine")
    (out / "loss.png").write_bytes(b"old")
    run_in_process(demo_run[0], "train.py", *args, "--overwrite_output_dir=true")
    (second,) = out.glob("tensorboard/events.out.tfevents.*")
    assert second != first and not first.exists()
    assert (out / "tensorboard/notes.txt").read_text() == "mine"
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"  # drawn again, by this run


# -----------------------------------------------------------------------------
# Webhooks: Discord, endpoints that fail, errors

def test_a_discord_webhook_gets_messages_and_the_contact_sheet_as_a_file(demo_run, tmp_path, endpoint):
    server = endpoint("ok")
    out = tmp_path / "out"
    run_in_process(demo_run[0], "train.py", *SHORT, "--max_train_steps=2", f"--output_dir={out}",
                   f"--webhook_config={webhook_file(tmp_path, {'webhook_type': 'discord', 'webhook_url': server.url})}")
    kinds = [headers["Content-Type"].split(";")[0] for _, headers, _ in server.posts]
    assert kinds == ["application/json", "multipart/form-data", "application/json"]  # start, the sheet, the end
    assert all(headers["User-Agent"] == "ltx-lora" for _, headers, _ in server.posts)
    assert "training started" in json.loads(server.posts[0][2])["content"]
    _, headers, body = server.posts[1]
    boundary = headers["Content-Type"].split("boundary=")[1].encode()
    parts = body.split(b"--" + boundary)
    sheet = (out / "samples/step-2/validation-64x64.png").read_bytes()
    assert any(b'name="files[0]"; filename="validation-64x64.png"' in p and p.endswith(sheet + b"\r\n") for p in parts)
    assert any(b'name="payload_json"' in p and b"validation at step 2" in p for p in parts)
    assert "ended at step 2" in json.loads(server.posts[2][2])["content"]


@pytest.mark.parametrize("behaviour", ["fail", "hang"])
def test_an_endpoint_that_fails_or_hangs_never_stops_or_holds_training(demo_run, tmp_path, endpoint, behaviour):
    server = endpoint(behaviour)
    hook = webhook_file(tmp_path, {"webhook_type": "raw", "callback_url": server.url, "timeout": 0.2})
    out = tmp_path / "out"
    start = time.time()
    result = run_in_process(demo_run[0], "train.py", *SHORT, "--max_train_steps=3", "--disable_validation=true",
                            "--webhook_reporting_interval=1", f"--webhook_config={hook}", f"--output_dir={out}")
    took = time.time() - start
    assert (out / "lora.safetensors").exists() and [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2, 3]
    # a hanging endpoint holds each post 4 x 0.2 s and the drain at most 3 x 0.2 s; without the thread, the 5 posts
    # alone would take 5 x 4 x 0.2 s more; with it the run takes what a plain run takes (seconds) + the drain
    assert took < 20
    said = result.stdout + result.stderr
    assert SECRET not in said and "http://127.0.0.1…" in said
    if behaviour == "fail":
        assert "webhook http://127.0.0.1…: the start post failed 4 times (HTTP Error 500" in said
        assert [post["event"] for post in server.json_posts()].count("start") == 4  # tried 1 + 3 times
    else:
        assert "gave up waiting for the last post(s)" in said


def test_an_error_is_posted_and_its_traceback_still_shows(demo_run, tmp_path, endpoint, monkeypatch):
    import sample

    def broken(*args, **kwargs):
        raise RuntimeError("validation broke on purpose")

    monkeypatch.setattr(sample, "render_validation", broken)  # train.py calls it through the module
    server = endpoint("ok")
    hook = webhook_file(tmp_path, {"webhook_type": "raw", "callback_url": server.url})
    result = run_in_process(demo_run[0], "train.py", *SHORT, f"--webhook_config={hook}",
                            f"--output_dir={tmp_path / 'out'}", expect=1)
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: validation broke on purpose" in result.stderr and "in validate" in result.stderr
    posts = server.json_posts()
    assert [p["event"] for p in posts] == ["start", "error"]
    assert posts[1]["step"] == 1  # the last step done: step 2 broke in its validation
    assert "RuntimeError: validation broke on purpose" in posts[1]["message"]
    assert "in validate" in posts[1]["traceback"]


@pytest.mark.parametrize("content,message", [
    ('{"webhook_type": "slack", "webhook_url": "https://x"}', 'needs "webhook_type": "discord" or "raw"'),
    ('{"webhook_type": "raw", "webhook_url": "https://x"}', 'a raw webhook needs "callback_url"'),
    ('{"webhook_type": "discord", "webhook_url": "https://x", "timeout": 0}', '"timeout" must be'),
    ('{"webhook_type": "raw", "callback_url": "https://x", "timeout": 1e308}', '"timeout" must be a number of seconds '
                                                                              'in \\(0, 600\\], got 1e\\+308'),
    ('{"webhook_type": "raw", ', "is not valid JSON"),
])
def test_a_bad_webhook_file_stops_the_run_at_start(tmp_path, content, message):
    import config
    path = tmp_path / "hook.json"
    path.write_text(content)
    with pytest.raises(SystemExit, match=message):
        config.parse_config([DEMO_CONFIG, f"--webhook_config={path}"])
