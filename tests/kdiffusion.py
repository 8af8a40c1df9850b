"""The real k-diffusion package's ``external.py`` and ``sampling.py`` (the code A1111's and Forge classic's
k-diffusion samplers run, at the commit A1111 pins), loaded on their own.

k-diffusion's package __init__ imports its training stack (torchvision, kornia, wandb, ...), which neither the hosts'
sampling path nor these tests need; this loads the package's real ``external.py`` (``DiscreteSchedule``,
``CompVisDenoiser``) and ``sampling.py`` (the samplers and schedules) under a package whose ``utils`` holds only
``append_dims`` (the one helper they use: the real ``utils.py`` imports torchvision). ``sampling.py``'s imports that
no sampler used here needs are stand-ins that fail if called: scipy's ``integrate`` (LMS's coefficients), torchdiffeq's
``odeint`` (log-likelihood), torchsde (the Brownian tree behind DPM++ SDE's default noise).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types

import pytest
import torch


def sd15_alphas_cumprod() -> torch.Tensor:
    # SD 1.x: "scaled_linear" betas from 0.00085 to 0.012 over 1000 steps (v1-inference.yaml linear_start/end).
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def _missing(name):
    def call(*args, **kwargs):
        raise NotImplementedError(f"{name} is not installed in the test environment")

    return call


def _stand_ins() -> dict[str, types.ModuleType]:
    modules = {}
    if importlib.util.find_spec("scipy") is None:
        scipy = types.ModuleType("scipy")
        scipy.integrate = types.SimpleNamespace(quad=_missing("scipy"))
        modules["scipy"] = scipy
    if importlib.util.find_spec("torchdiffeq") is None:
        torchdiffeq = types.ModuleType("torchdiffeq")
        torchdiffeq.odeint = _missing("torchdiffeq")
        modules["torchdiffeq"] = torchdiffeq
    if importlib.util.find_spec("torchsde") is None:
        torchsde = types.ModuleType("torchsde")
        torchsde.BrownianTree = _missing("torchsde")
        modules["torchsde"] = torchsde
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):
        """Appends dimensions to the end of a tensor until it has target_dims dimensions (k-diffusion's helper)."""
        extra = target_dims - x.ndim
        if extra < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
        return x[(...,) + (None,) * extra]

    utils.append_dims = append_dims
    modules["k_diffusion.utils"] = utils
    return modules


def _load(name: str, path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def real_k_diffusion():
    """Yields ``(external, sampling)``: the real modules, registered as ``k_diffusion.external`` /
    ``k_diffusion.sampling`` for as long as the context lasts (the hosts' samplers find them there)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.fail("the k-diffusion package is not installed: run the README's setup command")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    stand_ins = _stand_ins()
    names = ["k_diffusion", "k_diffusion.sampling", "k_diffusion.external", *stand_ins]
    saved = {k: sys.modules.get(k) for k in names}
    sys.modules["k_diffusion"] = package
    sys.modules.update(stand_ins)
    try:
        folder = spec.submodule_search_locations[0]
        package.utils = stand_ins["k_diffusion.utils"]
        package.sampling = _load("k_diffusion.sampling", folder + "/sampling.py")
        package.external = _load("k_diffusion.external", folder + "/external.py")
        yield package.external, package.sampling
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v

