"""Which noise levels a sampler will call its model at, found before sampling by running the sampler on a stand-in.

The WebUIs' samplers are functions called as ``func(model, x, sigmas=... or timesteps=..., extra_args=...,
callback=..., disable=..., **options)`` (k-diffusion's convention, which A1111's and Forge's own samplers follow). The
noise level of every model call follows from the schedule for all but adaptive samplers: the extra evaluations of
second-order samplers (Heun's next sigma, DPM2's midpoint, DPM++ 2S / SDE's intermediate sigmas), the restarts of
Restart, PLMS's warm-up step, UniPC's continuous times. Rather than re-deriving each sampler's arithmetic (and
getting a last bit wrong), ``record`` runs the sampler function itself once, on a zero latent, with a recording
stand-in for the model that returns its input unchanged, so every sigma is computed by the sampler's own code, on
the schedule's own device, exactly as the real run will compute it.

What the dry run must not do is change the real run:
- noise: the hosts route the samplers' ``randn_like`` through ``k_diffusion.sampling.torch`` (their ``TorchHijack``,
  which draws from the image's seeded generator): for the dry run that name (and the sampler module's own ``torch``)
  points at zero noise; a ``noise_sampler`` argument (DPM++ SDE's Brownian tree) is replaced by zero noise; any
  other draw from torch's global generators is undone (``torch.random.fork_rng``);
- callbacks: a no-op callback (the host's updates the progress state and previews), progress bars disabled;
- the model: the stand-in never calls the host's denoiser; attributes it is asked for are read from it, attributes
  a sampler sets stay on the stand-in.
A sampler whose calls depend on the model's output (DPM adaptive) gives a prediction the real run will not follow:
its calls then simply find no precomputed rows. The dry run stops after ``limit`` calls.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger("ella")


class _TooManyCalls(Exception):
    pass


class _Recorder:
    """Stands in for the host's CFG denoiser: records the noise level of each call and returns the input."""

    def __init__(self, denoiser: Any, limit: int):
        self.__dict__.update(_denoiser=denoiser, _limit=limit, sigmas=[])

    def __call__(self, x, sigma, *args, **kwargs):
        sigma = torch.as_tensor(sigma)
        self.sigmas.append(sigma.detach().clone())
        if len(self.sigmas) > self._limit:
            raise _TooManyCalls
        # A1111's DDIM CFG++ reads the denoiser's unconditional prediction after each call.
        self.__dict__["last_noise_uncond"] = x
        return x

    def __getattr__(self, name):
        return getattr(self.__dict__["_denoiser"], name)

    def __setattr__(self, name, value):
        self.__dict__[name] = value


class _NoNoise:
    """``torch`` for the dry run: every attribute is torch's, but random draws are zeros."""

    @staticmethod
    def randn_like(x, *args, **kwargs):
        return torch.zeros_like(x, *args, **kwargs)

    rand_like = randn_like

    @staticmethod
    def randn(*size, **kwargs):
        kwargs.pop("generator", None)
        return torch.zeros(*size, **kwargs)

    rand = randn

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def _quiet_noise(func: Callable, device: torch.device):
    """Point the sampler's noise at zeros for the duration, and undo any draw from torch's global generators."""
    namespaces = []
    kd_sampling = sys.modules.get("k_diffusion.sampling")
    if kd_sampling is not None and hasattr(kd_sampling, "torch"):
        namespaces.append(vars(kd_sampling))
    own = getattr(func, "__globals__", None)
    if own is not None and "torch" in own and all(own is not n for n in namespaces):
        namespaces.append(own)
    saved = [(namespace, namespace["torch"]) for namespace in namespaces]
    quiet = _NoNoise()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        for namespace, _ in saved:
            namespace["torch"] = quiet
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for namespace, value in saved:
            namespace["torch"] = value


def record(func: Callable, denoiser: Any, x: torch.Tensor, args: Sequence[Any], kwargs: dict[str, Any],
           limit: int) -> list[torch.Tensor] | None:
    """The noise level of each model call ``func(denoiser, x, *args, **kwargs)`` would make, in call order (each as
    the sampler hands it to the model: one value per image), or None when the dry run cannot tell (it raised, or
    made more than ``limit`` calls)."""
    recorder = _Recorder(denoiser, limit)
    zero = torch.zeros_like(x)
    options = dict(kwargs)
    options["callback"] = lambda *_args, **_kwargs: None
    options["disable"] = True
    if options.get("noise_sampler") is not None:
        options["noise_sampler"] = lambda *_args, **_kwargs: torch.zeros_like(zero)
    try:
        with torch.no_grad(), _quiet_noise(func, x.device):
            func(recorder, zero, *args, **options)
    except _TooManyCalls:
        log.info("ELLA: the sampler made more than %d calls in a dry run; its rows are computed per call", limit)
        return None
    except Exception as err:  # a sampler this dry run does not suit: per-call computation, as before
        log.info("ELLA: could not foresee this sampler's timesteps (%s: %s); its rows are computed per call",
                 type(err).__name__, err)
        return None
    return recorder.sigmas
