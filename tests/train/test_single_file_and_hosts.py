"""An A1111-style single-file SD 1.5 checkpoint as the base; the carried configs; trained connectors conditioning
generations in the A1111 and Forge host doubles; the command line."""

from __future__ import annotations

import shutil

import pytest
import torch

from ella_ext.train.cli import build_parser, main
from ella_ext.train.config import load_config
from ella_ext.train.loop import train
from ella_ext.train.model import load_base

from ..webui.conftest import forge_host, host, models_dir  # noqa: F401  (the host doubles' fixtures)
from .conftest import needs_extras, write_config, write_sd15_single_file

needs_extras()


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """A tiny checkpoint in A1111's key layout (SD 1.5's block structure at small widths) and its config folder."""
    folder = tmp_path_factory.mktemp("single")
    path = folder / "tiny-sd15.safetensors"
    configs, unet, vae = write_sd15_single_file(
        path, {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
    return path, configs, unet, vae


def test_single_file_sd15_checkpoint_loads_as_the_base(tmp_path, single_file, tiny_t5_dir, images8):
    path, configs, unet, vae = single_file
    config = load_config(write_config(tmp_path / "run.toml", base=path, llm=tiny_t5_dir, images=images8,
                                      output=tmp_path / "out", model={"base_config": str(configs)},
                                      data={"resolution": 64, "bucket_step": 64}, train={"steps": 2}))
    base = load_base(config, torch.device("cpu"), torch.float32)
    assert base.family == "sd15" and base.prediction == "epsilon"
    for original, loaded in ((unet, base.unet), (vae, base.vae)):
        expected, got = original.state_dict(), loaded.state_dict()
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert train(config).connector.is_file()


def test_carried_configs_have_the_real_models_shapes():
    """The configs the project carries build SD 1.5 and SDXL with their published parameter counts."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ella_ext.train.model import CONFIGS

    counts = {}
    with init_empty_weights():
        for family in ("sd15", "sdxl"):
            unet_config = UNet2DConditionModel.load_config(CONFIGS / family, subfolder="unet")
            unet = UNet2DConditionModel.from_config(unet_config)
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / family, subfolder="vae"))
            counts[family] = (sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in vae.parameters()))
        clip = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(CONFIGS / "sdxl" / "text_encoder_2"))
    assert counts == {"sd15": (859_520_964, 83_653_863), "sdxl": (2_567_463_684, 83_653_863)}
    assert sum(p.numel() for p in clip.parameters()) == 694_659_840


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory, sd15_base, sdxl_base, tiny_t5_dir, images8):
    folder = tmp_path_factory.mktemp("pair")
    out = {}
    for name, base in (("sd15", sd15_base), ("sdxl", sdxl_base)):
        config = load_config(write_config(folder / f"{name}.toml", base=base, llm=tiny_t5_dir, images=images8,
                                          output=folder / name, train={"steps": 2},
                                          model={"token_length": "flexible"}))
        out[name] = train(config).connector
    return out


def _install(root, trained_pair, name):
    shutil.copy(trained_pair[name], root / "ELLA" / f"trained-{name}.safetensors")
    return f"trained-{name}"


def test_trained_connectors_condition_a1111_generations(host, models_dir, trained_pair):  # noqa: F811
    from modules import shared

    from ..webui.conftest import FakeSDModel, ella_args

    sd15 = _install(models_dir, trained_pair, "sd15")
    p, processed = host.run("a red square", "blurry", steps=2, args=ella_args(connector=sd15))
    assert host.reported() == [] and f"ELLA: {sd15}" in processed.infotexts[0]
    _, _, cond_in, _ = p.denoisers[0].inner_calls[0]
    assert cond_in.shape == (2, 8, 768)
    sdxl = _install(models_dir, trained_pair, "sdxl")
    shared.sd_model = FakeSDModel(2048, is_sdxl=True)
    p, processed = host.run("a red square", "blurry", steps=1, args=ella_args(connector=sdxl))
    _, _, cond_in, _ = p.denoisers[0].inner_calls[0]
    assert cond_in["crossattn"].shape == (2, 8, 2048) and f"ELLA: {sdxl}" in processed.infotexts[0]


def test_trained_connectors_condition_forge_generations(forge_host, models_dir, trained_pair):  # noqa: F811
    from modules import shared

    from ..webui.conftest import ella_args, forge_sd_model

    sd15 = _install(models_dir, trained_pair, "sd15")
    p, processed = forge_host.run("a red square", "blurry", steps=2, args=ella_args(connector=sd15))
    assert forge_host.reported() == [] and f"ELLA: {sd15}" in processed.infotexts[0]
    (chunk,) = p.denoisers[0].inner_calls[0]
    assert chunk.crossattn.shape == (2, 8, 768)
    sdxl = _install(models_dir, trained_pair, "sdxl")
    shared.sd_model = forge_sd_model(forge_host.kind == "forge-new", 2048, is_sdxl=True)
    p, processed = forge_host.run("a red square", "blurry", steps=1, args=ella_args(connector=sdxl))
    (chunk,) = p.denoisers[0].inner_calls[0]
    assert chunk.crossattn.shape == (2, 8, 2048) and f"ELLA: {sdxl}" in processed.infotexts[0]


@pytest.mark.parametrize("verb", ["train", "cache", "sample", "estimate", "eval"])
def test_every_verb_explains_its_options(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([verb, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--config" in text and "--set" in text


def test_cli_cache_estimate_sample_and_errors(tmp_path, sd15_base, tiny_t5_dir, images8, capsys):
    path = write_config(tmp_path / "run.toml", base=sd15_base, llm=tiny_t5_dir, images=images8,
                        output=tmp_path / "out", train={"steps": 2, "cache": str(tmp_path / "cache")},
                        sample={"prompts": ["a red square"], "steps": 2})
    assert main(["cache", "--config", str(path)]) == 0
    assert (tmp_path / "cache" / "manifest.json").is_file()
    assert main(["estimate", "--config", str(path), "--measure-steps", "1"]) == 0
    report = capsys.readouterr().out
    assert "images: 8" in report and "cache on disk" in report and "time per optimiser step" in report
    assert main(["train", "--config", str(path)]) == 0
    connector = tmp_path / "out" / "connector.safetensors"
    assert main(["sample", "--config", str(path), "--connector", str(connector), "--prompt", "a blue circle",
                 "--out", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s").glob("*.png"))) == 1
    assert main(["train", "--config", str(path), "--set", "train.bogus=1"]) == 2
    assert "Unknown key in [train]: bogus" in capsys.readouterr().err
