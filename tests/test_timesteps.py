"""sigma -> timestep against the real k-diffusion package (the code A1111's k-diffusion samplers run): the sigmas and
``sigma_to_t`` of its real ``external.py``'s ``DiscreteEpsDDPMDenoiser`` (a ``DiscreteSchedule``, what A1111's
``CompVisDenoiser`` is), loaded without the package's training stack by ``tests/kdiffusion.py``.
"""

from __future__ import annotations

import pytest
import torch

from ella_ext.errors import InputError
from ella_ext.timesteps import TimestepSchedule, sigmas_from_alphas_cumprod

from .kdiffusion import real_k_diffusion, sd15_alphas_cumprod


@pytest.fixture(scope="module")
def k_external():
    with real_k_diffusion() as (external, _):
        yield external


@pytest.fixture(scope="module")
def denoiser(k_external):
    # A1111 wraps the UNet in k-diffusion's CompVisDenoiser, a DiscreteEpsDDPMDenoiser over alphas_cumprod.
    return k_external.DiscreteEpsDDPMDenoiser(torch.nn.Identity(), sd15_alphas_cumprod().float(), quantize=False)


def sample_sigmas(denoiser):
    karras = (denoiser.sigma_max ** (1 / 7) + torch.linspace(0, 1, 37) * (
        denoiser.sigma_min ** (1 / 7) - denoiser.sigma_max ** (1 / 7))) ** 7
    return torch.cat([karras, denoiser.sigmas, torch.tensor([1e-4, 0.01, 0.5, 1.0, 7.0, 30.0, 200.0])])


def test_fractional_matches_k_diffusion(denoiser):
    sigmas = sample_sigmas(denoiser)
    expected = denoiser.sigma_to_t(sigmas)
    # From the same float32 sigmas the arithmetic is the same, to the bit.
    assert torch.equal(TimestepSchedule(denoiser.sigmas).timestep(sigmas), expected)
    # From alphas_cumprod (sigmas computed in float64, then rounded): within 1e-4 of a timestep.
    schedule = TimestepSchedule.from_alphas_cumprod(sd15_alphas_cumprod().float())
    torch.testing.assert_close(schedule.timestep(sigmas), expected, atol=1e-4, rtol=0)


def test_sigmas_match_k_diffusion(denoiser):
    torch.testing.assert_close(sigmas_from_alphas_cumprod(sd15_alphas_cumprod()).float(), denoiser.sigmas)


def test_shape_preserved_and_scalar(denoiser):
    schedule = TimestepSchedule(denoiser.sigmas)
    assert schedule.timestep(torch.ones(2, 3)).shape == (2, 3)
    assert schedule.timestep(1.0).shape == ()
    assert schedule.timestep(float(denoiser.sigma_max)).item() == pytest.approx(999.0)
    assert schedule.timestep(float(denoiser.sigma_min)).item() == pytest.approx(0.0, abs=1e-4)


def test_bad_schedule():
    with pytest.raises(InputError):
        TimestepSchedule(torch.tensor([1.0]))
    with pytest.raises(InputError):
        TimestepSchedule(torch.tensor([2.0, 1.0]))
