"""The real k-diffusion package's ``external.py`` (the code A1111's k-diffusion samplers run), loaded on its own.

k-diffusion's package __init__ imports its training stack (torchvision, kornia, wandb, ...), which neither the hosts'
sampling path nor these tests need; this loads the package's real ``external.py`` (which holds ``DiscreteSchedule``
and ``CompVisDenoiser``) under a package whose ``sampling``/``utils`` submodules are empty placeholders.
``sigma_to_t``/``t_to_sigma``/``get_sigmas`` use neither.
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


@contextlib.contextmanager
def real_k_external():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.fail("the k-diffusion package is not installed: run the README's setup command")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.sampling", "k_diffusion.utils",
                                              "k_diffusion.external")}
    sys.modules.update({"k_diffusion": package, "k_diffusion.sampling": types.ModuleType("k_diffusion.sampling"),
                        "k_diffusion.utils": types.ModuleType("k_diffusion.utils")})
    try:
        path = spec.submodule_search_locations[0] + "/external.py"
        ext_spec = importlib.util.spec_from_file_location("k_diffusion.external", path)
        module = importlib.util.module_from_spec(ext_spec)
        ext_spec.loader.exec_module(module)
        yield module
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


