"""The connector's attention pool (SDXL's pooled text vector from the LLM features): its shapes and what it reads,
its file (tensors under ``pool.``, metadata ``ella.pooled``), strict loading, and files without a pool unchanged."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from ella_ext.connector import Connector
from ella_ext.connector_file import (
    CONFIG_METADATA_KEY,
    HEADS_METADATA_KEY,
    POOLED_METADATA_KEY,
    load_connector,
    read_config,
    read_metadata,
    save_connector,
    write_safetensors,
)
from ella_ext.errors import ConnectorLoadError, InputError

from .conftest import TINY, make_connector

POOLED = replace(TINY, output_dim=48, pooled_width=12)


def features(batch=3, tokens=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, TINY.in_width, generator=generator)


def test_pool_maps_features_to_one_vector_per_row():
    connector = make_connector(POOLED)
    assert connector.has_pool
    pooled = connector.pooled(features())
    assert pooled.shape == (3, 12) and torch.isfinite(pooled).all()
    assert not torch.allclose(pooled[0], pooled[1])  # each text its own vector
    context, both = connector(features(), 500.0, return_pooled=True)
    assert context.shape == (3, 8, 48)
    torch.testing.assert_close(both, pooled, rtol=0, atol=0)
    torch.testing.assert_close(context, connector(features(), 500.0), rtol=0, atol=0)


def test_pool_reads_no_timestep_and_leaves_the_tsc_as_it_was():
    plain, pooled = make_connector(replace(POOLED, pooled_width=None)), make_connector(POOLED)
    # the same seed gives the TSC the same weights with or without a pool: the pool's are drawn after them
    for t in (0.0, 999.0):
        torch.testing.assert_close(pooled(features(), t), plain(features(), t), rtol=0, atol=0)
    assert plain.pooled(features()) is None and not plain.has_pool


def test_mask_leaves_the_padding_out():
    connector = make_connector(POOLED)
    short = features(batch=1, tokens=4)
    padded = torch.cat([short, torch.randn(1, 5, TINY.in_width) * 50], dim=1)
    mask = torch.tensor([[True] * 4 + [False] * 5])
    torch.testing.assert_close(connector.pooled(padded, mask), connector.pooled(short), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(connector.pooled(padded), connector.pooled(short), atol=1e-3)  # unmasked: read
    with pytest.raises(InputError, match="wide"):
        connector.pooled(torch.randn(1, 4, TINY.in_width + 1))


def test_gradients_reach_every_pool_weight():
    connector = make_connector(POOLED).train()
    connector.pooled(features()).square().sum().backward()
    grads = {name: p.grad for name, p in connector.named_parameters() if name.startswith("pool.")}
    assert len(grads) == 9 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_file_carries_the_pool_beside_the_tsc(tmp_path):
    connector = make_connector(POOLED)
    path = tmp_path / "pooled.safetensors"
    save_connector(connector, path)
    metadata = read_metadata(path)
    assert metadata[POOLED_METADATA_KEY] == "attention"
    assert json.loads(metadata[CONFIG_METADATA_KEY])["pooled_width"] == 12
    keys = set(load_file(str(path)))
    assert {k for k in keys if k.startswith("pool.")} == {
        "pool.proj_in.weight", "pool.proj_in.bias", "pool.query", "pool.kv.weight", "pool.kv.bias",
        "pool.norm.weight", "pool.norm.bias", "pool.proj_out.weight", "pool.proj_out.bias"}
    assert read_config(path) == POOLED
    loaded = load_connector(path)
    assert loaded.config == POOLED and loaded.has_pool
    torch.testing.assert_close(loaded.pooled(features()), connector.pooled(features()), rtol=0, atol=0)


def test_a_file_without_a_pool_is_written_and_read_as_before(tmp_path):
    connector = make_connector(TINY)
    path = tmp_path / "plain.safetensors"
    save_connector(connector, path)
    # what save_connector wrote before pools existed: the weights, the head count and the config's eight fields
    before = tmp_path / "before.safetensors"
    fields = {k: v for k, v in TINY.__dict__.items() if k != "pooled_width"}
    write_safetensors(dict(connector.state_dict()), before,
                      {HEADS_METADATA_KEY: "4", CONFIG_METADATA_KEY: json.dumps(fields, sort_keys=True)})
    assert path.read_bytes() == before.read_bytes()
    loaded = load_connector(before)
    assert not loaded.has_pool and loaded.pooled(features()) is None
    assert POOLED_METADATA_KEY not in read_metadata(path)


def _pooled_state(tmp_path):
    connector = make_connector(POOLED)
    return {k: v.clone() for k, v in connector.state_dict().items()}


def test_pool_tensors_without_the_metadata_are_refused(tmp_path):
    path = tmp_path / "unsaid.safetensors"
    write_safetensors(_pooled_state(tmp_path), path, {HEADS_METADATA_KEY: "4"})  # a file without ella.pooled
    with pytest.raises(ConnectorLoadError, match="unexpected tensors: pool"):
        load_connector(path)


def test_metadata_without_the_pool_tensors_is_refused(tmp_path):
    state = _pooled_state(tmp_path)
    del state["pool.kv.weight"]
    path = tmp_path / "partial.safetensors"
    write_safetensors(state, path, {HEADS_METADATA_KEY: "4", POOLED_METADATA_KEY: "attention"})
    with pytest.raises(ConnectorLoadError, match="missing tensors: pool.kv.weight"):
        load_connector(path)
    plain = {k: v for k, v in state.items() if not k.startswith("pool.")}
    write_safetensors(plain, path, {HEADS_METADATA_KEY: "4", POOLED_METADATA_KEY: "attention"})
    with pytest.raises(ConnectorLoadError, match="attention pool"):
        load_connector(path)


def test_pool_of_the_wrong_shape_or_an_unknown_kind_is_refused(tmp_path):
    state = _pooled_state(tmp_path)
    state["pool.query"] = torch.zeros(31)
    path = tmp_path / "wrong.safetensors"
    write_safetensors(state, path, {HEADS_METADATA_KEY: "4", POOLED_METADATA_KEY: "attention"})
    with pytest.raises(ConnectorLoadError, match=r"wrong shape: pool.query \[31\]"):
        load_connector(path)
    write_safetensors(_pooled_state(tmp_path), path, {HEADS_METADATA_KEY: "4", POOLED_METADATA_KEY: "mean"})
    with pytest.raises(ConnectorLoadError, match="'mean' is not one of clip, attention"):
        load_connector(path)


def test_clip_kind_in_the_metadata_is_a_file_without_a_pool(tmp_path):
    connector = make_connector(TINY)
    path = tmp_path / "clip.safetensors"
    write_safetensors(dict(connector.state_dict()), path, {HEADS_METADATA_KEY: "4", POOLED_METADATA_KEY: "clip"})
    assert not load_connector(path).has_pool


def test_meta_device_build_counts_the_pool():
    with torch.device("meta"):
        plain, pooled = Connector(replace(POOLED, pooled_width=None)), Connector(POOLED)
    extra = sum(p.numel() for p in pooled.parameters()) - sum(p.numel() for p in plain.parameters())
    width, llm = TINY.width, TINY.in_width
    assert extra == (llm * width + width) + width + (width * 2 * width + 2 * width) + 2 * width + (width * 12 + 12)


@pytest.mark.parametrize("max_length", [None, 16])
def test_conditioner_pools_each_text_once_and_gathers_per_row(tiny_t5_dir, max_length, monkeypatch):
    from ella_ext import load_text_encoder
    from ella_ext.conditioning import Conditioner
    from ella_ext.prompts import WeightedText

    connector = make_connector(POOLED)
    encoder = load_text_encoder(tiny_t5_dir, "cpu", torch.float32)
    passes = []
    original = Connector.pooled
    monkeypatch.setattr(Connector, "pooled", lambda self, f, m=None: passes.append(f.shape[0]) or original(self, f, m))
    cond = Conditioner(connector, encoder, max_length=max_length)
    texts = ["a red cube on a table", "blurry", "", WeightedText("blurry", (1.5,))]
    cond.prepare(texts)
    assert passes == [4]  # one pool pass over the new texts, when they are prepared
    rows = cond.pooled(["blurry", "a red cube on a table", "blurry", "", WeightedText("blurry", (1.5,))])
    assert passes == [4] and rows.shape == (5, 12)
    for row, text in zip(rows, ["blurry", "a red cube on a table", "blurry", ""]):
        features, mask = encoder.encode([text], max_length)
        expected = original(connector, features, mask if max_length is None else None)[0]
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[4], rows[0], atol=1e-6, rtol=1e-6)  # emphasis does not change the pooled vector
    cond.pooled(["a new text"])  # a text not prepared yet is prepared (and pooled) on demand
    assert passes == [4, 1]
    cond.release()
    plain = Conditioner(make_connector(TINY), encoder)
    plain.prepare(["blurry"])
    assert plain.pooled(["blurry"]) is None and not plain.has_pool
