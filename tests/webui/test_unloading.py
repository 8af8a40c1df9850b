"""When ELLA's models are unloaded (the idle clock, the UI's button, picking other models), and what happens to a
generation that dies before ``postprocess``, through the A1111 1.10.1 double. Nothing here waits on a real clock:
the idle timer's function is called as the timer thread would call it."""

from __future__ import annotations

import pytest

from .conftest import CONNECTOR, at_call, ella_args


@pytest.fixture
def loaded(host):
    from ella_ext.registry import registry
    from ella_ext.webui import loading

    def keys():
        return sorted(key.path.rsplit("/", 1)[-1] for key in registry)

    return registry, loading.manager, keys


def fire(timer):
    """What the timer thread does when the minutes have passed."""
    assert timer is not None, "no idle clock is running"
    timer.function(*timer.args, **timer.kwargs)


def die_in_the_unet_at_call(monkeypatch, call: int):
    """The UNet raises at the denoiser's ``call``-th call (an out-of-memory there): the exception leaves
    ``process_images`` before ``postprocess``, and the job ends (the host's ``state.end()`` is in a finally)."""
    from modules import sd_samplers_cfg_denoiser

    original = sd_samplers_cfg_denoiser.CFGDenoiser.forward
    count = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == call:
            raise RuntimeError("CUDA out of memory (simulated, in the UNet)")
        return out

    monkeypatch.setattr(sd_samplers_cfg_denoiser.CFGDenoiser, "forward", forward)


def test_the_idle_clock_unloads_after_the_set_minutes(host, loaded):
    from modules import shared

    registry, manager, _ = loaded
    host.run("a cube", steps=1)
    assert len(registry) == 2
    timer = manager._timer
    assert timer is not None and timer.interval == 15 * 60  # the default: 15 minutes
    host.run("a cube", steps=1)  # a new generation restarts the clock
    assert timer.finished.is_set() and manager._timer is not timer
    fire(manager._timer)
    assert len(registry) == 0 and manager._timer is None
    shared.opts.ella_unload_minutes = 0
    try:
        host.run("a cube", steps=1)
        assert len(registry) == 2 and manager._timer is None  # 0: never
    finally:
        shared.opts.ella_unload_minutes = 15


def test_the_button_unloads_at_once_between_generations(host, loaded):
    from ella_ext.webui import ui

    registry, manager, _ = loaded
    host.run("a cube", steps=1)
    assert "Unloaded 2 ELLA model(s)" in ui._unload() and len(registry) == 0 and manager._timer is None


def test_the_button_during_a_generation_unloads_when_it_ends(host, loaded, monkeypatch):
    """The button is not behind the host's queue lock: pressed during a batch-count run, it used to unload at once,
    and the next batch fell back to CLIP ("No model is loaded under ModelKey(...)")."""
    from ella_ext.webui import ui

    registry, _, _ = loaded
    answers = []
    at_call(monkeypatch, 1, lambda: answers.append(ui._unload()))
    p, processed = host.run(["a red cube", "a blue sphere"], steps=2, n_iter=2)
    assert "when the current generation ends" in answers[0]
    assert len(host.recorded.calls) == 4, "both batches conditioned by ELLA"  # (recorded: the last batch's calls)
    assert all("ELLA error" not in info and f"ELLA: {CONNECTOR}" in info for info in processed.infotexts)
    assert len(registry) == 0, "unloaded once the generation ended"


def test_the_idle_clock_never_unloads_during_a_generation(host, loaded, monkeypatch):
    registry, manager, _ = loaded
    host.run("a cube", steps=1)
    before = manager._timer  # armed by the previous generation's end: it may fire just as the next one starts
    fired = []

    def fire_both():
        fire(before)  # a clock the new generation restarted
        fire(manager._timer)  # the clock running now: the host is busy, so it only looks again later
        fired.append(len(registry))

    at_call(monkeypatch, 1, fire_both)
    p, processed = host.run(["a red cube", "a blue sphere"], steps=2, n_iter=2)
    assert fired == [2] and len(registry) == 2
    assert all("ELLA error" not in info for info in processed.infotexts)
    assert manager._timer is not None and manager._timer is not before


def test_a_generation_that_dies_is_released_by_the_next_one(host, loaded, monkeypatch):
    from ella_ext.webui import generation

    registry, manager, _ = loaded
    die_in_the_unet_at_call(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated, in the UNet"):
        host.run("a cube", steps=3)
    dead = next(g for g, _ in manager._active)
    assert dead.conditioner._features is not None, "what it held is still held"
    assert manager._timer is not None, "the idle clock runs even though postprocess never came"
    monkeypatch.undo()
    host.__init__(host.module, monkeypatch, host.kind)  # the recording conditioner again, after undo()
    host.run("a cube", steps=1, args=ella_args(enabled=False))
    assert dead.conditioner._features is None and dead.passes == {} and manager._active == []
    assert isinstance(dead, generation.Generation) and len(registry) == 2


def test_a_generation_that_dies_is_released_by_the_idle_clock(host, loaded, monkeypatch):
    registry, manager, _ = loaded
    die_in_the_unet_at_call(monkeypatch, 1)
    with pytest.raises(RuntimeError):
        host.run("a cube", steps=2)
    dead = next(g for g, _ in manager._active)
    fire(manager._timer)  # the job has ended: the host is idle
    assert len(registry) == 0 and dead.conditioner._features is None and manager._active == []


def test_a_button_press_during_a_generation_that_dies_is_done_once(host, loaded, monkeypatch):
    """The button's deferred unload is done when the dead generation is released, and never again: a later ordinary
    generation keeps its models."""
    from ella_ext.webui import ui

    registry, manager, _ = loaded
    answers = []
    at_call(monkeypatch, 1, lambda: answers.append(ui._unload()))
    die_in_the_unet_at_call(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated, in the UNet"):
        host.run("a cube", steps=3)
    assert "when the current generation ends" in answers[0] and len(registry) == 2
    monkeypatch.undo()
    host.__init__(host.module, monkeypatch, host.kind)
    host.run("a cube", steps=1, args=ella_args(enabled=False))  # releases the dead one: the request is done now
    assert len(registry) == 0 and manager._active == []
    p, processed = host.run("a cube", steps=1)
    assert f"ELLA: {CONNECTOR}" in processed.infotexts[0]
    assert len(registry) == 2, "a generation after the request keeps its models"


def test_a_nested_generation_leaves_the_outer_one_alone(host, loaded, monkeypatch):
    """ADetailer runs a whole generation inside another's postprocess_image, in the same job: the inner start must
    not take the outer generation for a dead one."""
    outer_calls = []

    def inner():
        host.run("a face", steps=1, job=False)

    at_call(monkeypatch, 1, inner)
    from ella_ext.webui import generation

    for name in ("__call__", "lookup"):
        original = getattr(generation.Conditioner, name)
        monkeypatch.setattr(generation.Conditioner, name,
                            lambda self, texts, t, original=original: outer_calls.append(texts) or original(self,
                                                                                                            texts, t))
    p, processed = host.run("a red cube", steps=3)
    assert [texts[0] for texts in outer_calls] == ["a red cube", "a face", "a red cube", "a red cube"]
    assert "ELLA error" not in processed.infotexts[0] and f"ELLA: {CONNECTOR}" in processed.infotexts[0]


def test_a_nested_generation_in_a_later_batch_leaves_the_outer_one_alone(host, loaded, monkeypatch):
    """The host renames the running job per batch ("Batch 2 out of 2"): a generation nested in the second batch is
    still in the outer one's job, so the outer generation is neither taken for a dead one nor unloaded under."""
    from ella_ext.webui import ui

    registry, _, _ = loaded
    answers = []

    def inner_then_button():
        host.run("a face", steps=1, job=False)
        answers.append(ui._unload())

    at_call(monkeypatch, 3, inner_then_button)  # the second batch's first call
    p, processed = host.run(["a red cube", "a blue sphere"], steps=2, n_iter=2)
    assert "when the current generation ends" in answers[0]
    assert all("ELLA error" not in info and f"ELLA: {CONNECTOR}" in info for info in processed.infotexts)
    assert len(registry) == 0, "unloaded once the generation ended"


def test_picking_other_models_unloads_the_previous_ones(host, loaded):
    registry, _, keys = loaded
    host.run("a cube", steps=1)
    assert keys() == [f"{CONNECTOR}.safetensors", "tiny-t5"]
    host.run("a cube", steps=1, args=ella_args(connector="tiny-sdxl"))  # loaded, then refused: SD 1.5 checkpoint
    assert keys() == ["tiny-sdxl.safetensors", "tiny-t5"]
