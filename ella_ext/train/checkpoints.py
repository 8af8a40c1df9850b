"""What a run leaves in its output folder and reads back: resumable checkpoints (accelerate's state plus the step,
the images seen and the EMA weights), the connector files with their metadata, the metrics log."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
from .config import Config, ConfigError

CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "complete"


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


def ema_model(connector: Connector, ema: list[torch.Tensor]) -> Connector:
    copy = Connector(connector.config)
    with torch.no_grad():
        for p, e in zip(copy.parameters(), ema):
            p.copy_(e)
    return copy.eval()


def save_connector_file(accelerator, plain: Connector, state: TrainState, path: Path, meta: dict, ema: float) -> None:
    if accelerator.is_main_process:
        model = ema_model(plain, state.ema) if ema else plain
        tmp = path.with_suffix(".tmp")
        save_connector(model, tmp, metadata=meta)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (a crash after them would repeat them)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
