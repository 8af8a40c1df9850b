"""Other extensions whose combination with ELLA needs a word (``ella_ext/webui/neighbours.py``), replayed on the host
doubles: each extension's keys are written on ``p.extra_generation_params`` at the hook where its script writes them
(from its code, as read in the commits named in ``neighbours.py``), in the order A1111 runs the scripts with ELLA in
``extensions/sd-webui-ella``: Cutoff and Tiled Diffusion (``sd-webui-cutoff``, ``multidiffusion-upscaler-...``) in
``process()`` before ELLA's, Regional Prompter (``sd-webui-regional-prompter``) in ``process()`` after ELLA's, NegPiP
(``sd-webui-negpip``) in ``process_batch()`` after ELLA's."""

from __future__ import annotations

import pytest

from ella_ext.webui import neighbours

from .conftest import CONNECTOR, _hosted, ella_args

EVERY_WARNING = [neighbours.ADETAILER_WARNING, neighbours.RP_ATTENTION_WARNING, neighbours.RP_PROMPT_WARNING,
                 neighbours.CUTOFF_WARNING, neighbours.NEGPIP_WARNING, neighbours.TILED_DIFFUSION_WARNING]

REGIONAL_ATTENTION = {"RP Active": True, "RP Divide mode": "Matrix", "RP Matrix submode": "Horizontal",
                      "RP Mask submode": "Mask", "RP Prompt submode": "Prompt", "RP Calc Mode": "Attention",
                      "RP Ratios": "1,1", "RP Base Ratios": "0.2", "RP Use Base": False, "RP Use Common": False,
                      "RP Use Ncommon": False}
REGIONAL_LATENT = {**REGIONAL_ATTENTION, "RP Calc Mode": "Latent"}
REGIONAL_PROMPT = {**REGIONAL_ATTENTION, "RP Divide mode": "Prompt"}
CUTOFF = {"Cutoff enabled": True, "Cutoff targets": "red, blue", "Cutoff padding": "_", "Cutoff weight": 0.5,
          "Cutoff disable_for_neg": True, "Cutoff strong": False, "Cutoff interpolation": "lerp"}
NEGPIP = {"NegPiP Active": True}
TILED = {"Method": "MultiDiffusion", "Tile tile width": 96, "Tile tile height": 96, "Tile Overlap": 48,
         "Tile batch size": 4}
TILED_REGIONS = {**TILED, "Region control": {"Region 1": {"enable": True, "x": 0.0, "y": 0.0, "w": 0.5, "h": 1.0,
                                                          "prompt": "a dog", "neg_prompt": "", "blend_mode":
                                                          "Background", "feather_ratio": 0.2, "seed": -1}}}


@pytest.fixture(params=["a1111", "forge-new"])
def a1111_or_forge_new(request, models_dir, monkeypatch):
    """The hosts where the extension exists (Regional Prompter and NegPiP also handle Forge's UNet)."""
    yield from _hosted(request.param, models_dir, monkeypatch)


def _writes(monkeypatch, keys: dict, hook: str, *, before_ella: bool):
    """Have every generation's ``p`` get ``keys`` at ``hook``, before or after ELLA's own hook, as the extension's
    script does in the host."""
    from modules import scripts

    original_call = scripts.ScriptRunner.call

    def call(runner, name, p, *args, **kwargs):
        if name == hook and before_ella:
            p.extra_generation_params.update(keys)
        result = original_call(runner, name, p, *args, **kwargs)
        if name == hook and not before_ella:
            p.extra_generation_params.update(keys)
        return result

    monkeypatch.setattr(scripts.ScriptRunner, "call", call)


def _assert_warned(processed, warning: str | None, batches: int):
    assert len(processed.infotexts) == batches
    for info in processed.infotexts:
        assert f"ELLA: {CONNECTOR}" in info and "ELLA error" not in info, info
        if warning is None:
            assert "ELLA warning" not in info, info
            continue
        assert info.count("ELLA warning") == 1 and info.count(warning) == 1, info
        assert f"ELLA warning: {warning}" in info, info
        assert all(other not in info for other in EVERY_WARNING if other != warning), info


@pytest.mark.parametrize(("keys", "warning"), [(REGIONAL_ATTENTION, neighbours.RP_ATTENTION_WARNING),
                                               (REGIONAL_PROMPT, neighbours.RP_PROMPT_WARNING),
                                               (REGIONAL_LATENT, None)],
                         ids=["attention", "prompt", "latent"])
def test_regional_prompter_attention_and_prompt_modes_warn(a1111_or_forge_new, monkeypatch, keys, warning):
    _writes(monkeypatch, keys, "process", before_ella=False)  # sd-webui-regional-prompter sorts after sd-webui-ella
    p, processed = a1111_or_forge_new.run("a cat BREAK a dog", steps=2, n_iter=2)
    assert a1111_or_forge_new.reported() == []
    _assert_warned(processed, warning, batches=2)


@pytest.mark.parametrize(("keys", "warning"), [(CUTOFF, neighbours.CUTOFF_WARNING),
                                               ({**CUTOFF, "Cutoff enabled": False}, None)],
                         ids=["enabled", "disabled"])
def test_cutoff_warns(host, monkeypatch, keys, warning):
    _writes(monkeypatch, keys, "process", before_ella=True)  # sd-webui-cutoff sorts before sd-webui-ella
    p, processed = host.run("a red cat, a blue dog", steps=2, n_iter=2)
    assert host.reported() == []
    _assert_warned(processed, warning, batches=2)


def test_negpip_warns_though_it_writes_its_key_after_ellas_process_batch(a1111_or_forge_new, monkeypatch):
    _writes(monkeypatch, NEGPIP, "process_batch", before_ella=False)  # sd-webui-negpip sorts after sd-webui-ella
    p, processed = a1111_or_forge_new.run("a cat", steps=2, n_iter=2)
    assert a1111_or_forge_new.reported() == []
    _assert_warned(processed, neighbours.NEGPIP_WARNING, batches=2)


@pytest.mark.parametrize(("keys", "warning"), [(TILED_REGIONS, neighbours.TILED_DIFFUSION_WARNING), (TILED, None)],
                         ids=["region control", "tiles only"])
def test_tiled_diffusion_region_control_warns(host, monkeypatch, keys, warning):
    _writes(monkeypatch, {"Tiled Diffusion": keys}, "process", before_ella=True)
    p, processed = host.run("a cat", steps=2, n_iter=2)
    assert host.reported() == []
    _assert_warned(processed, warning, batches=2)


def test_no_neighbour_no_warning(a1111_or_forge_new):
    p, processed = a1111_or_forge_new.run("a cat", steps=2, n_iter=2)
    _assert_warned(processed, None, batches=2)


def test_each_warning_once_with_several_neighbours(host, monkeypatch):
    _writes(monkeypatch, {**CUTOFF, "Tiled Diffusion": TILED_REGIONS}, "process", before_ella=True)
    p, processed = host.run("a cat", steps=2, n_iter=3, args=ella_args())
    for info in processed.infotexts:
        assert info.count(neighbours.CUTOFF_WARNING) == 1 and info.count(neighbours.TILED_DIFFUSION_WARNING) == 1, info
