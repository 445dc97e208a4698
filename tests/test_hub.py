"""push_to_hub: the model card's text, and the uploads through huggingface_hub against a stand-in hub on 127.0.0.1
(the three endpoints an upload uses: create the repo, preupload, commit), including one that fails."""

import base64
import http.server
import json
import threading

import pytest

import config
import hub as hub_py  # (the module; `hub` below is the stand-in hub fixture)
import train
from config import Config
from conftest import DEMO_CONFIG, run_in_process


class StandInHub(http.server.BaseHTTPRequestHandler):
    """Answers as the hub does for create_repo and create_commit (files sent inline, base64); keeps each commit."""
    commits: list = []
    failing = False

    def log_message(self, *args):
        pass

    def reply(self, body: dict, status: int = 200) -> None:
        blob = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(blob)))
        self.end_headers()
        self.wfile.write(blob)

    def do_GET(self):
        self.reply({}, 404)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.failing:
            return self.reply({"error": "the hub is down"}, 500)
        if self.path == "/api/repos/create":
            request = json.loads(body)
            return self.reply({"url": f"{base}/{request.get('organization') or 'me'}/{request['name']}"})
        if self.path == "/api/validate-yaml":  # the model card's front matter, checked before a commit with it
            return self.reply({})
        if "/preupload/" in self.path:
            return self.reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in json.loads(body)["files"]]})
        if "/commit/" in self.path:
            lines = [json.loads(line) for line in body.decode().splitlines()]
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            files = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
            self.commits.append((repo, lines[0]["value"]["summary"], files))
            return self.reply({"commitUrl": f"{base}/{repo}/commit/abc", "commitOid": "a" * 40})
        self.reply({}, 404)


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants
    StandInHub.commits, StandInHub.failing = [], False
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # (conftest sets offline; this "hub" is local)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    yield StandInHub
    server.shutdown()


def test_the_model_card_says_what_the_lora_is_and_how_to_use_it(tmp_path):
    cfg = Config(pretrained_model_name_or_path="Lightricks/LTX-Video-0.9.5", hub_model_id="me/disney",
                 validation_prompt="a black and white cartoon mouse", use_ema=True, max_train_steps=100)
    clips = [train.data.Sample("d", tmp_path / f"{i}.mp4", f"caption {i % 2}", 768, 512, 121) for i in range(4)]
    card = hub_py.model_card(cfg, tmp_path, clips, 100, ["samples/validation-768x512.png"])
    assert card.startswith("---\nbase_model: Lightricks/LTX-Video-0.9.5\n")
    assert "- caption 0\n- caption 1\n\n" in card  # each caption once
    assert "- a black and white cartoon mouse" in card and "![samples](samples/validation-768x512.png)" in card
    assert "| steps | 100 |" in card and "| clips | 4 in 1 shape(s): 768x512@121 |" in card
    assert "| EMA | decay 0.999 (lora_ema.safetensors) |" in card
    assert 'pipe.load_lora_weights("me/disney", weight_name="lora.safetensors")' in card
    assert "ComfyUI: put `lora.safetensors` in `models/loras`" in card


def test_the_demo_uploads_its_lora_card_and_checkpoints(demo_run, hub, tmp_path):
    cwd, _ = demo_run
    out = tmp_path / "run"
    result = run_in_process(cwd, "train.py", DEMO_CONFIG, "--push_to_hub=true", "--push_checkpoints_to_hub=true",
                            "--hub_model_id=me/shapes", "--max_train_steps=4", "--checkpoint_step_interval=2",
                            "--validation_num_inference_steps=2", "--validation_step_interval=0",
                            f"--output_dir={out}")
    assert [(repo, summary) for repo, summary, _ in hub.commits] == [

        ("me/shapes", "ltx-lora: checkpoint step-2"), ("me/shapes", "ltx-lora: checkpoint step-4"),
        ("me/shapes", "ltx-lora: the LoRA after 4 steps")]
    assert set(hub.commits[0][2]) == {"checkpoints/step-2/lora.safetensors"}
    final = hub.commits[-1][2]
    assert set(final) == {"lora.safetensors", "config.toml", "README.md", "samples/validation-128x96.png"}
    assert final["lora.safetensors"] == (out / "lora.safetensors").read_bytes()  # what is on disk, byte for byte
    assert final["README.md"] == (out / "model_card.md").read_bytes()  # the card, uploaded under the repo's name
    assert "uploaded lora.safetensors, config.toml" in result.stdout


def test_a_readme_of_yours_in_output_dir_is_kept_and_a_stale_ema_is_not_uploaded(demo_run, hub, tmp_path):
    cwd, _ = demo_run
    out = tmp_path / "run"
    args = (DEMO_CONFIG, "--hub_model_id=me/shapes", "--disable_validation=true", f"--output_dir={out}")
    run_in_process(cwd, "train.py", *args, "--max_train_steps=2", "--checkpoint_step_interval=2", "--use_ema=true")
    assert (out / "lora_ema.safetensors").exists()
    (out / "README.md").write_text("my notes")
    run_in_process(cwd, "train.py", *args, "--max_train_steps=4", "--resume_from_checkpoint=latest",
                   "--push_to_hub=true", "--use_ema=false")
    assert (out / "README.md").read_text() == "my notes"
    assert not (out / "lora_ema.safetensors").exists()  # the EMA of steps 1-2 would not fit the LoRA of step 4
    assert set(hub.commits[-1][2]) == {"lora.safetensors", "config.toml", "README.md"}


def test_a_card_of_a_local_base_does_not_link_its_path_to_the_hub(tmp_path):
    base = tmp_path / "private" / "ltx-0.9.5"
    base.mkdir(parents=True)
    cfg = Config(pretrained_model_name_or_path=str(base), hub_model_id="me/disney", max_train_steps=10)
    card = hub_py.model_card(cfg, tmp_path, [], 10, [])
    assert str(tmp_path) not in card and "huggingface.co/" + str(base) not in card
    assert "base_model:" not in card and "`ltx-0.9.5`" in card


def test_a_failed_upload_keeps_the_run_and_says_how_to_retry(demo_run, hub, tmp_path):
    cwd, _ = demo_run
    hub.failing = True
    out = tmp_path / "run"
    result = run_in_process(cwd, "train.py", DEMO_CONFIG, "--push_to_hub=true", "--hub_model_id=me/shapes",
                            "--max_train_steps=2", "--disable_validation=true", f"--output_dir={out}")
    assert "upload to the hub repo me/shapes failed" in result.stdout
    assert f"Retry with: hf upload me/shapes {out / 'lora.safetensors'} lora.safetensors && " in result.stdout
    assert f"hf upload me/shapes {out / 'model_card.md'} README.md" in result.stdout
    assert (out / "lora.safetensors").exists() and (out / "model_card.md").exists() and not hub.commits


def test_push_to_hub_without_a_token_stops_before_training(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no token saved by `hf auth login` there
    with pytest.raises(SystemExit, match="push_to_hub needs a Hugging Face token"):
        config.parse_config([DEMO_CONFIG, "--push_to_hub=true"])
