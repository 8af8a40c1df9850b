"""A single-file base is read one model at a time and each model is built in the file's own dtype, then converted
once by load_base: an fp16 file gives the same float32 weights as before, without float32 copies of every model
beside the whole file (about 19 GiB for SDXL on the CPU; issue 18)."""

from __future__ import annotations

import torch

from ella_ext.train.config import load_config
from ella_ext.train.model import _load_single_file, load_base

from .conftest import needs_extras, write_config, write_sd15_single_file

needs_extras()


def test_an_fp16_file_builds_fp16_models_and_load_base_converts_them(tmp_path, tiny_t5_dir, images8):
    path = tmp_path / "tiny-sd15-fp16.safetensors"
    configs, unet, vae = write_sd15_single_file(
        path, {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}, half=True)
    config = load_config(write_config(tmp_path / "run.toml", base=path, llm=tiny_t5_dir, images=images8,
                                      output=tmp_path / "out", model={"base_config": str(configs)}))

    _, raw_unet, raw_vae, _, clip_g, _ = _load_single_file(str(path), config, True)
    assert {p.dtype for p in raw_unet.parameters()} == {torch.float16} == {p.dtype for p in raw_vae.parameters()}
    assert clip_g is None

    base = load_base(config, torch.device("cpu"), torch.float32)
    for original, loaded in ((unet, base.unet), (vae, base.vae)):
        expected, got = original.state_dict(), loaded.state_dict()
        assert expected.keys() == got.keys()
        assert all(got[k].dtype == torch.float32 for k in got if got[k].is_floating_point())
        assert all(torch.equal(expected[k].half().float() if expected[k].is_floating_point() else expected[k], got[k])
                   for k in expected)
