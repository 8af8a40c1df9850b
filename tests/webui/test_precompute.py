"""Each sampling pass's (text, timestep) pairs computed before its calls, driven through the three host doubles
(A1111 1.10.1, Forge classic, Forge new) and their samplers: what the UNet gets is bit-identical whether the rows
were computed ahead or at the calls that need them, the timesteps and texts are exactly the per-call path's, no TSC
pass runs after a foreseen pass's first call, unforeseen calls are computed per call, and the memory setting bounds
what is computed ahead."""

from __future__ import annotations

import os

import pytest
import torch

from ella_ext import conditioning
from ella_ext.webui import generation

from .conftest import SD15_TINY, ella_args

ALL_SAMPLERS = ["Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M", "DPM++ 2M SDE",
                "Restart", "LCM", "DDIM", "PLMS", "UniPC"]
# One of each family (first order, ancestral, second order, SDE with a noise sampler, multistep, timesteps, UniPC's
# continuous times): tools/run_tests.sh runs these on the stacks that differ only in transformers / gradio / torch
# versions (ELLA_SAMPLERS=family), and the whole list on one stack, so CI stays within its time on a 2-core machine.
FAMILY_SAMPLERS = ["Euler", "Euler a", "Heun", "DPM++ SDE", "DPM++ 2M", "DDIM", "UniPC"]
SAMPLERS = FAMILY_SAMPLERS if os.environ.get("ELLA_SAMPLERS") == "family" else ALL_SAMPLERS

# batch 2: an AND prompt (2 rows) and a prompt-editing one, each with its negative: 5 rows per call
GENERATION = dict(prompt=["a red cube AND a blue ball", "a [cat:dog:3] on a mat"], negative_prompt=["blurry", "dark"],
                  batch_size=2, steps=6, enable_hr=True, hr_second_pass_steps=4, denoising_strength=0.6)
ONE_TIMESTEP_PER_CHUNK = 6  # TSC_CHUNK for these tests: a chunk holds one timestep's rows (5, or 6 at a switch)


def unet_contexts(host, p) -> list[list[torch.Tensor]]:
    """Per denoiser call, over the passes in order: the context tensors the UNet (and ControlNet) got."""
    contexts, seen = [], set()
    for denoiser in p.denoisers:
        if id(denoiser) in seen:  # img2img: one sampler (one denoiser) for every batch
            continue
        seen.add(id(denoiser))
        for call in denoiser.inner_calls:
            if host.kind == "a1111":
                _, _, context, _ = call
                parts = list(context) if isinstance(context, tuple) else [context]
                contexts.append([c["crossattn"] if isinstance(c, dict) else c for c in parts])
            else:
                contexts.append([chunk.crossattn for chunk in call])
    return contexts


def pass_sizes(p) -> list[int]:
    sizes, seen = [], set()
    for denoiser in p.denoisers:
        if id(denoiser) not in seen:
            seen.add(id(denoiser))
            sizes.append(len(denoiser.inner_calls))
    return sizes


def generate(host, monkeypatch, *, ahead_mb=256, foresee=True, **kwargs):
    """One generation; returns what each call asked for and what the UNet got. ``foresee=False``: the per-call path
    (no sampler is watched, so no pass is foreseen)."""
    from modules import shared

    shared.opts.ella_precompute_mb = ahead_mb
    with monkeypatch.context() as patch:
        if not foresee:
            patch.setattr(generation, "watch_sampler", lambda p: None)
        p, processed = host.run(**kwargs)
    recorded = host.recorded
    return dict(p=p, processed=processed, texts=[c[0] for c in recorded.calls],
                timesteps=[c[1] for c in recorded.calls], foreseen=list(recorded.foreseen),
                passes=list(recorded.passes), contexts=unet_contexts(host, p), sizes=pass_sizes(p))


def passes_after_first_call(run) -> list[int]:
    """Per sampling pass: the TSC passes run after its first call."""
    counts, start = [], 0
    for size in run["sizes"]:
        counts.append(run["passes"][start + size - 1] - run["passes"][start])
        start += size
    return counts


def assert_same_contexts(a, b, exact=True):
    assert len(a["contexts"]) == len(b["contexts"])
    for call, (left, right) in enumerate(zip(a["contexts"], b["contexts"])):
        assert len(left) == len(right), call
        for x, y in zip(left, right):
            if exact:
                assert torch.equal(x, y), f"call {call}: max |diff| {(x.float() - y.float()).abs().max().item()}"
            else:  # computed in TSC passes of other shapes: the same numbers, not always the same bits
                torch.testing.assert_close(x.float(), y.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_rows_computed_ahead_are_the_rows_computed_at_each_call(any_host, monkeypatch, sampler):
    monkeypatch.setattr(conditioning, "TSC_CHUNK", ONE_TIMESTEP_PER_CHUNK)
    ahead = generate(any_host, monkeypatch, sampler_name=sampler, **GENERATION)
    at_calls = generate(any_host, monkeypatch, ahead_mb=0, sampler_name=sampler, **GENERATION)
    per_call = generate(any_host, monkeypatch, foresee=False, sampler_name=sampler, **GENERATION)
    assert any_host.reported() == []
    assert "ELLA error" not in ahead["processed"].infotexts[0]
    assert len(ahead["sizes"]) == 2 and len(ahead["texts"]) == sum(ahead["sizes"])  # first pass and hires pass
    # every call foreseen; every TSC pass of a pass ran at its first call
    assert all(ahead["foreseen"]) and all(at_calls["foreseen"]) and not any(per_call["foreseen"])
    assert passes_after_first_call(ahead) == [0, 0]
    # over the memory bound: each chunk (here one timestep's rows) computed at the first call that needs it
    assert sum(passes_after_first_call(at_calls)) > 0
    # the texts and timesteps of every row are exactly the per-call path's (the same mapping, the same schedule)
    assert ahead["texts"] == per_call["texts"] == at_calls["texts"]
    assert ahead["timesteps"] == per_call["timesteps"] == at_calls["timesteps"]
    # what the UNet gets: bit-identical ahead or at the calls; the per-call path's numbers within rounding
    assert_same_contexts(ahead, at_calls)
    assert_same_contexts(ahead, per_call, exact=False)


def test_a_whole_pass_is_one_tsc_pass_and_each_later_call_a_lookup(any_host, monkeypatch):
    run = generate(any_host, monkeypatch, prompt="a [cat:dog:10] on a mat", negative_prompt="blurry", steps=20,
                   sampler_name="Heun")
    assert all(run["foreseen"]) and run["sizes"] == [39]  # Heun: 20 steps, 39 calls at 20 distinct sigmas
    assert run["passes"][0] == 1 and run["passes"][-1] == 1  # every pair in one TSC pass, at the first call
    texts = [t[0] for t in run["texts"]]
    # prompt editing: schedules count 40 steps for Heun (total_steps); "cat" for calls 0-10, "dog" after
    assert texts.count("a cat on a mat") == 11 and texts.count("a dog on a mat") == 28


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DPM++ 2M", "DDIM", "UniPC"])
def test_img2img_partial_schedules_and_one_sampler_for_every_batch(any_host, monkeypatch, sampler):
    """img2img samples part of the schedule, with one sampler for all batches: each batch foresees its own calls
    (its own prompts) at its start."""
    monkeypatch.setattr(conditioning, "TSC_CHUNK", 3)
    kwargs = dict(prompt=["a red cube", "a [cat:dog:2] on a mat"], negative_prompt="blurry", n_iter=2, steps=8,
                  img2img=True, denoising_strength=0.5, sampler_name=sampler)
    ahead = generate(any_host, monkeypatch, **kwargs)
    at_calls = generate(any_host, monkeypatch, ahead_mb=0, **kwargs)
    per_call = generate(any_host, monkeypatch, foresee=False, **kwargs)
    assert all(ahead["foreseen"])
    batch = len(ahead["texts"]) // 2
    assert {t[0] for t in ahead["texts"][:batch]} == {"a red cube"}
    assert {t[0] for t in ahead["texts"][batch:]} in ({"a cat on a mat"}, {"a cat on a mat", "a dog on a mat"})
    passes = ahead["passes"]
    assert passes[batch - 1] == passes[0] and passes[-1] == passes[batch]  # nothing after each batch's first call
    assert ahead["timesteps"] == per_call["timesteps"] and ahead["texts"] == per_call["texts"]
    assert_same_contexts(ahead, at_calls)
    assert_same_contexts(ahead, per_call, exact=False)


@pytest.mark.parametrize("options", [dict(token_length="Fixed", max_length=16), dict(clip_mode="ELLA + CLIP"),
                                     dict(negative="Empty")])
def test_fixed_length_clip_and_empty_negative(any_host, monkeypatch, options):
    monkeypatch.setattr(conditioning, "TSC_CHUNK", ONE_TIMESTEP_PER_CHUNK)
    kwargs = dict(GENERATION, sampler_name="DPM++ 2S a", args=ella_args(**options))
    ahead = generate(any_host, monkeypatch, **kwargs)
    at_calls = generate(any_host, monkeypatch, ahead_mb=0, **kwargs)
    per_call = generate(any_host, monkeypatch, foresee=False, **kwargs)
    assert all(ahead["foreseen"]) and passes_after_first_call(ahead) == [0, 0]
    assert ahead["timesteps"] == per_call["timesteps"] and ahead["texts"] == per_call["texts"]
    assert_same_contexts(ahead, at_calls)
    assert_same_contexts(ahead, per_call, exact=False)


def test_restart_revisits_sigmas_it_foresaw(any_host, monkeypatch):
    """Restart (20 steps and more) goes back up the schedule: its restart segment is foreseen too."""
    run = generate(any_host, monkeypatch, prompt="a cube", negative_prompt="blurry", steps=20, sampler_name="Restart")
    per_call = generate(any_host, monkeypatch, foresee=False, prompt="a cube", negative_prompt="blurry", steps=20,
                        sampler_name="Restart")
    timesteps = [t[0] for t in run["timesteps"]]
    assert any(later > earlier for earlier, later in zip(timesteps, timesteps[1:]))  # it went back up
    assert all(run["foreseen"]) and run["passes"][0] == run["passes"][-1]
    assert run["timesteps"] == per_call["timesteps"]


def _noisy_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A sampler whose noise levels depend on its model's output: after each step it also evaluates a sigma moved
    by the size of the latent (a dry run on a zero latent cannot know it)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] > 0:
            model(x, sigmas[i + 1] * (1 + 0.01 * denoised.abs().mean()) * s_in, **extra_args)
        x = denoised
    return x


def test_an_unforeseen_timestep_is_computed_per_call(any_host, monkeypatch, reference):
    from modules import sd_samplers, sd_samplers_common

    config = sd_samplers_common.SamplerData(
        "Noisy Euler", lambda model: sd_samplers.sd_samplers_kdiffusion.KDiffusionSampler(_noisy_euler, model), [],
        {"second_order": True})
    monkeypatch.setitem(sd_samplers.all_samplers_map, "Noisy Euler", config)
    run = generate(any_host, monkeypatch, prompt="a cube", negative_prompt="blurry", steps=4,
                   sampler_name="Noisy Euler")
    per_call = generate(any_host, monkeypatch, foresee=False, prompt="a cube", negative_prompt="blurry", steps=4,
                        sampler_name="Noisy Euler")
    assert run["foreseen"] == [True, False, True, False, True, False, True]  # the schedule's calls were foreseen
    steps = run["passes"]
    added = [later - earlier for earlier, later in zip(steps, steps[1:])]
    if any_host.kind == "a1111":  # a fractional timestep of its own: one TSC pass at each unforeseen call
        assert added == [1, 0, 1, 0, 1, 0]
    else:  # Forge feeds the nearest whole step, which can be one of the foreseen ones: reused, not recomputed
        assert added[1::2] == [0, 0, 0] and 1 <= sum(added) <= 3
    assert run["timesteps"] == per_call["timesteps"] and run["texts"] == per_call["texts"]
    for (texts, timesteps, rows) in [c for c, seen in zip(any_host.recorded.calls, run["foreseen"]) if not seen]:
        for row, (text, t) in enumerate(zip(texts, timesteps)):
            torch.testing.assert_close(rows[row], reference(text, t), atol=2e-5, rtol=2e-5)
    assert_same_contexts(run, per_call, exact=False)


def test_a_schedule_changed_after_the_dry_run_is_computed_per_call(any_host, monkeypatch):
    """Another extension moving the noise level in its own denoiser callback (before ELLA's): those calls find no
    foreseen rows and are computed per call from what the UNet will really get."""
    from modules import script_callbacks

    def jitter(params):
        if params.denoiser.step % 2:
            params.sigma = params.sigma * 0.97

    script_callbacks.callback_map["cfg_denoiser"].insert(0, ("other", jitter))
    run = generate(any_host, monkeypatch, prompt="a cube", negative_prompt="blurry", steps=4, sampler_name="Euler")
    assert run["foreseen"] == [True, False, True, False]
    script_callbacks.callback_map["cfg_denoiser"].pop(0)
    assert any_host.reported() == []
    p = run["p"]
    for call in (1, 3):  # what the per-call path computed is what the UNet was fed at those calls
        if any_host.kind == "a1111":
            sigma_in = p.denoisers[0].inner_calls[call][1]
            expected = p.denoisers[0].inner_model.sigma_to_t(sigma_in).double().tolist()
            assert run["timesteps"][call] == pytest.approx(expected, abs=1e-4)
        else:
            fed = [t for chunk in p.denoisers[0].inner_calls[call] for t in chunk.timesteps.double().tolist()]
            assert run["timesteps"][call] == fed


def test_memory_setting_bounds_what_is_computed_ahead(any_host, monkeypatch):
    """Above the setting, chunks are computed as calls reach them and at most the bound's worth is kept."""
    monkeypatch.setattr(conditioning, "TSC_CHUNK", ONE_TIMESTEP_PER_CHUNK)
    held = []
    original = conditioning.Conditioner.lookup

    def watching(self, texts, timesteps):
        out = original(self, texts, timesteps)
        held.append((self.ahead, len(self._resident), len(self._chunks)))
        return out

    monkeypatch.setattr(conditioning.Conditioner, "lookup", watching)
    kwargs = dict(GENERATION, enable_hr=False, sampler_name="Euler")
    generate(any_host, monkeypatch, ahead_mb=256, **kwargs)
    assert len(held) == 6  # one lookup per Euler step
    assert all(ahead and resident == chunks == 6 for ahead, resident, chunks in held)  # all 6 timesteps ahead
    between = []  # a pass's rows are dropped when its sampler returns: none are kept into the hires pass
    monkeypatch.setattr(any_host.script, "before_hr", lambda p, *args: between.append(
        len(getattr(p, generation.ATTRIBUTE).conditioner._resident)))
    generate(any_host, monkeypatch, ahead_mb=256, **dict(GENERATION, sampler_name="Euler"))
    assert between == [0]
    held.clear()
    generate(any_host, monkeypatch, ahead_mb=0, **kwargs)
    assert len(held) == 6
    assert all(not ahead and resident == 1 and chunks == 6 for ahead, resident, chunks in held)


def test_forge_memory_request_counts_the_rows_computed_ahead(forge_host, monkeypatch):
    from modules import devices

    from ella_ext.webui import forge

    manager = getattr(devices, "memory_management", None) or devices.model_management
    monkeypatch.setattr(forge, "CLASSIC_MIN_RESERVE", 0)
    monkeypatch.setattr(conditioning, "TSC_CHUNK", ONE_TIMESTEP_PER_CHUNK)
    held = []
    original = conditioning.Conditioner.lookup

    def lookup(self, texts, timesteps):
        out = original(self, texts, timesteps)
        held.append(sum(t.numel() * t.element_size() for t in self._resident.values()))
        return out

    monkeypatch.setattr(conditioning.Conditioner, "lookup", lookup)
    reserved = {}
    for mb in (0, 256):
        manager.prepared.clear()
        held.clear()
        generate(forge_host, monkeypatch, ahead_mb=mb, prompt="a red cube", negative_prompt="blurry", batch_size=2,
                 steps=30, sampler_name="Heun")
        reserved[mb] = manager.prepared[0][1]
        assert 0 < max(held) <= reserved[mb]  # the rows kept: counted in what Forge was asked to keep free
    row_bytes = SD15_TINY.num_latents * SD15_TINY.out_width * 4  # fp32 on the CPU
    # 4 rows x 60 calls (Heun, 30 steps: total_steps 60) = 240 pairs at most: all kept ahead under the setting, one
    # chunk of 6 pairs without it
    assert reserved[256] - reserved[0] == (240 - ONE_TIMESTEP_PER_CHUNK) * row_bytes


def test_a_model_switched_mid_pass_stops_the_lookups(any_host, monkeypatch):
    """A refiner switch mid-pass (A1111: ``update_inner_model`` drops the denoiser's ``model_wrap``; Forge: a newly
    loaded UNet) may map sigmas to other timesteps: the rest of the pass is computed per call."""
    from forge_common import UnetModel, UnetPatcher
    from modules import script_callbacks, shared

    def switch(params):
        if params.denoiser.step == 2:
            if any_host.kind == "a1111":
                params.denoiser.model_wrap = None
            else:
                shared.sd_model.forge_objects.unet = UnetPatcher(UnetModel(shared.sd_model.alphas_cumprod,
                                                                           any_host.kind == "forge-new"))

    script_callbacks.callback_map["cfg_denoiser"].insert(0, ("refiner", switch))
    run = generate(any_host, monkeypatch, prompt="a cube", negative_prompt="blurry", steps=5, sampler_name="Euler")
    script_callbacks.callback_map["cfg_denoiser"].pop(0)
    assert any_host.reported() == []
    assert run["foreseen"] == [True, True, False, False, False]


def test_the_foresee_setting_off_computes_each_call_at_the_call(any_host, monkeypatch):
    """Settings > ELLA > foresee off: no dry run, the sampler function is the host's own, every call computed per
    call (the escape hatch for a sampler or extension the dry run does not suit)."""
    from modules import shared

    shared.opts.ella_foresee = False
    try:
        run = generate(any_host, monkeypatch, prompt="a cube", steps=4, sampler_name="Euler a")
    finally:
        shared.opts.ella_foresee = True
    assert not any(run["foreseen"]) and len(run["texts"]) == 4
    assert "ELLA error" not in run["processed"].infotexts[0]
    assert run["passes"][-1] - run["passes"][0] == 3  # one TSC pass per call after the first


def test_each_pass_says_in_the_debug_log_how_its_calls_were_served(any_host, monkeypatch, caplog):
    """What a user (or a real-host trial) can read with --loglevel DEBUG to see that passes were foreseen."""
    import logging

    with caplog.at_level(logging.DEBUG, logger="ella"):
        generate(any_host, monkeypatch, prompt="a cube", steps=4, sampler_name="Euler a")
    assert "a sampling pass ended: its calls 4 looked up, 0 computed at the call" in caplog.text
