"""What a run sets up before its loop: the data planned and cached (latents, captions, CREPA features, the held-out
eval clips), and the transformer assembled for training. data.py runs no model; the encoders run here.

    prepare_data(cfg, d, device, output_dir) -> Prepared   samples, eval clips, buckets, prompt embeddings, the VAE
    load_model(cfg, device)                                the transformer, quantized, with adapters, on the device
    prepare_model(transformer, cfg, device)                the same for a transformer already loaded (bench.py)
"""

import os
import random
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

import config
import crepa
import data
import demo
import lora
import model as ltx
import offload
import optim
import quant
import ranks
import track


def prepare_demo(cfg: config.Config) -> None:
    """The tiny random LTX pipeline and the synthetic clips, each made once at its configured path."""
    model_dir = Path(cfg.pretrained_model_name_or_path)
    folder = Path(config.dataset_entries(cfg, log=lambda message: None)[0][0].instance_data_dir)  # the first dataset's
    demo.prepare(model_dir, folder, cfg.seed)


def source_id(name_or_path: str) -> str:
    """A stable name for a model: the absolute path of a local folder, or the hub id."""
    return str(Path(name_or_path).resolve()) if os.path.isdir(name_or_path) else name_or_path


class Prepared(NamedTuple):
    samples: list[data.Sample]  # every usable sample that trains
    eval_clips: list[data.Sample]  # the ones held out for the eval loss (hold_out)
    buckets: list[data.Bucket]
    datasets: dict[str, data.Dataset]  # by id
    texts: dict[str, dict[str, torch.Tensor]]  # embeddings of "" and the validation prompts
    vae: torch.nn.Module | None  # kept (on the CPU) on rank 0 when there is something to validate
    rope_scale: tuple[float, float, float]


def prepare_data(cfg: config.Config, d: ranks.Dist, device: torch.device, output_dir: Path,
                 peaks: dict[str, int] | None = None) -> Prepared:
    """Plans every dataset's samples and caches their latents and captions, with the VAE and T5 loaded only
    for that and freed afterwards.

    Rank 0 plans (it alone moves bad files to quarantine) and hands the plan to the others; each rank then
    caches its share and all wait for each other. T5-XXL (9.8 GB in bf16) loads only if some caption or prompt
    needs encoding, so a rerun over a full cache skips it. One frozen model at a time is on the accelerator: T5
    (text_encoder_precision) while the prompts and captions are cached, then the VAE (tiled with
    vae_enable_tiling) while the clips are; the transformer loads after both. With validation prompts, rank 0 keeps
    the VAE, on the CPU until a validation decodes.
    """
    peaks = {} if peaks is None else peaks  # each phase's memory peak is recorded here (record_peak)
    datasets, text_entry = config.dataset_entries(cfg, log=print if d.rank == 0 else lambda message: None)
    by_id = {ds.id: ds for ds in datasets}
    report = data.Report(output_dir / "data_report.json", quarantine=cfg.delete_problematic_images,
                         echo=d.rank == 0)
    samples = plan(cfg, d, datasets, report)

    dtype = config.DTYPES[cfg.base_model_default_dtype]
    vae_source = cfg.pretrained_vae_model_name_or_path or cfg.pretrained_model_name_or_path
    vae = ltx.load_vae(vae_source, None if cfg.pretrained_vae_model_name_or_path else "vae", dtype)  # on the CPU
    if cfg.vae_enable_tiling:
        vae.enable_tiling()
    text, too_long = {}, {}  # too_long: caption -> its tokens, for captions T5's 128 tokens cut short

    def encode_text(prompts: list[str]):
        vae.to("cpu")  # one of the two on the accelerator at a time
        if not text:
            text["tokenizer"], text["encoder"] = ltx.load_text_encoder(cfg.pretrained_model_name_or_path, dtype)
            if cfg.quantize_via == "accelerator":
                text["encoder"].to(device)
            quant.quantize(text["encoder"], cfg.text_encoder_precision, quant.encoder_linears(text["encoder"]))
        text["encoder"].to(device)
        lengths = ltx.prompt_lengths(text["tokenizer"], prompts)
        too_long.update((p, n) for p, n in zip(prompts, lengths) if n > ltx.TEXT_TOKENS)
        return ltx.encode_prompts(text["tokenizer"], text["encoder"], prompts)

    def encode_video(video: torch.Tensor) -> torch.Tensor:
        if "text caching" not in peaks:
            track.record_peak(peaks, "text caching", device)
        if text:  # one of the two on the accelerator at a time
            text["encoder"].to("cpu")
        vae.to(device)
        return ltx.encode_video(vae, video)

    shape = data.CacheShape(*ltx.vae_ratios(vae), vae.config.latent_channels, ltx.TEXT_TOKENS,
                            ltx.text_dim(cfg.pretrained_model_name_or_path))  # what the encoders make of a clip
    vae_encoder = {"model": source_id(vae_source), "dtype": cfg.base_model_default_dtype,
                   "tiling": cfg.vae_enable_tiling}
    text_encoder = {"model": source_id(cfg.pretrained_model_name_or_path), "dtype": cfg.base_model_default_dtype,
                    "precision": cfg.text_encoder_precision, "tokens": ltx.TEXT_TOKENS}
    text_dir = Path(text_entry.cache_dir) if text_entry and text_entry.cache_dir else None
    data.cache_samples(samples, by_id, encode_video, encode_text, vae=vae_encoder, text=text_encoder,
                       text_dir=text_dir, compress=cfg.compress_disk_cache, vae_batch_size=cfg.vae_batch_size,
                       text_batch_size=(text_entry or data.Dataset()).write_batch_size, report=report,
                       shape=shape, rank=d.rank, world_size=d.world_size)
    prompts = config.validation_prompts(cfg)
    extra = [""] + ([p for _, p in prompts] + [cfg.validation_negative_prompt] if prompts else [])
    texts = data.cached_text(extra, encode_text, text_dir or data.latent_cache_dir(datasets[0]), text_encoder)
    del text  # T5 is done: every caption and prompt is cached
    track.record_peak(peaks, "latent caching" if "text caching" in peaks else "caching", device)  # no clip to encode
    rope_scale = ltx.rope_scale(vae)
    vae = vae.to("cpu") if prompts and d.rank == 0 else None  # kept off the GPU until a validation needs it
    if device.type == "cuda":
        torch.cuda.empty_cache()
    d.barrier()  # every rank's share is on disk
    if cfg.crepa_enabled:
        cache_crepa_features(data.cached(samples), by_id, cfg, d, device, report, shape)
        track.record_peak(peaks, "feature caching", device)
    gather_findings(d, report, too_long, samples, datasets)
    if d.rank == 0:
        stop_if_mostly_skipped(report)
        report.move_broken(by_id)  # only files broken in themselves, and only with delete_problematic_images
    samples, eval_clips = hold_out(data.cached(samples), cfg)
    buckets = data.make_buckets(samples, by_id, cfg.train_batch_size * d.world_size, not cfg.disable_bucket_pruning,
                                report)
    check_datasets(cfg, d, datasets, samples, eval_clips, buckets, report)
    return Prepared(samples, eval_clips, buckets, by_id, texts, vae, rope_scale)


def plan(cfg: config.Config, d: ranks.Dist, datasets: list[data.Dataset], report: data.Report) -> list[data.Sample]:
    """Every dataset's samples, planned by rank 0 (it alone may move bad files) and handed to the others."""
    planned = [None]
    if d.rank == 0:  # (an error on rank 0 ends the other ranks too: torchrun stops the job)
        planned = [[s for ds in datasets for s in data.plan_samples(ds, cfg.aspect_bucket_rounding, cfg.seed, report)]]
        stop_if_mostly_skipped(report)  # a settings mistake stops here, before any caching
    if d.world_size > 1:
        dist.broadcast_object_list(planned, src=0)
    return planned[0]


def gather_findings(d: ranks.Dist, report: data.Report, too_long: dict[str, int], samples: list[data.Sample],
                    datasets: list[data.Dataset]) -> None:
    """The decode failures and long captions each rank found in its share, in rank 0's report; a note per dataset
    whose captions T5 cut short (said once: by the run that encodes them)."""
    if d.world_size > 1:
        found = [None] * d.world_size
        dist.all_gather_object(found, (report.problems, too_long))
        report.problems = [p for problems, _ in found for p in problems]
        too_long = {caption: n for _, theirs in found for caption, n in theirs.items()}
    for ds in datasets:
        cut = {s.path.name: too_long[s.caption] for s in samples if s.dataset == ds.id and s.caption in too_long}
        if cut:
            longest = max(cut, key=cut.get)
            report.note(f"dataset '{ds.id}': {len(cut)} caption(s) are longer than T5's {ltx.TEXT_TOKENS} tokens and "
                        f"were cut to {ltx.TEXT_TOKENS} (the longest: {longest}'s, {cut[longest]} tokens)")


def check_datasets(cfg: config.Config, d: ranks.Dist, datasets: list[data.Dataset], samples: list[data.Sample],
                   eval_clips: list[data.Sample], buckets: list[data.Bucket], report: data.Report) -> None:
    """Says what each dataset brings (rank 0, with the report written), and stops when one cannot fill an
    optimizer step on its own or every bucket was pruned."""
    if d.rank == 0:
        for ds in datasets:
            held = sum(s.dataset == ds.id for s in eval_clips)
            if held:
                print(f"dataset '{ds.id}': {held} clip(s) held out for the eval loss, never trained on")
            if ds.id == cfg.eval_dataset_id:
                continue
            mine = [b for b in buckets if b.dataset == ds.id]
            skipped = sum(p["dataset"] == ds.id for p in report.problems)
            print(f"dataset '{ds.id}': {sum(len(b.samples) for b in mine)} samples in {len(mine)} bucket(s) "
                  f"({', '.join(f'{b.name}: {len(b.samples)}' for b in mine)}), "
                  f"{skipped} file(s) skipped")
        report.write()
    for ds in datasets:  # every dataset must fill one optimizer step on its own (none is empty: see Report)
        if ds.id == cfg.eval_dataset_id:
            continue
        usable = sum(s.dataset == ds.id for s in samples)
        needed = cfg.train_batch_size * d.world_size * cfg.gradient_accumulation_steps
        if usable * (1 + ds.repeats) < needed:
            raise SystemExit(f"no samples detected in dataset {ds.id}: {usable} usable clips < batch x accumulation "
                             f"{'x processes ' if d.world_size > 1 else ''}= {needed}; raise repeats or lower the "
                             f"batch (skipped files: {report.path})")
    if not buckets:
        raise SystemExit(f"every bucket holds fewer clips than one batch of {cfg.train_batch_size * d.world_size} "
                         f"and was pruned; lower train_batch_size or set disable_bucket_pruning = true")


def cache_crepa_features(samples: list[data.Sample], datasets: dict[str, data.Dataset], cfg: config.Config,
                         d: ranks.Dist, device: torch.device, report: data.Report, shape: data.CacheShape) -> None:
    """CREPA's DINOv2 features of the clean frames, cached beside the latents (data.cache_features): DINOv2 loads
    only when some clip's features are missing, alone on the accelerator (T5 is gone and the VAE on the CPU by
    then), and is freed before the transformer loads; training reads the features from disk."""
    encoder = {}
    spatial, temporal = shape.spatial, shape.temporal

    def encode_frames(video: torch.Tensor) -> torch.Tensor:
        if not encoder:
            encoder["dinov2"] = crepa.load_encoder(cfg.crepa_model, device, config.DTYPES[cfg.base_model_default_dtype])
        frames, height, width = video.shape[2:]
        grid = ((frames - 1) // temporal + 1, height // spatial, width // spatial)
        return crepa.frame_features(encoder["dinov2"], video, cfg.crepa_encoder_image_size, grid, temporal)

    settings = crepa.feature_encoder(cfg.crepa_model, cfg.crepa_encoder_image_size, cfg.base_model_default_dtype)
    data.cache_features(samples, datasets, encode_frames, settings, cfg.vae_batch_size, report, cfg.compress_disk_cache,
                        d.rank, d.world_size, shape, crepa.feature_dim(cfg.crepa_model))
    encoder.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    d.barrier()  # every rank's features are on disk


def stop_if_mostly_skipped(report: data.Report) -> None:
    """More than half of a dataset unusable looks like wrong settings: stop with the report written, nothing moved."""
    try:
        report.check_mostly_usable()
    except data.DataError:
        report.write()
        raise


def load_model(cfg: config.Config, device: torch.device, log=print):
    """The transformer as training uses it: loaded in base_model_default_dtype, then prepare_model."""
    transformer = ltx.load_transformer(*config.transformer_source(cfg), config.DTYPES[cfg.base_model_default_dtype])
    if cfg.enable_group_offload and device.type != "cuda":
        log(f"group offload on the {device.type}: group_offload_use_stream is ignored (CUDA streams only)"
            + ("" if cfg.group_offload_to_disk_path else "; without group_offload_to_disk_path nothing moves"))
    return prepare_model(transformer, cfg, device)


class Trainables(NamedTuple):
    lora_params: list[torch.nn.Parameter]
    alignment: crepa.Alignment | None  # CREPA's hook and projection head, with crepa_enabled
    params: list[torch.nn.Parameter]  # what the optimizer steps: the LoRA's, and CREPA's head's
    optimizer: torch.optim.Optimizer
    ema: optim.EMA | None  # with use_ema


def trainables(cfg: config.Config, transformer, device: torch.device) -> Trainables:
    """What trains over the loaded transformer: its adapters, CREPA's head, their optimizer, the LoRA's EMA."""
    lora_params = lora.lora_parameters(transformer)
    alignment = crepa.Alignment(transformer, cfg, crepa.feature_dim(cfg.crepa_model), device, lora_params[0].dtype) \
        if cfg.crepa_enabled else None
    params = lora_params + (list(alignment.head.parameters()) if alignment else [])
    ema = optim.EMA(lora_params, cfg.ema_decay, device if cfg.ema_device == "accelerator" else torch.device("cpu")) \
        if cfg.use_ema else None
    return Trainables(lora_params, alignment, params, optim.make_optimizer(params, cfg), ema)


def prepare_model(transformer: ltx.LTXTransformer, cfg: config.Config, device: torch.device):
    """A loaded transformer made ready to train, in one fixed order (bench.py builds its rows with it too):
        quantize the block linears (quant.py) -> inject LoRA (lora.py) -> device,
        the blocks' frozen weights offloaded instead with enable_group_offload (offload.py)
    With quantize_via = "cpu" the weights are quantized before they move, so the full-precision model never sits
    on the accelerator whole; "accelerator" moves it first (faster quantization, the full model's memory once)."""
    if cfg.quantize_via == "accelerator":
        transformer.to(device)
    quant.quantize(transformer, cfg.base_model_precision, quant.block_linears(transformer))
    adapter_dtype = optim.OPTIMIZERS[cfg.optimizer].adapter_dtype
    if cfg.lora_type == "lycoris":  # LoKr in the linears LyCORIS' preset names (lora_rank / alpha / targets unused)
        lora.inject_lokr(transformer, lora.read_lycoris_config(cfg.lycoris_config), adapter_dtype)
    else:
        lora.inject(transformer, cfg.lora_target_modules, cfg.lora_rank, config.lora_alpha(cfg),
                    cfg.lora_dropout, dtype=adapter_dtype)
    ltx.set_attention(transformer, cfg.attention_mechanism)
    transformer.gradient_checkpointing = cfg.gradient_checkpointing
    transformer.checkpointing_interval = cfg.gradient_checkpointing_interval
    if cfg.compile:
        ltx.compile_blocks(transformer)
    if cfg.enable_group_offload:  # the rest moves to the device; the blocks' frozen weights visit it (offload.py)
        folder = cfg.group_offload_to_disk_path and offload.make_folder(cfg.group_offload_to_disk_path)
        offload.offload_blocks(transformer, device, cfg.group_offload_blocks_per_group, cfg.group_offload_use_stream,
                               folder)
        return transformer.train()
    return transformer.to(device).train()


class DataOrder:
    """The run's global batches, a pure function of (seed, micro-batch k): epoch e is data.epoch_plan(seed, e),
    computed when the run reaches it (only the current epoch is kept)."""

    def __init__(self, buckets: list[data.Bucket], datasets: dict[str, data.Dataset], global_batch: int, seed: int):
        self.buckets, self.datasets, self.global_batch, self.seed = buckets, datasets, global_batch, seed
        self.plans: dict[int, list[list[int]]] = {}
        self.batches_per_epoch = len(self.epoch(0))

    def epoch(self, e: int) -> list[list[int]]:
        if e not in self.plans:
            self.plans = {e: data.epoch_plan(self.buckets, self.datasets, self.global_batch, self.seed, e)}
        return self.plans[e]

    def total_steps(self, cfg: config.Config, resume: Path | None = None, meta: dict | None = None) -> int:
        """max_train_steps, or num_train_epochs of these batches; a checkpoint past them is refused."""
        total = cfg.max_train_steps or max(1, cfg.num_train_epochs * self.batches_per_epoch //
                                           cfg.gradient_accumulation_steps)
        if meta and meta["step"] > total:
            raise SystemExit(f"cannot resume from {resume}: it is at step {meta['step']}, past the {total} steps "
                             f"of num_train_epochs = {cfg.num_train_epochs}; raise num_train_epochs or max_train_steps")
        return total

    def cursor(self, k: int) -> tuple[int, int]:
        """(epoch, batch in the epoch) of micro-batch k."""
        return divmod(k, self.batches_per_epoch)


def micro_batch(order: DataOrder, k: int, samples: list[data.Sample], rank: int, batch_size: int,
                device: torch.device) -> tuple[dict[str, torch.Tensor], str]:
    """This rank's slice of the k-th global batch of the run, on the device (its i2v flags stay on the CPU),
    and its bucket as WxH@F."""
    epoch, position = order.cursor(k)
    chosen = [samples[i] for i in order.epoch(epoch)[position][rank * batch_size:(rank + 1) * batch_size]]
    batch = data.load_batch(chosen)
    bucket = data.shape_name(chosen[0].width, chosen[0].height, chosen[0].frames)
    return {key: value if key == "i2v" else value.to(device, non_blocking=True) for key, value in batch.items()}, bucket


def hold_out(samples: list[data.Sample], cfg: config.Config) -> tuple[list[data.Sample], list[data.Sample]]:
    """(training samples, eval samples): the whole eval_dataset_id dataset, or eval_fraction of each dataset's
    files (at least one) by a seeded shuffle of their paths, so the same files on every rank and after a resume.
    Every sample of a held-out file is held out: no window of an eval clip is ever trained on."""
    if cfg.eval_dataset_id:
        held = {s.path for s in samples if s.dataset == cfg.eval_dataset_id}
    elif cfg.eval_fraction:
        held = set()
        for ds in sorted({s.dataset for s in samples}):
            files = sorted({s.path for s in samples if s.dataset == ds})
            random.Random(f"{cfg.seed}/eval/{ds}").shuffle(files)
            held |= set(files[:max(1, round(cfg.eval_fraction * len(files)))])
            if len(held & set(files)) == len(files):
                raise SystemExit(f"eval_fraction = {cfg.eval_fraction} holds out every file of dataset '{ds}' "
                                 f"({len(files)} file(s)), leaving nothing to train on; lower it or use "
                                 f"eval_dataset_id")
    else:
        return samples, []
    return [s for s in samples if s.path not in held], [s for s in samples if s.path in held]
