"""The training run: accelerate (DDP over the TSC only), the output folder claimed, models and data set up, the steps
(loss and learning rate from objective.py), checkpoints, resume, metrics, samples.

Determinism: every random draw of a sample (caption dropout, timestep, noise) comes from a generator seeded by
(seed, micro-batch number, position in the global batch), and the data order from (seed, epoch). So a run resumed at
step N continues exactly as the straight run would (no RNG state needs restoring), and two processes see exactly the
samples one process sees with the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..connector import Connector
from ..errors import ELLAError
from ..evaluate.during import TrainingJudge, judging_on
from .checkpoints import (
    RUN_CONFIG,
    OutputLock,
    TrainState,
    check_output,
    check_resumable,
    check_same_inputs,
    checkpoints,
    connector_shape,
    ema_model,
    file_inputs,
    held_out,
    llm_name,
    metadata,
    resolve_resume,
    save_checkpoint,
    save_connector_file,
    truncate_metrics,
    write_connector,
)
from .config import Config, ConfigError, write_run_config
from .data import preflight
from .feed import make_data, make_inputs
from .objective import compute_loss, lr_at, make_optimizer
from .runtime import (
    all_agree,
    check_sync,
    llm_dtype,
    load_encoder,
    make_accelerator,
    needs_clip_g,
    peak_lr,
    set_threads,
    weight_dtype,
)
from .summary import duration_text, summary_lines, training_record
from .validation import make_validation, validation_on

log = logging.getLogger("ella")


class TrainingStopped(ELLAError):
    """Training stopped early (a non-finite loss): the message says where the last good checkpoint is."""


@dataclass
class Result:
    step: int
    interrupted: bool
    connector: Path | None
    checkpoint: Path | None


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


def train(config: Config, resume: str | None = None, on_step: Callable[[int, Connector], None] | None = None,
          overwrite: bool = False) -> Result:
    """Train the TSC as the config says; returns where things were written.

    Before any model loads: the data sources must exist, the checkpoint to resume from must be complete, and the
    output folder must not hold another run's weights (unless ``resume`` continues its newest checkpoint or
    ``overwrite`` deletes it); the folder is locked for the run's lifetime."""
    accelerator = make_accelerator(config, trackers=True)
    threads = set_threads(config, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), accelerator.device)
    preflight(config)  # the data's paths and captions, before any model loads
    lock, checkpoint = _claim_output(accelerator, config, resume, overwrite)
    run = _Run(config, accelerator, checkpoint, on_step, lock)
    try:
        log.info("ELLA train: %s", threads)
        return run.run()
    finally:
        if run.lock is not None:
            run.lock.release()


def _claim_output(accelerator, config: Config, resume: str | None,
                  overwrite: bool) -> tuple[OutputLock | None, Path | None]:
    """The main process locks the output folder, finds the checkpoint to resume from and checks it may train there;
    every process stops if it cannot. Returns the lock (the main process's) and the checkpoint (every process's)."""
    output = config.output
    lock, checkpoint, error = None, None, None
    if accelerator.is_main_process:
        try:
            lock = OutputLock(output)
            lock.acquire()
            checkpoint = resolve_resume(output, resume) if resume else None
            check_output(output, checkpoint, overwrite, keep=config.path)
        except (ELLAError, OSError) as exc:
            if lock is not None:
                lock.release()
            lock = None
            error = exc if isinstance(exc, ELLAError) else ConfigError(
                f"[train] output = {output} cannot be used as the run's folder ({exc}). Set it to a folder that can "
                "be made and written.")
    if all_agree(accelerator, error is not None):
        raise error or ConfigError(f"The main process could not use {output} (its message says why).")
    if resume and checkpoint is None:  # the other processes: the same folder, now checked and locked
        checkpoint = resolve_resume(output, resume)
    return lock, checkpoint


class _Run:
    """One training run, set up (base, LLM or cache, connector, data) and then stepped."""

    def __init__(self, config: Config, accelerator, checkpoint: Path | None, on_step, lock: OutputLock | None):
        self.config, self.accelerator, self.checkpoint, self.on_step = config, accelerator, checkpoint, on_step
        self.lock = lock
        self.output = config.output
        self.main = accelerator.is_main_process
        self._output_missing_reported = False
        self.trackers_ok = True

    # -- setup -------------------------------------------------------------------------------------------------

    def run(self) -> Result:
        self._load_models()
        self._make_connector()
        self._make_data()
        self._start_logs()
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(), _StopSignal() as stop:
            return self._finish(self._steps(stop))

    def _load_models(self) -> None:
        from .cache import CacheReader, build_cache, cache_complete
        from .model import load_base

        config, accelerator, device = self.config, self.accelerator, self.accelerator.device
        self.feature_dtype = llm_dtype(config, device)
        dtype_name = str(self.feature_dtype).replace("torch.", "")
        cache_dir = config.cache_dir
        self.encoder = self.reader = None
        if cache_dir is not None and cache_complete(cache_dir):  # a stale cache is refused before the models load
            self.reader = CacheReader(cache_dir, config, dtype_name)
        self.base = base = load_base(config, device, weight_dtype(config), clip_g=needs_clip_g(config))
        if config.train["gradient_checkpointing"]:
            base.unet.enable_gradient_checkpointing()
            _checkpointing_needs_train_mode(base.unet)
        if self.reader is None or config.sample["prompts"] or validation_on(config) or judging_on(config):
            self.encoder = load_encoder(config, device)
        if cache_dir is not None:
            if self.reader is None:
                log.info("ELLA train: making the cache %s first", cache_dir)
                build_cache(config, cache_dir, accelerator, base, self.encoder, dtype_name)
                self.reader = CacheReader(cache_dir, config, dtype_name)
                if config.connector["pooled"] == "attention":  # CLIP-G was loaded for the cache only
                    base.clip_g = base.clip_g_tokenizer = None
            self.llm_width = self.reader.empty()["features"].shape[-1]
        else:
            self.llm_width = self.encoder.hidden_size

    def _make_connector(self) -> None:
        from .model import connector_config, load_or_init_connector

        config, accelerator = self.config, self.accelerator
        self.peak_lr = peak_lr(config, self.base.family)
        self.shape = connector_config(config, self.base.family, self.llm_width, self.base.context_width,
                                      self.base.pooled_width)
        self.llm_name = llm_name(config)
        if config.connector["init_from"]:
            check_same_inputs(config, f"[connector] init_from {Path(config.connector['init_from']).name}",
                              file_inputs(config.resolve(config.connector["init_from"])), self.llm_name)
        connector = load_or_init_connector(config, self.shape).to(accelerator.device)
        optimizer = make_optimizer(config, list(connector.parameters()), self.peak_lr)
        ema = config.train["ema"]
        self.state = TrainState(ema=[p.detach().float().clone() for p in connector.parameters()] if ema else [])
        self.connector, self.optimizer = accelerator.prepare(connector, optimizer)
        accelerator.register_for_checkpointing(self.state)
        self.plain = accelerator.unwrap_model(self.connector)
        self.resumed_step = None
        if self.checkpoint is not None:
            check_resumable(config, self.checkpoint, self.shape, self.llm_name)
            try:
                accelerator.load_state(str(self.checkpoint))
            except (RuntimeError, KeyError, ValueError) as exc:  # torch's "size mismatch", missing keys
                raise ConfigError(f"--resume {self.checkpoint}: the checkpoint does not fit this config's connector "
                                  f"or optimiser ({str(exc).splitlines()[0]}). Resume with the config it was saved "
                                  f"with ({RUN_CONFIG} in the output folder), or start a new run in another "
                                  "[train] output.") from exc
            self.resumed_step = self.state.step
            log.info("ELLA train: resumed from %s at step %d", self.checkpoint, self.state.step)

    def _make_data(self) -> None:
        from .sample import encode_prompts

        config, accelerator = self.config, self.accelerator
        accum = config.train["grad_accum"]
        self.global_batch = config.train["batch_size"] * accelerator.num_processes * accum
        self.data = make_data(config, accelerator, self.state.step * accum, self.base, self.reader)
        self.prompts = encode_prompts(config, self.base, self.encoder) if config.sample["prompts"] else None
        self.validation = make_validation(config, accelerator, self.base, self.encoder, self.data, self.state.step)
        self.judged = TrainingJudge(config, accelerator, self.base, self.encoder, self.state.step) \
            if judging_on(config) else None
        self.record = training_record(config, self.base, self.data, accelerator.num_processes, self.peak_lr,
                                      self.llm_name, self.validation and self.validation.record())
        if self.main:
            lines = summary_lines(config, self.base, self.data, self.record, self.plain, self.state.step,
                                  self.feature_dtype, self.encoder)
            for line in lines + (self.validation.summary() if self.validation else []):
                log.info("ELLA train: %s", line)
        if self.reader is not None:
            self.encoder = None  # the LLM is needed no more: the cache and the prompts' features are at hand
        if self.state.step >= config.train["steps"]:
            log.info("ELLA train: already at step %d of %d; raise [train] steps to train on.", self.state.step,
                     config.train["steps"])

    def _start_logs(self) -> None:
        if self.main:
            self._write(self._ensure_output)
            self._write(self._write_run_config)
            self._to_trackers(lambda: self.accelerator.init_trackers("ella"))
            self._write(lambda: truncate_metrics(self.output / "metrics.jsonl", self.state.step))

    def _write_run_config(self) -> None:
        path = self.output / RUN_CONFIG
        if self.config.path is None or path.resolve() != self.config.path.resolve():  # never the user's own file
            write_run_config(self.config, path)

    # -- the steps ---------------------------------------------------------------------------------------------

    def _steps(self, stop) -> bool:
        """Train to [train] steps; True when stopped early by a signal (a checkpoint was saved)."""
        from tqdm.auto import tqdm

        config, accelerator, state = self.config, self.accelerator, self.state
        steps, accum = config.train["steps"], config.train["grad_accum"]
        self.last_saved = None
        progress = tqdm(total=steps, initial=state.step, disable=not self.main, desc="train", dynamic_ncols=True)
        started, start_step = time.perf_counter(), state.step
        params = list(self.connector.parameters())
        try:
            while state.step < steps:
                step_loss = self._one_step(accum, params)
                elapsed = time.perf_counter() - started
                entry = {"step": state.step, "loss": step_loss, "lr": self.lr, "images": state.images,
                         "images_per_s": (state.step - start_step) * self.global_batch / elapsed,
                         "elapsed_s": round(elapsed, 3)}
                if self.grad_norm is not None:
                    entry["grad_norm"] = self.grad_norm
                every = config.train["check_sync_every"]
                if every and state.step % every == 0:
                    entry["weight_digests"] = check_sync(accelerator, self.plain)
                if self.main:
                    progress.update(1)
                    progress.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{entry['images_per_s']:.2f}")
                    if state.step - start_step == TIMING_STEPS and state.step < steps:
                        self._log_timing(time.perf_counter() - started, state.step - start_step)
                    if state.step % config.train["log_every"] == 0 or state.step == steps:
                        self._log_metrics(entry)
                if self.on_step is not None:
                    self.on_step(state.step, self.plain)
                if self._after_step(all_agree(accelerator, stop.requested)):
                    return True
        finally:
            progress.close()
        return False

    def _one_step(self, accum: int, params) -> float:
        config, accelerator, state = self.config, self.accelerator, self.state
        losses = []
        for micro in range(accum):
            items = next(self.data)
            inputs = make_inputs(items, self.data, state.step * accum + micro, config, accelerator, self.base,
                                 self.encoder)
            sync = micro == accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(self.connector):
                loss = compute_loss(self.connector, self.base, inputs, accelerator,
                                    config.train["min_snr_gamma"])
                accelerator.backward(loss / accum)
            losses.append(loss.detach())
        step_loss = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
        if not math.isfinite(step_loss):
            good = checkpoints(self.output)
            where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was saved yet"
            raise TrainingStopped(f"The loss became non-finite ({step_loss}) at step {state.step + 1}; training "
                                  f"stopped and {where}. Lower [train] lr, or use mixed_precision = 'bf16' or 'no'.")
        self.grad_norm = None
        if config.train["max_grad_norm"] > 0:
            self.grad_norm = float(accelerator.clip_grad_norm_(params, config.train["max_grad_norm"]))
        self.lr = lr_at(config, state.step, self.peak_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.images += self.global_batch
        if config.train["ema"]:
            decay = min(config.train["ema"], (1 + state.step) / (10 + state.step))
            with torch.no_grad():
                for e, p in zip(state.ema, self.plain.parameters()):
                    e.mul_(decay).add_(p.detach().float(), alpha=1 - decay)
        return step_loss

    def _after_step(self, stop_now: bool) -> bool:
        """Files every save_every steps, samples every sample_every; on a stop request, a checkpoint. True: stop."""
        config, state = self.config, self.state
        steps, save_every = config.train["steps"], config.train["save_every"]
        sample_every = config.train["sample_every"]
        self._validate()  # before a checkpoint: kept on resume
        if save_every and state.step % save_every == 0 and state.step < steps:
            self._save_connector(self.output / f"connector-step{state.step}.safetensors")
            self.last_saved = self._save_checkpoint()
        if sample_every and state.step % sample_every == 0 and state.step < steps:
            self._samples()
        if not stop_now or state.step >= steps:  # a stop asked during the last step: the run ends as planned
            return False
        if self.last_saved is None or not self.last_saved.name.endswith(f"{state.step:08d}"):
            self.last_saved = self._save_checkpoint()
        log.warning("ELLA train: stopped at step %d; checkpoint %s. Continue with --resume latest.", state.step,
                    self.last_saved)
        return True

    def _finish(self, interrupted: bool) -> Result:
        config, state = self.config, self.state
        final = None
        if not interrupted:
            final = self.output / "connector.safetensors"
            final = self._save_connector(final)
            if config.train["save_every"] and state.step % config.train["save_every"] == 0:
                self._save_connector(self.output / f"connector-step{state.step}.safetensors")
            if state.step != self.resumed_step:  # (a resume already at its last step has that checkpoint)
                self.last_saved = self._save_checkpoint()
            if self.prompts is not None:
                self._samples()
            self._validate(end=True)
        if self.judged is not None:
            self.judged.close()
        self._to_trackers(self.accelerator.end_training)
        return Result(state.step, interrupted, final, self.last_saved)

    def _validate(self, end: bool = False) -> None:
        """When due: the held-out loss (every process scores its share) and the judge's score (the main process),
        to metrics.jsonl and the trackers."""
        step = self.state.step
        loss_due = self.validation is not None and self.validation.due(step, end)
        judge_due = self.judged is not None and self.judged.due(step, end)
        if not (loss_due or judge_due):
            return
        ema = self.config.train["ema"]
        model = ema_model(self.plain, self.state.ema).to(self.accelerator.device) if ema else self.plain
        entry = {"step": step, **(self.validation.loss(model, step) if loss_due else {}),
                 **(self.judged.score(model, step) if judge_due else {})}
        if self.main:
            self._log_metrics(entry)

    # -- writing -----------------------------------------------------------------------------------------------

    def _ensure_output(self) -> None:
        """The output folder exists: made again (once reported) if it was deleted during the run."""
        if self.output.is_dir():
            return
        self.output.mkdir(parents=True, exist_ok=True)
        for tracker in self.accelerator.trackers:  # TensorBoard opens its event file by name at every write
            if getattr(tracker, "logging_dir", None):
                Path(tracker.logging_dir).mkdir(parents=True, exist_ok=True)
        if self.lock is not None:  # the lock file went with the folder: take the folder's new one, or stop
            self.lock.release()
            self.lock = OutputLock(self.output)
            try:
                self.lock.acquire()
            except ConfigError as exc:
                self.lock = None
                raise OSError(str(exc)) from exc
        self._write_run_config()  # the run's config went with the folder too
        if not self._output_missing_reported and self.main and self.state.step:
            self._output_missing_reported = True
            log.warning("ELLA train: the output folder %s was deleted during the run; it was made again (files "
                        "written there before are lost; the run goes on).", self.output)

    def _log_metrics(self, entry: dict) -> None:
        def write():
            self._ensure_output()
            with open(self.output / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

        self._write(write)
        self._to_trackers(lambda: self.accelerator.log({k: v for k, v in entry.items() if isinstance(v, float | int)},
                                                       step=entry["step"]))

    def _to_trackers(self, write) -> None:
        """Trackers are a view of metrics.jsonl and the sample images: when one fails (its folder deleted, wandb
        offline), say so once and go on without them rather than stop the run."""
        if not self.trackers_ok:
            return
        try:
            write()
        except Exception as exc:  # any tracker's own error
            self.trackers_ok = False
            log.warning("ELLA train: logging to the trackers failed (%s: %s); metrics.jsonl and samples/ go on, the "
                        "trackers stop for this run.", type(exc).__name__, exc)

    def _log_timing(self, seconds: float, steps_done: int) -> None:
        per_step = seconds / steps_done
        left = self.config.train["steps"] - self.state.step
        log.info("ELLA train: %.2f s per step over the first %d steps: about %s for the %d steps left", per_step,
                 steps_done, duration_text(per_step * left), left)

    def _save_connector(self, path: Path) -> Path:
        """Write a connector file (the EMA weights when EMA is on, in [train] save_precision)."""
        meta = metadata(self.config, self.base.family, self.feature_dtype, self.state.step, self.base.name,
                        self.record)
        if self.main:
            self._write(self._ensure_output)
        self._write(lambda: save_connector_file(self.accelerator, self.plain, self.state, path, meta,
                                                self.config.train["ema"],
                                                SAVE_DTYPES[self.config.train["save_precision"]]))
        return path

    def _write(self, write):
        """Run one of the trainer's own writes to the output folder; if the folder cannot be written, the weights in
        memory go to a rescue file before the run stops (reading errors are not caught here)."""
        try:
            return write()
        except OSError as exc:
            raise self._rescue(exc) from exc

    def _rescue(self, error: OSError) -> TrainingStopped:
        """The output folder cannot be written: the weights in memory go to a rescue file, named in the error, so
        the run's work is not lost with it."""
        if not self.main:
            return TrainingStopped(f"The main process could not write {self.output} ({error}).")
        rescue = rescue_path(self.output / "connector.safetensors")
        meta = metadata(self.config, self.base.family, self.feature_dtype, self.state.step, self.base.name,
                        getattr(self, "record", None))
        write_connector(self.plain, self.state.ema if self.config.train["ema"] else None, rescue, meta,
                        SAVE_DTYPES[self.config.train["save_precision"]])
        return TrainingStopped(f"Could not write to the output folder {self.output} ({error}). The connector of "
                               f"step {self.state.step} was saved to {rescue}. Make the folder writable and continue "
                               "with --resume latest from its last checkpoint, or use that file.")

    def _save_checkpoint(self) -> Path:
        if self.main:
            self._write(self._ensure_output)
        model = self.config.model
        info = {"llm": self.llm_name, "llm_layer": model["llm_layer"], "token_length": model["token_length"],
                "max_length": model["max_length"], "family": self.base.family, "connector": connector_shape(self.shape),
                "held_out": held_out(self.config), "step": self.state.step}
        return self._write(lambda: save_checkpoint(self.accelerator, self.output, self.state.step,
                                                   self.config.train["keep_checkpoints"], info))

    def _samples(self) -> None:
        from .sample import generate, save_sample

        config, state, accelerator = self.config, self.state, self.accelerator
        if self.main:
            model = ema_model(self.plain, state.ema).to(accelerator.device) if config.train["ema"] else self.plain
            folder = self.output / "samples"
            images = generate(config, self.base, model, self.prompts)

            def write():
                self._ensure_output()
                folder.mkdir(parents=True, exist_ok=True)
                for i, (prompt, image) in enumerate(zip(self.prompts.prompts, images)):
                    save_sample(image, folder / f"step{state.step:06d}-{i}.png", config, prompt, i,
                                f"step {state.step} of {self.output.name}")

            self._write(write)
            self._to_trackers(lambda: log_images(accelerator, images, self.prompts.prompts, state.step))
        accelerator.wait_for_everyone()


TIMING_STEPS = 3  # steps timed before the first estimate of the run's duration is logged
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def rescue_path(path: Path) -> Path:
    """Where a connector goes when its folder cannot be written: the working folder, else the temp folder."""
    import tempfile

    name = f"ella-rescued-{time.strftime('%Y%m%d-%H%M%S')}-{path.name}"
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        if os.access(folder, os.W_OK):
            return folder / name
    return Path(tempfile.gettempdir()) / name


def log_images(accelerator, images: list, prompts: list[str], step: int) -> None:
    """Sample images to the trackers: TensorBoard's Images tab (as samples/N, N = the prompt's place in [sample]
    prompts), wandb (captioned by the prompt)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for i, image in enumerate(images):
                tracker.log_images({f"samples/{i}": np.asarray(image)[None]}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": [wandb.Image(image, caption=prompt) for image, prompt in zip(images, prompts)]},
                        step=step)


def _checkpointing_needs_train_mode(unet) -> None:
    """diffusers before 0.32 checkpoints only in train mode (``self.training and ...``); SD UNets have no dropout,
    so train mode changes nothing else there."""
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    if (major, minor) < (0, 32):
        unet.train()
