"""[connector] pooled = "attention": the connector's attention pool trains with the TSC and gives the SDXL UNet its
pooled text vector (on the tiny SDXL base its width is the UNet's, 32, not SDXL's 1280); refused on SD 1.5; init_from,
resume, the cache, estimate and the file's metadata with and without a pool."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ella_ext import load_connector
from ella_ext.connector_file import META_TRAINING, POOLED_METADATA_KEY, read_metadata, save_connector
from ella_ext.train.config import ConfigError, load_config
from ella_ext.train.loop import train

from .conftest import POOLED, needs_extras, write_config

needs_extras()

POOL_KEYS = {"pool.proj_in.weight", "pool.proj_in.bias", "pool.query", "pool.kv.weight", "pool.kv.bias",
             "pool.norm.weight", "pool.norm.bias", "pool.proj_out.weight", "pool.proj_out.bias"}


def _config(tmp_path, base, llm, images, name="run", **sections):
    sections.setdefault("connector", {})
    sections["connector"] = {"pooled": "attention", **sections["connector"]}
    sections["train"] = {"steps": 3, "weight_decay": 0.0, "save_precision": "fp32", **sections.get("train", {})}
    return write_config(tmp_path / f"{name}.toml", base=base, llm=llm, images=images, output=tmp_path / name,
                        **sections)


def _spy(monkeypatch):
    """Each micro-batch: the pool's output for its features (computed apart, before the step) and the pooled
    vector the UNet was handed."""
    import ella_ext.train.loop as loop
    from ella_ext.train.model import Base

    seen = {"expected": [], "handed": [], "clip": []}
    original_loss, original_added = loop.compute_loss, Base.added_conditions

    def compute_loss(connector, base, inputs, accelerator, *rest):
        plain = accelerator.unwrap_model(connector)
        with torch.no_grad():
            seen["expected"].append(plain.pooled(inputs.features, inputs.mask))
        seen["clip"].append(inputs.pooled)
        return original_loss(connector, base, inputs, accelerator, *rest)

    def added_conditions(self, pooled, time_ids, dtype):
        seen["handed"].append(pooled)
        return original_added(self, pooled, time_ids, dtype)

    monkeypatch.setattr(loop, "compute_loss", compute_loss)
    monkeypatch.setattr(Base, "added_conditions", added_conditions)
    return seen


def test_the_pool_trains_and_gives_the_unet_its_pooled_vector(tmp_path, sdxl_base, tiny_t5_dir, images8,
                                                              monkeypatch):
    from ella_ext.train.model import connector_config, init_connector

    sources = [{"path": str(images8), "caption_dropout": 0.5}]  # caption-dropped samples: the pool of "" features
    config = load_config(_config(tmp_path, sdxl_base, tiny_t5_dir, images8, sources=sources,
                                 sample={"prompts": ["a red cube"], "steps": 2}))
    seen = _spy(monkeypatch)
    _no_clip_g(monkeypatch)
    result = train(config)
    assert len(seen["handed"]) == 3 + 1  # 3 steps, then the sample image (its negative's and prompt's vectors)
    for expected, handed, clip in zip(seen["expected"], seen["handed"], seen["clip"]):
        assert handed.shape == (2, POOLED) and handed.requires_grad  # the UNet's width; the gradient reaches it
        torch.testing.assert_close(handed.detach(), expected, atol=1e-6, rtol=1e-6)
        assert clip is None  # CLIP-G was neither loaded nor run
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 1  # sampled with the pool, without CLIP-G
    assert seen["handed"][3].shape == (2, POOLED) and torch.count_nonzero(seen["handed"][3][1]) > 0
    assert torch.count_nonzero(seen["handed"][2]) > 0  # it starts at 0 and has learned something by step 3
    trained = load_file(str(result.connector))
    start = init_connector(connector_config(config, "sdxl", 20, 2048, POOLED), config.train["seed"]).state_dict()
    assert {k for k in trained if k.startswith("pool.")} == POOL_KEYS
    assert all(not torch.equal(trained[k], start[k]) for k in POOL_KEYS)  # weight decay 0: gradients moved them
    assert torch.count_nonzero(start["pool.proj_out.weight"]) == 0
    metadata = read_metadata(result.connector)
    assert metadata[POOLED_METADATA_KEY] == "attention"
    assert json.loads(metadata[META_TRAINING])["pooled"] == "attention"
    loaded = load_connector(result.connector)
    assert loaded.config.pooled_width == POOLED and loaded.has_pool
    checkpoint = json.loads((result.checkpoint / "run.json").read_text())
    assert checkpoint["connector"]["pooled"] == "attention"


def _no_clip_g(monkeypatch):
    """CLIP-G cannot load: a run that needs no CLIP-G must not try."""
    from transformers import CLIPTextModelWithProjection

    def refuse(*args, **kwargs):
        raise AssertionError("CLIP-G was loaded")

    monkeypatch.setattr(CLIPTextModelWithProjection, "from_pretrained", refuse)


def test_clip_pooled_is_as_before(tmp_path, sdxl_base, tiny_t5_dir, images8, monkeypatch):
    config = load_config(_config(tmp_path, sdxl_base, tiny_t5_dir, images8, connector={"pooled": "clip"},
                                 train={"steps": 1}))
    seen = _spy(monkeypatch)
    result = train(config)
    torch.testing.assert_close(seen["handed"][0], seen["clip"][0])  # CLIP-G's pooled vector, as before
    assert not any(k.startswith("pool.") for k in load_file(str(result.connector)))
    metadata = read_metadata(result.connector)
    assert POOLED_METADATA_KEY not in metadata and json.loads(metadata[META_TRAINING])["pooled"] == "clip"


def test_pool_with_the_cache(tmp_path, sdxl_base, tiny_t5_dir, images8, monkeypatch):
    config = load_config(_config(tmp_path, sdxl_base, tiny_t5_dir, images8,
                                 train={"steps": 2, "cache": str(tmp_path / "cache")}))
    seen = _spy(monkeypatch)
    result = train(config)
    for expected, handed in zip(seen["expected"], seen["handed"]):
        torch.testing.assert_close(handed.detach(), expected, atol=1e-6, rtol=1e-6)
    assert result.step == 2 and load_connector(result.connector).has_pool
    # the cache this run built keeps CLIP-G's vectors: a run with pooled = "clip" reads it as it is
    seen = _spy(monkeypatch)
    again = load_config(config.path, ["connector.pooled=clip", f"train.output={tmp_path / 'clip'}"])
    train(again)
    assert seen["clip"][0] is not None and seen["clip"][0].shape == (2, POOLED)
    torch.testing.assert_close(seen["handed"][0], seen["clip"][0].to(seen["handed"][0].dtype))
    # and an attention run on the complete cache loads no CLIP-G
    _no_clip_g(monkeypatch)
    train(load_config(config.path, [f"train.output={tmp_path / 'again'}"]))


def test_attention_on_sd15_is_refused(tmp_path, sd15_base, tiny_t5_dir, images8):
    config = load_config(_config(tmp_path, sd15_base, tiny_t5_dir, images8))
    with pytest.raises(ConfigError, match="pooled = 'attention' is for SDXL"):
        train(config)
    with pytest.raises(ConfigError, match="pooled = 'attention' is for SDXL"):
        load_config(config.path, ["model.family=sd15"])  # said in the config: refused before anything loads
    with pytest.raises(ConfigError, match="pooled = 'mean' is not allowed"):
        load_config(config.path, ["connector.pooled=mean"])


def _file(tmp_path, name, pooled_width):
    from ella_ext.connector import ConnectorConfig
    from ella_ext.train.model import init_connector

    # the shape write_config's [connector] keys say
    shape = ConnectorConfig(time_channels=16, time_embed_dim=32, width=32, layers=2, heads=4, num_latents=8,
                            input_dim=20, output_dim=2048, pooled_width=pooled_width)
    connector = init_connector(shape, 11)
    with torch.no_grad():
        for p in connector.parameters():
            p.add_(0.01)
    path = tmp_path / f"{name}.safetensors"
    save_connector(connector, path)
    return path, connector


def test_init_from_with_and_without_a_pool(tmp_path, sdxl_base, tiny_t5_dir, images8):
    from ella_ext.train.model import connector_config, load_or_init_connector

    def start(init_from, pooled):
        config = load_config(_config(tmp_path, sdxl_base, tiny_t5_dir, images8, name=f"i{init_from.stem}{pooled}",
                                     connector={"init_from": str(init_from), "pooled": pooled}))
        shape = connector_config(config, "sdxl", 20, 2048, POOLED)
        return load_or_init_connector(config, shape)

    plain_file, plain = _file(tmp_path, "plain", None)
    pooled_file, pooled = _file(tmp_path, "pooled", POOLED)
    # a file without a pool: its TSC goes on, a new pool (output 0) is trained beside it
    grown = start(plain_file, "attention")
    assert grown.has_pool and torch.count_nonzero(grown.pool.proj_out.weight) == 0
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(grown.state_dict()[key], value, rtol=0, atol=0)
    # a file with a pool goes on whole
    kept = start(pooled_file, "attention")
    for key, value in pooled.state_dict().items():
        torch.testing.assert_close(kept.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="has an attention pool.*pooled is 'clip'.*set pooled = 'attention'"):
        start(pooled_file, "clip")
    other_file, _ = _file(tmp_path, "other", 12)
    with pytest.raises(ConfigError, match="pools to 12 wide vectors but this base's UNet takes 32"):
        start(other_file, "attention")
    assert not start(plain_file, "clip").has_pool


def test_resume_with_another_pooled_is_refused(tmp_path, sdxl_base, tiny_t5_dir, images8):
    path = _config(tmp_path, sdxl_base, tiny_t5_dir, images8, connector={"pooled": "clip"}, train={"steps": 1})
    train(load_config(path))
    with pytest.raises(ConfigError, match="pooled clip -> attention"):
        train(load_config(path, ["connector.pooled=attention", "train.steps=2"]), resume="latest")


def test_estimate_counts_the_pool(tmp_path, sdxl_base, tiny_t5_dir, images8):
    from ella_ext.train.estimate import estimate, format_report

    clip = load_config(_config(tmp_path, sdxl_base, tiny_t5_dir, images8, connector={"pooled": "clip"}))
    pooled = load_config(clip.path, ["connector.pooled=attention"])
    without, with_pool = estimate(clip, measure=False), estimate(pooled, measure=False)
    width = 32
    expected = (20 * width + width) + width + (width * 2 * width + 2 * width) + 2 * width + (width * POOLED + POOLED)
    assert with_pool["pool_parameters"] == expected and without["pool_parameters"] == 0
    assert with_pool["tsc_parameters"] - without["tsc_parameters"] == expected
    assert "attention pool" in format_report(with_pool, pooled)
    # with the pool, a run without a cache to build loads no CLIP-G: it is not counted
    assert "clip_g" in without["frozen_parameters"] and "clip_g" not in with_pool["frozen_parameters"]
    clip_g = without["frozen_parameters"]["clip_g"]
    assert with_pool["memory_weights_bytes"] - without["memory_weights_bytes"] == 16 * expected - 4 * clip_g
    cached = estimate(load_config(clip.path, ["connector.pooled=attention", f"train.cache={tmp_path / 'c'}"]),
                      measure=False)
    assert cached["frozen_parameters"]["clip_g"] == clip_g  # the cache is built with CLIP-G's vectors
