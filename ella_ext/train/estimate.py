"""``estimate``: cache size on disk, memory per device and time per step, before anything is trained.

Sizes come from the configs (models built on the meta device, so nothing is loaded); the time per step (and, on
CUDA, the peak memory) is measured by a few real training steps on random inputs at the config's batch and
resolution, unless ``measure`` is off."""

from __future__ import annotations

import time

import torch

from .config import Config
from .data import Skipped, iter_shard, list_sources, make_buckets, pick_bucket

GIB = 2**30


def _param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_sizes(config: Config) -> dict[str, int]:
    """Parameter counts of the frozen models, from their configs only."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoConfig, AutoModel, CLIPTextConfig, CLIPTextModelWithProjection

    from .model import CONFIGS, _single_file_family, is_single_file

    base = config.resolve(config.model["base"])
    if is_single_file(base):
        from safetensors import safe_open

        with safe_open(base, framework="pt") as f:
            family = _single_file_family(set(f.keys()), base)
        folder = config.resolve(config.model["base_config"]) if config.model["base_config"] else str(CONFIGS / family)
    else:
        folder = base
    counts = {}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        counts["unet"] = _param_count(unet)
        counts["vae"] = _param_count(AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")))
        if unet.config.addition_embed_type == "text_time":
            clip = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
            counts["clip_g"] = _param_count(clip)
        llm_config = AutoConfig.from_pretrained(config.resolve(config.model["llm"]))
        if llm_config.model_type in ("t5", "mt5", "umt5"):
            from transformers import T5EncoderModel

            counts["llm"] = _param_count(T5EncoderModel(llm_config))
        else:
            counts["llm"] = _param_count(AutoModel.from_config(llm_config))
    counts["family"] = "sdxl" if "clip_g" in counts else "sd15"
    counts["context_width"] = unet.config.cross_attention_dim
    counts["llm_width"] = getattr(llm_config, "d_model", None) or llm_config.hidden_size
    counts["vae_factor"] = 2 ** (len(AutoencoderKL.load_config(folder, subfolder="vae")["block_out_channels"]) - 1)
    return counts


def estimate(config: Config, measure: bool = True, measure_steps: int = 3) -> dict:
    from ..text_encoders import load_tokenizer
    from .model import connector_config
    from .runtime import llm_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = _meta_sizes(config)
    shape = connector_config(config, sizes["family"], sizes["llm_width"], sizes["context_width"])
    tsc = sum(p.numel() for p in _meta_connector(shape).parameters())
    weight_bytes = {"no": 4, "fp16": 2, "bf16": 2}[config.train["mixed_precision"]]
    feature_bytes = torch.empty((), dtype=llm_dtype(config, device)).element_size()

    skipped = Skipped()
    records, shards = list_sources(config, skipped)
    for index, urls in shards:
        for url in urls:
            records += [r for r, _ in iter_shard(index, url, skipped)]
    buckets = make_buckets(config.data["resolution"], config.data["bucket_step"], config.data["bucket_max_ratio"],
                           config.data["bucketing"])
    tokenizer = load_tokenizer(config.resolve(config.model["llm"]))
    latent_bytes = feature_total = 0
    for record in records:
        w, h = pick_bucket(record.size, buckets)
        latent_bytes += 4 * (w // sizes["vae_factor"]) * (h // sizes["vae_factor"]) * weight_bytes
        if config.model["token_length"] == "fixed":
            tokens = config.model["max_length"]
        else:
            tokens = min(len(tokenizer(record.caption)["input_ids"]), config.model["max_length"])
        feature_total += tokens * sizes["llm_width"] * feature_bytes + (1280 * 4 if sizes["family"] == "sdxl" else 0)
    optimizer_bytes = 2 if config.train["optimizer"] == "adamw8bit" else 8
    frozen = (sizes["unet"] + sizes["vae"] + sizes.get("clip_g", 0)) * weight_bytes
    llm = sizes["llm"] * feature_bytes if not config.train["cache"] else 0
    trainable = tsc * (4 + 4 + optimizer_bytes + (4 if config.train["ema"] else 0))
    report = {
        "images": len(records),
        "skipped": dict(skipped.counts),
        "cache_bytes": latent_bytes + feature_total,
        "tsc_parameters": tsc,
        "frozen_parameters": {k: sizes[k] for k in ("unet", "vae", "clip_g", "llm") if k in sizes},
        "memory_weights_bytes": frozen + llm + trainable,
        "device": str(device),
    }
    if measure:
        report.update(_measure(config, measure_steps))
    return report


def _meta_connector(shape):
    from ..connector import Connector

    with torch.device("meta"):
        return Connector(shape)


def _measure(config: Config, steps: int) -> dict:
    """Time real training steps (random latents, features and timesteps) at the config's batch and resolution."""
    from .feed import Inputs
    from .loop import compute_loss, make_optimizer
    from .model import connector_config, init_connector, load_base
    from .runtime import load_encoder, make_accelerator, weight_dtype

    accelerator = make_accelerator(config)
    device = accelerator.device
    base = load_base(config, device, weight_dtype(config))
    if config.train["gradient_checkpointing"]:
        base.unet.enable_gradient_checkpointing()
    encoder = load_encoder(config, device) if not config.train["cache"] else None
    width = encoder.hidden_size if encoder else _meta_sizes(config)["llm_width"]
    connector = init_connector(connector_config(config, base.family, width, base.context_width), 0).to(device)
    optimizer = make_optimizer(config, list(connector.parameters()))
    connector, optimizer = accelerator.prepare(connector, optimizer)
    batch, side = config.train["batch_size"], config.data["resolution"]
    latent = side // base.vae_factor
    tokens = config.model["max_length"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps + 1):
        generator = torch.Generator().manual_seed(step)
        inputs = Inputs(
            torch.randn(batch, base.unet.config.in_channels, latent, latent, generator=generator).to(device),
            torch.randn(batch, tokens, width, generator=generator).to(device), None,
            torch.randint(0, 1000, (batch,), generator=generator).to(device),
            torch.randn(batch, base.unet.config.in_channels, latent, latent, generator=generator).to(device),
            torch.randn(batch, 1280).to(device) if base.family == "sdxl" else None,
            torch.tensor([[side, side, 0, 0, side, side]] * batch, dtype=torch.float32)
            if base.family == "sdxl" else None)
        if encoder is not None:  # the on-the-fly LLM pass is part of a step
            encoder.encode(["a photo of a cat"] * batch, config.model["max_length"])
        start = time.perf_counter()
        loss = compute_loss(connector, base, inputs, accelerator)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    result = {"seconds_per_step": sum(times) / len(times), "measured_steps": len(times)}
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def format_report(report: dict, config: Config) -> str:
    lines = [
        f"images: {report['images']}" + (f" (skipped: {report['skipped']})" if report["skipped"] else ""),
        f"cache on disk: {report['cache_bytes'] / GIB:.3f} GiB (latents in the frozen models' dtype, LLM features "
        f"{'padded to max_length' if config.model['token_length'] == 'fixed' else 'real tokens only'})",
        f"TSC: {report['tsc_parameters'] / 1e6:.1f} M parameters",
        "frozen: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in report["frozen_parameters"].items()),
        f"memory per device, weights + gradients + optimiser: {report['memory_weights_bytes'] / GIB:.2f} GiB "
        "(activations come on top)",
    ]
    if "seconds_per_step" in report:
        accum = config.train["grad_accum"]
        per_step = report["seconds_per_step"] * accum
        lines.append(f"time per optimiser step on {report['device']}: {per_step:.3f} s (measured over "
                     f"{report['measured_steps']} micro-batches of {config.train['batch_size']}); "
                     f"{config.train['steps']} steps: {per_step * config.train['steps'] / 3600:.2f} h per process")
    if "peak_memory_bytes" in report:
        lines.append(f"peak CUDA memory measured: {report['peak_memory_bytes'] / GIB:.2f} GiB")
    return "\n".join(lines)
