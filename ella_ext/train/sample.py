"""Sample images from a connector and the base model: DDIM, classifier-free guidance against the empty text (the
reference's negative), the TSC evaluated at every step with that step's timestep."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..connector import Connector
from .config import Config

log = logging.getLogger("ella")


@dataclass
class PromptConditions:
    prompts: list[str]
    features: list[tuple[torch.Tensor, torch.Tensor | None]]  # per prompt: ([1, S, D], mask or None)
    empty: tuple[torch.Tensor, torch.Tensor | None]
    pooled: torch.Tensor | None  # SDXL: [P, 1280]
    empty_pooled: torch.Tensor | None


def encode_prompts(config: Config, base, encoder, prompts: list[str] | None = None) -> PromptConditions:
    from .runtime import token_max_length

    prompts = list(config.sample["prompts"] if prompts is None else prompts)
    max_length = token_max_length(config)

    def one(text: str):
        features, mask = encoder.encode([text], max_length)
        return features, (mask if max_length is None else None)

    pooled = base.pooled(prompts) if prompts else None
    return PromptConditions(prompts, [one(p) for p in prompts], one(""), pooled, base.pooled([""]))


@torch.no_grad()
def generate(config: Config, base, connector: Connector, conditions: PromptConditions) -> list:
    """One PIL image per prompt (seed [sample] seed + the prompt's index)."""
    images = []
    for index, (features, mask) in enumerate(conditions.features):
        clip = None if conditions.pooled is None else conditions.pooled[index : index + 1]
        pooled, empty_pooled = pooled_pair(connector, (features, mask), conditions.empty, clip,
                                           conditions.empty_pooled)
        context_at = connector_contexts(connector, (features, mask), conditions.empty, base.unet.device)
        images += denoise(config, base, context_at, [config.sample["seed"] + index], pooled, empty_pooled,
                          conditions.prompts[index])
    return images


@torch.no_grad()
def pooled_pair(connector: Connector, text, empty, clip_pooled, clip_empty) -> tuple:
    """SDXL's pooled vectors of a text and of the negative: the connector's pool of their features when it has one
    (``[connector] pooled = "attention"``: a training run then has no CLIP-G), else CLIP-G's (given); None, None for
    SD 1.5."""
    if not connector.has_pool:
        return clip_pooled, clip_empty
    device = next(connector.parameters()).device
    pooled = [connector.pooled(features.to(device), None if mask is None else mask.to(device))
              for features, mask in (text, empty)]
    return pooled[0].float(), pooled[1].float()


def connector_contexts(connector: Connector, text, empty, device) -> Callable[[torch.Tensor], tuple]:
    """The TSC's rows at a timestep for a text and for the empty text (the negative): ``t -> (cond, uncond)``."""

    def at(timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for features, mask in (text, empty):
            rows.append(connector(features.to(device), timestep, None if mask is None else mask.to(device)))
        return rows[0], rows[1]

    return at


@torch.no_grad()
def denoise(config: Config, base, context_at: Callable[[torch.Tensor], tuple], seeds: list[int],
            pooled: torch.Tensor | None, empty_pooled: torch.Tensor | None, prompt: str) -> list:
    """Images of one prompt, one per seed, made together: DDIM with [sample] steps and guidance ([sample] cfg)
    against the negative. ``context_at(timestep)`` gives the ``[1, T, W]`` rows of the prompt and of the negative at
    that timestep; each image's noise comes from its own seed alone (a batch draws what single images draw)."""
    from diffusers import DDIMScheduler

    sample = config.sample
    side = sample["resolution"] or config.data["resolution"]
    scheduler = DDIMScheduler.from_config(base.scheduler.config, prediction_type=base.prediction,
                                          clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(sample["steps"])
    device, dtype, count = base.unet.device, base.unet.dtype, len(seeds)
    shape = (1, base.unet.config.in_channels, side // base.vae_factor, side // base.vae_factor)
    latents = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])
    latents = latents.to(device) * scheduler.init_noise_sigma
    added = None
    if base.family == "sdxl":
        both = torch.cat([empty_pooled.expand(count, -1), pooled.expand(count, -1)])
        time_ids = torch.tensor([[side, side, 0, 0, side, side]] * 2 * count, dtype=torch.float32)
        added = base.added_conditions(both, time_ids, dtype)
    for t in scheduler.timesteps:
        cond, uncond = context_at(t.float().reshape(1).to(device))
        context = torch.cat([uncond.expand(count, -1, -1), cond.expand(count, -1, -1)]).to(dtype)
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t).to(dtype)
        out = base.unet(model_in, t.to(device), encoder_hidden_states=context, added_cond_kwargs=added).sample
        out_uncond, out_cond = out.float().chunk(2)
        guided = out_uncond + sample["cfg"] * (out_cond - out_uncond)
        latents = scheduler.step(guided, t, latents).prev_sample
    return [_to_image(base, base.decode_latents(latents[i : i + 1])[0], prompt) for i in range(count)]


def _to_image(base, pixels: torch.Tensor, prompt: str):
    from PIL import Image

    if not torch.isfinite(pixels).all():
        log.warning("ELLA train: the image for %r has non-finite pixels (shown black): the VAE overflowed in %s; set "
                    "[model] vae_dtype = 'float32' or an fp16-fixed [model] vae.", prompt,
                    str(base.vae.dtype).replace("torch.", ""))
        pixels = torch.nan_to_num(pixels, nan=-1.0, posinf=1.0, neginf=-1.0)
    pixels = pixels.clamp(-1, 1)
    array = ((pixels + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def sample_parameters(config: Config, prompt: str, index: int, connector: str) -> str:
    """The image's parameters in the WebUI's own PNG text format (PNG Info reads them): the prompt, then the
    settings line."""
    sample = config.sample
    side = sample["resolution"] or config.data["resolution"]
    settings = {"Steps": sample["steps"], "Sampler": "DDIM", "CFG scale": sample["cfg"],
                "Seed": sample["seed"] + index, "Size": f"{side}x{side}", "Model": Path(config.model["base"]).name,
                "ELLA connector": connector, "ELLA LLM": Path(config.model["llm"]).name,
                "ELLA negative": "the empty text"}
    return prompt + "\nSteps: " + ", ".join(f"{k}: {v}" for k, v in settings.items())[len("Steps: "):]


def save_sample(image, path: Path, config: Config, prompt: str, index: int, connector: str) -> Path:
    """Write a sample as PNG with its prompt and settings in the ``parameters`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", sample_parameters(config, prompt, index, connector))
    image.save(path, pnginfo=info)
    return path


def free_path(folder: Path, stem: str, suffix: str = ".png") -> Path:
    """``folder/stem.png``, or ``stem-2.png``, ``stem-3.png``... when taken: an earlier image is never replaced."""
    path = folder / f"{stem}{suffix}"
    number = 2
    while path.exists():
        path = folder / f"{stem}-{number}{suffix}"
        number += 1
    return path
