"""The dry run of a sampler: it finds the noise level of every model call the real run makes, bit for bit, and
leaves the real run unchanged (its noise, torch's generators, the host's denoiser)."""

from __future__ import annotations

import types

import pytest
import torch

from ella_ext.sampler_probe import record

from .kdiffusion import real_k_diffusion


@pytest.fixture
def kd():
    with real_k_diffusion() as (external, sampling):
        yield external, sampling


class HostNoise:
    """Stands in for the hosts' ``TorchHijack``: ``k_diffusion.sampling.torch`` whose ``randn_like`` draws the
    image's noise from its own seeded generator (A1111 ``sd_samplers_common.TorchHijack`` -> ``p.rng.next()``)."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = 0

    def randn_like(self, x):
        self.draws += 1
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype)

    def __getattr__(self, name):
        return getattr(torch, name)


class Model:
    """The host's denoiser as a sampler sees it: records each sigma, returns a denoised latent."""

    def __init__(self):
        self.sigmas = []
        self.inner_model = types.SimpleNamespace(tag="inner")

    def __call__(self, x, sigma, **kwargs):
        self.sigmas.append(sigma.clone())
        return x * 0.5 + 0.1


def _noise_sampler(seed):
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn((2, 4, 3, 3), generator=generator)


SAMPLERS = {  # k-diffusion function -> its options as A1111 passes them
    "sample_euler": {},
    "sample_euler_ancestral": {"eta": 1.0},
    "sample_heun": {},
    "sample_dpm_2": {},
    "sample_dpm_2_ancestral": {"eta": 1.0},
    "sample_dpmpp_2s_ancestral": {"eta": 1.0},
    "sample_dpmpp_sde": {"eta": 1.0, "noise_sampler": "brownian"},
    "sample_dpmpp_2m": {},
    "sample_dpmpp_2m_sde": {"eta": 1.0, "noise_sampler": "brownian"},
    "sample_dpmpp_3m_sde": {"eta": 1.0, "noise_sampler": "brownian"},
}


def _run(sampling, name, options, sigmas, probe):
    sampling.torch = HostNoise(seed=7)
    kwargs = dict(options, sigmas=sigmas)
    if kwargs.get("noise_sampler") == "brownian":
        kwargs["noise_sampler"] = _noise_sampler(11)
    model = Model()
    x = torch.randn((2, 4, 3, 3), generator=torch.Generator().manual_seed(3)) * sigmas[0]
    func = getattr(sampling, name)
    foreseen = record(func, model, x, (), dict(kwargs, extra_args={}, disable=True), limit=100) if probe else None
    out = func(model, x, extra_args={}, disable=True, callback=lambda d: None, **kwargs)
    return foreseen, model.sigmas, out, sampling.torch.draws


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_dry_run_finds_every_sigma_and_changes_nothing(kd, name):
    _, sampling = kd
    sigmas = sampling.get_sigmas_karras(6, 0.0291675, 14.614642)
    _, real, out, draws = _run(sampling, name, SAMPLERS[name], sigmas, probe=False)
    state = torch.get_rng_state()
    foreseen, real_again, out_again, draws_again = _run(sampling, name, SAMPLERS[name], sigmas, probe=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(foreseen) == len(real) == len(real_again)
    assert all(torch.equal(a, b) for a, b in zip(foreseen, real))  # every sigma, to the last bit
    assert torch.equal(out_again, out) and draws_again == draws  # the real run drew the same noise


def test_second_order_samplers_evaluate_between_the_schedule_sigmas(kd):
    _, sampling = kd
    sigmas = sampling.get_sigmas_karras(6, 0.0291675, 14.614642)
    schedule = set(sigmas.tolist())
    for name in ("sample_dpm_2", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde"):
        foreseen, *_ = _run(sampling, name, SAMPLERS[name], sigmas, probe=True)
        between = [s for s in foreseen if s[0].item() not in schedule]
        assert between, name  # midpoints / intermediate sigmas the schedule does not list


def test_noise_from_torchs_own_generator_is_not_consumed(kd):
    """Without the host's hijack an ancestral sampler draws from torch's global generator: the dry run puts it
    back as it found it."""
    _, sampling = kd
    sampling.torch = torch
    sigmas = sampling.get_sigmas_karras(5, 0.0291675, 14.614642)
    x = torch.zeros(1, 4, 2, 2)
    torch.manual_seed(5)
    expected = sampling.sample_euler_ancestral(Model(), x, sigmas, disable=True)
    torch.manual_seed(5)
    record(sampling.sample_euler_ancestral, Model(), x, (), {"sigmas": sigmas}, limit=100)
    assert torch.equal(sampling.sample_euler_ancestral(Model(), x, sigmas, disable=True), expected)
    assert sampling.torch is torch


def test_the_host_denoiser_is_read_never_written_nor_called():
    model = Model()

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        assert model.inner_model.tag == "inner"
        model.cond_scale_multiplier = 0.5  # a sampler setting an attribute on its model
        for sigma in sigmas[:-1]:
            callback({"i": 0})
            model(x, sigma * x.new_ones([x.shape[0]]))
        return x

    found = record(sampler, model, torch.ones(2, 1), (), {"sigmas": torch.tensor([3.0, 2.0, 0.0])}, limit=10)
    assert [s.tolist() for s in found] == [[3.0, 3.0], [2.0, 2.0]]
    assert model.sigmas == [] and not hasattr(model, "cond_scale_multiplier")


def test_a_sampler_that_fails_or_never_ends_is_not_foreseen():
    def failing(model, x, sigmas, **kwargs):
        model(x, sigmas[0])
        raise ValueError("needs something the dry run does not have")

    def endless(model, x, sigmas, **kwargs):
        while True:
            model(x, sigmas[0])

    sigmas = torch.tensor([1.0, 0.0])
    assert record(failing, Model(), torch.ones(1), (), {"sigmas": sigmas}, limit=10) is None
    assert record(endless, Model(), torch.ones(1), (), {"sigmas": sigmas}, limit=10) is None


def test_draws_from_torchs_generators_by_other_routes_are_undone():
    draw = torch.randn  # bound before the dry run: not the sampler module's ``torch``

    def sampler(model, x, sigmas, **kwargs):
        model(x, sigmas[0] + draw(1) * 0)
        return x

    state = torch.get_rng_state()
    assert record(sampler, Model(), torch.ones(1), (), {"sigmas": torch.tensor([1.0, 0.0])}, limit=10) is not None
    assert torch.equal(torch.get_rng_state(), state)
