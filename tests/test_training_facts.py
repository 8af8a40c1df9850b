"""How a connector was trained, read from its file (``connector_file.TrainingFacts``), and an LLM giving a connector
the hidden state it was trained on without a second copy of its weights (``TextEncoder.with_layer``)."""

from __future__ import annotations

import logging

import pytest
import torch

from ella_ext import connector_file as cf
from ella_ext.errors import TextEncoderError

from .conftest import make_connector

TRAINER_METADATA = {  # as ella_ext/train/loop.py metadata() writes it
    cf.META_LLM: "TinyLlama/TinyLlama_v1.1", cf.META_LLM_LAYER: "-2", cf.META_TOKEN_LENGTH: "fixed",
    cf.META_MAX_LENGTH: "96", cf.META_FEATURE_DTYPE: "bfloat16", cf.META_BASE_FAMILY: "sdxl", cf.META_STEPS: "20000",
    "ella.trainer": "ella_ext.train",
}


def test_a_trained_connectors_facts_come_from_its_header(tmp_path):
    path = tmp_path / "trained.safetensors"
    cf.save_connector(make_connector(), path, metadata=TRAINER_METADATA)
    facts = cf.read_training_facts(path)
    assert facts == cf.TrainingFacts(llm="TinyLlama/TinyLlama_v1.1", llm_layer=-2, token_length="fixed",
                                     max_length=96, feature_dtype="bfloat16", base_family="sdxl")
    assert facts.layer == -2 and facts.fixed_length == 96 and facts.describe_tokens() == "fixed 96"
    assert facts.llm_is_t5 is False
    assert facts.llm_dtype("cuda") == torch.bfloat16 and facts.llm_dtype("cpu") == torch.float32


def test_a_file_that_says_nothing_gives_the_official_connectors_behaviour(tmp_path):
    """The official file has no training metadata: every fact is None, which the readers take as the official
    connector's training (last layer, fp16 features on CUDA), the token length staying the user's."""
    path = tmp_path / "official-like.safetensors"
    cf.save_connector(make_connector(), path)
    facts = cf.read_training_facts(path)
    assert facts == cf.TrainingFacts() and facts.problems == ()
    assert facts.layer == -1 and facts.fixed_length is None and facts.describe_tokens() == ""
    assert facts.llm_is_t5 is None
    assert facts.llm_dtype(torch.device("cuda")) == torch.float16 and facts.llm_dtype("cpu") == torch.float32
    assert facts.llm_dtype("mps") == torch.float32


def test_a_connector_trained_on_fp32_features_gets_fp16_on_cuda():
    """A CPU-trained connector (fp32 features) would double the LLM's memory on a GPU for a difference far below
    fp16's: "auto" caps it at fp16 there."""
    facts = cf.TrainingFacts(feature_dtype="float32")
    assert facts.llm_dtype("cuda") == torch.float16 and facts.llm_dtype("cpu") == torch.float32


@pytest.mark.parametrize(("key", "value", "said"), [
    (cf.META_LLM_LAYER, "second to last", "is not a whole number"),
    (cf.META_LLM_LAYER, "", "is not a whole number"),
    (cf.META_MAX_LENGTH, "0", "is not a whole number from 1"),
    (cf.META_MAX_LENGTH, "128.5", "is not a whole number from 1"),
    (cf.META_TOKEN_LENGTH, "sometimes", "is not one of fixed, flexible"),
    (cf.META_FEATURE_DTYPE, "float8", "is not one of float16, bfloat16, float32"),
    (cf.META_BASE_FAMILY, "flux", "is not one of sd15, sdxl"),
])
def test_a_value_that_cannot_be_read_is_ignored_with_a_warning(key, value, said, caplog):
    with caplog.at_level(logging.WARNING, logger="ella"):
        facts = cf.TrainingFacts.from_metadata({**TRAINER_METADATA, key: value}, source="odd.safetensors")
    field = {cf.META_LLM_LAYER: "llm_layer", cf.META_MAX_LENGTH: "max_length", cf.META_TOKEN_LENGTH: "token_length",
             cf.META_FEATURE_DTYPE: "feature_dtype", cf.META_BASE_FAMILY: "base_family"}[key]
    assert getattr(facts, field) is None
    assert facts.llm == "TinyLlama/TinyLlama_v1.1"  # the rest is read
    [problem] = facts.problems
    assert problem == f"{key}={value!r} {said}"
    assert f"odd.safetensors: the metadata {problem}; it is ignored" in caplog.text


def test_values_are_read_leniently():
    facts = cf.TrainingFacts.from_metadata({cf.META_LLM_LAYER: " -3 ", cf.META_TOKEN_LENGTH: "Flexible",
                                            cf.META_FEATURE_DTYPE: "Float16", cf.META_LLM: "  "})
    assert (facts.llm_layer, facts.token_length, facts.feature_dtype, facts.llm) == (-3, "flexible", "float16", None)
    assert facts.problems == ()


@pytest.mark.parametrize(("name", "t5"), [
    ("google/flan-t5-xl", True), ("models--google--flan-t5-xl--text_encoder", True), ("t5-v1_1-xxl", True),
    ("google/umt5-xxl", True), ("mt5-xl", True), ("byt5-small", True), ("tiny-t5", True),
    ("TinyLlama/TinyLlama-1.1B", False), ("google/t5gemma-2b-2b", False), ("microsoft/phi-2", False),
])
def test_whether_the_named_llm_is_a_t5(name, t5):
    assert cf.TrainingFacts(llm=name).llm_is_t5 is t5


@pytest.mark.parametrize(("a", "b"), [
    ("google/flan-t5-xl", "models--google--flan-t5-xl--text_encoder"),
    ("/models/ELLA/text_encoders/Flan-T5-XL/", "flan-t5-xl"),
    ("C:\\models\\tiny-llama", "tiny-llama"),
])
def test_llm_names_compare_by_their_last_part(a, b):
    assert cf.llm_key(a) == cf.llm_key(b)


def test_a_decoder_llm_gives_another_layer_through_a_view_that_shares_its_weights(tiny_llama_dir):
    from transformers import AutoModel, AutoTokenizer

    from ella_ext import load_text_encoder

    encoder = load_text_encoder(tiny_llama_dir)
    view = encoder.with_layer(-2)
    assert view is not encoder and (encoder.layer, view.layer) == (-1, -2)
    assert view.model is encoder.model and view.tokenizer is encoder.tokenizer and view.cache is encoder.cache
    assert encoder.with_layer(-1) is encoder and view.with_layer(-2) is view
    text = "a red cube on top of a blue sphere"
    # sentencepiece's own ids on every transformers (4.30's fast one gives others)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir), use_fast=False)
    model = AutoModel.from_pretrained(str(tiny_llama_dir)).eval()
    tokens = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                       output_hidden_states=True).hidden_states
    for which, layer in ((view, -2), (encoder, -1), (view, -2)):  # one cache, keyed by layer: never the other's
        features, _ = which.encode([text], max_length=None)
        torch.testing.assert_close(features[0], hidden[layer][0], atol=1e-5, rtol=1e-5)
    assert encoder.hidden_states == 3  # 2 layers and the embeddings
    with pytest.raises(TextEncoderError, match="has 3 hidden states"):
        encoder.with_layer(-4)
    assert encoder.with_layer(-3).layer == -3 and encoder.with_layer(2).layer == 2


def test_a_t5_encoder_has_one_output_whatever_the_layer(tiny_t5_dir):
    from ella_ext import load_text_encoder

    encoder = load_text_encoder(tiny_t5_dir)
    assert encoder.layer is None and encoder.hidden_states is None
    assert encoder.with_layer(-2) is encoder and encoder.with_layer(-40) is encoder
