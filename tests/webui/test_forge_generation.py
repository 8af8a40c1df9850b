"""The script driven through the Forge classic and Forge new doubles: the same generation scenarios as on A1111,
checked against what Forge's sampling function hands the UNet and ControlNet, plus what only Forge does (CFG 1
without an uncond, the hires hook twice, real sigmas for the timestep samplers, its memory manager)."""

from __future__ import annotations

import pytest
import torch

from ella_ext.prompts import WeightedText

from .conftest import CONNECTOR, ENCODER, ella_args, fail_conditioner_at, forge_sd_model


def texts_per_call(host):
    return [texts for texts, _, _ in host.recorded.calls]


def chunks(p, denoiser=0):
    """Per denoiser call, the chunks the UNet ran (``forge_common.ModelCall``)."""
    return p.denoisers[denoiser].inner_calls


def fed(p, call, denoiser=0):
    """The timesteps the UNet was fed at a call, rows in the order ELLA hands them (cond rows, then uncond rows)."""
    return [t for chunk in chunks(p, denoiser)[call] for t in chunk.timesteps.double().tolist()]


def memory_manager():
    from modules import devices

    return getattr(devices, "memory_management", None) or devices.model_management


@pytest.fixture
def reserving(forge_host, monkeypatch):
    """The tiny test models need a few MB: make classic reserve them too, to test the mechanism on both."""
    from ella_ext.webui import forge

    monkeypatch.setattr(forge, "CLASSIC_MIN_RESERVE", 0)
    return forge_host


def test_host_detected_and_callbacks_registered_without_name(forge_host):
    from modules import script_callbacks

    from ella_ext.webui import forge, host

    assert host.kind() == forge_host.kind
    assert forge_host.module.ADAPTER is forge
    assert [name for name, _ in script_callbacks.callback_map["cfg_denoiser"]] == [None]
    for category in ("ui_settings", "app_started", "before_ui", "infotext_pasted"):
        assert len(script_callbacks.callback_map[category]) == 1


def test_euler_rows_timesteps_and_tensors_as_the_unet_gets_them(forge_host, reference):
    from modules import shared

    shared.opts.data["ella_emphasis"] = "off"  # the LLM reads the plain text: the rows are today's
    p, processed = forge_host.run("a (red:1.2) cube on a table", "blurry", steps=4, sampler_name="Euler")
    assert forge_host.reported() == []
    assert texts_per_call(forge_host) == [["a red cube on a table", "blurry"]] * 4
    for call, (_, timesteps, _) in enumerate(forge_host.recorded.calls):
        (chunk,) = chunks(p)[call]  # equal lengths: Forge runs cond and uncond as one chunk
        assert chunk.cond_or_uncond == [0, 1]
        assert timesteps == fed(p, call)  # Forge feeds the UNet the nearest whole step, and so do we
        assert all(t == round(t) for t in timesteps)
        assert chunk.crossattn.shape == (2, 8, 768) and chunk.crossattn.dtype == torch.float16
        torch.testing.assert_close(chunk.crossattn[0].float(), reference("a red cube on a table", timesteps[0]),
                                   atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(chunk.crossattn[1].float(), reference("blurry", timesteps[1]), atol=2e-3,
                                   rtol=2e-3)
    assert forge_host.recorded.calls[0][1] == [999.0, 999.0]
    info = processed.infotexts[0]
    assert f"ELLA: {CONNECTOR}" in info and f"ELLA LLM: {ENCODER}" in info and "ELLA error" not in info
    assert "ELLA emphasis: off" in info


def test_emphasis_rows_as_the_unet_gets_them(forge_host, reference):
    p, processed = forge_host.run("(red:1.5) cube", "blurry", steps=3)
    assert forge_host.reported() == []
    assert len(forge_host.recorded.calls) == 3  # one conditioner call per step
    for call, (texts, timesteps, rows) in enumerate(forge_host.recorded.calls):
        assert texts == [WeightedText("red cube", (1.5, 1.0)), "blurry"]
        expected = reference("red cube", timesteps[0], word_weights=[1.5, 1.0])
        torch.testing.assert_close(rows[0], expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(rows[0], reference("red cube", timesteps[0]), atol=1e-3)
        (chunk,) = chunks(p)[call]
        torch.testing.assert_close(chunk.crossattn[0].float(), expected, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(chunk.crossattn[1].float(), reference("blurry", timesteps[1]), atol=2e-3,
                                   rtol=2e-3)
    assert "ELLA emphasis" not in processed.infotexts[0]
    from modules import script_callbacks

    script_callbacks.ui_settings_callback()  # the host registers the settings when it starts
    _, processed = forge_host.run("(red:1.5) cube", "blurry", steps=1, override_settings={"ella_emphasis": "off"})
    assert forge_host.recorded.calls[0][0] == ["red cube", "blurry"]


def test_disabled_changes_nothing(forge_host):
    p, processed = forge_host.run("a cube", steps=2, args=ella_args(enabled=False))
    assert forge_host.recorded.calls == []
    assert chunks(p)[0][0].crossattn.shape == (2, 77, 768)
    assert "ELLA" not in processed.infotexts[0]
    assert all(reserved == 0 for _, reserved in memory_manager().prepared)


@pytest.mark.parametrize("sampler", ["Heun", "DPM2"])
def test_second_order_samplers(forge_host, sampler):
    # schedules get total_steps = 6 for 3 steps: [cat:dog:0.5] switches after call 3, as on A1111
    p, _ = forge_host.run("[cat:dog:0.5]", steps=3, sampler_name=sampler)
    calls = forge_host.recorded.calls
    assert [texts[0] for texts, _, _ in calls][:4] == ["cat"] * 4 and calls[-1][0][0] == "dog"
    for call, (_, timesteps, _) in enumerate(calls):
        assert timesteps == fed(p, call)  # classic too: not k-diffusion's fractional sigma_to_t


@pytest.mark.parametrize("sampler, steps", [
    ("DDIM", [999, 667, 334]),
    ("PLMS", [999, 667, 667, 334]),  # its first step evaluates the next timestep too
    ("UniPC", [999, 749, 500, 250]),  # 4 timesteps for 3 steps; 999, 749.25, 499.5, 249.75 rounded by Forge
])
def test_timestep_samplers_hand_the_callback_real_sigmas(forge_host, sampler, steps):
    p, _ = forge_host.run("a cube", steps=3, sampler_name=sampler)
    sigmas = [float(call[0].sigmas[0]) for call in chunks(p)]
    if sampler == "DDIM":  # seen in a running Forge new: 14.614642, 2.929549, 0.935510 (host-api.md section 10)
        assert sigmas == pytest.approx([14.614642, 2.929549, 0.935510], abs=1e-4)
    acd = p.sd_model.alphas_cumprod
    assert sigmas == pytest.approx([float(((1 - acd[t]) / acd[t]) ** 0.5) for t in steps], rel=1e-6)
    assert [ts for _, ts, _ in forge_host.recorded.calls] == [[float(t)] * 2 for t in steps]
    assert [fed(p, call) for call in range(len(steps))] == [[float(t)] * 2 for t in steps]


def test_batch_with_a_prompt_and_negative_per_image(forge_host, reference):
    p, processed = forge_host.run(["a red cube", "a blue ball"], ["ugly", "dark"], batch_size=2, steps=2)
    texts, timesteps, _ = forge_host.recorded.calls[0]
    assert texts == ["a red cube", "a blue ball", "ugly", "dark"]
    (chunk,) = chunks(p)[0]
    assert chunk.cond_or_uncond == [0, 1] and chunk.crossattn.shape == (4, 8, 768)
    for row, text in enumerate(texts):
        torch.testing.assert_close(chunk.crossattn[row].float(), reference(text, timesteps[row]), atol=2e-3,
                                   rtol=2e-3)
    assert len(processed.infotexts) == 2 and all(f"ELLA: {CONNECTOR}" in i for i in processed.infotexts)


def test_batch_count_uses_each_batch_prompts(forge_host):
    forge_host.run(["first prompt", "second prompt"], batch_size=1, n_iter=2, steps=2)
    assert [texts[0] for texts in texts_per_call(forge_host)] == ["first prompt"] * 2 + ["second prompt"] * 2


def test_and_parts_reach_forge_grouped_by_part(forge_host, reference):
    # Forge groups the rows of the j-th AND part of every image (compile_weighted_conditions)
    p, _ = forge_host.run(["a cat AND a dog", "a car AND a bus"], ["n1", "n2"], batch_size=2, steps=1)
    texts, timesteps, _ = forge_host.recorded.calls[0]
    assert texts == ["a cat", "a dog", "a car", "a bus", "n1", "n2"]
    (chunk,) = chunks(p)[0]
    assert chunk.cond_or_uncond == [0, 0, 1]
    for row, text in enumerate(["a cat", "a car", "a dog", "a bus", "n1", "n2"]):
        torch.testing.assert_close(chunk.crossattn[row].float(), reference(text, 999.0), atol=2e-3, rtol=2e-3)


def test_lora_tags_stripped_and_forge_lora_kept(reserving):
    forge_host = reserving
    p, _ = forge_host.run("<lora:style:0.8> a cube", "<lora:neg:1> blurry", steps=1)
    assert texts_per_call(forge_host)[0] == ["a cube", "blurry"]
    unet, reserved = memory_manager().prepared[0]
    assert unet.lora_patches == {"lora": "patches"} and reserved > 0  # our clone carries Forge's LoRA patches


def test_hires_hook_twice_reserves_once_and_nothing_outlives_the_pass(reserving):
    from ella_ext.webui import forge

    forge_host = reserving
    p, processed = forge_host.run("a cube", "blurry", steps=3, enable_hr=True, hr_prompt="a sharp cube",
                                  hr_second_pass_steps=2, hr_sampler_name="Euler", denoising_strength=0.5)
    assert forge_host.reported() == []
    hooks = p.runner.calls.count("process_before_every_sampling")
    assert hooks == (3 if forge_host.kind == "forge-new" else 2)
    (first, first_reserved), (hires, hires_reserved) = memory_manager().prepared
    assert first_reserved > 0 and hires_reserved > 0
    assert hires.model_options[forge.RESERVED] == hires_reserved  # added once, though the hook ran twice in new
    assert first is not hires
    sd = p.sd_model
    for objects in (sd.forge_objects_original, sd.forge_objects_after_applying_lora):
        assert objects.unet.extra_preserved_memory_during_sampling == 0
        assert forge.RESERVED not in objects.unet.model_options
    hires_calls = forge_host.recorded.calls[len(chunks(p, 0)):]
    assert [texts for texts, _, _ in hires_calls] == [["a sharp cube", "blurry"]] * 2
    # seen in a running Forge new: hires sigmas 0.932358 and 0.029168 are fed to the UNet as steps 333 and 0
    assert [ts[0] for _, ts, _ in hires_calls] == [333.0, 0.0]
    assert [fed(p, call, 1) for call in range(2)] == [ts for _, ts, _ in hires_calls]


def test_reservation_does_not_grow_over_generations(reserving):
    forge_host = reserving
    reserved = []
    for _ in range(3):
        memory_manager().prepared.clear()
        forge_host.run("a cube", "blurry", steps=2)
        reserved.append(memory_manager().prepared[0][1])
    assert reserved[0] > 0 and reserved == [reserved[0]] * 3
    from modules import shared

    assert shared.sd_model.forge_objects_after_applying_lora.unet.extra_preserved_memory_during_sampling == 0


def test_classic_leaves_the_patcher_alone_for_a_small_reservation(forge_host):
    # classic re-applies LoRA weights for every new patcher object it loads: below 64 MiB ELLA does not clone
    from modules import shared

    forge_host.run("<lora:style:1> a cube", "blurry", steps=2)
    unet, reserved = memory_manager().prepared[0]
    if forge_host.kind == "forge-classic":
        assert reserved == 0 and unet is shared.sd_model.forge_objects_after_applying_lora.unet
    else:
        assert reserved > 0 and unet is not shared.sd_model.forge_objects_after_applying_lora.unet


def test_cfg_1(forge_host):
    p, _ = forge_host.run("a cube", "blurry", steps=2, cfg_scale=1.0)
    assert forge_host.reported() == []
    if forge_host.kind == "forge-new":  # no uncond at all: text_uncond is None
        assert texts_per_call(forge_host) == [["a cube"]] * 2
    else:  # classic keeps the uncond in the callback; its sampling function drops it at CFG 1
        assert texts_per_call(forge_host) == [["a cube", "blurry"]] * 2
    assert all([chunk.cond_or_uncond for chunk in call] == [[0]] for call in chunks(p))
    assert chunks(p)[0][0].crossattn.shape == (1, 8, 768)


def test_hires_cfg_1(forge_host):
    p, _ = forge_host.run("a cube", "blurry", steps=2, enable_hr=True, hr_second_pass_steps=2, hr_cfg=1.0)
    assert forge_host.reported() == []
    if forge_host.kind == "forge-new":  # the hires pass has its own CFG; at 1 it has no uncond
        assert texts_per_call(forge_host) == [["a cube", "blurry"]] * 2 + [["a cube"]] * 2
    else:  # classic has no hires CFG
        assert texts_per_call(forge_host) == [["a cube", "blurry"]] * 4
    assert all(chunk.crossattn.shape[1] == 8 for call in chunks(p, 1) for chunk in call)


def test_forge_controlnet_reads_the_ella_context(forge_host):
    from forge_common import ControlNet
    from modules import shared

    control = ControlNet()
    shared.sd_model.forge_objects_original.unet.controlnet_linked_list = control
    p, _ = forge_host.run("a cube", "blurry", steps=2)
    assert len(control.seen) == 2
    for call, seen in enumerate(control.seen):
        (chunk,) = chunks(p)[call]
        assert seen.shape == (2, 8, 768) and chunk.crossattn.shape == (2, 8, 768)
        rows = forge_host.recorded.calls[call][2]  # what ELLA's conditioner returned at this call
        torch.testing.assert_close(seen.float(), rows, atol=2e-3, rtol=2e-3)


def test_ella_plus_clip_unequal_lengths_run_apart(forge_host):
    from modules.processing import fake_clip

    long_prompt = " ".join(["word"] * 80)
    p, _ = forge_host.run(long_prompt, "blurry", steps=1, args=ella_args(clip_mode="ELLA + CLIP"))
    cond, uncond = chunks(p)[0]
    assert cond.cond_or_uncond == [0] and cond.crossattn.shape == (1, 8 + 154, 768)
    assert uncond.cond_or_uncond == [1] and uncond.crossattn.shape == (1, 8 + 77, 768)
    torch.testing.assert_close(cond.crossattn[0, 8:], fake_clip(long_prompt, 768).half())


def test_sdxl_stays_a_dict_with_shape_that_forge_can_index(forge_host):
    from modules import shared
    from modules.processing import conditioning_row

    shared.sd_model = forge_sd_model(forge_host.kind == "forge-new", 2048, is_sdxl=True)
    p, _ = forge_host.run(["a cube AND a ball", "a car AND a bus"], ["n1", "n2"], batch_size=2, steps=1,
                          args=ella_args(connector="tiny-sdxl"))
    assert forge_host.reported() == []
    (chunk,) = chunks(p)[0]
    assert chunk.crossattn.shape == (6, 8, 2048)
    expected = [conditioning_row(shared.sd_model, t)["vector"] for t in ("a cube ", "a car ", " a ball", " a bus")]
    torch.testing.assert_close(chunk.y[:4], torch.stack(expected))


def test_sdxl_reservation_counts_the_wider_rows_computed_ahead(reserving, models_dir):
    # Forge is asked to keep free what a pass computes ahead: every (text, timestep) row of the pass, 2048 wide on SDXL
    from modules import shared

    from ella_ext.connector_file import read_config

    forge_host, steps, reserved = reserving, 4, {}
    for name, width, is_sdxl in ((CONNECTOR, 768, False), ("tiny-sdxl", 2048, True)):
        shared.sd_model = forge_sd_model(forge_host.kind == "forge-new", width, is_sdxl=is_sdxl)
        memory_manager().prepared.clear()
        p, _ = forge_host.run("a cube", "blurry", steps=steps, args=ella_args(connector=name))
        assert forge_host.reported() == [] and chunks(p)[0][0].crossattn.shape[-1] == width
        (_, reserved[width]), = memory_manager().prepared
    latents = read_config(models_dir / "ELLA" / "tiny-sdxl.safetensors").num_latents
    rows = 2 * steps * latents  # prompt and negative, at each of the pass's calls, computed ahead (fp16 at least)
    assert reserved[2048] >= rows * 2048 * 2
    assert reserved[2048] - reserved[768] >= rows * (2048 - 768) * 2


def test_other_model_families_are_refused_and_the_image_made(forge_host):
    from modules import shared

    for flag in ("is_sd1", "is_sd2", "is_sdxl", "is_sd3"):
        setattr(shared.sd_model, flag, False)  # as Forge new's Flux and other non-SD engines
    p, processed = forge_host.run("a cube", steps=1)
    assert forge_host.recorded.calls == []
    assert "not Stable Diffusion 1.x, 2.x or XL" in processed.infotexts[0]
    assert chunks(p)[0], "the image is still made"


def test_failure_mid_generation_falls_back_to_clip(forge_host, monkeypatch):
    fail_conditioner_at(monkeypatch, 2)
    p, processed = forge_host.run("a cube", steps=3)
    assert [call[0].crossattn.shape[1] for call in chunks(p)] == [8, 77, 77]
    assert "sampler call 2" in processed.infotexts[0]


def test_forge_is_asked_for_room_before_weights_move_to_the_gpu(forge_host, monkeypatch):
    from ella_ext.options import from_script_args
    from ella_ext.registry import registry
    from ella_ext.webui import host, loading

    cuda = torch.device("cuda")
    host.make_room(1000, cuda)
    host.make_room(1000, torch.device("cpu"))  # never on the CPU: Forge would unload its CPU-resident models
    assert memory_manager().freed == [(1000 + 1024**3, cuda)]

    # the host's device is a GPU: record the requests and the moves (nothing really moves: this torch has no CUDA)
    events = []
    monkeypatch.setattr(host, "device", lambda: cuda)
    monkeypatch.setattr(host, "make_room", lambda nbytes, device: events.append(("room", nbytes, device)))
    moves = {}

    def to(key, device):
        events.append(("move", key.kind, torch.device(device)))
        moves[key] = torch.device(device)
        return registry.peek(key)

    monkeypatch.setattr(registry, "device", lambda key: moves.get(key, torch.device("cpu")))
    monkeypatch.setattr(registry, "to", to)
    loaded = loading.manager.load(from_script_args(ella_args()))
    with loaded.encoding():
        pass
    sizes = {kind: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
             for kind, m in (("connector", registry.peek(loaded.connector_key)),
                             ("text_encoder", registry.peek(loaded.encoder_key).model))}
    assert events == [("room", sizes["connector"], cuda), ("move", "connector", cuda),
                      ("room", sizes["text_encoder"], cuda), ("move", "text_encoder", cuda),
                      ("move", "text_encoder", torch.device("cpu"))]  # back to the CPU after encoding


def test_llm_not_moved_when_the_batch_has_nothing_new_to_encode(forge_host, monkeypatch):
    from ella_ext.webui import loading

    entered = []
    original = loading.LoadedModels.encoding

    def counting(self):
        entered.append(1)
        return original(self)

    monkeypatch.setattr(loading.LoadedModels, "encoding", counting)
    forge_host.run("a cube", "blurry", n_iter=3, steps=1)
    assert len(entered) == 1  # batches 2 and 3 read the same texts: no LLM move, no memory asked of Forge
    forge_host.run("a cube", "blurry", steps=1)
    assert len(entered) == 1  # the next generation finds them in the encoder's cache
    forge_host.run("a ball", "blurry", steps=1)
    assert len(entered) == 2


def test_low_vram_follows_forge_vram_state(forge_host, monkeypatch):
    from forge_common import VRAMState

    from ella_ext.webui import host

    assert host.low_vram() is False
    monkeypatch.setattr(memory_manager(), "vram_state", VRAMState.LOW_VRAM)
    assert host.low_vram() is True


def test_float8_unet_dtype_gives_a_16_bit_connector(forge_host, monkeypatch):
    from modules import devices

    from ella_ext.webui import host

    monkeypatch.setattr(devices, "device", torch.device("cuda"))
    monkeypatch.setattr(devices, "dtype_unet", torch.float8_e4m3fn)
    assert host.unet_dtype() == torch.float16
    monkeypatch.setattr(devices, "dtype_unet", torch.bfloat16)
    assert host.unet_dtype() == torch.bfloat16


def test_ui_builds_in_forge(forge_host):
    import gradio as gr

    from ella_ext import options

    for is_img2img in (False, True, False):
        with gr.Blocks():
            controls = forge_host.script.ui(is_img2img)
        assert [c.value for c in controls] == [getattr(options.DEFAULTS, name) for name in options.FIELD_NAMES]
    assert forge_host.reported() == []
