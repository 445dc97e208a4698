"""Checkpoints: output_dir/checkpoints/step-N/{lora.safetensors, training_state.pt, meta.json, rng-R.pt,
manifest.json}, written whole or not at all, checked against their manifest on resume.

    save_checkpoint(...)            every rank's RNG, then rank 0's adapters, optimizer, EMA, CREPA head, meta, manifest
    resume_point(cfg, d, dir)       the checkpoint to resume (find_resume_folder: the named one, or the newest
                                    complete one with "latest") and its meta.json, checked by check_resume
    resume(...)                     restores it (load_checkpoint) and keeps log.jsonl up to its step
    check_resume(folder, cfg)       refuses another base model or other adapters, before anything is cached
    load_checkpoint(...)            restores what save_checkpoint wrote; returns the step to continue from
    save_after_failure(...)         an error mid-run: the last whole step saved before the traceback
    refuse_unfinished, save_final   a run is done only with finite weights and its last step taken; then the LoRA
    seed_all, rng_state             the generators seeded at start, and each rank's saved with a checkpoint
"""

import dataclasses
import json
import os
import pickle
import random
import shutil
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import config
import hub
import lora
import optim
import outputs
import prepare
import ranks
import track


def seed_all(seed: int) -> None:
    """torch's, Python's and NumPy's generators seeded alike (on every rank: the LoRA starts identical)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, transformer, optimizer, cfg: config.Config, info: dict, d: ranks.Dist,
                    ema: "optim.EMA | None" = None, alignment=None) -> Path:
    """Every rank adds its RNG state; rank 0 writes the rest, fsyncs, writes manifest.json (each file's size and
    hash) last, and renames step-N.tmp to step-N: a kill at any moment leaves either the complete new checkpoint
    or none, and the older ones untouched; damage done later is caught by the manifest on resume."""
    final = output_dir / "checkpoints" / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if d.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    torch.save(rng_state(), tmp / f"rng-{d.rank}.pt")
    if d.rank == 0:
        lora.save_lora(transformer, tmp / "lora.safetensors", info, cfg.lora_format)  # for the user to try
        state = {"adapters": lora.adapter_state(transformer), "optimizer": optimizer.state_dict()}
        if ema:
            state["ema"] = ema.shadow
            with ema.applied(lora.lora_parameters(transformer)):
                lora.save_lora(transformer, tmp / "lora_ema.safetensors", info, cfg.lora_format)
        if alignment:
            state["crepa_head"] = alignment.head.state_dict()
        torch.save(state, tmp / "training_state.pt")  # exactly as trained: what resume reads
        meta = {"step": step, "world_size": d.world_size, **info, "adapter": adapter_definition(cfg),
                "config": dataclasses.asdict(cfg)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    d.barrier()
    if d.rank == 0:
        files = sorted(tmp.iterdir())
        manifest = {f.name: {"bytes": f.stat().st_size, "sha256": outputs.sha256(f)} for f in files}
        (tmp / "manifest.json").write_text(json.dumps({"files": manifest}, indent=2))
        for f in [*files, tmp / "manifest.json"]:  # on disk before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if cfg.checkpoints_total_limit:  # old ones go only once the new one is complete
            for old in outputs.list_checkpoints(output_dir)[:-cfg.checkpoints_total_limit]:
                shutil.rmtree(old)
        if cfg.push_checkpoints_to_hub:
            hub.push_files({f"checkpoints/{final.name}/{f.name}": f for f in sorted(final.glob("lora*.safetensors"))},
                       cfg, output_dir, f"ltx-lora: checkpoint {final.name}")
    d.barrier()
    return final


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, naming the file; None when every file its manifest lists is
    there, whole and unchanged."""
    try:
        manifest = json.loads((folder / "manifest.json").read_bytes())
    except FileNotFoundError:
        return f"{folder / 'manifest.json'} is missing, so the checkpoint was never completed"
    except ValueError:  # not JSON
        manifest = None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(f, dict) and isinstance(f.get("bytes"), int)
                                              and isinstance(f.get("sha256"), str) for f in files.values()):
        return f"{folder / 'manifest.json'} is damaged"
    for name, f in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != f["bytes"] or outputs.sha256(path) != f["sha256"]:
            return f"{path} is damaged (it differs from what manifest.json recorded when it was saved)"
    return None


def find_resume_folder(cfg: config.Config, output_dir: Path, log=print) -> Path | None:
    """The checkpoint to resume from: the named one, or with "latest" the newest complete one (damaged ones
    are skipped with a line each); None for a fresh start."""
    if cfg.resume_from_checkpoint == "latest":
        found = outputs.list_checkpoints(output_dir)
        for folder in reversed(found):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder
            log(f"skipping checkpoint {folder.name}: {problem}")
        if found:
            raise SystemExit(f"no checkpoint in {output_dir / 'checkpoints'} is complete (see above), so there is "
                             f"nothing to resume; start over in another output_dir or with {outputs.START_OVER}")
        return None  # nothing saved yet: a fresh start, as other trainers do
    if not cfg.resume_from_checkpoint:
        return None
    folder = Path(cfg.resume_from_checkpoint)
    problem = checkpoint_problem(folder)
    if problem:
        raise SystemExit(f"cannot resume from {folder}: {problem}")
    step = int(folder.name[5:]) if folder.name[5:].isdigit() else None  # a copy may be named anything
    newer = [p.name for p in outputs.list_checkpoints(output_dir) if step is not None and int(p.name[5:]) > step
             and p.resolve().parent == folder.resolve().parent]
    if newer:  # they belong to the run that went on from here; pruning and "latest" would mix the two
        raise SystemExit(f"cannot resume from {folder}: {output_dir} also holds the later checkpoints "
                         f"{', '.join(newer)} of the run that went on from it; resume from latest, or resume into "
                         f"another output_dir (--output_dir=...)")
    return folder


# A checkpoint means nothing to a run with another base model or other adapters; anything else may change.
MUST_MATCH = ("pretrained_model_name_or_path", "pretrained_transformer_model_name_or_path",
              "pretrained_transformer_subfolder")


def adapter_definition(cfg: config.Config) -> dict:
    """Everything that shapes or scales the adapters (meta.json keeps it): LoRA's rank, alpha and targets, or the
    LoKr its lycoris_config describes (the file's contents, not its name: an edited file is another adapter)."""
    if cfg.lora_type == "lycoris":
        spec = dataclasses.asdict(lora.read_lycoris_config(cfg.lycoris_config))
        named = {"dim": "linear_dim", "alpha": "linear_alpha", "targets": "target_module"}  # as the JSON names them
        found = {"lora_type": "lycoris", **{named.get(k, k): v for k, v in spec.items()}}
    else:
        found = {"lora_type": "standard", "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
                 "lora_target_modules": cfg.lora_target_modules}
    return json.loads(json.dumps(found))  # as meta.json gives it back (tuples are lists there)


def saved_adapter_definition(meta: dict) -> dict:
    """A checkpoint's adapter definition; one written before meta.json kept it has its config keys instead."""
    if "adapter" in meta:
        return meta["adapter"]
    saved = meta["config"]
    if saved.get("lora_type", "standard") == "lycoris":
        return {"lora_type": "lycoris", "lycoris_config": saved.get("lycoris_config")}
    return {"lora_type": "standard", **{k: saved.get(k) for k in ("lora_rank", "lora_alpha", "lora_target_modules")}}


def check_resume(folder: Path, cfg: config.Config, log=print) -> dict:
    """The checkpoint's meta.json, once it is known to fit this run: refusals come before anything is cached."""
    meta = json.loads((folder / "meta.json").read_text())
    saved, now = meta["config"], dataclasses.asdict(cfg)
    for key in MUST_MATCH:
        if saved.get(key) != now[key]:
            raise SystemExit(f"cannot resume from {folder}: it was trained with {key} = {saved.get(key)!r}, this run "
                             f"has {now[key]!r}; use the same value or start a new output_dir")
    then, adapter = saved_adapter_definition(meta), adapter_definition(cfg)
    if "adapter" not in meta and then["lora_type"] == "lycoris":  # an old LoKr checkpoint: its file's name is known
        adapter = {"lora_type": "lycoris", "lycoris_config": cfg.lycoris_config}
    keys = ["lora_type"] if then["lora_type"] != adapter["lora_type"] else dict.fromkeys([*then, *adapter])
    differ = [f"{k} {then.get(k)!r} -> {adapter.get(k)!r}" for k in keys if then.get(k) != adapter.get(k)]
    if differ:
        raise SystemExit(f"cannot resume from {folder}: its adapters were defined otherwise ({'; '.join(differ)}); "
                         f"resume with the settings it was trained with (lora_type, lora_rank / lora_alpha / "
                         f"lora_target_modules, or the same lycoris_config contents), or start a new output_dir")
    if cfg.max_train_steps and meta["step"] > cfg.max_train_steps:
        raise SystemExit(f"cannot resume from {folder}: it is at step {meta['step']}, past max_train_steps = "
                         f"{cfg.max_train_steps}; raise max_train_steps or resume from an earlier checkpoint")
    changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]
               and k not in ("resume_from_checkpoint", "overwrite_output_dir")]
    if changed:
        log(f"resuming with changed settings: {'; '.join(changed)}")
    return meta


def load_checkpoint(folder: Path, meta: dict, transformer, optimizer, cfg: config.Config, d: ranks.Dist, log=print,
                    ema: "optim.EMA | None" = None, alignment=None) -> int:
    """Restores adapters, optimizer, EMA, CREPA head and this rank's RNG; returns the step to continue from.
    Only safetensors, JSON and weights_only tensors are read: loading never runs code from a file."""
    state = load_tensors(folder / "training_state.pt")
    if "adapters" not in state:  # an older checkpoint's adapters are exactly its lora.safetensors
        state["adapters"] = {f"{name}.lora_{ab}.weight": t for name, (a, b, _) in
                             lora.read_lora_file(folder / "lora.safetensors").items() for ab, t in zip("AB", (a, b))}
    lora.load_adapter_state(transformer, state["adapters"])
    saved = meta["config"]
    head = alignment and "crepa_head" in state and fits(alignment.head.state_dict(), state["crepa_head"])
    if alignment and "crepa_head" in state and not head:  # crepa_model of another width: the head cannot continue
        log(f"the checkpoint's CREPA projection head was trained for crepa_model = {saved.get('crepa_model')!r} of "
            f"another width; a fresh head starts training, and the optimizer starts with fresh state")
    elif (saved.get("optimizer", "adamw"), saved.get("crepa_enabled", False)) == (cfg.optimizer, cfg.crepa_enabled):
        optimizer.load_state_dict(state["optimizer"])
    elif saved.get("optimizer", "adamw") != cfg.optimizer:  # another rule's state means nothing to this one
        log(f"the checkpoint was trained with optimizer = {saved.get('optimizer', 'adamw')}; the LoRA continues from "
            f"it, and {cfg.optimizer} starts with fresh state")
    else:  # the CREPA head's weights come or go: the optimizer's tensors no longer line up
        log(f"the checkpoint was trained with crepa_enabled = {saved.get('crepa_enabled', False)}; the LoRA continues "
            f"from it, and the optimizer starts with fresh state")
    if ema and "ema" in state:
        ema.shadow = [t.to(ema.shadow[0].device) for t in state["ema"]]
    elif ema:
        ema.shadow = optim.EMA(lora.lora_parameters(transformer), ema.decay, ema.shadow[0].device).shadow
        log("the checkpoint has no EMA (use_ema was off): the average starts from its LoRA")
    if head:
        alignment.head.load_state_dict(state["crepa_head"])
    elif alignment and "crepa_head" not in state:
        log("the checkpoint has no CREPA projection head (crepa_enabled was off): a fresh one starts training")
    saved_world = meta.get("world_size", 1)
    rng_file = folder / f"rng-{d.rank}.pt"
    if saved_world == d.world_size or rng_file.exists():  # same world size: the manifest made sure it is there
        set_rng_state(load_tensors(rng_file))
    if saved_world != d.world_size:
        log(f"resuming a {saved_world}-process run on {d.world_size} processes: global batches change size, so the "
            f"data order is not the one the first run would have seen")
    return meta["step"]


def fits(model_state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> bool:
    """Whether saved tensors have exactly the names and shapes of a module's state."""
    return model_state.keys() == saved.keys() and all(model_state[k].shape == saved[k].shape for k in saved)


def load_tensors(path: Path):
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:  # weights_only met an object it will not build
        raise SystemExit(f"{path} holds more than tensors (a pickled object, which could run code when loaded); "
                         f"it was not loaded. Resume from a checkpoint this trainer wrote")


def checkpoint_info(step: int, order: prepare.DataOrder, cfg: config.Config) -> dict:
    """What meta.json (and the LoRA file's metadata) records besides the step and config: where the data continues,
    the base model and the precision its weights were trained in."""
    epoch, position = order.cursor(step * cfg.gradient_accumulation_steps)
    return {"data_cursor": {"epoch": epoch, "batch": position}, "base_model": cfg.pretrained_model_name_or_path,
            "base_model_precision": cfg.base_model_default_dtype if cfg.base_model_precision == "no_change"
            else cfg.base_model_precision}


def save_after_failure(output_dir: Path, step: int | None, transformer, optimizer, cfg: config.Config,
                       order: prepare.DataOrder, d: ranks.Dist, ema: "optim.EMA | None", alignment, log=print) -> None:
    """An error after training began: the adapters of the last whole step, saved as checkpoints/step-N (resumable)
    before the traceback, so no trained step is lost. Not under torchrun (the other ranks may be waiting in a
    collective that never comes), not of NaN weights, not in the middle of an update, and not twice."""
    saved = outputs.list_checkpoints(output_dir)
    if step is None or d.world_size > 1 or step == 0 or (saved and int(saved[-1].name[5:]) >= step) \
            or not all_finite(lora.lora_parameters(transformer)):
        return
    try:
        folder = save_checkpoint(output_dir, step, transformer, optimizer, cfg, checkpoint_info(step, order, cfg), d,
                                 ema, alignment)
    except Exception:  # the first error is raised next; this one (maybe a bug of ours) shows its traceback here
        log(f"\nthe run failed after step {step}, and saving its checkpoint failed too:")
        traceback.print_exc()
        return
    log(f"\nthe run failed after step {step} (the traceback follows); the LoRA and training state of step {step} "
        f"are saved in {folder} (lora.safetensors there is the LoRA so far): fix the cause, then continue with "
        f"--resume_from_checkpoint=latest")


def all_finite(tensors: list[torch.Tensor]) -> bool:
    return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all())


def save_final(transformer, output_dir: Path, info: dict, cfg: config.Config, ema: "optim.EMA | None",
               lora_params: list) -> None:
    """output_dir/lora.safetensors and, with use_ema, lora_ema.safetensors beside it (an EMA left by an earlier part
    of this run without use_ema no longer fits the LoRA: it is removed), recorded as this run's outputs."""
    lora.save_lora(transformer, output_dir / "lora.safetensors", info, cfg.lora_format)
    if ema:
        with ema.applied(lora_params):
            lora.save_lora(transformer, output_dir / "lora_ema.safetensors", info, cfg.lora_format)
    elif (output_dir / "lora_ema.safetensors").exists():
        (output_dir / "lora_ema.safetensors").unlink()
        print("removed lora_ema.safetensors, the EMA of an earlier part of this run (use_ema is off now)")
    outputs.own(output_dir, "lora.safetensors", *(["lora_ema.safetensors"] if ema else []))


def resume(folder: Path | None, meta: dict | None, transformer, optimizer, cfg: config.Config, d: ranks.Dist,
           output_dir: Path, log=print, ema: "optim.EMA | None" = None, alignment=None) -> int:
    """The step a run starts from: 0, or the checkpoint's (load_checkpoint); log.jsonl kept up to it (the lines of
    the run whose checkpoint it is, when that run lived in another folder)."""
    start_step = 0
    if folder is not None:
        start_step = load_checkpoint(folder, meta, transformer, optimizer, cfg, d, log, ema, alignment)
        log(f"resumed from {folder} at step {start_step}")
    if d.rank == 0:  # a checkpoint of another folder's run (claim_output_dir made sure this one holds none): its log
        elsewhere = folder is not None and folder.resolve().parent != (output_dir / "checkpoints").resolve()
        track.truncate_log(output_dir / "log.jsonl", start_step,
                           source=folder.parent.parent / "log.jsonl" if elsewhere else None)
    return start_step


def resume_point(cfg: config.Config, d: ranks.Dist, output_dir: Path, log=print) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from (rank 0 checks the files and tells the others) and its meta.json, once
    check_resume knows it fits this run; (None, None) for a fresh start."""
    folder = [find_resume_folder(cfg, output_dir) if d.rank == 0 else None]
    if d.world_size > 1:
        dist.broadcast_object_list(folder, src=0)
    return folder[0], check_resume(folder[0], cfg, log=log) if folder[0] else None


def refuse_unfinished(params: list, skipped: int, step: int, output_dir: Path) -> None:
    """A run is done only when its weights are finite (a finite loss can still take a step to NaN weights: an
    absurd learning rate) and its last step was taken (not skipped as NaN / inf): otherwise no LoRA is written."""
    if not all_finite(params):
        raise SystemExit(f"the LoRA holds NaN or inf values after step {step}, so it was not written; lower "
                         f"learning_rate or set max_grad_norm. The last checkpoint is "
                         f"{outputs.last_checkpoint(output_dir)}.")
    if skipped:
        raise SystemExit(f"the last {skipped} step(s) had a NaN or inf loss or gradient and were skipped, so the "
                         f"run did not finish cleanly and the LoRA was not written; lower learning_rate, set "
                         f"max_grad_norm, or check flow_schedule_shift and the data. The last checkpoint is "
                         f"{outputs.last_checkpoint(output_dir)}.")
