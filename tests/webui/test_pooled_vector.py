"""SDXL's pooled text vector from the connector's attention pool, through the A1111, Forge classic and Forge new
doubles: the vector the UNet gets has the pool's output (of each row's text) in its first 1280 columns, for prompt and
negative rows, and the host's size / crop embeddings in the others; a connector without a pool leaves the vector as
the host made it; other checkpoints never see a pool."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from ella_ext import load_connector, load_text_encoder
from ella_ext.connector import Connector
from ella_ext.connector_file import save_connector
from ella_ext.prompts import plain_text

from ..random_weights import init_random
from .conftest import CONNECTOR, ENCODER, SD15_TINY, FakeSDModel, ella_args, forge_sd_model

POOL = "tiny-sdxl-pool"
PLAIN = "tiny-sdxl"
POOLED_COLUMNS = 1280


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_t5_dir):
    """This module's models folder: the shared one's connectors plus SDXL connectors with an attention pool."""
    root = tmp_path_factory.mktemp("pooled-models")
    ella = root / "ELLA"
    (ella / "text_encoders").mkdir(parents=True)
    sdxl = replace(SD15_TINY, output_dim=2048)
    save_connector(init_random(Connector(SD15_TINY), torch.Generator().manual_seed(3), std=0.2).eval(),
                   ella / f"{CONNECTOR}.safetensors")
    save_connector(init_random(Connector(sdxl), torch.Generator().manual_seed(4), std=0.2).eval(),
                   ella / f"{PLAIN}.safetensors")
    for name, config in ((POOL, replace(sdxl, pooled_width=POOLED_COLUMNS)),
                         ("tiny-sdxl-pool32", replace(sdxl, pooled_width=32)),
                         ("tiny-sd15-pool", replace(SD15_TINY, pooled_width=POOLED_COLUMNS))):
        save_connector(init_random(Connector(config), torch.Generator().manual_seed(4), std=0.2).eval(),
                       ella / f"{name}.safetensors")
    shutil.copytree(tiny_t5_dir, ella / "text_encoders" / ENCODER)
    return root


@pytest.fixture(scope="module")
def pool_of(models_dir):
    """The pool's vector of one text, computed directly from the file and the LLM (flexible length)."""
    connector = load_connector(models_dir / "ELLA" / f"{POOL}.safetensors")
    encoder = load_text_encoder(models_dir / "ELLA" / "text_encoders" / ENCODER, "cpu", torch.float32)

    def pooled(text) -> torch.Tensor:
        features, mask = encoder.encode([plain_text(text)], None)
        with torch.no_grad():
            return connector.pooled(features, mask)[0]

    return pooled


def use_sdxl(kind):
    from modules import shared

    shared.sd_model = FakeSDModel(2048, is_sdxl=True) if kind == "a1111" else forge_sd_model(kind == "forge-new",
                                                                                             2048, is_sdxl=True)


def unet_rows(kind, p):
    """Per denoiser call, the cross-attention rows and vectors the UNet got, ``([N, T, 2048], [N, 2816])``."""
    calls = []
    if kind == "a1111":
        for _, _, cond_in, batched in p.denoisers[0].inner_calls:
            parts = [cond_in] if batched else list(cond_in)
            calls.append((torch.cat([c["crossattn"] for c in parts]), torch.cat([c["vector"] for c in parts])))
        return calls
    for chunks in p.denoisers[0].inner_calls:
        calls.append((torch.cat([c.crossattn for c in chunks]), torch.cat([c.y for c in chunks])))
    return calls


def run(host, connector, enabled=True, **kwargs):
    use_sdxl(host.kind)
    settings = {"batch_size": 2, "steps": 2, **kwargs}
    p, processed = host.run(["a red cube", "a blue car"], ["blurry", "dark"],
                            args=ella_args(connector=connector, enabled=enabled), **settings)
    assert host.reported() == []
    return p, processed


def row_text(host, call, crossattn_row):
    """The text of the ELLA row the UNet got as ``crossattn_row`` (matched against the conditioner's rows)."""
    texts, _, rows = host.recorded.calls[call]
    matches = [i for i, row in enumerate(rows) if torch.allclose(crossattn_row.float(), row, atol=2e-3, rtol=2e-3)]
    assert matches, "every row the UNet got is one ELLA computed"
    return texts[matches[0]]


def test_pool_fills_the_pooled_columns_of_every_row(any_host, pool_of):
    p_off, _ = run(any_host, PLAIN, enabled=False)  # the host's own vectors, ELLA off
    host_vectors = [vector for _, vector in unet_rows(any_host.kind, p_off)]
    p, processed = run(any_host, POOL)
    calls = unet_rows(any_host.kind, p)
    assert len(calls) == 2 and len(any_host.recorded.calls) == 2
    seen = set()
    for call, ((crossattn, vector), original) in enumerate(zip(calls, host_vectors)):
        assert vector.shape == (4, 2816) and vector.dtype == original.dtype  # 2 prompt rows, 2 negative rows
        for j in range(vector.shape[0]):
            text = row_text(any_host, call, crossattn[j])
            seen.add(plain_text(text))
            torch.testing.assert_close(vector[j, :POOLED_COLUMNS].float(), pool_of(text), atol=2e-3, rtol=2e-3)
        assert torch.equal(vector[:, POOLED_COLUMNS:], original[:, POOLED_COLUMNS:])  # size / crop: the host's
    assert seen == {"a red cube", "a blue car", "blurry", "dark"}
    assert "ELLA pooled: connector" in processed.infotexts[0]


def test_without_a_pool_the_vector_is_the_hosts(any_host):
    p_off, off = run(any_host, PLAIN, enabled=False)
    p_on, on = run(any_host, PLAIN)
    for (_, original), (_, vector) in zip(unet_rows(any_host.kind, p_off), unet_rows(any_host.kind, p_on)):
        assert torch.equal(vector, original)
    assert "ELLA pooled" not in on.infotexts[0] and "ELLA: tiny-sdxl" in on.infotexts[0]


def test_scheduled_and_and_prompts_pool_each_row_text(host, pool_of):
    use_sdxl("a1111")
    p, _ = host.run(["a [red:blue:1] cube AND a ball", "a car"], ["n1", "n2"], batch_size=2, steps=3,
                    args=ella_args(connector=POOL))
    assert host.reported() == []
    texts_seen = set()
    for call, (_, vector) in enumerate(unet_rows("a1111", p)):
        texts, _, _ = host.recorded.calls[call]
        assert vector.shape[0] == len(texts) == 5  # 3 prompt rows (one per AND part), 2 negative rows
        for j, text in enumerate(texts):
            texts_seen.add(plain_text(text))
            torch.testing.assert_close(vector[j, :POOLED_COLUMNS].float(), pool_of(text), atol=2e-3, rtol=2e-3)
    assert {"a red cube", "a blue cube"} <= texts_seen  # the schedule's texts each have their own vector


def test_pool_is_computed_once_per_text_per_generation(any_host, monkeypatch):
    from ella_ext.connector import Connector as Module

    calls = []
    original = Module.pooled

    def counted(self, features, mask=None):
        calls.append(features.shape[0])
        return original(self, features, mask)

    monkeypatch.setattr(Module, "pooled", counted)
    run(any_host, POOL, steps=4)
    assert calls == [4]  # one pool pass over the four texts, at the batch's start; the calls only gather


def test_cfg_one_in_forge_keeps_the_pool_on_the_prompt_rows(forge_host, pool_of):
    p, _ = run(forge_host, POOL, cfg_scale=1.0)
    for call, (crossattn, vector) in enumerate(unet_rows(forge_host.kind, p)):
        assert vector.shape[0] == 2  # no negative rows run at CFG 1
        for j in range(2):
            text = row_text(forge_host, call, crossattn[j])
            torch.testing.assert_close(vector[j, :POOLED_COLUMNS].float(), pool_of(text), atol=2e-3, rtol=2e-3)


def test_a_pool_of_another_width_is_refused_and_the_image_made(any_host):
    p, processed = run(any_host, "tiny-sdxl-pool32")
    assert any_host.recorded.calls == []
    info = processed.infotexts[0]
    assert "ELLA error" in info and "32-wide pooled vectors, but SDXL takes 1280" in info
    assert unet_rows(any_host.kind, p)[0][0].shape[1] == 77  # the host's own CLIP rows


def test_sd15_checkpoint_never_sees_a_pool(any_host):
    p, processed = any_host.run("a cube", "blurry", steps=1, args=ella_args(connector="tiny-sd15-pool"))
    assert any_host.reported() == [] and len(any_host.recorded.calls) == 1
    info = processed.infotexts[0]
    assert "ELLA: tiny-sd15-pool" in info and "ELLA pooled" not in info and "ELLA error" not in info
