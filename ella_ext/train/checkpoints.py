"""What a run leaves in its output folder and reads back: resumable checkpoints (accelerate's state plus the step,
the images seen and the EMA weights), the connector files with their metadata, the metrics log."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..connector import Connector, ConnectorConfig
from ..connector_file import (
    META_BASE_FAMILY,
    META_FEATURE_DTYPE,
    META_LLM,
    META_LLM_LAYER,
    META_MAX_LENGTH,
    META_STEPS,
    META_TOKEN_LENGTH,
    META_TRAINING,
    llm_key,
    read_metadata,
    save_connector,
)
from .config import Config, ConfigError

log = logging.getLogger("ella")
CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "complete"
RUN_INFO = "run.json"  # in a checkpoint: the LLM and the connector's shape it was saved with


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


def llm_name(config: Config) -> str:
    """How files name the run's LLM: a local folder by its name, a hub id as written."""
    llm = config.model["llm"]
    resolved = config.resolve(llm)
    return Path(resolved).name if Path(resolved).exists() else llm


def metadata(config: Config, base_family: str, feature_dtype: torch.dtype, steps: int, base_name: str,
             record: dict | None = None) -> dict:
    """A connector file's metadata: how the extension must run it (LLM, layer, token length, feature dtype) and
    ``ella.training``, the training record as JSON with sorted keys (the same run gives the same bytes)."""
    meta = {
        META_LLM: llm_name(config),
        META_LLM_LAYER: str(config.model["llm_layer"]),
        META_TOKEN_LENGTH: config.model["token_length"],
        META_MAX_LENGTH: str(config.model["max_length"]),
        META_FEATURE_DTYPE: str(feature_dtype).replace("torch.", ""),
        META_BASE_FAMILY: base_family,
        META_STEPS: str(steps),
        "ella.base": base_name,
        "ella.ema": str(config.train["ema"]),
        "ella.trainer": f"ella_ext.train {__version__}",
    }
    if record is not None:
        meta[META_TRAINING] = json.dumps({**record, "steps_trained": steps}, sort_keys=True)
    return meta


# -- which LLM and shape a connector or checkpoint was made with ------------------------------------------------


def file_llm(path: str | Path) -> str:
    """The LLM a connector file names (``ella.llm``), "" when it names none."""
    return read_metadata(path).get(META_LLM, "")


def check_same_llm(config: Config, what: str, trained: str, chosen: str) -> None:
    """Refuse (or, with [model] allow_other_llm, warn about) continuing from weights made with another LLM: features
    of the same width from another model mean something else, and the connector would start from noise."""
    if not trained or llm_key(trained) == llm_key(chosen):
        return
    message = f"{what} was trained with the LLM {trained}, but [model] llm is {chosen}"
    if not config.model["allow_other_llm"]:
        raise ConfigError(f"{message}. Set [model] llm to {trained}, or set [model] allow_other_llm = true if you "
                          "mean to carry these weights over to another LLM.")
    log.warning("ELLA train: %s; going on because [model] allow_other_llm = true.", message)


def connector_shape(shape: ConnectorConfig) -> dict:
    return {"width": shape.width, "layers": shape.layers, "heads": shape.heads, "latents": shape.num_latents,
            "in_width": shape.in_width, "out_width": shape.out_width, "time_channels": shape.time_channels}


def check_resumable(config: Config, checkpoint: Path, shape: ConnectorConfig, llm: str) -> None:
    """A checkpoint resumes only with the connector shape and LLM it was saved with; say what changed."""
    info_file = checkpoint / RUN_INFO
    if not info_file.is_file():  # saved before run.json existed: loading reports a shape mismatch itself
        return
    info = json.loads(info_file.read_text(encoding="utf-8"))
    saved, now = info.get("connector", {}), connector_shape(shape)
    changed = [f"{key} {saved[key]} -> {now[key]}" for key in now if key in saved and saved[key] != now[key]]
    if changed:
        raise ConfigError(f"--resume {checkpoint.name}: the connector's shape changed since that checkpoint "
                          f"({', '.join(changed)}). Put the [connector] keys back as they were (config.toml in "
                          "the output folder holds them), or train the new shape into another [train] output.")
    check_same_llm(config, f"--resume {checkpoint.name}", info.get("llm", ""), llm)


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


def save_checkpoint(accelerator, output: Path, step: int, keep: int, info: dict | None = None) -> Path:
    """accelerate's state (connector, optimiser, TrainState) under checkpoints/step-N, with ``info`` (LLM and
    connector shape) in run.json; the ``complete`` marker last. Keeps the newest ``keep`` checkpoints."""
    folder = output / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
    if accelerator.is_main_process and folder.exists():
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if info is not None:
            (folder / RUN_INFO).write_text(json.dumps(info, sort_keys=True, indent=1), encoding="utf-8")
        (folder / COMPLETE_MARKER).write_text(str(step))
        if keep:
            for old in checkpoints(output)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def ema_model(connector: Connector, ema: list[torch.Tensor]) -> Connector:
    copy = Connector(connector.config)
    with torch.no_grad():
        for p, e in zip(copy.parameters(), ema):
            p.copy_(e)
    return copy.eval()


def save_connector_file(accelerator, plain: Connector, state: TrainState, path: Path, meta: dict, ema: float,
                        dtype: torch.dtype = torch.float16) -> None:
    """The main process writes the connector (EMA weights when EMA is on) in ``dtype``, atomically."""
    error = None
    if accelerator.is_main_process:
        model = ema_model(plain, state.ema) if ema else plain
        tmp = path.with_suffix(".tmp")
        try:
            save_connector(model, tmp, metadata=meta, dtype=dtype)
            os.replace(tmp, path)
        except OSError as exc:
            error = exc
    accelerator.wait_for_everyone()
    if error is not None:
        raise error


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (a crash after them would repeat them)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


# -- the output folder: one run at a time, never over another run --------------------------------------------------

LOCK_NAME = "train.lock"
# What a run writes; a folder with any of these holds a run (samples/ alone may come from the `sample` verb).
RUN_FILES = ("connector.safetensors", "metrics.jsonl", "checkpoints", "config.toml", "skipped.txt", "logs")
RUN_GLOBS = ("connector-step*.safetensors",)


def run_files(output: Path) -> list[Path]:
    """The files and folders of an earlier run in ``output`` (empty for a new or empty folder)."""
    if not output.is_dir():
        return []
    found = [output / name for name in RUN_FILES if (output / name).exists()]
    for pattern in RUN_GLOBS:
        found += sorted(output.glob(pattern))
    return found


class OutputLock:
    """An exclusive lock on ``output/train.lock`` held for a run's lifetime, so two runs (or two launches of one)
    never write one folder. The operating system drops the lock when its process ends, a crash or a kill included,
    so a dead run never leaves the folder locked; the file itself stays and says who held it last."""

    def __init__(self, output: Path):
        self.path = output / LOCK_NAME
        self._file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the run's lifetime)
        try:
            _lock_file(handle)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"{self.path.parent} is in use by another training run ({holder}). Wait for it to "
                              "end, or set [train] output to another folder.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                _unlock_file(self._file)
            self._file.close()
            self._file = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


if os.name == "nt":  # pragma: no cover - Windows
    import msvcrt

    def _lock_file(handle) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock_file(handle) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock_file(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock_file(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def check_output(output: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to start a new run over an earlier one (it would replace its connector, cut its metrics and mix its
    checkpoints with the new run's), unless ``overwrite``: then the earlier run's files are deleted first. Called by
    the main process, under the lock, before any model is loaded."""
    found = run_files(output)
    if resume or not found:
        return
    if not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise ConfigError(
            f"{output} already holds a training run ({names}). To continue it: train --resume latest (raise "
            "[train] steps to train longer). To start another run: set [train] output to a new folder. To delete "
            "that run and start again there: train --overwrite.")
    log.warning("ELLA train: --overwrite: deleting the earlier run in %s (%s)", output,
                ", ".join(p.name for p in found))
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    samples = output / "samples"
    if samples.is_dir():
        shutil.rmtree(samples)
