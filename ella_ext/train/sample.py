"""Sample images from a connector and the base model: DDIM, classifier-free guidance against the empty text (the
reference's negative), the TSC evaluated at every step with that step's timestep."""

from __future__ import annotations

import logging
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
    """One PIL image per prompt."""
    from diffusers import DDIMScheduler
    from PIL import Image

    sample = config.sample
    side = sample["resolution"] or config.data["resolution"]
    scheduler = DDIMScheduler.from_config(base.scheduler.config, prediction_type=base.prediction,
                                          clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(sample["steps"])
    device, dtype = base.unet.device, base.unet.dtype
    images = []
    for index, (features, mask) in enumerate(conditions.features):
        generator = torch.Generator().manual_seed(sample["seed"] + index)
        shape = (1, base.unet.config.in_channels, side // base.vae_factor, side // base.vae_factor)
        latents = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
        added = None
        if base.family == "sdxl":
            pooled = torch.cat([conditions.empty_pooled, conditions.pooled[index : index + 1]])
            time_ids = torch.tensor([[side, side, 0, 0, side, side]] * 2, dtype=torch.float32)
            added = base.added_conditions(pooled, time_ids, dtype)
        for t in scheduler.timesteps:
            timestep = t.float().reshape(1).to(device)
            cond = connector(features.to(device), timestep, None if mask is None else mask.to(device))
            empty_features, empty_mask = conditions.empty
            uncond = connector(empty_features.to(device), timestep,
                               None if empty_mask is None else empty_mask.to(device))
            context = torch.cat([uncond, cond]).to(dtype)
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t).to(dtype)
            out = base.unet(model_in, t.to(device), encoder_hidden_states=context, added_cond_kwargs=added).sample
            out_uncond, out_cond = out.float().chunk(2)
            guided = out_uncond + sample["cfg"] * (out_cond - out_uncond)
            latents = scheduler.step(guided, t, latents).prev_sample
        pixels = base.decode_latents(latents)[0]
        if not torch.isfinite(pixels).all():
            log.warning("ELLA train: the sample for %r has non-finite pixels (shown black): the VAE overflowed in "
                        "%s; set [model] vae_dtype = 'float32' or an fp16-fixed [model] vae.",
                        conditions.prompts[index], str(base.vae.dtype).replace("torch.", ""))
            pixels = torch.nan_to_num(pixels, nan=-1.0, posinf=1.0, neginf=-1.0)
        pixels = pixels.clamp(-1, 1)
        array = ((pixels + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        images.append(Image.fromarray(array))
    return images


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
