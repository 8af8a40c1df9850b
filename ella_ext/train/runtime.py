"""What every verb sets up the same way: the accelerator (joining a distributed launch, GPUs or not), the frozen
models' and the LLM's dtypes, the LLM encoder, the token length."""

from __future__ import annotations

import os

import torch

from ..errors import ELLAError
from .config import Config, ConfigError


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
