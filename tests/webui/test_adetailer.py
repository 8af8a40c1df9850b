"""ADetailer (Bing-su/adetailer 36189cbe) around an ELLA generation, replayed on the host doubles.

What ADetailer does, from ``scripts/!adetailer.py``: ``process()`` (its script runs before ELLA's: the folder
``adetailer`` sorts first) writes its keys, ``"ADetailer version"`` among them, into ``p.extra_generation_params``;
``postprocess_image()``, per image after the batch's ``postprocess_batch``: for the batch's first image
``p.scripts.postprocess(copy(p), dummy)`` (line 909), then per detection a new img2img ``p`` with the ADetailer prompt,
``batch_size=1``, ``n_iter=1``, a copy of the outer ``extra_generation_params``, the outer script args, the scripts
kept by its filter (``script_filter``: only those whose file stem is in the setting ``ad_script_names`` when
``ad_only_selected_scripts`` is on, both the default), ``_ad_inner = True`` and ``_ad_disabled = True``, run with
``process_images(copy(i2i))`` inside the running job; for the batch's last image ``copy_p = copy(p);
p.scripts.before_process(copy_p); p.scripts.process(copy_p)`` (lines 924-927). The host writes the image's info text
right after ``postprocess_image``. The doubles have no ``postprocess_image`` hook: the replay runs right after
``postprocess_batch``, where the host calls it (``modules/processing.py``)."""

from __future__ import annotations

from copy import copy

import pytest
import torch

from .conftest import CONNECTOR, ella_args

AD_DEFAULT_SCRIPTS = "dynamic_prompting,dynamic_thresholding,lora_block_weight,negpip,wildcard_recursive,wildcards"
AD_PROMPT = "a smiling face"
WARNING = "ADetailer's inpaint passes use CLIP"


class _NotELLA:
    """A nested pass's runner without ELLA (ADetailer's filter dropped it): the hooks do nothing."""

    alwayson = True
    args_from = args_to = 1

    def __getattr__(self, hook):
        return lambda *args, **kwargs: None


def _adetailer(host, monkeypatch, *, ella_in_nested: bool, disabled: bool = False):
    """Make every generation of the test run with ADetailer around it, as it runs in the host; returns the calls the
    conditioner made in the nested passes (each pass's calls, in order)."""
    from modules import processing, scripts

    nested_calls = []
    outer = {}
    original_call = scripts.ScriptRunner.call

    def postprocess_image(runner, p, index):
        if index == 0:  # need_call_postprocess
            runner.call("postprocess", copy(p), processing.Processed(copy(p), []))
        i2i = processing.StableDiffusionProcessingImg2Img(AD_PROMPT, "", script_args=p.script_args, steps=p.steps)
        i2i.extra_generation_params = dict(p.extra_generation_params)  # copy_extra_params: a new dict
        i2i._ad_inner = True
        i2i._ad_disabled = True
        nested_runner = scripts.ScriptRunner(host.script if ella_in_nested else _NotELLA())
        before = len(host.recorded.calls)
        processing.process_images(copy(i2i), nested_runner)  # inside the running job
        nested_calls.append(host.recorded.calls[before:])
        if index == p.batch_size - 1:  # need_call_process
            copy_p = copy(p)
            runner.call("before_process", copy_p)
            runner.call("process", copy_p)

    def call(runner, hook, p, *extra, **kwargs):
        if hook == "process" and not outer:  # the first process() is the outer generation's; ADetailer's runs first
            outer["p"] = p
            if disabled:
                p._ad_disabled = True
            else:
                p.extra_generation_params.update({"ADetailer model": "face_yolov8n.pt",
                                                  "ADetailer version": "25.3.0"})
        result = original_call(runner, hook, p, *extra, **kwargs)
        if hook == "postprocess_batch" and p is outer.get("p"):
            for index in range(p.batch_size):
                p.batch_index = index
                postprocess_image(runner, p, index)
        return result

    monkeypatch.setattr(scripts.ScriptRunner, "call", call)
    return nested_calls


def _script_names(monkeypatch, names=None, only_selected=None):
    from modules import shared

    if names is not None:
        monkeypatch.setitem(shared.opts.data, "ad_script_names", names)
    if only_selected is not None:
        monkeypatch.setitem(shared.opts.data, "ad_only_selected_scripts", only_selected)


def _main_calls(host, nested_calls):
    nested = {id(call) for calls in nested_calls for call in calls}
    return [call for call in host.recorded.calls if id(call) not in nested]


def _assert_nothing_left(p):
    from ella_ext.webui.generation import ATTRIBUTE
    from ella_ext.webui.loading import manager

    assert manager._active == []  # every generation ELLA started was finished, none was left to a copy of p
    assert not hasattr(p, ATTRIBUTE)


def test_default_settings_keep_ella_info_and_warn_that_adetailer_uses_clip(any_host, monkeypatch):
    nested_calls = _adetailer(any_host, monkeypatch, ella_in_nested=False)
    p, processed = any_host.run("a cat", steps=3, n_iter=2)
    assert any_host.reported() == []
    main = _main_calls(any_host, nested_calls)
    assert len(main) == 2 * 3 and all(texts == ["a cat", ""] for texts, _, _ in main)  # both batches: ELLA
    assert len(nested_calls) == 2 and all(calls == [] for calls in nested_calls)  # CLIP in the inpaint passes
    assert len(processed.infotexts) == 2
    for info in processed.infotexts:
        assert f"ELLA: {CONNECTOR}" in info and "ELLA error" not in info, info
        assert f"ELLA warning: {WARNING}" in info, info
        assert "add ella to Settings > ADetailer > Script names to apply to ADetailer" in info, info
    _assert_nothing_left(p)


def test_ella_in_adetailer_scripts_conditions_the_inpaint_pass_with_its_prompt(any_host, monkeypatch, reference):
    _script_names(monkeypatch, names=f"{AD_DEFAULT_SCRIPTS},ella")
    nested_calls = _adetailer(any_host, monkeypatch, ella_in_nested=True)
    p, processed = any_host.run("a cat", steps=3, n_iter=2)
    assert any_host.reported() == []
    main = _main_calls(any_host, nested_calls)
    assert len(main) == 2 * 3 and all(texts == ["a cat", ""] for texts, _, _ in main)
    assert len(nested_calls) == 2
    for calls in nested_calls:
        assert calls and all(texts == [AD_PROMPT, ""] for texts, _, _ in calls)
        for _, timesteps, rows in calls:
            torch.testing.assert_close(rows[0].float(), reference(AD_PROMPT, timesteps[0]), atol=1e-4, rtol=1e-4)
    for info in processed.infotexts:
        assert f"ELLA: {CONNECTOR}" in info and "ELLA error" not in info and WARNING not in info, info
    _assert_nothing_left(p)


@pytest.mark.parametrize("setting", ["only selected off", "ADetailer off"])
def test_no_warning_when_adetailer_runs_every_script_or_is_off(host, monkeypatch, setting):
    if setting == "only selected off":
        _script_names(monkeypatch, only_selected=False)
    nested_calls = _adetailer(host, monkeypatch, ella_in_nested=setting == "only selected off",
                              disabled=setting == "ADetailer off")
    p, processed = host.run("a cat", steps=2)
    (info,) = processed.infotexts
    assert f"ELLA: {CONNECTOR}" in info and "ELLA warning" not in info, info
    assert bool(nested_calls[0]) == (setting == "only selected off")
    _assert_nothing_left(p)


def test_a_copy_of_p_neither_finishes_nor_restarts_the_generation(host, monkeypatch):
    """Any extension that copies ``p`` and calls the hooks again: the copy's hooks leave the generation alone."""
    from modules import processing

    from ella_ext.webui import generation

    seen = {}
    original = generation.prepare_batch

    def prepare_batch(p, batch_number):
        original(p, batch_number)
        if batch_number == 0:
            own = seen["generation"] = getattr(p, generation.ATTRIBUTE)
            other = copy(p)
            host.script.postprocess_batch(other, *ella_args())
            host.script.postprocess(other, processing.Processed(other, []), *ella_args())
            host.script.process(other, *ella_args())
            host.script.process_batch(other, *ella_args(), batch_number=1)
            seen["kept"] = getattr(other, generation.ATTRIBUTE, None) is own and own.batch == 0 and bool(own.passes)

    monkeypatch.setattr(generation, "prepare_batch", prepare_batch)
    p, processed = host.run("a cat", steps=2, n_iter=2)
    assert host.reported() == [] and seen["kept"]
    assert len(host.recorded.calls) == 4 and all(texts == ["a cat", ""] for texts, _, _ in host.recorded.calls)
    assert all(f"ELLA: {CONNECTOR}" in info for info in processed.infotexts), processed.infotexts
    _assert_nothing_left(p)

