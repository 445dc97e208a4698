"""bench.py runs as README says (tiny sizes here: the numbers themselves are not asserted, the equal work is)."""

import json

import pytest

from conftest import REPO, run_in_process


def test_bench_data_prints_its_table():
    result = run_in_process(REPO, "bench.py", "--data", "--clips", "2", "--frames", "17", "--size", "128x96",
                            "--resolution", "64", "--repeats", "1")
    assert "| **ours / naive** |" in result.stdout and "rerun over the full cache" in result.stdout


@pytest.mark.parametrize("precision,checkpointing", [("fp32", "off"), ("bf16", "on")])
def test_bench_step_does_the_references_work(tmp_path, precision, checkpointing):
    """Ours and diffusers + peft start from identical weights and adapters: the first step's losses agree (bench.py
    refuses to time otherwise), and the table and the JSON carry the ratios."""
    out = tmp_path / "step.json"
    result = run_in_process(REPO, "bench.py", "--preset", "tiny", "--precision", precision, "--checkpointing",
                            checkpointing, "--steps", "1", "--warmup", "0", "--json", str(out))
    assert "the same work" in result.stdout and "| **ours / reference** |" in result.stdout
    saved = json.loads(out.read_text())
    first = saved["first_loss"]
    assert abs(first["ours"] - first["reference"]) <= (1e-6 if precision == "fp32" else 2e-2) * first["reference"]
    assert saved["step_time_ratio"] > 0 and saved["compared_with"] == "reference"
    assert saved["peak_memory_ratio"] is None or saved["peak_memory_ratio"] >= 0  # a tiny step may need < 1 page


def test_bench_memory_prints_every_precision_and_optimizer(tmp_path):
    """--memory: one row per base precision x optimizer, built from the same weights; the bf16 row's output error is
    0 by definition and every quantized one's is not."""
    out = tmp_path / "memory.json"
    result = run_in_process(REPO, "bench.py", "--memory", "--preset", "tiny", "--steps", "1", "--optimizers",
                            "adamw,bnb-lion8bit-paged", "--offload", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    precisions = ("bf16", "int8-torchao", "fp8-torchao", "nf4-bnb")
    assert list(rows) == [f"{p} + {o}" for p in precisions for o in ("adamw", "bnb-lion8bit-paged")] + \
        [f"{p} + adamw + group offload" for p in precisions]
    assert rows["bf16 + adamw"]["output_error"] == 0
    assert all(r["output_error"] > 0 for name, r in rows.items() if not name.startswith("bf16"))
    assert all(r["step_seconds"] > 0 and r["peak_bytes"] >= 0 for r in rows.values())
    assert "| nf4-bnb + bnb-lion8bit-paged |" in result.stdout


def test_bench_whole_run_reports_every_phase(tmp_path):
    """--memory --whole-run: train.py's own memory.json per row, every phase of a run present."""
    out = tmp_path / "whole.json"
    run_in_process(tmp_path, "bench.py", "--memory", "--whole-run", "--preset", "tiny", "--precisions", "no_change",
                   "--steps", "1", "--json", str(out))
    saved = json.loads(out.read_text())
    assert saved["phases"] == ["text caching", "latent caching", "loading the transformer", "training step",
                               "validation"]
    assert list(saved["rows"]) == ["fp32", "fp32 + group offload"]
    assert all(peak > 0 for row in saved["rows"].values() for peak in row.values())


def test_the_medium_pipeline_is_the_medium_preset(tmp_path):
    """bench.py --whole-run --preset medium trains on demo.make_tiny_pipeline(size="medium"): its transformer has the
    medium preset's shape and T5 is as wide as its captions, so train.py runs it like any pipeline."""
    import demo
    import model as ltx
    from bench import PRESETS
    folder = demo.make_tiny_pipeline(tmp_path / "medium", size="medium")
    cfg, p = ltx.load_transformer(str(folder), "transformer").config, PRESETS["medium"]
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.in_channels, cfg.caption_channels) == \
        (p["layers"], p["heads"], p["head_dim"], p["channels"], p["caption"])
    assert ltx.text_dim(str(folder)) == p["caption"]


def test_bench_tools_prints_each_tool_against_the_plain_step(tmp_path):
    out = tmp_path / "tools.json"
    result = run_in_process(REPO, "bench.py", "--tools", "--preset", "tiny", "--precision", "fp32", "--steps", "1",
                            "--warmup", "0", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["plain step", "+ EMA (every step)", "+ CREPA (DINOv2-giant features, middle block)",
                          "+ scheduled sampling (every clip, 2 steps)", "all three", "eval one clip"]
    assert all(r["step_seconds"] > 0 for name, r in rows.items() if name != "eval one clip")
    assert "| plain step |" in result.stdout and "| eval loss: one clip at 5 σ |" in result.stdout
