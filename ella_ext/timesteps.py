"""Noise level (sigma) -> DDPM timestep, for the TSC.

The TSC was trained on DDPM timestep indices 0..999. k-diffusion samplers hand the model a sigma; a model's
``alphas_cumprod`` gives the sigma of every discrete timestep, ``sigma_t = sqrt((1 - a_t) / a_t)``, and a sigma in
between maps to a fractional timestep by linear interpolation in log-sigma (what k-diffusion's
``DiscreteSchedule.sigma_to_t`` does). Samplers that already
work in timesteps (DDIM, PLMS, UniPC in A1111) need no mapping.
"""

from __future__ import annotations

import torch

from .errors import InputError


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


class TimestepSchedule:
    """A discrete schedule's sigmas (ascending with the timestep), mapping sigmas to timesteps."""

    def __init__(self, sigmas: torch.Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
        if sigmas.numel() < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()) or not bool((sigmas > 0).all()):
            raise InputError(
                "A timestep schedule needs at least two positive sigmas, strictly ascending: pass the model's "
                "alphas_cumprod (decreasing from near 1) or its sigmas in ascending order."
            )
        self.sigmas = sigmas
        self.log_sigmas = sigmas.log()
        self._on_device: dict[torch.device, torch.Tensor] = {sigmas.device: self.log_sigmas}

    def _log_sigmas(self, device: torch.device) -> torch.Tensor:
        """The schedule on ``device``, copied there once (the per-call path must not copy it every time)."""
        found = self._on_device.get(device)
        if found is None:
            found = self._on_device[device] = self.log_sigmas.to(device)
        return found

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> TimestepSchedule:
        return cls(sigmas_from_alphas_cumprod(alphas_cumprod).float())

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Fractional timestep of each sigma; float32, same shape."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        log_sigmas = self._log_sigmas(sigma.device)
        log_sigma = sigma.log().reshape(-1)
        last = log_sigmas.shape[0] - 1
        # Index of the last schedule entry <= log_sigma (0 when there is none), kept below the final entry.
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, last - 1)
        low_value, high_value = log_sigmas[low], log_sigmas[low + 1]
        weight = ((low_value - log_sigma) / (low_value - high_value)).clamp(0, 1)
        return ((1 - weight) * low + weight * (low + 1)).reshape(sigma.shape)
