"""What every verb sets up the same way: the accelerator (joining a distributed launch, GPUs or not), the frozen
models' and the LLM's dtypes, the LLM encoder, the token length."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os

import torch

from ..errors import ELLAError, TextEncoderError
from .config import FAMILY_LR, Config, ConfigError

log = logging.getLogger("ella")


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(config: Config | None, trackers: bool = False):
    """An Accelerator that really joins a distributed launch, GPUs or not; only the main process logs below errors.

    Under torchrun on a machine without CUDA, a default ``Accelerator()`` does not initialise the process group and
    every process trains alone: pass ``cpu=True`` there, which makes accelerate join the processes over gloo.
    ``trackers``: log to [train] trackers (TensorBoard in ``output/logs``, wandb)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    mixed = config.train["mixed_precision"] if config else "no"
    cpu = launched_distributed() and not torch.cuda.is_available()
    if mixed == "fp16" and not torch.cuda.is_available():
        raise ConfigError("[train] mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on this machine.")
    kwargs = {}
    if trackers and config is not None and config.train["trackers"]:
        if "wandb" in config.train["trackers"] and importlib.util.find_spec("wandb") is None:
            raise ConfigError("[train] trackers names 'wandb', which is not installed: pip install wandb (and "
                              "wandb login), or remove it from the list.")
        kwargs["log_with"] = list(config.train["trackers"])
        kwargs["project_config"] = ProjectConfiguration(project_dir=str(config.output),
                                                        logging_dir=str(config.output / "logs"))
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed, **kwargs)
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise ELLAError(f"The launcher started {expected} processes but accelerate joined {accelerator.num_processes}"
                        "; they would train apart. Launch with torchrun or `accelerate launch --multi_gpu`.")
    if not accelerator.is_main_process:  # one copy of every line per run, not one per process
        logging.getLogger("ella").setLevel(logging.ERROR)
    return accelerator


def set_threads(config: Config, processes_here: int, device: torch.device) -> str:
    """CPU threads for this process: on a CPU the data loader workers and torch's own threads must not ask for more
    cores than there are (OpenMP threads then wait on each other: on a busy 2-core machine one process trained at
    0.8 images/s with torch's default threads and 5 images/s with one). An OMP_NUM_THREADS the user set wins.
    Returns a line for the log."""
    workers = config.train["workers"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if os.environ.get("OMP_NUM_THREADS"):
        return (f"{torch.get_num_threads()} CPU thread(s) per process (OMP_NUM_THREADS), {workers} data loader "
                f"worker(s) per process, {cores} core(s)")
    threads = max(1, cores // max(1, processes_here) - (workers if device.type == "cpu" else 0))
    torch.set_num_threads(threads)
    return (f"{threads} CPU thread(s) per process, {workers} data loader worker(s) (one thread each) per process, "
            f"{processes_here} process(es) on {cores} core(s); set OMP_NUM_THREADS to choose")


def weight_dtype(config: Config) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.train["mixed_precision"]]


def llm_dtype(config: Config, device: torch.device) -> torch.dtype:
    from ..text_encoders import default_dtype

    name = config.model["llm_dtype"]
    return default_dtype(device) if name == "auto" else getattr(torch, name)


def load_encoder(config: Config, device: torch.device):
    """The LLM at [model] llm_layer, refused at once when the layer does not exist (not at the first step)."""
    from ..text_encoders import EncodingCache, load_text_encoder

    # No cross-step cache: a text's features must not depend on which batch first encoded it (exact resume).
    layer = config.model["llm_layer"]
    encoder = load_text_encoder(config.resolve(config.model["llm"]), device, llm_dtype(config, device),
                                cache=EncodingCache(max_entries=0))
    if encoder.layer is None:
        if layer != -1:
            log.warning("ELLA train: [model] llm_layer = %d is ignored: %s is an encoder (T5 family), whose last "
                        "hidden state is used.", layer, config.model["llm"])
        return encoder
    try:
        return encoder.with_layer(layer)
    except TextEncoderError as exc:
        count = encoder.hidden_states
        raise ConfigError(f"[model] llm_layer = {layer} is not a hidden state of {config.model['llm']}, which has "
                          f"{count} (its {count - 1} layers and the embeddings): use -1 (the last) down to {-count}, "
                          f"or 0 to {count - 1}.") from exc


def needs_clip_g(config: Config) -> bool:
    """Whether a training run needs SDXL's CLIP-G: not when the connector's attention pool makes the pooled vector
    (``[connector] pooled = "attention"``), unless the run builds its cache first: cache entries keep CLIP-G's
    vector, so that a run with either kind of pooled vector can read them."""
    from .cache import cache_complete

    cache = config.cache_dir
    return config.connector["pooled"] != "attention" or (cache is not None and not cache_complete(cache))


def token_max_length(config: Config) -> int | None:
    return config.model["max_length"] if config.model["token_length"] == "fixed" else None


def peak_lr(config: Config, family: str) -> float:
    """[train] lr, or the paper's for the base's family when unset."""
    return config.train["lr"] if config.train["lr"] is not None else FAMILY_LR[family]


# -- the processes agreeing -----------------------------------------------------------------------------------------


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def all_agree(accelerator, flag: bool) -> bool:
    """True on every process when any process's ``flag`` is true (one decision for all, e.g. to stop together)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([int(flag)], device=accelerator.device), "sum").item())


def check_sync(accelerator, model) -> list[str]:
    """Every process's weights digest; a process holding other weights stops the run."""
    digest = weights_digest(model)
    value = torch.tensor([int(digest, 16) >> 1], dtype=torch.int64, device=accelerator.device)
    everyone = accelerator.gather(value).tolist()
    digests = [f"{v:016x}" for v in everyone]
    if len(set(everyone)) != 1:
        raise ELLAError(f"The processes hold different weights ({digests}); the distributed setup is broken.")
    return digests
