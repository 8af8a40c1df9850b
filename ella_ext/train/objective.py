"""What training minimises and how it steps: the loss of one micro-batch (the diffusion MSE, optionally Min-SNR
weighted; ``predict`` is shared with the held-out loss), the learning rate at each step, the optimiser."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import Config, ConfigError
from .feed import Inputs


def compute_loss(connector, base, inputs: Inputs, accelerator, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """The diffusion MSE on the UNet's prediction (the paper's loss); with ``min_snr_gamma`` each sample's MSE is
    weighted by min(SNR, gamma) / SNR for epsilon targets, min(SNR, gamma) / (SNR + 1) for v targets (Min-SNR,
    Hang et al. 2023, arXiv 2303.09556), which keeps the low-noise steps from dominating."""
    prediction, target = predict(connector, base, inputs, accelerator)
    if not min_snr_gamma:
        return F.mse_loss(prediction.float(), target.float())
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(base, inputs.timesteps, min_snr_gamma)).mean()


def predict(connector, base, inputs: Inputs, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's prediction on the noised latents with the connector's context, and the target it is scored
    against (the noise for epsilon, v for v-prediction). SDXL's pooled text vector is the connector's attention
    pool of the same features when it has one (its gradient trains the pool), else ``inputs.pooled`` (CLIP-G's)."""
    from .model import target_of

    dtype = base.unet.dtype
    noisy = base.scheduler.add_noise(inputs.latents, inputs.noise, inputs.timesteps)
    target = target_of(base, inputs.latents, inputs.noise, inputs.timesteps)
    pooled = inputs.pooled
    with accelerator.autocast():
        if accelerator.unwrap_model(connector).has_pool:  # through the wrapper's forward: DDP sees the pool's use
            context, pooled = connector(inputs.features, inputs.timesteps.float(), inputs.mask, return_pooled=True)
        else:
            context = connector(inputs.features, inputs.timesteps.float(), inputs.mask)
        prediction = base.unet(noisy.to(dtype), inputs.timesteps, encoder_hidden_states=context.to(dtype),
                               added_cond_kwargs=base.added_conditions(pooled, inputs.time_ids, dtype)).sample
    return prediction, target


def min_snr_weights(base, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample Min-SNR weights at these training timesteps (SNR = alpha_bar / (1 - alpha_bar))."""
    alpha_bar = base.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if base.prediction == "v_prediction" else clipped / snr


def lr_at(config: Config, step: int, peak: float) -> float:
    """The learning rate of optimiser step ``step`` (0-based): a linear warm-up over warmup_steps (step 0 gets
    peak / warmup_steps), then [train] lr_schedule: constant, or a cosine or linear decay that reaches 0 at
    [train] steps. A function of the step alone, so a resumed run needs no scheduler state."""
    warmup, steps = config.train["warmup_steps"], config.train["steps"]
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    schedule = config.train["lr_schedule"]
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (1.0 - progress)


def make_optimizer(config: Config, params, lr: float):
    if config.train["optimizer"] == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ConfigError("[train] optimizer = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes "
                              "(CUDA only), or use 'adamw'.") from exc
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=config.train["weight_decay"])
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.train["weight_decay"])
