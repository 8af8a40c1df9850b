"""``estimate``: cache size on disk, memory per device and time per step, before anything is trained.

Sizes come from the configs (models built on the meta device, so nothing is loaded); the time per step (and, on
CUDA, the peak memory) is measured by a few real training steps on random inputs at the config's batch and
resolution, unless ``measure`` is off."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import TextEncoderError
from .batches import make_buckets, pick_bucket
from .config import Config
from .data import Skipped, iter_shard, list_sources
from .model import BaseModelError, refuse_pickle
from .summary import duration_text, size_text, weights_memory


def _param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_sizes(config: Config) -> dict[str, int]:
    """Parameter counts of the frozen models, from their configs only."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoConfig, AutoModel, CLIPTextConfig, CLIPTextModelWithProjection

    from ..llm_files import T5_FAMILY
    from .model import _config_folder, _single_file_family, is_single_file, unet_pooled_width

    base = config.resolve(config.model["base"])
    refuse_pickle(base, "[model] base")
    if is_single_file(base):
        from safetensors import safe_open

        if not Path(base).is_file():
            raise BaseModelError(f"[model] base = {base!r}: no such file.")
        try:
            with safe_open(base, framework="pt") as f:
                family = _single_file_family(set(f.keys()), base)
        except BaseModelError:
            raise
        except Exception as exc:  # safetensors raises its own types
            raise BaseModelError(f"{base} could not be read as safetensors ({exc}); it may be a partial "
                                 "download.") from exc
        folder = _config_folder(config, family, base)
    else:
        folder = base
    counts = {}
    try:
        unet_config = UNet2DConditionModel.load_config(folder, subfolder="unet")
        vae_config = AutoencoderKL.load_config(folder, subfolder="vae")
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"[model] base = {base!r} is not a diffusers pipeline (folder or hub id with unet/ and "
                             f"vae/ configs) or a .safetensors single file that could be read: {exc}") from exc
    try:
        llm_config = AutoConfig.from_pretrained(config.resolve(config.model["llm"]))
    except (OSError, ValueError) as exc:
        raise TextEncoderError(f"[model] llm = {config.model['llm']!r}: no LLM config could be read there ({exc}). "
                               "Give an LLM folder with config.json, or a hub id.") from exc
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        counts["unet"] = _param_count(unet)
        counts["vae"] = _param_count(AutoencoderKL.from_config(vae_config))
        if unet.config.addition_embed_type == "text_time":
            clip_config = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")
            counts["clip_g"] = _param_count(CLIPTextModelWithProjection(clip_config))
            counts["pooled_width"] = clip_config.projection_dim
            counts["unet_pooled_width"] = unet_pooled_width(unet_config)
        if llm_config.model_type in T5_FAMILY:
            from transformers import T5EncoderModel

            counts["llm"] = _param_count(T5EncoderModel(llm_config))
        else:
            counts["llm"] = _param_count(AutoModel.from_config(llm_config))
    counts["family"] = "sdxl" if "clip_g" in counts else "sd15"
    counts["context_width"] = unet.config.cross_attention_dim
    counts["llm_width"] = getattr(llm_config, "d_model", None) or llm_config.hidden_size
    counts["vae_factor"] = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return counts


def estimate(config: Config, measure: bool = True, measure_steps: int = 3) -> dict:
    from ..llm_files import load_tokenizer
    from .model import connector_config
    from .runtime import llm_dtype, needs_clip_g

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = _meta_sizes(config)
    shape = connector_config(config, sizes["family"], sizes["llm_width"], sizes["context_width"],
                             sizes.get("unet_pooled_width"))
    meta = _meta_connector(shape)
    tsc = sum(p.numel() for p in meta.parameters())  # with its attention pool, when it has one
    from .model import vae_dtype_for
    from .runtime import weight_dtype

    latent_dtype = vae_dtype_for(config, sizes["family"], weight_dtype(config))
    latent_item = torch.empty((), dtype=latent_dtype).element_size()
    feature_bytes = torch.empty((), dtype=llm_dtype(config, device)).element_size()

    skipped = Skipped()
    records, shards = list_sources(config, skipped)
    for index, urls in shards:
        for url in urls:
            records += [r for r, _ in iter_shard(index, url, skipped, empty_captions=config.data["empty_captions"],
                                                 split=config.validation["split"])]
    buckets = make_buckets(config.data["resolution"], config.data["bucket_step"], config.data["bucket_max_ratio"],
                           config.data["bucketing"])
    tokenizer = load_tokenizer(config.resolve(config.model["llm"]))
    latent_bytes = feature_total = 0
    for record in records:
        w, h = pick_bucket(record.size, buckets)
        latent_bytes += 4 * (w // sizes["vae_factor"]) * (h // sizes["vae_factor"]) * latent_item
        if config.model["token_length"] == "fixed":
            tokens = config.model["max_length"]
        else:
            tokens = min(len(tokenizer(record.caption)["input_ids"]), config.model["max_length"])
        feature_total += tokens * sizes["llm_width"] * feature_bytes + 4 * sizes.get("pooled_width", 0)
    if not needs_clip_g(config):  # the connector's pool makes SDXL's pooled vector: CLIP-G is not loaded
        sizes.pop("clip_g", None)
    frozen = sizes["unet"] + sizes["vae"] + sizes.get("clip_g", 0)
    report = {
        "images": len(records),
        "skipped": dict(skipped.counts),
        "cache_bytes": latent_bytes + feature_total,
        "tsc_parameters": tsc,
        "pool_parameters": sum(p.numel() for p in meta.pool.parameters()) if meta.has_pool else 0,
        "frozen_parameters": {k: sizes[k] for k in ("unet", "vae", "clip_g", "llm") if k in sizes},
        "memory_weights_bytes": weights_memory(config, frozen, sizes["llm"], tsc, feature_bytes),
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
    """Time real training steps (random latents, features and timesteps) at the config's batch and resolution;
    without a cache a step also runs the VAE on its images, the LLM and (SDXL) CLIP-G on its captions, so those are
    timed too."""
    from .feed import Inputs
    from .model import connector_config, init_connector, load_base
    from .objective import compute_loss, make_optimizer
    from .runtime import load_encoder, make_accelerator, needs_clip_g, peak_lr, weight_dtype

    accelerator = make_accelerator(config)
    device = accelerator.device
    base = load_base(config, device, weight_dtype(config), clip_g=needs_clip_g(config))
    if config.train["gradient_checkpointing"]:
        base.unet.enable_gradient_checkpointing()
    encoder = load_encoder(config, device) if not config.train["cache"] else None
    width = encoder.hidden_size if encoder else _meta_sizes(config)["llm_width"]
    shape = connector_config(config, base.family, width, base.context_width, base.pooled_width)
    connector = init_connector(shape, 0).to(device)
    optimizer = make_optimizer(config, list(connector.parameters()), peak_lr(config, base.family))
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
            torch.randn(batch, base.pooled_width).to(device) if base.family == "sdxl" else None,
            torch.tensor([[side, side, 0, 0, side, side]] * batch, dtype=torch.float32)
            if base.family == "sdxl" else None)
        start = time.perf_counter()
        if encoder is not None:  # on the fly, a step also encodes its images and captions (feed.make_inputs)
            captions = ["a photo of a cat"] * batch
            with torch.no_grad():
                base.encode_pixels(torch.randn(batch, 3, side, side, generator=generator).to(device))
                encoder.encode(captions, config.model["max_length"])
                base.pooled(captions)  # SDXL's CLIP-G pass; nothing for SD 1.5 or without CLIP-G
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
        f"cache on disk: {size_text(report['cache_bytes'])} (latents in the VAE's dtype, LLM features "
        f"{'padded to max_length' if config.model['token_length'] == 'fixed' else 'real tokens only'})",
        f"TSC: {report['tsc_parameters'] / 1e6:.1f} M parameters"
        + (f" (with its attention pool, {report['pool_parameters'] / 1e6:.1f} M)" if report["pool_parameters"] else ""),
        "frozen: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in report["frozen_parameters"].items()),
        f"memory per device, weights + gradients + optimiser: {size_text(report['memory_weights_bytes'])} "
        "(activations come on top)",
    ]
    if "seconds_per_step" in report:
        accum = config.train["grad_accum"]
        per_step = report["seconds_per_step"] * accum
        lines.append(f"time per optimiser step on {report['device']}: {per_step:.3f} s (measured over "
                     f"{report['measured_steps']} micro-batches of {config.train['batch_size']}); "
                     f"{config.train['steps']} steps: {duration_text(per_step * config.train['steps'])} per process")
    if "peak_memory_bytes" in report:
        lines.append(f"peak CUDA memory measured: {size_text(report['peak_memory_bytes'])}")
    return "\n".join(lines)
