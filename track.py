"""Tracking: log.jsonl is always written; report_to adds TensorBoard or wandb, webhook_config adds webhooks; loss.png
is drawn from the log; memory.json holds each phase's memory peak.

    open_trackers(cfg, output_dir, d, step)  one Tracker the loop calls, whatever stands behind it (ranks other
                                             than 0 get the one that does nothing)
    check_trackers(cfg)                      report_to's package missing: one sentence at start-up
    write_record(log_file, tracker, record)  a step's line of log.jsonl and its scalars to the trackers
    plot_loss(output_dir)                    loss.png from log.jsonl
    record_peak(peaks, phase, device)        a phase's memory peak (CUDA's max allocated, or the CPU's RSS)
"""

import contextlib
import dataclasses
import http.client
import json
import math
import os
import queue
import threading
import time
import traceback
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

import config
import model as ltx
import data
import errors
import outputs
import ranks


def truncate_log(path: Path, step: int, log=print, source: Path | None = None) -> None:
    """Keeps the log lines up to the step we start from (none on a fresh start): later ones will be written
    again. A damaged line (a crash mid-write leaves a partial last one) is dropped with a note. With `source`
    (the log of the run whose checkpoint this one continues in another folder), its lines are the ones kept."""
    source = source or path
    if not source.exists():
        return
    kept, damaged = [], 0
    for line in source.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # not JSON: cut short
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            damaged += 1
        elif record["step"] <= step:
            kept.append(line + "\n")
    if damaged:
        log(f"{path}: dropped {damaged} damaged line(s), e.g. a partial last line left by a crash")
    data.write_atomic(path, lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))


def json_line(record: dict) -> str:
    """Strict JSON (no bare NaN / Infinity): a non-finite number is written as null and named in "nonfinite"."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        record = {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}
    return json.dumps(record, allow_nan=False) + "\n"


class Tracker:
    """Does nothing: report_to = "none" with no webhook, and every rank but 0. The trackers below override it."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def video(self, step: int, name: str, path: Path) -> None:
        pass

    def image(self, step: int, name: str, path: Path) -> None:
        pass

    def close(self, error: BaseException | None = None) -> None:
        """The run ends; `error` is the exception ending it, if one does (it is raised on afterwards)."""


class TrackerGroup(Tracker):
    """Several trackers as one: each call goes to each, in order."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for t in self.trackers:
            t.log(step, scalars)

    def video(self, step: int, name: str, path: Path) -> None:
        for t in self.trackers:
            t.video(step, name, path)

    def image(self, step: int, name: str, path: Path) -> None:
        for t in self.trackers:
            t.image(step, name, path)

    def close(self, error: BaseException | None = None) -> None:
        for t in self.trackers:
            t.close(error)


class TensorBoard(Tracker):
    """Scalars and the validation contact sheets in output_dir/tensorboard (`tensorboard --logdir <output_dir>`).
    A video shows as its contact sheet: TensorBoard's add_video would need moviepy."""

    def __init__(self, folder: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        # a resumed run writes its steps again: the events the last run logged past the checkpoint are dropped
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def image(self, step: int, name: str, path: Path) -> None:
        from PIL import Image
        self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self, error: BaseException | None = None) -> None:
        self.writer.close()


class Wandb(Tracker):
    """A wandb run in output_dir/wandb with the resolved config, the scalars, the validation videos and contact
    sheets. wandb reads its mode from the environment: WANDB_MODE=offline keeps the run on disk (`wandb sync`
    uploads it later); online needs `wandb login` or WANDB_API_KEY."""

    def __init__(self, cfg: config.Config, name: str, output_dir: Path):
        import wandb
        self.wandb = wandb
        try:
            self.run = wandb.init(project=cfg.tracker_project_name, name=name, dir=str(output_dir),
                                  config=dataclasses.asdict(cfg))
        except wandb.errors.Error as e:  # no login, a refused key, no network: before any work, in one sentence
            raise SystemExit(f'report_to = "wandb" could not start a wandb run ({errors.first_line(e)}): run `wandb '
                             f'login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to keep the run on disk and '
                             f'`wandb sync` it later')

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def video(self, step: int, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Video(str(path))}, step=step)

    def image(self, step: int, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self, error: BaseException | None = None) -> None:
        self.run.finish(exit_code=1 if ended_by_error(error) else 0)


def ended_by_error(error: BaseException | None) -> bool:
    """Whether an exception ending the run is a failure: a SystemExit with no message is a normal end."""
    return error is not None and not (isinstance(error, SystemExit) and error.code in (None, 0))


def shown_url(url: str) -> str:
    """A webhook URL as it may be printed: its path is the key that lets anyone post, so only scheme and host."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}…"


class Webhook(Tracker):
    """Posts the run's news to a Discord channel or any URL (one entry of webhook_config): the start, progress every
    webhook_reporting_interval steps (loss, lr, the latest eval loss), each validation contact sheet (Discord: the
    PNG itself; raw: the paths of it and its videos), an error that ends the run (with its traceback), and the end.

    A thread of its own posts, in order, so a slow endpoint never slows a step. Each try waits at most `timeout`
    seconds (the entry's "timeout", 10 by default); a failed post is tried RETRIES more times, after timeout/10,
    /5, /2.5 seconds, and then given up with one line: training goes on. close() waits at most 3 x timeout for
    what is still queued. The URL is never printed whole (shown_url)."""

    RETRIES = 3

    def __init__(self, entry: dict, name: str, interval: int, log=print):
        self.kind = entry["webhook_type"]
        self.url = entry[config.WEBHOOK_URL_KEYS[self.kind]]
        self.timeout, self.prefix = float(entry.get("timeout", 10)), entry.get("message_prefix", "")
        self.name, self.interval, self.print = name, interval, log
        self.step, self.eval_loss, self.videos = 0, None, []
        self.queue = queue.Queue()
        self.thread = threading.Thread(target=self.send_queued, daemon=True)  # a hung post never holds the exit
        self.thread.start()
        self.post("start", f"{name}: training started")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.step = step
        self.eval_loss = scalars.get("eval_loss", self.eval_loss)
        if self.interval and step % self.interval == 0 and "loss" in scalars:
            loss, lr = scalars["loss"], scalars["lr"]
            evaluated = f", eval loss {self.eval_loss:.4f}" if self.eval_loss is not None else ""
            self.post("progress", f"{self.name}: step {step}, loss {loss:.4f}, lr {lr:.2e}{evaluated}", step=step,
                      loss=loss, lr=lr, eval_loss=self.eval_loss)

    def video(self, step: int, name: str, path: Path) -> None:
        self.videos.append(str(path))  # posted with the contact sheet that follows it

    def image(self, step: int, name: str, path: Path) -> None:
        self.post("validation", f"{self.name}: validation at step {step} ({Path(path).name})", step=step,
                  image=str(path), videos=self.videos)
        self.videos = []

    def close(self, error: BaseException | None = None) -> None:
        if ended_by_error(error):
            what = traceback.format_exception_only(error)[-1].strip()
            self.post("error", f"{self.name}: stopped by an error after step {self.step}: {what}", step=self.step,
                      traceback="".join(traceback.format_exception(error)))
        else:
            self.post("finish", f"{self.name}: training ended at step {self.step}", step=self.step)
        self.queue.put(None)
        self.thread.join(3 * self.timeout)
        if self.thread.is_alive():
            self.print(f"webhook {shown_url(self.url)}: gave up waiting for the last post(s) to be answered")

    def post(self, event: str, message: str, **fields) -> None:
        self.queue.put((event, f"{self.prefix} {message}".strip(), fields))

    def send_queued(self) -> None:
        while (item := self.queue.get()) is not None:
            event = item[0]
            for attempt in range(self.RETRIES + 1):
                try:
                    with urllib.request.urlopen(self.request(*item), timeout=self.timeout) as response:
                        response.read()
                    break
                except (OSError, http.client.HTTPException) as error:  # network, HTTP status, timeout: logged
                    # (a bug in building the post is not caught here: it shows its traceback in this thread)
                    if attempt == self.RETRIES:
                        reason = str(error).replace(self.url, shown_url(self.url))
                        self.print(f"webhook {shown_url(self.url)}: the {event} post failed {attempt + 1} times "
                                   f"({reason}); training goes on")
                    else:
                        time.sleep(self.timeout / 10 * 2 ** attempt)

    def request(self, event: str, message: str, fields: dict) -> urllib.request.Request:
        """raw: the event as JSON. Discord: the message as a chat message (at most 2,000 characters), a contact
        sheet attached as a file (multipart/form-data), the end of an error's traceback as a code block."""
        headers = {"User-Agent": "ltx-lora"}  # Discord refuses urllib's default agent
        if self.kind == "raw":
            payload = {"event": event, "run": self.name, "message": message, **fields}
            return urllib.request.Request(self.url, json_line(payload).encode(),  # strict JSON: NaN as null
                                          {**headers, "Content-Type": "application/json"})
        room = 1900 - len(message)  # for the end of a traceback
        if "traceback" in fields and room > 100:
            message += "\n```\n" + fields["traceback"][-room:] + "```"
        payload = json.dumps({"content": message[:2000]})
        if "image" not in fields:
            return urllib.request.Request(self.url, payload.encode(), {**headers, "Content-Type": "application/json"})
        boundary = os.urandom(16).hex()
        image = Path(fields["image"])
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"payload_json\"\r\n"
                f"Content-Type: application/json\r\n\r\n{payload}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"files[0]\"; filename=\"{image.name}\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        return urllib.request.Request(self.url, body, {**headers,
                                                       "Content-Type": f"multipart/form-data; boundary={boundary}"})


class Report(NamedTuple):
    """One report_to choice: the package it needs, how a run opens it, and where it writes (for the summary)."""
    package: str | None
    open: Callable[[config.Config, str, Path, int], Tracker] | None  # (cfg, run name, output_dir, start step)
    where: Callable[[config.Config, Path], str] | None


REPORTS = {  # report_to -> its Report; log.jsonl is written whatever report_to says. A new tracker: a class + a row
    "none": Report(None, None, None),
    "jsonl": Report(None, None, None),
    "tensorboard": Report("tensorboard", lambda cfg, name, out, step: TensorBoard(out / "tensorboard", step),
                          lambda cfg, out: f"TensorBoard in {out.resolve() / 'tensorboard'}"),
    "wandb": Report("wandb", lambda cfg, name, out, step: Wandb(cfg, name, out),
                    lambda cfg, out: f"wandb project {cfg.tracker_project_name}"
                    + (f" (WANDB_MODE={os.environ['WANDB_MODE']})" if "WANDB_MODE" in os.environ else "")),
}


def check_trackers(cfg: config.Config) -> None:
    """report_to's package missing stops the run at start, before any work, in one sentence."""
    package = REPORTS[cfg.report_to].package
    if package:
        errors.need_package(package, f'report_to = "{cfg.report_to}"', 'or set report_to = "none"')


def open_trackers(cfg: config.Config, output_dir: Path, d: ranks.Dist, start_step: int, log=print) -> Tracker:
    """Rank 0's trackers (report_to, then one Webhook per webhook_config entry); the no-op on other ranks."""
    if d.rank != 0:
        return Tracker()
    name = cfg.tracker_run_name or output_dir.resolve().name
    before, report = outputs.tracker_logs(output_dir), REPORTS[cfg.report_to]
    trackers = [report.open(cfg, name, output_dir, start_step)] if report.open else []
    outputs.own(output_dir, *sorted(str(p.relative_to(output_dir)) for p in outputs.tracker_logs(output_dir) - before))
    trackers += [Webhook(entry, name, cfg.webhook_reporting_interval, log) for entry in config.webhooks(cfg)]
    return TrackerGroup(trackers)


def can_plot() -> bool:
    """Whether matplotlib is here to draw loss.png (it is optional: the start-up summary says when it is not)."""
    try:
        __import__("matplotlib")
    except ImportError:
        return False
    return True


def plot(output_dir: Path, rank: int) -> None:
    """loss.png, by rank 0 when matplotlib is there (the start-up summary says when it is not)."""
    if rank == 0 and can_plot():
        plot_loss(output_dir)


def plot_loss(output_dir: Path) -> None:
    """output_dir/loss.png from log.jsonl: each step's loss, its moving average (as the progress bar shows it),
    and the eval loss where it was measured. Drawn on matplotlib's Agg canvas (no display, no pyplot state), to a
    temporary name and renamed: a reader never sees half a PNG."""
    from matplotlib.figure import Figure
    records = []
    for line in (output_dir / "log.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    points = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    steps, losses = [step for step, _ in points], [loss for _, loss in points]
    smooth, smoothed = None, []
    for loss in losses:
        smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
        smoothed.append(smooth)
    figure = Figure(figsize=(8, 4.5), dpi=100)
    ax = figure.subplots()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    ax.plot(steps, smoothed, color="tab:blue", linewidth=1.5, label="loss, moving average (0.9)")
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", label="eval loss")
    ax.set(xlabel="step", ylabel="flow-matching loss", title=output_dir.resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    data.write_atomic(output_dir / "loss.png", lambda tmp: figure.savefig(tmp, format="png"))


def human_time(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def write_record(log_file, tracker: Tracker, record: dict, tracked: dict | None = None) -> None:
    """A line of log.jsonl (log_file: rank 0's, else None) and the trackers' scalars: the record's numbers and
    `tracked` (it/s, memory)."""
    if log_file:
        log_file.write(json_line({k: v for k, v in record.items() if v != []}))
        log_file.flush()
    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "seconds")}
    tracker.log(record["step"], {**scalars, **(tracked or {})})


def memory_line(device: torch.device, peaks: dict[str, int]) -> str:
    return f"peak {memory_kind(device)} by phase: " + ", ".join(f"{phase} {peak / 2**20:.0f} MiB"
                                                              for phase, peak in peaks.items())


def startup_summary(cfg: config.Config, d: ranks.Dist, device: torch.device, output_dir: Path, prepared, order,
                    total_steps: int, start_step: int, params: list, trainable: int, precision: str,
                    alignment) -> str:
    """The facts to check at a glance before leaving a run alone: the machine, model, LoRA, precision, data,
    steps, outputs and where the numbers go (and CREPA's head, when it trains)."""
    tracking = ["log.jsonl", "loss.png" if can_plot() else "no loss.png (matplotlib is not installed: pip install "
                "matplotlib)"]
    tracking += [REPORTS[cfg.report_to].where(cfg, output_dir)] if REPORTS[cfg.report_to].where else []
    tracking += [f"{w['webhook_type']} webhook {shown_url(w[config.WEBHOOK_URL_KEYS[w['webhook_type']]])} (progress "
                 f"every {cfg.webhook_reporting_interval} steps)" for w in config.webhooks(cfg)]
    model_from = "folder" if os.path.isdir(cfg.pretrained_model_name_or_path) else "hub id"
    source, subfolder = config.transformer_source(cfg)
    in_folder = subfolder and subfolder != "none" and not ltx.is_single_file(source)  # a single file is all of it
    transformer_from = source + (f"/{subfolder}" if in_folder else "")
    global_batch = cfg.train_batch_size * d.world_size
    epochs = total_steps * cfg.gradient_accumulation_steps / order.batches_per_epoch
    datasets, buckets = prepared.datasets, prepared.buckets
    lines = [
        f"training a LoRA on {d.world_size} x {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"  model      {cfg.pretrained_model_name_or_path} ({model_from}); transformer from {transformer_from}",
        f"  LoRA       rank {cfg.lora_rank}, alpha {config.lora_alpha(cfg):g} on {', '.join(cfg.lora_target_modules)}: "
        f"{trainable:,} trainable parameters ({str(params[0].dtype)[6:]}, {cfg.optimizer}), saved as {cfg.lora_format}",
        f"  precision  base weights {cfg.base_model_default_dtype}, blocks {precision}, autocast {cfg.mixed_precision}",
        f"  data       {len(datasets)} dataset(s) ({', '.join(datasets)}): {len(prepared.samples)} samples in "
        f"{len(buckets)} buckets ({', '.join(sorted({b.name for b in buckets}))}), {order.batches_per_epoch} batches "
        f"per epoch" + (f"; {len(prepared.eval_clips)} clip(s) held out for the eval loss" if prepared.eval_clips
                        else ""),
        f"  steps      {total_steps} steps of {global_batch * cfg.gradient_accumulation_steps} clips "
        f"({cfg.train_batch_size} a micro-batch x {cfg.gradient_accumulation_steps} accumulated x {d.world_size} "
        f"process(es)) = {epochs:.3g} epochs" + (f", resuming at step {start_step}" if start_step else ""),
        f"  outputs    {output_dir.resolve()}",
        f"  tracking   {', '.join(tracking)}"]
    if alignment:
        lines.append(f"CREPA: block {cfg.crepa_block_index}'s hidden states -> a "
                     f"{sum(p.numel() for p in alignment.head.parameters()):,}-parameter projection head -> "
                     f"{cfg.crepa_model} features, weight {cfg.crepa_lambda}")
    return "\n".join(lines)


def first_steps_line(seconds: float, done: int, start_step: int, total_steps: int, peaks: dict[str, int],
                     device: torch.device) -> str:
    """After the first steps: their time per step, what the whole run will take, and the memory peak so far."""
    per_step = seconds / (done - start_step)  # taken before this step's eval and validation
    return (f"\n{per_step:.3g} s per step over the first {done - start_step}: about "
            f"{human_time(per_step * (total_steps - start_step))} for the {total_steps - start_step} steps "
            f"(validation, eval loss and checkpoints not counted); peak {memory_kind(device)} so far "
            f"{max(peaks.values(), default=0) / 2**20:.0f} MiB")


def write_memory(output_dir: Path, device: torch.device, peaks: dict[str, int]) -> None:
    (output_dir / "memory.json").write_text(json.dumps({"device": device.type, "peak_bytes": peaks}, indent=2))


def record_peak(peaks: dict[str, int], phase: str, device: torch.device) -> None:
    """Adds `phase`'s memory peak since the last record (and starts the next). memory.json keeps them."""
    try:
        peak = memory_peak(device)
        reset_peak(device)
    except (OSError, StopIteration):  # not Linux: nothing to read on the CPU
        return
    peaks[phase] = max(peaks.get(phase, 0), peak)


def peak_during(work: Callable, device: torch.device):
    """(work(), the bytes it needed at its peak above what was in use before it)."""
    before = memory_in_use(device)
    reset_peak(device)
    result = work()
    return result, memory_peak(device) - before


# The one memory reader: CUDA's allocator on a GPU, on the CPU the process's resident set (Linux's
# /proc/self/status; its high-water mark is reset through /proc/self/clear_refs).

def memory_in_use(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return resident_bytes("VmRSS")


def memory_peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_bytes("VmHWM")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the kernel's way to reset VmHWM to the current RSS


def memory_kind(device: torch.device) -> str:
    """What record_peak's numbers are on this device."""
    return "GPU memory (allocated)" if device.type == "cuda" else "resident memory"


def peak_scalars(peaks: dict[str, int]) -> dict[str, float]:
    """The memory peaks by phase as the trackers' scalars, in MiB."""
    return {f"peak_memory_mib/{phase.replace(' ', '_')}": peak / 2**20 for phase, peak in peaks.items()}


def resident_bytes(field: str) -> int:
    """The process's resident set now (VmRSS) or its high-water mark (VmHWM), from Linux's /proc/self/status."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith(field)).split()[1]) * 1024
