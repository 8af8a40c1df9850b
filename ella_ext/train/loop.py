"""The training loop: accelerate (DDP over the TSC only), the loss, the optimiser, checkpoints, resume, metrics,
samples.

Determinism: every random draw of a sample (caption dropout, timestep, noise) comes from a generator seeded by
(seed, micro-batch number, position in the global batch), and the data order from (seed, epoch). So a run resumed at
step N continues exactly as the straight run would (no RNG state needs restoring), and two processes see exactly the
samples one process sees with the same global batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..connector import Connector
from ..connector_file import (
    META_BASE_FAMILY,
    META_FEATURE_DTYPE,
    META_LLM,
    META_LLM_LAYER,
    META_MAX_LENGTH,
    META_STEPS,
    META_TOKEN_LENGTH,
    save_connector,
)
from ..errors import ELLAError
from .config import Config, ConfigError
from .data import (
    DataError,
    ListedPlan,
    Skipped,
    list_sources,
    make_buckets,
    pick_bucket,
    prepare_image,
    sample_seed,
    stream_batches,
)

log = logging.getLogger("ella")
CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "complete"


class TrainingStopped(ELLAError):
    """Training stopped early (a non-finite loss): the message says where the last good checkpoint is."""


@dataclass
class Result:
    step: int
    interrupted: bool
    connector: Path | None
    checkpoint: Path | None


@dataclass
class TrainState:
    """What a checkpoint holds beside the TSC and the optimiser (registered with accelerate)."""

    step: int = 0
    images: int = 0
    ema: list[torch.Tensor] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"step": self.step, "images": self.images, "ema": [t.clone() for t in self.ema]}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.images = int(state["step"]), int(state["images"])
        for mine, saved in zip(self.ema, state["ema"]):
            mine.copy_(saved)


# -- setup --------------------------------------------------------------------------------------------------------


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(config: Config | None, trackers: bool = False):
    """An Accelerator that really joins a distributed launch, GPUs or not.

    Under torchrun on a machine without CUDA, a default ``Accelerator()`` does not initialise the process group and
    every process trains alone: pass ``cpu=True`` there, which makes accelerate join the processes over gloo."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    mixed = config.train["mixed_precision"] if config else "no"
    cpu = launched_distributed() and not torch.cuda.is_available()
    if mixed == "fp16" and not torch.cuda.is_available():
        raise ConfigError("[train] mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on this machine.")
    kwargs = {}
    if trackers and config is not None:
        kwargs["log_with"] = "tensorboard"
        kwargs["project_config"] = ProjectConfiguration(project_dir=str(config.output),
                                                        logging_dir=str(config.output / "logs"))
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed, **kwargs)
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise ELLAError(f"The launcher started {expected} processes but accelerate joined {accelerator.num_processes}"
                        "; they would train apart. Launch with torchrun or `accelerate launch --multi_gpu`.")
    return accelerator


def weight_dtype(config: Config) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.train["mixed_precision"]]


def llm_dtype(config: Config, device: torch.device) -> torch.dtype:
    from ..text_encoders import default_dtype

    name = config.model["llm_dtype"]
    return default_dtype(device) if name == "auto" else getattr(torch, name)


def load_encoder(config: Config, device: torch.device):
    from ..text_encoders import EncodingCache, load_text_encoder

    # No cross-step cache: a text's features must not depend on which batch first encoded it (exact resume).
    return load_text_encoder(config.resolve(config.model["llm"]), device, llm_dtype(config, device),
                             layer=config.model["llm_layer"], cache=EncodingCache(max_entries=0))


def token_max_length(config: Config) -> int | None:
    return config.model["max_length"] if config.model["token_length"] == "fixed" else None


def metadata(config: Config, base_family: str, feature_dtype: torch.dtype, steps: int, base_name: str) -> dict:
    llm = config.model["llm"]
    resolved = config.resolve(llm)
    return {
        META_LLM: Path(resolved).name if Path(resolved).exists() else llm,
        META_LLM_LAYER: str(config.model["llm_layer"]),
        META_TOKEN_LENGTH: config.model["token_length"],
        META_MAX_LENGTH: str(config.model["max_length"]),
        META_FEATURE_DTYPE: str(feature_dtype).replace("torch.", ""),
        META_BASE_FAMILY: base_family,
        META_STEPS: str(steps),
        "ella.base": base_name,
        "ella.ema": str(config.train["ema"]),
        "ella.trainer": "ella_ext.train",
    }


# -- batches ------------------------------------------------------------------------------------------------------


class _ListedImages(torch.utils.data.Dataset):
    def __init__(self, records, buckets_of):
        self.records, self.buckets_of = records, buckets_of

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        try:
            pixels, crop = prepare_image(record.path, self.buckets_of[index])
        except Exception:  # a file that changed or broke since it was listed
            return {"index": index, "pixels": None}
        return {"index": index, "pixels": pixels, "crop": crop}


class _ListedCache(torch.utils.data.Dataset):
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader.items)

    def __getitem__(self, index):
        item = self.reader.items[index]
        return {"index": index, **self.reader.load(item), "crop": item.crop}


class _Plan(torch.utils.data.Sampler):
    def __init__(self, plan: ListedPlan, start: int):
        self.plan, self.start = plan, start

    def __iter__(self):
        return self.plan.batches(self.start)


def _collate(items: list[dict]) -> list[dict]:
    return items


@dataclass
class Data:
    """This process's micro-batches: ``next(data)`` -> list of dicts (record, pixels or cached tensors, crop)."""

    iterator: object
    records: list
    buckets_of: list | None
    cached: bool
    empty: dict | None = None
    skipped: Skipped | None = None

    def __next__(self):
        return next(self.iterator)


def make_data(config: Config, accelerator, start_micro: int, base, cache_reader=None) -> Data:
    rank, processes = accelerator.process_index, accelerator.num_processes
    batch = config.train["batch_size"]
    seed = config.train["seed"]
    workers = config.train["workers"]
    buckets = make_buckets(config.data["resolution"], config.data["bucket_step"], config.data["bucket_max_ratio"],
                           config.data["bucketing"])
    bad = [b for b in buckets if b[0] % base.latent_multiple or b[1] % base.latent_multiple]
    if bad:
        raise ConfigError(f"Bucket {bad[0][0]}x{bad[0][1]} is not a multiple of {base.latent_multiple} pixels, which "
                          "this UNet needs; make [data] resolution and bucket_step multiples of "
                          f"{base.latent_multiple}.")
    repeats_of_source = [s.repeats for s in config.sources]
    if cache_reader is not None:
        items = cache_reader.items
        records = [i.record for i in items]
        buckets_of = [i.bucket for i in items]
        dataset = _ListedCache(cache_reader)
        cached = True
    else:
        skipped = Skipped()
        records, shards = list_sources(config, skipped)
        skipped.report()
        if shards:
            return _stream_data(config, shards, buckets, rank, processes, start_micro, skipped)
        if not records:
            raise DataError("No usable image in the [[data.sources]] (every item was skipped; see the log above). "
                            "Each image needs a caption: a same-name .txt file, or a metadata.jsonl line.")
        buckets_of = [pick_bucket(r.size, buckets) for r in records]
        dataset = _ListedImages(records, buckets_of)
        cached = False
    plan = ListedPlan(buckets_of, [repeats_of_source[r.source] for r in records], batch, rank, processes, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_Plan(plan, start_micro), num_workers=workers,
                                         collate_fn=_collate, persistent_workers=False,
                                         multiprocessing_context="spawn" if workers else None)
    data = Data(iter(loader), records, buckets_of, cached)
    if cache_reader is not None:
        data.empty = cache_reader.empty()
    return data


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, args):
        self.args = args

    def __iter__(self):
        for group in stream_batches(*self.args):
            out = []
            for item in group:
                try:
                    pixels, crop = prepare_image(item.image, item.bucket)
                except Exception:
                    out.append({"record": item.record, "pixels": None, "bucket": item.bucket})
                    continue
                out.append({"record": item.record, "pixels": pixels, "crop": crop, "bucket": item.bucket})
            yield out


def _stream_data(config, shards, buckets, rank, processes, start_micro, skipped) -> Data:
    args = (shards, buckets, config.train["batch_size"], rank, processes, config.train["seed"], skipped, start_micro)
    workers = min(1, config.train["workers"])  # one reader keeps the stream's order
    loader = torch.utils.data.DataLoader(_Stream(args), batch_size=None, num_workers=workers,
                                         multiprocessing_context="spawn" if workers else None)
    return Data(iter(loader), [], None, False, skipped=skipped)


# -- one micro-batch ----------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    latents: torch.Tensor
    features: torch.Tensor
    mask: torch.Tensor | None
    timesteps: torch.Tensor
    noise: torch.Tensor
    pooled: torch.Tensor | None
    time_ids: torch.Tensor | None


def _pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(r.shape[0] for r in rows)
    features = torch.zeros(len(rows), length, rows[0].shape[-1])
    for i, row in enumerate(rows):
        features[i, : row.shape[0]] = row.float()
    lengths = torch.tensor([r.shape[0] for r in rows])
    return features, torch.arange(length)[None, :] < lengths[:, None]


def _fill_failed(items: list[dict], data: Data) -> list[dict]:
    """An image that broke since it was listed is replaced by the batch's first good one (counted in the log)."""
    good = next((i for i in items if i.get("pixels", 0) is not None), None)
    if good is None:
        raise DataError("Every image of a batch failed to load; the files changed since they were listed.")
    out = []
    for item in items:
        if item.get("pixels", 0) is None:
            log.warning("ELLA train: an image could not be read; its place in the batch is taken by another.")
            item = good
        out.append(item)
    return out


def make_inputs(items: list[dict], data: Data, micro: int, config: Config, accelerator, base, encoder) -> Inputs:
    device = accelerator.device
    rank, batch = accelerator.process_index, len(items)
    items = _fill_failed(items, data) if not data.cached else items
    records = [i["record"] if "record" in i else data.records[i["index"]] for i in items]
    buckets = [i.get("bucket") or data.buckets_of[i["index"]] for i in items]
    dropout = [config.sources[r.source].caption_dropout for r in records]
    timesteps, drop, generators = [], [], []
    steps = base.scheduler.config.num_train_timesteps
    for position in range(batch):
        generator = torch.Generator().manual_seed(sample_seed(config.train["seed"], micro, rank * batch + position))
        drop.append(bool(torch.rand((), generator=generator).item() < dropout[position]))
        timesteps.append(torch.randint(0, steps, (), generator=generator))
        generators.append(generator)
    captions = ["" if d else r.caption for d, r in zip(drop, records)]
    max_length = token_max_length(config)
    if data.cached:
        latents = torch.stack([i["latent"] for i in items]).to(device)
        rows = [data.empty["features"] if d else i["features"] for d, i in zip(drop, items)]
        features, mask = _pad(rows)
        pooled = (torch.stack([(data.empty["pooled"] if d else i["pooled"]).float() for d, i in zip(drop, items)])
                  if "pooled" in items[0] else None)
    else:
        latents = base.encode_pixels(torch.stack([i["pixels"] for i in items]))
        features, mask = encoder.encode(captions, max_length)
        pooled = base.pooled(captions)
    latents = base.scale_latents(latents).to(device)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(device)
    time_ids = None
    if base.family == "sdxl":
        time_ids = torch.tensor([[r.size[1], r.size[0], i["crop"][0], i["crop"][1], b[1], b[0]]
                                 for r, i, b in zip(records, items, buckets)], dtype=torch.float32)
    return Inputs(latents, features.to(device), mask.to(device) if max_length is None else None,
                  torch.stack(timesteps).to(device), noise, pooled, time_ids)


def compute_loss(connector, base, inputs: Inputs, accelerator) -> torch.Tensor:
    from .model import target_of

    dtype = base.unet.dtype
    scheduler = base.scheduler
    noisy = scheduler.add_noise(inputs.latents, inputs.noise, inputs.timesteps)
    target = target_of(base, inputs.latents, inputs.noise, inputs.timesteps)
    with accelerator.autocast():
        context = connector(inputs.features, inputs.timesteps.float(), inputs.mask)
        prediction = base.unet(noisy.to(dtype), inputs.timesteps, encoder_hidden_states=context.to(dtype),
                               added_cond_kwargs=base.added_conditions(inputs.pooled, inputs.time_ids, dtype)).sample
    return F.mse_loss(prediction.float(), target.float())


# -- checkpoints --------------------------------------------------------------------------------------------------


def checkpoints(output: Path) -> list[Path]:
    folder = output / "checkpoints"
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / COMPLETE_MARKER).is_file()] \
        if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(output: Path, resume: str) -> Path:
    if resume == "latest":
        found = checkpoints(output)
        if not found:
            raise ConfigError(f"--resume latest: no complete checkpoint in {output / 'checkpoints'}; train without "
                              "--resume to start.")
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / COMPLETE_MARKER).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no '{COMPLETE_MARKER}' file in it).")
    return path


def save_checkpoint(accelerator, output: Path, step: int, keep: int) -> Path:
    folder = output / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
    if accelerator.is_main_process and folder.exists():
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / COMPLETE_MARKER).write_text(str(step))
        if keep:
            for old in checkpoints(output)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


# -- the run ------------------------------------------------------------------------------------------------------


class _StopSignal:
    """SIGINT / SIGTERM ask for a checkpoint at the end of the step; a second SIGINT stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("ELLA train: %s received; saving a checkpoint at the end of this step.",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _ema_model(connector: Connector, ema: list[torch.Tensor]) -> Connector:
    copy = Connector(connector.config)
    with torch.no_grad():
        for p, e in zip(copy.parameters(), ema):
            p.copy_(e)
    return copy.eval()


def lr_at(config: Config, step: int) -> float:
    """Linear warm-up over warmup_steps (step 0 gets lr / warmup_steps), then constant."""
    warmup = config.train["warmup_steps"]
    return config.train["lr"] * (min(1.0, (step + 1) / warmup) if warmup else 1.0)


def make_optimizer(config: Config, params):
    if config.train["optimizer"] == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ConfigError("[train] optimizer = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes "
                              "(CUDA only), or use 'adamw'.") from exc
        return bnb.optim.AdamW8bit(params, lr=config.train["lr"], weight_decay=config.train["weight_decay"])
    return torch.optim.AdamW(params, lr=config.train["lr"], weight_decay=config.train["weight_decay"])


def train(config: Config, resume: str | None = None, on_step: Callable[[int, Connector], None] | None = None) -> Result:
    """Train the TSC as the config says; returns where things were written."""
    from tqdm.auto import tqdm

    from .cache import CacheReader, build_cache, cache_complete
    from .model import connector_config, load_base, load_or_init_connector

    output = config.output
    output.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(config, trackers=True)
    device, main = accelerator.device, accelerator.is_main_process
    train_cfg = config.train
    base = load_base(config, device, weight_dtype(config))
    if train_cfg["gradient_checkpointing"]:
        base.unet.enable_gradient_checkpointing()
        _checkpointing_needs_train_mode(base.unet)
    feature_dtype = llm_dtype(config, device)
    dtype_name = str(feature_dtype).replace("torch.", "")
    cache_dir = config.cache_dir
    encoder = None
    reader = None
    if cache_dir is None or not cache_complete(cache_dir) or config.sample["prompts"]:
        encoder = load_encoder(config, device)
    if cache_dir is not None:
        if not cache_complete(cache_dir):
            log.info("ELLA train: making the cache %s first", cache_dir)
            build_cache(config, cache_dir, accelerator, base, encoder, dtype_name)
        reader = CacheReader(cache_dir, config, dtype_name)
        llm_width = reader.empty()["features"].shape[-1]
    else:
        llm_width = encoder.hidden_size
    shape = connector_config(config, base.family, llm_width, base.context_width)
    connector = load_or_init_connector(config, shape).to(device)
    optimizer = make_optimizer(config, [p for p in connector.parameters()])
    state = TrainState(ema=[p.detach().float().clone() for p in connector.parameters()] if train_cfg["ema"] else [])
    connector, optimizer = accelerator.prepare(connector, optimizer)
    accelerator.register_for_checkpointing(state)
    plain = accelerator.unwrap_model(connector)

    checkpoint = None
    if resume:
        checkpoint = resolve_resume(output, resume)
        accelerator.load_state(str(checkpoint))
        log.info("ELLA train: resumed from %s at step %d", checkpoint, state.step)
    steps, accum, batch = train_cfg["steps"], train_cfg["grad_accum"], train_cfg["batch_size"]
    processes = accelerator.num_processes
    global_batch = batch * processes * accum
    log.info("ELLA train: %d process(es) x batch %d x accumulation %d = global batch %d; %d steps (%d done); "
             "TSC %.1f M parameters", processes, batch, accum, global_batch, steps, state.step,
             sum(p.numel() for p in plain.parameters()) / 1e6)
    if state.step >= steps:
        log.info("ELLA train: already at step %d of %d; raise [train] steps to train on.", state.step, steps)
    data = make_data(config, accelerator, state.step * accum, base, reader)
    if reader is not None and encoder is not None and not config.sample["prompts"]:
        encoder = None
    prompts = _prompt_conditions(config, base, encoder) if config.sample["prompts"] else None
    if reader is not None:
        encoder = None  # the LLM is needed no more: the cache and the prompts' features are at hand

    if main:
        accelerator.init_trackers("ella")
        _truncate_metrics(output / "metrics.jsonl", state.step)
    meta = lambda s: metadata(config, base.family, feature_dtype, s, base.name)  # noqa: E731
    progress = tqdm(total=steps, initial=state.step, disable=not main, desc="train", dynamic_ncols=True)
    params = [p for p in connector.parameters()]
    last_saved = None
    started = time.perf_counter()
    start_step = state.step
    interrupted = False
    with _StopSignal() as stop:
        while state.step < steps:
            losses = []
            for micro in range(accum):
                items = next(data)
                inputs = make_inputs(items, data, state.step * accum + micro, config, accelerator, base, encoder)
                sync = micro == accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(connector):
                    loss = compute_loss(connector, base, inputs, accelerator)
                    accelerator.backward(loss / accum)
                losses.append(loss.detach())
            step_loss = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
            if not math.isfinite(step_loss):
                good = checkpoints(output)
                where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was saved yet"
                raise TrainingStopped(f"The loss became non-finite ({step_loss}) at step {state.step + 1}; training "
                                      f"stopped and {where}. Lower [train] lr, or use mixed_precision = 'bf16' "
                                      "or 'no'.")
            grad_norm = None
            if train_cfg["max_grad_norm"] > 0:
                grad_norm = float(accelerator.clip_grad_norm_(params, train_cfg["max_grad_norm"]))
            lr = lr_at(config, state.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.images += global_batch
            if train_cfg["ema"]:
                decay = min(train_cfg["ema"], (1 + state.step) / (10 + state.step))
                with torch.no_grad():
                    for e, p in zip(state.ema, plain.parameters()):
                        e.mul_(decay).add_(p.detach().float(), alpha=1 - decay)
            entry = {"step": state.step, "loss": step_loss, "lr": lr, "images": state.images,
                     "images_per_s": (state.step - start_step) * global_batch / (time.perf_counter() - started)}
            if grad_norm is not None:
                entry["grad_norm"] = grad_norm
            if train_cfg["check_sync_every"] and state.step % train_cfg["check_sync_every"] == 0:
                entry["weight_digests"] = _check_sync(accelerator, plain)
            if main:
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{entry['images_per_s']:.2f}")
                if state.step % train_cfg["log_every"] == 0 or state.step == steps:
                    with open(output / "metrics.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps(entry) + "\n")
                    accelerator.log({k: v for k, v in entry.items() if isinstance(v, float | int)}, step=state.step)
            if on_step is not None:
                on_step(state.step, plain)
            stop_now = _agree(accelerator, stop.requested)
            save_now = train_cfg["save_every"] and state.step % train_cfg["save_every"] == 0
            if save_now and state.step < steps:
                _save_connector(accelerator, plain, state, output / f"connector-step{state.step}.safetensors",
                                meta(state.step), train_cfg["ema"])
                last_saved = save_checkpoint(accelerator, output, state.step, train_cfg["keep_checkpoints"])
            if train_cfg["sample_every"] and state.step % train_cfg["sample_every"] == 0 and state.step < steps:
                _samples(accelerator, config, base, plain, state, prompts)
            if stop_now:
                if last_saved is None or not last_saved.name.endswith(f"{state.step:08d}"):
                    last_saved = save_checkpoint(accelerator, output, state.step, train_cfg["keep_checkpoints"])
                interrupted = True
                log.warning("ELLA train: stopped at step %d; checkpoint %s. Continue with --resume latest.",
                            state.step, last_saved)
                break
    progress.close()
    final = None
    if not interrupted:
        final = output / "connector.safetensors"
        _save_connector(accelerator, plain, state, final, meta(state.step), train_cfg["ema"])
        if train_cfg["save_every"] and state.step % train_cfg["save_every"] == 0:
            _save_connector(accelerator, plain, state, output / f"connector-step{state.step}.safetensors",
                            meta(state.step), train_cfg["ema"])
        if checkpoint is None or state.step != int(checkpoint.name[len(CHECKPOINT_PREFIX):]):
            last_saved = save_checkpoint(accelerator, output, state.step, train_cfg["keep_checkpoints"])
        if prompts is not None:
            _samples(accelerator, config, base, plain, state, prompts)
    accelerator.end_training()
    return Result(state.step, interrupted, final, last_saved)


def _checkpointing_needs_train_mode(unet) -> None:
    """diffusers before 0.32 checkpoints only in train mode (``self.training and ...``); SD UNets have no dropout,
    so train mode changes nothing else there."""
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    if (major, minor) < (0, 32):
        unet.train()


def _agree(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([int(flag)], device=accelerator.device), "sum").item())


def _check_sync(accelerator, model) -> list[str]:
    digest = weights_digest(model)
    value = torch.tensor([int(digest, 16) >> 1], dtype=torch.int64, device=accelerator.device)
    everyone = accelerator.gather(value).tolist()
    digests = [f"{v:016x}" for v in everyone]
    if len(set(everyone)) != 1:
        raise TrainingStopped(f"The processes hold different weights ({digests}); the distributed setup is broken.")
    return digests


def _save_connector(accelerator, plain: Connector, state: TrainState, path: Path, meta: dict, ema: float) -> None:
    if accelerator.is_main_process:
        model = _ema_model(plain, state.ema) if ema else plain
        tmp = path.with_suffix(".tmp")
        save_connector(model, tmp, metadata=meta)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (a crash after them would repeat them)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _prompt_conditions(config: Config, base, encoder):
    from .sample import encode_prompts

    return encode_prompts(config, base, encoder)


def _samples(accelerator, config: Config, base, plain: Connector, state: TrainState, prompts) -> None:
    from .sample import generate

    if accelerator.is_main_process:
        model = _ema_model(plain, state.ema).to(accelerator.device) if config.train["ema"] else plain
        folder = config.output / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(generate(config, base, model, prompts)):
            image.save(folder / f"step{state.step:06d}-{i}.png")
    accelerator.wait_for_everyone()
