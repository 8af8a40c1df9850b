"""The script driven through the A1111 1.10.1 host double: rows, texts and timesteps handed to the conditioner at
every denoiser call, and the tensors handed back to the host, for each case the per-call swap must get right."""

from __future__ import annotations

import pytest
import torch

from ella_ext.prompts import WeightedText

from .conftest import CONNECTOR, ENCODER, FakeSDModel, ella_args, fail_conditioner_at


def sigma_to_t(p, call):
    """What the UNet is fed for a k-diffusion call: the real CompVisDenoiser's sigma_to_t of the call's sigma."""
    denoiser = p.denoisers[0]
    _, sigma_in, _, _ = denoiser.inner_calls[call]
    return denoiser.inner_model.sigma_to_t(sigma_in).double().tolist()


def texts_per_call(host):
    return [texts for texts, _, _ in host.recorded.calls]


def test_callback_registered_once_at_import(host):
    from modules import script_callbacks

    assert [name for name, _ in script_callbacks.callback_map["cfg_denoiser"]] == [None]
    assert len(script_callbacks.callback_map["ui_settings"]) == 1
    assert len(script_callbacks.callback_map["app_started"]) == 1


def set_emphasis(value):
    """The setting "Emphasis in the LLM prompt" as the user sets it (shared.opts)."""
    from modules import shared

    shared.opts.data["ella_emphasis"] = value


def test_euler_rows_texts_timesteps_and_tensors(host, reference):
    set_emphasis("off")  # the LLM reads the plain text: the rows are today's
    p, processed = host.run("a (red:1.2) cube on a table", "blurry", steps=4, sampler_name="Euler")
    assert host.reported() == []
    assert texts_per_call(host) == [["a red cube on a table", "blurry"]] * 4
    for call, (_, timesteps, _) in enumerate(host.recorded.calls):
        assert timesteps == pytest.approx(sigma_to_t(p, call), abs=1e-4)
        _, _, cond_in, batched = p.denoisers[0].inner_calls[call]
        assert batched  # equal token counts: the host keeps its batched cond+uncond path
        assert cond_in.shape == (2, 8, 768) and cond_in.dtype == torch.float16  # the host's dtype
        torch.testing.assert_close(cond_in[0].float(), reference("a red cube on a table", timesteps[0]),
                                   atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(cond_in[1].float(), reference("blurry", timesteps[1]), atol=2e-3, rtol=2e-3)
    assert host.recorded.calls[0][1][0] == pytest.approx(999.0, abs=1e-3)  # Euler starts at sigma_max
    info = processed.infotexts[0]
    assert f"ELLA: {CONNECTOR}" in info and f"ELLA LLM: {ENCODER}" in info and "ELLA tokens: flexible" in info
    assert "ELLA error" not in info and "ELLA emphasis: off" in info


@pytest.mark.parametrize("weight", [1.5, 0.5, 0.0])
def test_emphasis_weights_the_connector_attention(host, reference, weight):
    p, processed = host.run(f"(red:{weight}) cube", "(blurry:1.3)", steps=3)
    assert host.reported() == []
    assert len(host.recorded.calls) == 3  # one conditioner call per step
    for call, (texts, timesteps, rows) in enumerate(host.recorded.calls):
        assert texts == [WeightedText("red cube", (weight, 1.0)), WeightedText("blurry", (1.3,))]
        expected = reference("red cube", timesteps[0], word_weights=[weight, 1.0])
        torch.testing.assert_close(rows[0], expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(rows[0], reference("red cube", timesteps[0]), atol=1e-3)  # the weight matters
        torch.testing.assert_close(rows[1], reference("blurry", timesteps[1], word_weights=[1.3]), atol=1e-5,
                                   rtol=1e-5)
        _, _, cond_in, _ = p.denoisers[0].inner_calls[call]
        torch.testing.assert_close(cond_in[0].float(), expected, atol=2e-3, rtol=2e-3)  # what the UNet got
    info = processed.infotexts[0]
    assert f"ELLA: {CONNECTOR}" in info and "ELLA emphasis" not in info and "ELLA warning" not in info


def test_weight_one_is_no_emphasis(host):
    host.run("(red:1) cube", "blurry", steps=2)
    weighted = host.recorded.calls[:]
    host.run("red cube", "blurry", steps=2)
    assert len(weighted) == len(host.recorded.calls) == 2  # one conditioner call per step in each run
    for (texts, _, rows), (plain_texts, _, plain_rows) in zip(weighted, host.recorded.calls):
        assert texts == plain_texts == ["red cube", "blurry"]
        assert torch.equal(rows, plain_rows)


def test_nested_emphasis_break_and_and_reach_their_rows(host, reference):
    host.run("((red) cube:1.2) BREAK on a [table] AND (blue:0.5) sphere", "", steps=1)
    (texts, timesteps, rows), = host.recorded.calls
    assert texts[1:] == [WeightedText("blue sphere", (0.5, 1.0)), ""]
    assert texts[0].text == "red cube on a table"
    assert texts[0].weights == pytest.approx((1.1 * 1.2, 1.2, 1.0, 1.0, 1 / 1.1))
    torch.testing.assert_close(rows[0], reference(texts[0].text, timesteps[0], word_weights=texts[0].weights),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[1], reference("blue sphere", timesteps[1], word_weights=[0.5, 1.0]), atol=1e-5,
                               rtol=1e-5)


def test_out_of_range_emphasis_is_clamped_with_a_warning(host, reference):
    p, processed = host.run("(red:25) [(blue:-1)] cube", steps=1)
    (texts, timesteps, rows), = host.recorded.calls
    assert texts == [WeightedText("red blue cube", (10.0, 0.0, 1.0)), ""]
    torch.testing.assert_close(rows[0], reference("red blue cube", timesteps[0], word_weights=[10.0, 0.0, 1.0]),
                               atol=1e-5, rtol=1e-5)
    assert "ELLA warning: emphasis outside 0 to 10 clamped (-0.909091 to 0, 25 to 10)" in processed.infotexts[0]
    _, processed = host.run("(red:2) cube", steps=1)
    assert "ELLA warning" not in processed.infotexts[0]


def test_emphasis_in_fixed_mode_with_the_other_warnings(host, reference):
    long_prompt = "(red:25) cube " + " ".join(["on a blue sphere"] * 6)
    _, processed = host.run(long_prompt, steps=1, args=ella_args(token_length="Fixed", max_length=16))
    (texts, timesteps, rows), = host.recorded.calls
    weights = [10.0] + [1.0] * (len(texts[0].text.split()) - 1)
    assert texts[0] == WeightedText(texts[0].text, tuple(weights))
    # fixed: every position attended, the padding and EOS at weight 1, the words past the 16 tokens cut
    torch.testing.assert_close(rows[0], reference(texts[0].text, timesteps[0], 16, word_weights=weights), atol=1e-5,
                               rtol=1e-5)
    info = processed.infotexts[0]
    assert "ELLA warning: emphasis outside 0 to 10 clamped (25 to 10); a prompt has" in info
    assert "more than the fixed token length (16)" in info


def test_emphasis_setting_from_override_settings(host):
    """The API's override_settings, the UI's "Override settings" and the XYZ axis all set p.override_settings."""
    from modules import script_callbacks, shared
    from modules.processing import StableDiffusionProcessingTxt2Img

    from ella_ext.errors import InputError
    from ella_ext.webui import xyz

    script_callbacks.ui_settings_callback()  # the host registers the settings when it starts
    _, processed = host.run("(red:1.5) cube", steps=1, override_settings={"ella_emphasis": "off"})
    assert host.recorded.calls[0][0] == ["red cube", ""]
    assert "ELLA emphasis: off" in processed.infotexts[0]
    assert shared.opts.ella_emphasis == "attention"  # restored after the generation
    cell = StableDiffusionProcessingTxt2Img("(red:1.5) cube")
    xyz.apply_emphasis(cell, " Off", [])
    assert cell.override_settings == {"ella_emphasis": "off"}
    with pytest.raises(InputError, match="'attention' or 'off'"):
        xyz.confirm_emphasis(cell, ["attention", "loud"])


def test_bad_emphasis_setting_is_reported_and_the_image_made(host):
    set_emphasis("loud")
    p, processed = host.run("a cube", steps=1)
    assert host.recorded.calls == []
    assert "ELLA error" in processed.infotexts[0] and "Emphasis in the LLM prompt" in processed.infotexts[0]
    _, _, cond_in, _ = p.denoisers[0].inner_calls[0]
    assert cond_in.shape == (2, 77, 768)  # CLIP's
    _, processed = host.run("a cube", steps=1, args=ella_args(enabled=False))
    assert "ELLA" not in processed.infotexts[0]  # ELLA off: its setting is none of the image's business


def test_disabled_changes_nothing(host):
    p, processed = host.run("a cube", steps=3, args=ella_args(enabled=False))
    assert host.recorded.calls == []
    _, _, cond_in, _ = p.denoisers[0].inner_calls[0]
    assert cond_in.shape == (2, 77, 768)  # the host's CLIP context
    assert "ELLA" not in processed.infotexts[0]


def test_prompt_editing_follows_the_denoiser_call_counter(host):
    # host: [cat:dog:2] with 4 steps -> "cat" while step <= 2, then "dog"; the step is CFGDenoiser.step
    host.run("a [cat:dog:2] on a mat", steps=4)
    assert [texts[0] for texts in texts_per_call(host)] == ["a cat on a mat"] * 3 + ["a dog on a mat"]


def test_second_order_sampler_doubles_schedule_steps_and_reuses_pairs(host):
    # Heun, 3 steps: calls at s0, s1 | s1, s2 | s2 -> 5 calls; schedules get total_steps = 6, so [cat:dog:0.5]
    # switches after step int(0.5 * 6) = 3.
    p, _ = host.run("[cat:dog:0.5]", steps=3, sampler_name="Heun")
    calls = host.recorded.calls
    assert len(calls) == 5
    assert [texts[0] for texts, _, _ in calls] == ["cat", "cat", "cat", "cat", "dog"]
    for call, (_, timesteps, _) in enumerate(calls):
        assert timesteps == pytest.approx(sigma_to_t(p, call), abs=1e-4)
    assert calls[1][1] == pytest.approx(calls[2][1])  # the same sigma twice


def test_dpm2_midpoint_sigmas_give_fractional_timesteps(host):
    p, _ = host.run("a cube", steps=3, sampler_name="DPM2")
    fractional = [t for _, ts, _ in host.recorded.calls for t in ts if abs(t - round(t)) > 1e-3]
    assert fractional, "DPM2's midpoint sigmas fall between the schedule's timesteps"
    for call, (_, timesteps, _) in enumerate(host.recorded.calls):
        assert timesteps == pytest.approx(sigma_to_t(p, call), abs=1e-4)


@pytest.mark.parametrize("sampler, expected", [
    ("DDIM", [999.0, 667.0, 334.0]),  # seen in a running A1111 1.10.1 (host-api.md section 9)
    ("PLMS", [999.0, 667.0, 667.0, 334.0]),  # its first step evaluates the next timestep too
    # over the 4 timesteps of 3 steps, at continuous times (t - 1/1000) * 1000: fractional
    ("UniPC", [999.0, 749.25, 499.5, 249.75]),
])
def test_timestep_samplers_pass_timesteps_through(host, sampler, expected):
    p, _ = host.run("a cube", steps=3, sampler_name=sampler)
    fed = [sigma_in.double().tolist() for _, sigma_in, _, _ in p.denoisers[0].inner_calls]
    assert [ts for _, ts, _ in host.recorded.calls] == fed  # what the UNet is fed, unchanged
    assert [ts[0] for ts in fed] == pytest.approx(expected, abs=1e-3)


def test_batch_with_a_prompt_and_negative_per_image(host, reference):
    p, processed = host.run(["a red cube", "a blue ball"], ["ugly", "dark"], batch_size=2, steps=2)
    texts, timesteps, _ = host.recorded.calls[0]
    assert texts == ["a red cube", "a blue ball", "ugly", "dark"]
    _, _, cond_in, _ = p.denoisers[0].inner_calls[0]
    for row, text in enumerate(texts):
        torch.testing.assert_close(cond_in[row].float(), reference(text, timesteps[row]), atol=2e-3, rtol=2e-3)
    assert len(processed.infotexts) == 2 and all(f"ELLA: {CONNECTOR}" in i for i in processed.infotexts)


def test_batch_count_uses_each_batch_prompts(host):
    p, processed = host.run(["first prompt", "second prompt"], batch_size=1, n_iter=2, steps=2)
    assert [texts[0] for texts in texts_per_call(host)] == ["first prompt"] * 2 + ["second prompt"] * 2
    assert len(processed.infotexts) == 2 and all(f"ELLA: {CONNECTOR}" in i for i in processed.infotexts)


def test_and_subprompts_one_row_each_in_host_order(host):
    p, _ = host.run(["a cat AND a dog :0.5", "a car"], ["n1", "n2"], batch_size=2, steps=2)
    texts, timesteps, _ = host.recorded.calls[0]
    assert texts == ["a cat", "a dog", "a car", "n1", "n2"]
    assert len(timesteps) == 5
    _, _, cond_in, _ = p.denoisers[0].inner_calls[0]
    assert cond_in.shape[0] == 5


def test_extra_network_tags_never_reach_the_llm(host):
    host.run("<lora:style:0.8> a cube", "<lora:neg:1> blurry", steps=1)
    assert texts_per_call(host)[0] == ["a cube", "blurry"]


def test_empty_negative_mode(host):
    host.run("a cube", "blurry", steps=2, args=ella_args(negative="Empty"))
    assert texts_per_call(host)[0] == ["a cube", ""]


def test_separate_llm_prompt(host):
    host.run("cube, 8k, masterpiece", steps=1, args=ella_args(llm_prompt="a small red cube on a wooden table"))
    assert texts_per_call(host)[0] == ["a small red cube on a wooden table", ""]


def test_llm_prompt_with_the_wrong_number_of_parts_is_one_sentence(host):
    p, processed = host.run("a cube AND a ball AND a cone", steps=1, args=ella_args(llm_prompt="red AND blue"))
    assert host.recorded.calls == [] and p.denoisers[0].inner_calls
    assert "give the ELLA prompt one part, or as many parts as the prompt; this batch uses CLIP" in processed.info


def test_fixed_token_length(host, reference):
    p, processed = host.run("a cube", steps=1, args=ella_args(token_length="Fixed", max_length=16))
    texts, timesteps, _ = host.recorded.calls[0]
    _, _, cond_in, _ = p.denoisers[0].inner_calls[0]
    torch.testing.assert_close(cond_in[0].float(), reference("a cube", timesteps[0], max_length=16),
                               atol=2e-3, rtol=2e-3)
    assert "ELLA tokens: fixed 16" in processed.infotexts[0]


def test_hires_pass_uses_its_own_prompts_sampler_and_timesteps(host):
    # the hires pass's new denoiser: step counter from 0; 2 hires steps at denoising 0.5 sample sigmas
    # 0.932358 and 0.029168, as seen in a running A1111 1.10.1 (host-api.md section 9)
    p, processed = host.run("a cube", "blurry", steps=3, enable_hr=True, hr_prompt="a sharp [cube:ball:1]",
                            hr_second_pass_steps=2, hr_sampler_name="Euler", denoising_strength=0.5)
    first = len(p.denoisers[0].inner_calls)
    assert first == 3 and len(p.denoisers) == 2
    hires = host.recorded.calls[first:]
    # host rule: a whole-number switch point in a hires prompt counts first-pass steps too (1 - 3 < 0): switched
    assert [texts for texts, _, _ in hires] == [["a sharp ball", "blurry"], ["a sharp ball", "blurry"]]
    hires_sigmas = [float(c[1][0]) for c in p.denoisers[1].inner_calls]
    assert hires_sigmas == pytest.approx([0.932358, 0.029168], abs=1e-5)
    for call, (_, timesteps, _) in enumerate(hires):
        expected = p.denoisers[1].inner_model.sigma_to_t(p.denoisers[1].inner_calls[call][1]).double().tolist()
        assert timesteps == pytest.approx(expected, abs=1e-4)
    assert f"ELLA: {CONNECTOR}" in processed.infotexts[0] and "ELLA hires" not in processed.infotexts[0]


def test_hires_schedule_counts_the_first_pass_total_steps(host):
    """prompt_parser.py: a whole-number switch point in the hires prompt is offset by the first pass's *total*
    steps (the sampler's total_steps: x2 for Heun), not by p.steps: [ball:box:5] after a 3-step Heun pass (6
    schedule steps) is 5 - 6 < 0, so the hires pass reads "box" throughout (5 - 3 would keep "ball")."""
    p, _ = host.run("a cube", steps=3, sampler_name="Heun", enable_hr=True, hr_prompt="a [ball:box:5]",
                    hr_second_pass_steps=2, hr_sampler_name="Heun")
    first = len(p.denoisers[0].inner_calls)
    hires = [texts[0] for texts, _, _ in host.recorded.calls[first:]]
    assert first == 5 and len(hires) >= 2 and set(hires) == {"a box"}


@pytest.mark.parametrize(("old", "expected"), [(True, ["a cat", "a cat", "a dog", "a dog"]), (False, ["a cat"] * 4)])
def test_the_hosts_old_scheduling_option_is_followed(host, old, expected):
    """Settings > Compatibility > use_old_scheduling: [cat:dog:1.0] switches after step 1 (old: 1.0 is not a
    fraction) or at the end (new: 1.0 of the steps)."""
    from modules import shared

    shared.opts.use_old_scheduling = old
    try:
        host.run("a [cat:dog:1.0]", steps=4)
    finally:
        shared.opts.use_old_scheduling = False
    assert [texts[0] for texts in texts_per_call(host)] == expected


def test_hires_pass_off(host):
    p, processed = host.run("a cube", steps=2, enable_hr=True, hr_second_pass_steps=2,
                            args=ella_args(hires=False))
    assert len(host.recorded.calls) == len(p.denoisers[0].inner_calls)
    _, _, cond_in, _ = p.denoisers[1].inner_calls[0]
    assert cond_in.shape[1] == 77  # CLIP in the hires pass
    assert "ELLA hires: off" in processed.infotexts[0]


def test_img2img_partial_schedule(host):
    # steps 4, denoising 0.5 -> t_enc 2 -> sigmas[1:]: 3 calls, the step counter from 0
    p, _ = host.run("a cube", steps=4, img2img=True, denoising_strength=0.5)
    assert len(host.recorded.calls) == 3
    for call, (_, timesteps, _) in enumerate(host.recorded.calls):
        assert timesteps == pytest.approx(sigma_to_t(p, call), abs=1e-4)
    assert host.recorded.calls[0][1][0] < 999.0 - 1


def test_controlnet_marker_row_is_kept(host):
    p, _ = host.run("a cube", "blurry", steps=1, controlnet=True)
    _, _, cond_in, batched = p.denoisers[0].inner_calls[0]
    assert batched and cond_in.shape == (2, 9, 768)
    assert torch.all(cond_in[0, 0] == 1024) and torch.all(cond_in[1, 0] == -1024)


def test_ella_plus_clip_concatenates_the_host_rows(host):
    from modules.processing import fake_clip

    long_prompt = " ".join(["word"] * 80)  # two CLIP chunks: 154 tokens against the negative's 77
    p, _ = host.run(long_prompt, "blurry", steps=1, args=ella_args(clip_mode="ELLA + CLIP"))
    _, _, (cond, uncond), batched = p.denoisers[0].inner_calls[0]
    assert not batched  # as in the host without ELLA: unequal CLIP lengths run cond and uncond apart
    assert cond.shape == (1, 8 + 154, 768) and uncond.shape == (1, 8 + 77, 768)
    torch.testing.assert_close(cond[0, 8:], fake_clip(long_prompt, 768).half())
    torch.testing.assert_close(uncond[0, 8:], fake_clip("blurry", 768).half())
    out = host.recorded.calls[0][2]
    torch.testing.assert_close(cond[0, :8], out[0].half())


def test_sdxl_keeps_vector_in_dict_with_shape(host):
    from modules import prompt_parser, shared

    shared.sd_model = FakeSDModel(2048, is_sdxl=True)
    p, _ = host.run("a cube", "blurry", steps=1, args=ella_args(connector="tiny-sdxl"))
    _, _, cond_in, batched = p.denoisers[0].inner_calls[0]
    assert batched and isinstance(cond_in, dict)
    assert cond_in["crossattn"].shape == (2, 8, 2048)
    from modules.processing import conditioning_row

    torch.testing.assert_close(cond_in["vector"][0], conditioning_row(shared.sd_model, "a cube")["vector"])
    assert host.reported() == []
    assert prompt_parser.DictWithShape  # the double's container is what the host hands over


def test_connector_width_mismatch_is_refused_and_image_made(host):
    from modules import shared

    shared.sd_model = FakeSDModel(2048, is_sdxl=True)
    p, processed = host.run("a cube", steps=1)
    assert host.recorded.calls == []
    assert (f"ELLA error: ELLA: the connector {CONNECTOR} is made for SD 1.5 (768-wide rows), but this checkpoint is "
            "SDXL (2048-wide). Load an SD 1.5 checkpoint for this connector, or pick a connector made for SDXL"
            in processed.infotexts[0])
    assert f"ELLA: {CONNECTOR}" not in processed.infotexts[0]
    assert p.denoisers[0].inner_calls, "the image is still made"


def test_sdxl_connector_on_sd15_says_which_checkpoint_it_needs(host):
    p, processed = host.run("a cube", steps=1, args=ella_args(connector="tiny-sdxl"))
    assert host.recorded.calls == [] and p.denoisers[0].inner_calls, "no ELLA, but the image is made"
    assert ("the connector tiny-sdxl is made for SDXL (2048-wide rows), but this checkpoint is SD 1.5 (768-wide). "
            "Load an SDXL checkpoint for this connector, or pick a connector made for SD 1.5") in processed.infotexts[0]


def test_missing_connector_says_where_to_put_it(host):
    p, processed = host.run("a cube", steps=1, args=ella_args(connector="not-there"))
    assert host.recorded.calls == []
    assert "ELLA error" in processed.infotexts[0] and "not-there" in processed.infotexts[0]
    assert host.reported() == []


@pytest.mark.parametrize("name", ["/abs/path/c.safetensors", "../ELLA/tiny-sd15", "owner/name"])
def test_unlisted_models_are_refused_at_generation(host, models_dir, name):
    """Pasted parameters and X/Y/Z values reach the script without the API's check: the same refusal there."""
    p, processed = host.run("a cube", steps=1, args=ella_args(connector=name))
    assert host.recorded.calls == [] and p.denoisers[0].inner_calls, "no ELLA, but the image is made"
    shown = {"/abs/path/c.safetensors": "path/c.safetensors"}.get(name, name)  # no absolute path in the image
    assert f"the connector '{shown}' is not one of the listed models" in processed.infotexts[0]
    assert "/abs/" not in processed.infotexts[0]


def test_paths_when_the_setting_accepts_them_and_names_in_the_info_text(host, models_dir):
    from modules import shared

    shared.opts.ella_allow_paths = True
    try:
        connector = str(models_dir / "ELLA" / f"{CONNECTOR}.safetensors")
        encoder = str(models_dir / "ELLA" / "text_encoders" / ENCODER)
        p, processed = host.run("a cube", steps=2, args=ella_args(connector=connector, text_encoder=encoder))
    finally:
        shared.opts.ella_allow_paths = False
    info = processed.infotexts[0]
    assert len(host.recorded.calls) == 2 and "ELLA error" not in info
    assert f"ELLA: {CONNECTOR}," in info and f"ELLA LLM: {ENCODER}," in info
    assert str(models_dir) not in info, "the image carries no path of the machine that made it"


def test_failure_mid_generation_falls_back_to_clip(host, monkeypatch):
    # a CUDA out-of-memory at the second call: that call and the rest use CLIP, the image is made, the info says so
    fail_conditioner_at(monkeypatch, 2)
    p, processed = host.run("a cube", steps=4)
    shapes = [c[2].shape[1] for c in p.denoisers[0].inner_calls]
    assert shapes == [8, 77, 77, 77]
    assert "CUDA out of memory (simulated)" in processed.infotexts[0] and "sampler call 2" in processed.infotexts[0]
    assert host.reported() == []


def test_row_count_mismatch_falls_back(host):
    from modules import script_callbacks

    def shrink(params):  # another extension changes the batch before ELLA's callback
        params.text_cond = params.text_cond[:1]

    script_callbacks.callback_map["cfg_denoiser"].insert(0, ("other", shrink))
    p, processed = host.run("a cube AND a ball", steps=2)
    assert host.recorded.calls == []
    assert "prompt rows" in processed.infotexts[0]
    assert [c[2].shape[1] for c in p.denoisers[0].inner_calls] == [77, 77]


def test_api_dict_of_named_fields(host):
    args = [{"enabled": True, "connector": CONNECTOR, "text_encoder": ENCODER, "negative": "empty"}, *ella_args()[1:]]
    host.run("a cube", "blurry", steps=1, args=args)
    assert texts_per_call(host)[0] == ["a cube", ""]


def test_api_bad_dict_is_reported_and_image_made(host):
    args = [{"enabled": True, "clip": "yes"}]
    p, processed = host.run("a cube", steps=1, args=args)
    assert host.recorded.calls == []
    assert "unknown field 'clip'" in processed.infotexts[0]
    assert p.denoisers[0].inner_calls


def test_state_is_dropped_and_nothing_grows(host):
    from ella_ext.registry import registry
    from ella_ext.webui.generation import ATTRIBUTE

    p, _ = host.run("a cube", steps=2)
    assert not hasattr(p, ATTRIBUTE)
    loaded = len(registry)
    for _ in range(3):
        host.run("another cube", steps=2)
    assert len(registry) == loaded == 2


def test_xyz_overrides_apply_per_copy(host):
    import copy

    from modules.processing import StableDiffusionProcessingTxt2Img

    from ella_ext.webui import xyz

    base = StableDiffusionProcessingTxt2Img("a cube")
    first, second = copy.copy(base), copy.copy(base)
    xyz.apply_clip_mode(first, "ELLA + CLIP", [])
    xyz.apply_token_length(second, "Fixed 64", [])
    assert first.ella_xyz == {"clip_mode": "ELLA + CLIP"}
    assert second.ella_xyz == {"token_length": "Fixed", "max_length": "64"}
    assert not hasattr(base, "ella_xyz")


def test_info_text_per_batch_after_a_failure_in_the_first(host, monkeypatch):
    fail_conditioner_at(monkeypatch, 1)  # the first call of batch 1: that batch is all CLIP, batch 2 is ELLA's
    p, processed = host.run(["first", "second"], n_iter=2, steps=2)
    first, second = processed.infotexts
    assert "ELLA error" in first and f"ELLA: {CONNECTOR}" not in first and "this batch uses CLIP" in first
    assert f"ELLA: {CONNECTOR}" in second and "ELLA error" not in second


def test_info_text_says_when_the_sampler_never_called_ella(host, monkeypatch):
    from ella_ext.webui import generation

    monkeypatch.setattr(generation, "on_denoiser", lambda params, timesteps: None)
    p, processed = host.run("a cube", steps=2)
    assert "ELLA was not called by this sampler" in processed.infotexts[0]
    assert f"ELLA: {CONNECTOR}" not in processed.infotexts[0]


def test_info_text_of_images_saved_before_hires_fix(host):
    p, processed = host.run("a cube", steps=2, enable_hr=True, hr_second_pass_steps=2)
    (before,) = p.before_hires_infotexts  # written after the first pass, before any hires hook
    assert f"ELLA: {CONNECTOR}" in before and "ELLA error" not in before


def test_xyz_cells_share_one_dict_and_ella_off_cells_show_no_ella_keys(host):
    # xyz_grid.py: pc = copy(p) per cell; the first cell shares p.extra_generation_params with the next cells
    p, first = host.run("a cube", steps=1)
    shared_params = p.extra_generation_params
    from modules import processing, scripts

    q = processing.StableDiffusionProcessingTxt2Img("a cube", steps=1, script_args=[None, *ella_args(enabled=False)])
    q.extra_generation_params = shared_params
    processed = processing.process_images(q, scripts.ScriptRunner(host.script))
    assert f"ELLA: {CONNECTOR}" in first.infotexts[0]
    assert "ELLA" not in processed.infotexts[0]


def test_no_not_called_message_after_an_interrupt(host, monkeypatch):
    from modules import shared

    from ella_ext.webui import generation

    # the user presses Interrupt while sampling, before ELLA conditioned a call
    monkeypatch.setattr(generation, "on_denoiser", lambda params, timesteps: setattr(shared.state, "interrupted", True))
    p, processed = host.run("a cube", steps=2)
    assert "ELLA" not in processed.infotexts[0]


def test_rows_keep_their_precision_when_the_host_samples_under_autocast(host, reference, monkeypatch):
    # A1111 with FP8 weight storage on a CPU samples inside bfloat16 autocast (seen in the real 1.10.1: the rows of a
    # trained connector were 3e-2 off its own computation, as far as the texts are apart); ELLA's rows are computed
    # in the connector's own dtype all the same
    from modules import devices, script_callbacks

    seen = []
    script_callbacks.on_cfg_denoiser(lambda params: seen.append(torch.is_autocast_cpu_enabled()))
    monkeypatch.setattr(devices, "fp8", True)
    monkeypatch.setattr(devices, "dtype_unet", torch.float32)  # --no-half, as on a CPU
    p, processed = host.run("a red cube on a table", "blurry", steps=3, enable_hr=True, hr_second_pass_steps=2,
                            denoising_strength=0.5)
    assert host.reported() == [] and seen and all(seen)  # every sampler call ran under the host's autocast
    assert len(host.recorded.calls) == 5
    for texts, timesteps, rows in host.recorded.calls:
        assert rows.dtype == torch.float32
        for row, text, t in zip(rows, texts, timesteps):
            torch.testing.assert_close(row, reference(text, t), atol=1e-5, rtol=1e-5)
    assert "ELLA error" not in processed.infotexts[0]
