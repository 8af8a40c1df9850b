"""What a run says about itself: the summary logged before step 1 (data, buckets, epochs, batch, precision, what
trains, memory) and the training record written into every connector file (``ella.training``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from .. import __version__
from .config import Config

GIB = 2**30
SHOWN_BUCKETS = 8


def size_text(n_bytes: float) -> str:
    """``1.23 GiB``, or MiB below a GiB."""
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"


def duration_text(seconds: float) -> str:
    """``3.4 h``, ``12 min`` or ``40 s``."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def images_per_source(config: Config, data) -> list[int | None]:
    """Usable images of each [[data.sources]] (None for streamed shards, which are counted as they are read)."""
    if not data.records and not data.cached:
        return [None] * len(config.sources)
    counts = Counter(r.source for r in data.records)
    return [counts.get(i, 0) for i in range(len(config.sources))]


def training_record(config: Config, base, data, processes: int, lr: float, llm: str,
                    validation: dict | None = None) -> dict:
    """How the connector is trained, as a connector file's ``ella.training`` JSON: settings, base and LLM names,
    data source names (not paths) and counts, the held-out set's counts (``validation``, when there is one), the
    trainer's version. Nothing that differs between two runs of the same config (no times, no absolute paths), so
    the same run gives the same file."""
    train, model = config.train, config.model
    counts = images_per_source(config, data)
    extra = {"validation": validation} if validation is not None else {}
    return {**extra,
        "base": base.name, "family": base.family, "prediction": base.prediction,
        "llm": llm, "llm_layer": model["llm_layer"], "token_length": model["token_length"],
        "max_length": model["max_length"],
        **({"pooled": config.connector["pooled"]} if base.family == "sdxl" else {}),  # SDXL's pooled vector
        "lr": lr, "lr_schedule": train["lr_schedule"], "warmup_steps": train["warmup_steps"],
        "weight_decay": train["weight_decay"], "optimizer": train["optimizer"],
        "batch_size": train["batch_size"], "grad_accum": train["grad_accum"], "processes": processes,
        "global_batch": train["batch_size"] * train["grad_accum"] * processes, "steps": train["steps"],
        "resolution": config.data["resolution"], "bucketing": config.data["bucketing"], "seed": train["seed"],
        "mixed_precision": train["mixed_precision"], "ema": train["ema"], "min_snr_gamma": train["min_snr_gamma"],
        "noise_offset": train["noise_offset"], "max_grad_norm": train["max_grad_norm"],
        "sources": [{"name": Path(s.path).name, "images": n, "repeats": s.repeats, "caption_dropout": s.caption_dropout}
                    for s, n in zip(config.sources, counts)],
        "trainer": f"ella_ext.train {__version__}",
    }


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def weights_memory(config: Config, frozen: int, llm: int, tsc: int, llm_bytes: int) -> int:
    """Bytes per device for weights, gradients and optimiser state (activations come on top): the frozen models in
    the training precision, the LLM (unless features come from the cache), and the TSC in fp32 with its gradient,
    AdamW's two moments (8-bit: 2 bytes) and the EMA copy."""
    weight_bytes = {"no": 4, "fp16": 2, "bf16": 2}[config.train["mixed_precision"]]
    optimizer_bytes = 2 if config.train["optimizer"] == "adamw8bit" else 8
    trainable = tsc * (4 + 4 + optimizer_bytes + (4 if config.train["ema"] else 0))
    return frozen * weight_bytes + (llm * llm_bytes if not config.train["cache"] else 0) + trainable


def cpu_bf16_note(config: Config, device: torch.device) -> str | None:
    """bf16 on a CPU: fast only where the CPU computes in it (seen on a 2-core CPU without: a full-size SDXL step had
    not finished after 6 minutes, against 13.5 s in float32)."""
    if config.train["mixed_precision"] != "bf16" or device.type != "cpu":
        return None
    return ("bf16 on a CPU is fast only where the CPU computes in bf16 (AVX512-BF16 or AMX); elsewhere it is "
            "emulated and can be many times slower than mixed_precision = 'no'")


def summary_lines(config: Config, base, data, record: dict, connector, done: int, feature_dtype: torch.dtype,
                  encoder=None) -> list[str]:
    train = config.train
    lines = []
    for source, count in zip(record["sources"], images_per_source(config, data)):
        what = "streamed (counted as read)" if count is None else f"{count} image(s)"
        lines.append(f"data {source['name']}: {what} x {source['repeats']} repeat(s), caption dropout "
                     f"{source['caption_dropout']}")
    skipped = getattr(data, "skipped", None)
    if skipped is not None and sum(skipped.counts.values()):
        lines.append(f"skipped: {sum(skipped.counts.values())} item(s) ({skipped.summary()}); the list is in "
                     "skipped.txt")
    global_batch = record["global_batch"]
    if data.buckets_of is not None:
        repeats = [config.sources[r.source].repeats for r in data.records]
        buckets = Counter()
        for bucket, repeat in zip(data.buckets_of, repeats):
            buckets[bucket] += repeat
        shown = ", ".join(f"{w}x{h}: {n}" for (w, h), n in buckets.most_common(SHOWN_BUCKETS))
        more = f" and {len(buckets) - SHOWN_BUCKETS} more" if len(buckets) > SHOWN_BUCKETS else ""
        lines.append(f"buckets (images per epoch): {shown}{more}")
        per_epoch = sum(buckets.values())
        steps_per_epoch = max(1, per_epoch // global_batch)
        lines.append(f"an epoch: {per_epoch} images = about {steps_per_epoch} steps of {global_batch}; "
                     f"{train['steps']} steps = {train['steps'] * global_batch / max(1, per_epoch):.1f} epochs")
    lines.append(f"global batch {global_batch} = {record['processes']} process(es) x batch {train['batch_size']} x "
                 f"accumulation {train['grad_accum']}; {train['steps']} steps ({done} done)")
    vae = next(base.vae.parameters())
    lines.append(f"precision: frozen models {_dtype(base.unet.dtype)} (mixed_precision = "
                 f"'{train['mixed_precision']}'), VAE {_dtype(vae.dtype)}, LLM features {_dtype(feature_dtype)}; "
                 f"the connector trains in float32 and is saved in {train['save_precision']}")
    lines += [note for note in [cpu_bf16_note(config, base.unet.device)] if note]
    frozen = {"UNet": _parameters(base.unet), "VAE": _parameters(base.vae)}
    if base.clip_g is not None:
        frozen["CLIP-G"] = _parameters(base.clip_g)
    llm = _parameters(getattr(encoder, "model", None))
    if llm:
        frozen["LLM"] = llm
    tsc = _parameters(connector)
    pool = _parameters(getattr(connector, "pool", None))
    lines.append("frozen: " + ", ".join(f"{name} {count / 1e6:.1f} M" for name, count in frozen.items())
                 + (" (LLM features from the cache)" if data.cached else "")
                 + f"; trained: the connector, {tsc / 1e6:.1f} M parameters"
                 + (f" (its attention pool, SDXL's pooled vector: {pool / 1e6:.1f} M)" if pool else ""))
    memory = weights_memory(config, sum(v for k, v in frozen.items() if k != "LLM"), llm, tsc,
                            torch.empty((), dtype=feature_dtype).element_size())
    lines.append(f"memory per device for weights, gradients and optimiser: {size_text(memory)} (activations come "
                 "on top; `estimate` measures a step's peak on a GPU)")
    loss = "MSE" + (f", Min-SNR gamma {train['min_snr_gamma']}" if train["min_snr_gamma"] else "")
    offset = f", noise offset {train['noise_offset']}" if train["noise_offset"] else ""
    lines.append(f"lr {record['lr']:g} ({train['lr_schedule']}, warm-up {train['warmup_steps']} steps), {loss}"
                 f"{offset}; the time per step is logged after the first steps")
    return lines
