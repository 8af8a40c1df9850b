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
    pooled_kind,
    read_training_facts,
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
    from .model import short_name

    return short_name(config.resolve(config.model["llm"]))


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


def check_same_inputs(config: Config, what: str, trained: dict, llm: str) -> None:
    """Refuse (or, with [model] allow_other_llm, warn about) continuing from weights made with another LLM or another
    LLM layer: features of the same width from another model or layer mean something else, and the connector would
    start from noise. Another token length only warns. ``trained``: llm, llm_layer, token_length, max_length (each
    may be missing)."""
    model = config.model
    problems = []
    if trained.get("llm") and llm_key(trained["llm"]) != llm_key(llm):
        problems.append(f"the LLM {trained['llm']}, but [model] llm is {llm}")
    if trained.get("llm_layer") is not None and trained["llm_layer"] != model["llm_layer"]:
        problems.append(f"LLM layer {trained['llm_layer']}, but [model] llm_layer is {model['llm_layer']}")
    if problems:
        message = f"{what} was trained with " + "; and with ".join(problems)
        if not model["allow_other_llm"]:
            raise ConfigError(f"{message}. Set [model] back to what it was trained with, or set [model] "
                              "allow_other_llm = true if you mean to carry these weights over to other features.")
        log.warning("ELLA train: %s; going on because [model] allow_other_llm = true.", message)
    length = (trained.get("token_length"), trained.get("max_length"))
    if length[0] and length != (model["token_length"], model["max_length"]):
        log.warning("ELLA train: %s was trained with %s token length, max %s; this run uses %s, max %s.", what,
                    length[0], length[1], model["token_length"], model["max_length"])


def file_inputs(path: str | Path) -> dict:
    """What a connector file says it read (its LLM, layer and token length), for ``check_same_inputs``."""
    facts = read_training_facts(path)
    return {"llm": facts.llm, "llm_layer": facts.llm_layer, "token_length": facts.token_length,
            "max_length": facts.max_length}


def connector_shape(shape: ConnectorConfig) -> dict:
    return {"width": shape.width, "layers": shape.layers, "heads": shape.heads, "latents": shape.num_latents,
            "in_width": shape.in_width, "out_width": shape.out_width, "time_channels": shape.time_channels,
            "pooled": pooled_kind(shape), "pooled_width": shape.pooled_width}


def check_resumable(config: Config, checkpoint: Path, shape: ConnectorConfig, llm: str) -> None:
    """A checkpoint resumes only with the connector shape and LLM it was saved with; say what changed."""
    info_file = checkpoint / RUN_INFO
    if not info_file.is_file():  # saved before run.json existed: loading reports a shape mismatch itself
        return
    info = json.loads(info_file.read_text(encoding="utf-8"))
    # a checkpoint saved before pools existed has none: "clip"
    saved, now = {"pooled": "clip", **info.get("connector", {})}, connector_shape(shape)
    changed = [f"{key} {saved[key]} -> {now[key]}" for key in now if key in saved and saved[key] != now[key]]
    if changed:
        raise ConfigError(f"--resume {checkpoint.name}: the connector's shape changed since that checkpoint "
                          f"({', '.join(changed)}). Put the [connector] keys back as they were ({RUN_CONFIG} "
                          "in the output folder holds them), or train the new shape into another [train] output.")
    check_same_inputs(config, f"--resume {checkpoint.name}", info, llm)
    if "held_out" in info and info["held_out"] != held_out(config):  # (checkpoints before [validation]: unknown)
        raise ConfigError(
            f"--resume {checkpoint.name}: the held-out set changed since that checkpoint ([validation] path / split "
            f"{_held_text(info['held_out'])} then, {_held_text(held_out(config))} now): images held out now may "
            f"have been trained on, and val_loss would not compare. Put [validation] back as it was ({RUN_CONFIG} in "
            "the output folder holds it), or start a new run in another [train] output.")


def held_out(config: Config) -> dict:
    """The run's held-out set as checkpoints record it: [validation] path (resolved) and split."""
    path = config.validation["path"]
    return {"path": str(Path(config.resolve(path)).resolve()) if path else "", "split": config.validation["split"]}


def _held_text(held: dict) -> str:
    if held.get("path"):
        return f"path {held['path']}"
    return f"split {held.get('split')}" if held.get("split") else "none"


def checkpoints(output: Path) -> list[Path]:
    """The complete checkpoints under ``output/checkpoints``, oldest first."""
    folder = output / "checkpoints"
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*")
             if p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / COMPLETE_MARKER).is_file()] \
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


def write_connector(plain: Connector, ema: list[torch.Tensor] | None, path: Path, meta: dict,
                    dtype: torch.dtype) -> None:
    """Write a connector file atomically: the EMA weights when given, in ``dtype``."""
    model = ema_model(plain, ema) if ema else plain
    tmp = path.with_suffix(".tmp")
    save_connector(model, tmp, metadata=meta, dtype=dtype)
    os.replace(tmp, path)


def save_connector_file(accelerator, plain: Connector, state: TrainState, path: Path, meta: dict, ema: float,
                        dtype: torch.dtype = torch.float16) -> None:
    """The main process writes the connector (EMA weights when EMA is on) in ``dtype``; a write error reaches every
    process's caller after they meet."""
    error = None
    if accelerator.is_main_process:
        try:
            write_connector(plain, state.ema if ema else None, path, meta, dtype)
        except OSError as exc:
            error = exc
    accelerator.wait_for_everyone()
    if error is not None:
        raise error


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (a crash after them would repeat them) and lines a crash cut
    short."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash or a full disk
            continue
        if isinstance(entry, dict) and entry.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


# -- the output folder: one run at a time, never over another run --------------------------------------------------

LOCK_NAME = "train.lock"
RUN_CONFIG = "ella-run.toml"  # the config as the run used it (never the user's own config file)
# What else a run writes. Left by a run that saved no weights (it failed or was killed before its first save), they
# are replaced by the next run; beside a run's weights they are that run's and are kept.
RUN_EXTRAS = ("metrics.jsonl", "logs", "skipped.txt", "validation.txt", RUN_CONFIG, "samples", "checkpoints")


def weight_files(output: Path) -> list[Path]:
    """A run's weights in ``output``: its connector files and complete checkpoints (what must never be lost)."""
    if not output.is_dir():
        return []
    found = [output / "connector.safetensors"] if (output / "connector.safetensors").is_file() else []
    return found + sorted(output.glob("connector-step*.safetensors")) + checkpoints(output)


def run_extras(output: Path, keep: Path | None = None) -> list[Path]:
    """The other files a run writes, found in ``output`` (``keep``, the user's config file, is never among them)."""
    if not output.is_dir():
        return []
    keep = keep.resolve() if keep is not None else None
    return [output / name for name in RUN_EXTRAS if (output / name).exists() and (output / name).resolve() != keep]


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
            try:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
            except OSError:
                holder = "another process"
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

    _LOCK_OFFSET = 1 << 30  # Windows byte locks are mandatory: lock a byte past the text, so the holder can be read

    def _lock_file(handle) -> None:
        handle.seek(_LOCK_OFFSET)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock_file(handle) -> None:
        handle.seek(_LOCK_OFFSET)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock_file(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock_file(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def check_output(output: Path, checkpoint: Path | None, overwrite: bool, keep: Path | None = None) -> None:
    """Refuse to start a run over another run's weights (it would replace its connector, cut its metrics and mix its
    checkpoints with the new run's), unless ``overwrite``: then that run's files are deleted first. A resume is
    allowed from the folder's own newest checkpoint, or from elsewhere into a folder without weights. Files of a run
    that saved no weights are replaced. ``keep`` (the user's config file) is never deleted. Called by the main
    process, under the lock, before any model loads."""
    weights = weight_files(output)
    if checkpoint is not None and overwrite:
        raise ConfigError("--resume and --overwrite together: --resume continues the run in [train] output, "
                          "--overwrite deletes it. Give one of them.")
    if checkpoint is not None and weights:
        own = checkpoints(output)
        if own and checkpoint.resolve() == own[-1].resolve():
            return
        newest = f"its newest checkpoint is {own[-1].name}" if own else "it has no checkpoint"
        raise ConfigError(
            f"--resume {checkpoint} would train into {output}, which holds another line of training ({newest}); "
            "the two runs' files would mix. Resume into a new folder (--set train.output=...), or continue that "
            "folder's own run with --resume latest.")
    if weights and not overwrite:
        names = ", ".join(p.name for p in weights[:4]) + (" ..." if len(weights) > 4 else "")
        if checkpoints(output):
            ways = "To continue it: train --resume latest (raise [train] steps to train longer)."
        else:
            ways = ("It has no checkpoint to continue from; to start from its connector, set [connector] init_from "
                    "to it and [train] output to a new folder.")
        raise ConfigError(f"{output} already holds a training run ({names}). {ways} To start another run: set "
                          "[train] output to a new folder. To delete that run and start again there: train "
                          "--overwrite.")
    leftovers = [p for p in [*weights, *run_extras(output, keep)] if p.exists()]
    if not leftovers:
        return
    if weights:
        log.warning("ELLA train: --overwrite: deleting the earlier run in %s (%s)", output,
                    ", ".join(p.name for p in leftovers))
    else:
        log.warning("ELLA train: %s holds files of a run that saved no weights (%s); starting over there.", output,
                    ", ".join(p.name for p in leftovers))
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
