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
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..connector import Connector
from ..errors import ELLAError
from .checkpoints import (
    CHECKPOINT_PREFIX,
    TrainState,
    checkpoints,
    ema_model,
    metadata,
    resolve_resume,
    save_checkpoint,
    save_connector_file,
    truncate_metrics,
)
from .config import Config, ConfigError
from .feed import Inputs, make_data, make_inputs
from .runtime import llm_dtype, load_encoder, make_accelerator, weight_dtype

log = logging.getLogger("ella")


class TrainingStopped(ELLAError):
    """Training stopped early (a non-finite loss): the message says where the last good checkpoint is."""


@dataclass
class Result:
    step: int
    interrupted: bool
    connector: Path | None
    checkpoint: Path | None


# -- one micro-batch's loss ---------------------------------------------------------------------------------------


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
        truncate_metrics(output / "metrics.jsonl", state.step)
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
                save_connector_file(accelerator, plain, state, output / f"connector-step{state.step}.safetensors",
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
        save_connector_file(accelerator, plain, state, final, meta(state.step), train_cfg["ema"])
        if train_cfg["save_every"] and state.step % train_cfg["save_every"] == 0:
            save_connector_file(accelerator, plain, state, output / f"connector-step{state.step}.safetensors",
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


def _prompt_conditions(config: Config, base, encoder):
    from .sample import encode_prompts

    return encode_prompts(config, base, encoder)


def _samples(accelerator, config: Config, base, plain: Connector, state: TrainState, prompts) -> None:
    from .sample import generate

    if accelerator.is_main_process:
        model = ema_model(plain, state.ema).to(accelerator.device) if config.train["ema"] else plain
        folder = config.output / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(generate(config, base, model, prompts)):
            image.save(folder / f"step{state.step:06d}-{i}.png")
    accelerator.wait_for_everyone()
