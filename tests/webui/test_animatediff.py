"""AnimateDiff's prompt travel beside ELLA, on the A1111 double. AnimateDiff (continue-revolution/
sd-webui-animatediff a88e8891, read, not run here) gives each frame its keyframe's prompt, and its cfg_denoiser
callback, registered before ELLA's, hands the UNet at every call the rows it interpolated between keyframes from the
first call's conditioning. ELLA's rows change with the timestep, so ELLA interpolates its own rows at every call with
AnimateDiff's scheduler (found through AnimateDiff's script arguments on ``p``). The stand-ins below play
AnimateDiff's part: a scheduler that interpolates linearly between keyframes (the real one uses slerp: which curve is
AnimateDiff's business, the test checks that ELLA's rows go through it) and the callback that holds its first rows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from .conftest import ella_args

FRAMES = ["a cat", "a cat", "a dog", "a dog"]  # prompt travel "0: a cat / 2: a dog" over 4 frames


class Scheduler:
    prompt_map = {0: "a cat", 2: "a dog"}

    def __init__(self):
        self.calls = 0

    def multi_cond(self, cond, closed_loop=False):
        self.calls += 1
        keys = sorted(self.prompt_map)
        rows = []
        for frame in range(cond.shape[0]):
            before = max(k for k in keys if k <= frame)
            after = min((k for k in keys if k > frame), default=before)
            rate = 0.0 if after == before else (frame - before) / (after - before)
            rows.append(cond[before] * (1 - rate) + cond[after] * rate)
        return torch.stack(rows)


class AnimateDiffScript:
    def __init__(self, args_from):
        self.args_from = args_from

    def title(self):
        return "AnimateDiff"


@pytest.fixture
def animatediff(host, monkeypatch):
    """AnimateDiff on for every generation: its arguments on ``p`` (set before ELLA's ``process``) and its
    cfg_denoiser callback ahead of ELLA's (its folder sorts first)."""
    from modules import script_callbacks, scripts

    scheduler = Scheduler()
    held = {}
    params = SimpleNamespace(enable=True, video_length=4, batch_size=4, closed_loop="R-P", prompt_scheduler=scheduler)

    def hold(cfg_params):  # AnimateDiff's callback: interpolate at the first call, hand the same rows every call
        if cfg_params.denoiser.step == 0:
            held["cond"] = scheduler.multi_cond(cfg_params.text_cond)
        cfg_params.text_cond = held["cond"]

    script_callbacks.callback_map["cfg_denoiser"].insert(0, ("animatediff", hold))
    original_call = scripts.ScriptRunner.call

    def call(runner, name, p, *args, **kwargs):
        if name == "process":
            p.scripts = SimpleNamespace(alwayson_scripts=[AnimateDiffScript(len(p.script_args))])
            p.script_args = (*p.script_args, params)
        return original_call(runner, name, p, *args, **kwargs)

    monkeypatch.setattr(scripts.ScriptRunner, "call", call)
    return params


def test_prompt_travel_interpolates_ellas_rows_at_every_call(host, animatediff):
    p, processed = host.run(FRAMES, "blurry", batch_size=4, steps=3)
    assert host.reported() == []
    calls = p.denoisers[0].inner_calls
    assert len(calls) == len(host.recorded.calls) == 3
    firsts = []
    for (texts, _, rows), (_, _, cond_in, batched) in zip(host.recorded.calls, calls):
        assert texts[:4] == FRAMES and batched
        cat, dog = rows[0], rows[2]  # ELLA's rows for the keyframes' prompts at this call's timestep
        expected = torch.stack([cat, (cat + dog) / 2, dog, dog])
        torch.testing.assert_close(cond_in[:4].float(), expected, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(cond_in[4:].float(), rows[4:], atol=2e-3, rtol=2e-3)  # negatives untouched
        firsts.append(cond_in[0].float())
    assert not torch.allclose(firsts[0], firsts[-1], atol=1e-3), "ELLA's rows follow the timestep, not held"
    info = processed.infotexts[0]
    assert "ELLA: tiny-sd15" in info and "ELLA warning" not in info


def test_without_prompt_travel_the_rows_are_ellas(host, animatediff):
    animatediff.prompt_scheduler.prompt_map = None  # AnimateDiff without "N:" lines
    p, _ = host.run(["a cat"] * 4, "blurry", batch_size=4, steps=2)
    for (_, _, rows), (_, _, cond_in, _) in zip(host.recorded.calls, p.denoisers[0].inner_calls):
        torch.testing.assert_close(cond_in.float(), rows, atol=2e-3, rtol=2e-3)


def test_and_parts_are_not_interpolated_and_the_info_text_says_so(host, animatediff):
    p, processed = host.run([f"{f} AND a tree" for f in FRAMES], "blurry", batch_size=4, steps=2)
    assert len(host.recorded.calls) == 2  # ELLA still conditions every call, one row per AND part
    for (_, _, rows), (_, _, cond_in, _) in zip(host.recorded.calls, p.denoisers[0].inner_calls):
        torch.testing.assert_close(cond_in.float(), rows, atol=2e-3, rtol=2e-3)
    assert "AND parts: ELLA's rows were not interpolated between keyframes" in processed.infotexts[0]


def test_a_failing_scheduler_leaves_ellas_rows_and_warns(host, animatediff, monkeypatch):
    monkeypatch.setattr(Scheduler, "multi_cond", lambda self, cond, closed_loop=False: 1 / 0)
    p, processed = host.run(FRAMES, "blurry", batch_size=4, steps=2, args=ella_args())
    assert "prompt-travel interpolation of ELLA's rows failed (ZeroDivisionError" in processed.infotexts[0]
    assert p.denoisers[0].inner_calls, "the image is still made"
