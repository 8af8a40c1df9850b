"""A1111's refiner switch (``refiner_checkpoint``, ``refiner_switch_at``) through the host double: the refiner is
loaded in the middle of a pass and the host hands its own CLIP conditioning to the callbacks from then on. A refiner
whose context width the connector does not fit gets its own rows, and the info text says where ELLA stopped; one of
the same width keeps ELLA's rows."""

from __future__ import annotations

import torch

from .conftest import FakeSDModel, ella_args


def _checkpoints(main_width: int, refiner_width: int, sdxl: bool):
    from modules import sd_models, shared

    main = FakeSDModel(main_width, is_sdxl=sdxl)
    refiner = FakeSDModel(refiner_width, is_sdxl=sdxl)
    if sdxl and refiner_width == 1280:
        refiner.vector_width = 2560  # SDXL refiner: CLIP-G's pooled vector and its aesthetic-score embedding
    sd_models._register("base", main)
    sd_models._register("refiner", refiner)
    shared.sd_model = main
    return main, refiner


def _widths(denoiser):
    widths = []
    for _, _, cond_in, batched in denoiser.inner_calls:
        cond = cond_in if batched else cond_in[0]
        widths.append((cond["crossattn"] if isinstance(cond, dict) else cond).shape[-1])
    return widths


def test_sdxl_refiner_gets_its_own_rows_and_the_info_text_says_where_ella_stopped(host, caplog):
    from modules.processing import conditioning_row

    _, refiner = _checkpoints(2048, 1280, sdxl=True)
    p, processed = host.run("a cube", "blurry", steps=6, n_iter=2, args=ella_args(connector="tiny-sdxl"),
                            refiner_checkpoint="refiner", refiner_switch_at=0.5)
    assert host.reported() == []
    first, second = p.denoisers
    for denoiser in (first, second):  # each batch starts on the base (the host reloads it) and switches again
        widths = _widths(denoiser)
        before = widths.index(1280)
        assert 0 < before < len(widths) and set(widths[:before]) == {2048} and set(widths[before:]) == {1280}
        for _, _, cond_in, batched in denoiser.inner_calls[before:]:
            assert batched and cond_in["crossattn"].shape == (2, 77, 1280) and cond_in["vector"].shape == (2, 2560)
            torch.testing.assert_close(cond_in["crossattn"][0], conditioning_row(refiner, "a cube")["crossattn"])
            torch.testing.assert_close(cond_in["crossattn"][1], conditioning_row(refiner, "blurry")["crossattn"])
    assert len(host.recorded.calls) == _widths(first).count(2048) + _widths(second).count(2048)
    for info in processed.infotexts:
        assert "ELLA: tiny-sdxl" in info and "Refiner: refiner" in info and "ELLA error" not in info
        conditioned = _widths(first).count(2048)
        assert (f"ELLA warning: ELLA stopped at the refiner switch: the refiner refiner takes 1280-wide text "
                f"conditioning, the connector makes 2048; ELLA conditioned {conditioned} sampler calls before it, "
                f"the refiner's own CLIP the rest") in info
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "stopped at the refiner switch" in r.message]
    assert len(warned) == 2  # in the console too, once per batch


def test_refiner_of_the_same_width_keeps_ella(host):
    _checkpoints(768, 768, sdxl=False)
    p, processed = host.run("a cube", "blurry", steps=4, refiner_checkpoint="refiner", refiner_switch_at=0.5)
    assert host.reported() == []
    assert p.extra_generation_params["Refiner"] == "refiner"  # the switch happened
    assert len(host.recorded.calls) == 4 and _widths(p.denoisers[0]) == [768] * 4
    for _, _, cond_in, _ in p.denoisers[0].inner_calls:
        assert cond_in.shape[1] == 8  # ELLA's 8 tokens, not CLIP's 77, after the switch too
    info = processed.infotexts[0]
    assert "ELLA: tiny-sd15" in info and "ELLA warning" not in info and "ELLA error" not in info


def test_switch_before_the_first_call_leaves_the_batch_to_the_refiner_and_says_so(host):
    _checkpoints(2048, 1280, sdxl=True)
    p, processed = host.run("a cube", "blurry", steps=3, args=ella_args(connector="tiny-sdxl"),
                            refiner_checkpoint="refiner", refiner_switch_at=0.0)
    assert host.reported() == [] and host.recorded.calls == []
    assert _widths(p.denoisers[0]) == [1280] * 3, "the image is made by the refiner"
    info = processed.infotexts[0]
    assert "ELLA error: ELLA stopped at the refiner switch" in info and "ELLA conditioned 0 sampler calls" in info
    assert "ELLA: tiny-sdxl" not in info
