"""The output folder: one run at a time, and nothing in it replaced that this trainer did not write.

    lock_output_dir(output_dir)        an OS lock held for the run's lifetime (a second run refuses, naming the PID)
    claim_output_dir(cfg, output_dir)  refuses a folder holding another run or a file of yours; overwrite_output_dir
                                       removes exactly what the record lists (remove_run)
    own(output_dir, *names)            records a file this run wrote in .ltx-lora-outputs.json (hashed where a
                                       user edits)
    list_checkpoints(output_dir)       the complete checkpoints/step-N folders, oldest first
"""

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import config
import data


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is still named step-N.tmp)."""
    folder = output_dir / "checkpoints"
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tracker_logs(output_dir: Path) -> set[Path]:
    """TensorBoard's event files and wandb's run folders in output_dir (each tracker start makes one)."""
    found = {*output_dir.glob("tensorboard/events.out.tfevents.*"), *output_dir.glob("wandb/*run-*")}
    return {p for p in found if not p.is_symlink()}  # (wandb's latest-run is a link to the newest)


START_OVER = "--resume_from_checkpoint= --overwrite_output_dir=true"


OUTPUTS = ".ltx-lora-outputs.json"  # what this trainer wrote in output_dir: {path: SHA-256, or null}


RUN_FILES = ("lora.safetensors", "lora_ema.safetensors", "log.jsonl", "config.toml", "data_report.json",
             "memory.json", "loss.png", "model_card.md")  # what a run writes at the top of output_dir


STEP_FOLDERS = ("checkpoints", "samples")  # their step-N folders are a run's; anything else in them is kept


CHANGED_BY_HAND = ("lora.safetensors", "lora_ema.safetensors", "config.toml", "model_card.md")  # hashed: an
# edited or replaced copy is yours from then on. The others are recorded by name only (logs, reports, plots).


def last_checkpoint(output_dir: Path) -> str:
    """The newest complete checkpoint, as an error message names it."""
    found = list_checkpoints(output_dir)
    return str(found[-1]) if found else "none (no checkpoint was saved yet)"


def lock_output_dir(output_dir: Path):
    """An exclusive OS lock on output_dir/.lock, held while the returned file stays open: the OS releases it when
    the process ends, however it ends (SIGKILL included), so it is never stale. A second run stops at once."""
    import fcntl
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise SystemExit(f"output_dir {output_dir} is in use by another run (PID {holder}); wait for it to end, stop "
                         f"it, or choose another output_dir")
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def read_outputs(output_dir: Path) -> dict[str, str | None]:
    """The record of what this trainer wrote in output_dir: {path relative to it: the file's SHA-256 when written,
    or None for what is recorded by name}. A missing or damaged record is empty: nothing is then taken as ours."""
    try:
        record = json.loads((output_dir / OUTPUTS).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    ok = isinstance(record, dict) and all(isinstance(v, (str, type(None))) for v in record.values())
    return record if ok else {}


def own(output_dir: Path, *names: str) -> None:
    """Records files or folders of output_dir as this trainer's (CHANGED_BY_HAND files with their hash): a later
    run of this trainer may replace them, and overwrite_output_dir may remove them."""
    record = read_outputs(output_dir)
    for name in names:
        path = output_dir / name
        record[name] = sha256(path) if name in CHANGED_BY_HAND and path.is_file() else None
    write_json_atomic(output_dir / OUTPUTS, record)


def write_json_atomic(path: Path, value) -> None:
    data.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2)))


def not_ours(output_dir: Path, names) -> list[str]:
    """The names among `names` that exist in output_dir but this trainer did not write (or that were edited or
    replaced since: their hash differs): files of yours that a run must not replace."""
    record = read_outputs(output_dir)
    return [name for name in names if (output_dir / name).exists()
            and (name not in record or record[name] not in (None, sha256(output_dir / name)))]


def adopt_earlier_outputs(output_dir: Path) -> None:
    """A run written before OUTPUTS existed is taken as this trainer's as it stands: its files and tracker logs.
    Its log.jsonl is what tells a run from a folder where a user keeps a LoRA (a lone one stays the user's)."""
    if (output_dir / OUTPUTS).exists() or not (output_dir / "log.jsonl").is_file():
        return
    own(output_dir, *[n for n in RUN_FILES if (output_dir / n).exists()],
        *sorted(str(p.relative_to(output_dir)) for p in tracker_logs(output_dir)))


def previous_run(output_dir: Path) -> str:
    """What of an earlier run output_dir holds ("" when nothing): its LoRA, checkpoints or log lines."""
    found = []
    if (output_dir / "lora.safetensors").exists():
        found.append("lora.safetensors")
    checkpoints = sorted(p.name for p in (output_dir / "checkpoints").glob("step-*"))
    if checkpoints:
        found.append(f"checkpoints {', '.join(checkpoints)}")
    log = output_dir / "log.jsonl"
    if log.exists() and log.stat().st_size:
        found.append("log.jsonl")
    return "; ".join(found)


def remove_run(output_dir: Path) -> list[str]:
    """overwrite_output_dir: deletes what the earlier run wrote (its recorded files and tracker logs, and the
    step-N folders of checkpoints/ and samples/) and nothing else; returns what it removed."""
    removed = []
    for name in read_outputs(output_dir):
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
        if path.parent != output_dir:  # a tracker's folder: its links to what went (wandb's latest-run), then it
            for link in [p for p in path.parent.iterdir() if p.is_symlink() and not p.exists()]:
                link.unlink()
            with contextlib.suppress(OSError):  # kept when it holds anything else
                path.parent.rmdir()
    for folder in STEP_FOLDERS:
        steps = sorted((output_dir / folder).glob("step-*"))
        for path in steps:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if steps:
            removed.append(f"{folder}/{{{', '.join(p.name for p in steps)}}}")
            with contextlib.suppress(OSError):  # kept when it holds anything else
                (output_dir / folder).rmdir()
    write_json_atomic(output_dir / OUTPUTS, {})
    return removed


def claim_output_dir(cfg: config.Config, output_dir: Path, log=print) -> None:
    """Makes output_dir this run's, refusing (before anything is changed) when the run would replace a file it did
    not write or another run: a fresh run refuses a folder that holds a run, unless overwrite_output_dir removes
    that run's outputs (never anything else: the demo keeps its model and clips there); a resume of another
    folder's checkpoint needs an output_dir without a run."""
    adopt_earlier_outputs(output_dir)
    writes = [n for n in RUN_FILES if n != "model_card.md" or cfg.push_to_hub]
    foreign = not_ours(output_dir, writes)
    if foreign:
        raise SystemExit(f"output_dir {output_dir} holds {', '.join(foreign)}, which this trainer did not write (or "
                         f"which changed since it did); this run would replace {'them' if len(foreign) > 1 else 'it'}"
                         f": move {'them' if len(foreign) > 1 else 'it'} elsewhere or choose another output_dir")
    found = previous_run(output_dir)
    elsewhere = cfg.resume_from_checkpoint not in ("", "latest") and \
        Path(cfg.resume_from_checkpoint).resolve().parent != (output_dir / "checkpoints").resolve()
    if cfg.overwrite_output_dir and found:  # (config.check refused it together with resume_from_checkpoint)
        log(f"overwrite_output_dir: removed the previous run from {output_dir}: {'; '.join(remove_run(output_dir))}")
    elif found and not cfg.resume_from_checkpoint:
        raise SystemExit(f"output_dir {output_dir} holds a run already ({found}); continue it with "
                         f"--resume_from_checkpoint=latest, or start over in another output_dir or with "
                         f"--overwrite_output_dir=true (which deletes that run's checkpoints, log, LoRA and samples)")
    elif found and elsewhere:
        raise SystemExit(f"output_dir {output_dir} holds a run ({found}), and resume_from_checkpoint = "
                         f"{cfg.resume_from_checkpoint} is another folder's checkpoint: continuing it here would "
                         f"replace that run; resume into an output_dir that holds no run")
    elif found and cfg.resume_from_checkpoint == "latest" and not list_checkpoints(output_dir) \
            and (output_dir / "lora.safetensors").exists():
        raise SystemExit(f"output_dir {output_dir} holds a finished run (lora.safetensors) with no checkpoint to "
                         f"resume from; start over in another output_dir or with {START_OVER}")
    own(output_dir, *[n for n in writes if n not in CHANGED_BY_HAND])  # this run's from now on
