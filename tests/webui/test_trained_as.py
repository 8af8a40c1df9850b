"""A connector runs as it was trained: the LLM layer, the token length and the LLM precision its file's metadata
names (``ella.llm_layer``, ``ella.token_length`` / ``ella.max_length``, ``ella.feature_dtype``), through the A1111
host double."""

from __future__ import annotations

import pytest
import torch

from ella_ext.connector_file import (
    META_FEATURE_DTYPE,
    META_LLM,
    META_LLM_LAYER,
    META_MAX_LENGTH,
    META_TOKEN_LENGTH,
    load_connector,
    save_connector,
)

from .conftest import CONNECTOR, ENCODER, ella_args

LLAMA = "tiny-llama"
TRAINED = {  # connector name -> its file's metadata (the same weights: only what the metadata says differs)
    "llama-layer-2": {META_LLM: LLAMA, META_LLM_LAYER: "-2", META_TOKEN_LENGTH: "flexible", META_MAX_LENGTH: "64",
                      META_FEATURE_DTYPE: "float32"},
    "llama-layer-1": {META_LLM: LLAMA, META_LLM_LAYER: "-1", META_TOKEN_LENGTH: "flexible", META_MAX_LENGTH: "64"},
    "llama-fixed-16": {META_LLM: LLAMA, META_LLM_LAYER: "-2", META_TOKEN_LENGTH: "fixed", META_MAX_LENGTH: "16"},
    "llama-bf16": {META_LLM: LLAMA, META_LLM_LAYER: "-1", META_FEATURE_DTYPE: "bfloat16"},
    "bad-metadata": {META_LLM_LAYER: "second to last", META_TOKEN_LENGTH: "sometimes", META_FEATURE_DTYPE: "fp8"},
}


def _folder(models_dir, tiny_llama_dir, tmp_path):
    """A models folder of its own (Settings > ELLA > models folder): the tiny T5 and a tiny Llama, the tiny connector
    as it is (no metadata, as the official file) and saved again under each metadata of ``TRAINED``."""
    from modules import shared

    source = models_dir / "ELLA"
    ella = tmp_path / "ELLA"
    (ella / "text_encoders").mkdir(parents=True)
    (ella / f"{CONNECTOR}.safetensors").symlink_to(source / f"{CONNECTOR}.safetensors")
    (ella / "text_encoders" / ENCODER).symlink_to(source / "text_encoders" / ENCODER)
    (ella / "text_encoders" / LLAMA).symlink_to(tiny_llama_dir)
    tiny = load_connector(source / f"{CONNECTOR}.safetensors")
    for name, metadata in TRAINED.items():
        save_connector(tiny, ella / f"{name}.safetensors", metadata=metadata)
    shared.opts.ella_models_dir = str(ella)
    yield ella
    shared.opts.ella_models_dir = ""
    shared.opts.ella_llm_dtype = "auto"


@pytest.fixture
def folder(host, models_dir, tiny_llama_dir, tmp_path):
    """``_folder`` in the A1111 double."""
    yield from _folder(models_dir, tiny_llama_dir, tmp_path)


@pytest.fixture
def any_folder(any_host, models_dir, tiny_llama_dir, tmp_path):
    """``_folder`` in each of the three host doubles."""
    yield from _folder(models_dir, tiny_llama_dir, tmp_path)


@pytest.fixture(scope="module")
def llama_row(tiny_llama_dir):
    """The row a connector file gives for ``text`` at timestep ``t``, computed apart from the extension:
    transformers' own hidden state ``layer`` of the tiny Llama (``output_hidden_states``), then the connector."""
    from transformers import AutoModel, AutoTokenizer

    # sentencepiece's own ids on every transformers (4.30's fast one gives others)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir), use_fast=False)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "right"
    model = AutoModel.from_pretrained(str(tiny_llama_dir)).float().eval()

    def row(path, text: str, t: float, layer: int, fixed: int | None = None) -> torch.Tensor:
        padding = {"padding": "max_length", "max_length": fixed, "truncation": True} if fixed else {}
        tokens = tokenizer([text], return_tensors="pt", **padding)
        with torch.no_grad():
            hidden = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                           output_hidden_states=True).hidden_states[layer]
            return load_connector(path)(hidden, torch.tensor([t]))[0]

    return row


def prompt_rows(host):
    """(timestep, row) of the prompt's row (the first) at each conditioner call of the last generation."""
    return [(timesteps[0], rows[0]) for _, timesteps, rows in host.recorded.calls]


def test_a_connector_gets_the_llm_layer_it_was_trained_on_and_the_llm_loads_once(any_host, any_folder, llama_row,
                                                                               monkeypatch):
    """A decoder-only LLM gives each connector the hidden state its file names: -2, then -1 with the same loaded
    LLM (no second load of its weights), then -2 again (the encoding cache keeps the layers apart)."""
    import ella_ext.text_encoders as text_encoders

    loads = []
    original = text_encoders.load_text_encoder
    monkeypatch.setattr(text_encoders, "load_text_encoder", lambda *a, **k: loads.append(a) or original(*a, **k))
    prompt = "a red cube on top of a blue sphere"
    for connector, layer in (("llama-layer-2", -2), ("llama-layer-1", -1), ("llama-layer-2", -2)):
        _, processed = any_host.run(prompt, steps=2, args=ella_args(connector=connector, text_encoder=LLAMA))
        info = processed.infotexts[0]
        assert "ELLA error" not in info and "ELLA warning" not in info, info
        rows = prompt_rows(any_host)
        assert len(rows) == 2
        path = any_folder / f"{connector}.safetensors"
        for t, row in rows:
            expected = llama_row(path, prompt, t, layer)
            other = llama_row(path, prompt, t, -1 if layer == -2 else -2)
            assert (expected - other).abs().max() > 1e-2, "the two layers must give different rows"
            torch.testing.assert_close(row.float(), expected, atol=1e-4, rtol=1e-4)
    assert len(loads) == 1, "the LLM's weights are loaded once, whatever layer its connectors read"


def named(**fields):
    """The API's named form: one dict in the first slot (``alwayson_scripts: {"ELLA": {"args": [{...}]}}``)."""
    return [{"enabled": True, "text_encoder": LLAMA, **fields}]


def test_an_api_request_that_leaves_the_token_length_open_gets_the_connectors(host, folder, llama_row):
    _, processed = host.run("a red cube", steps=1, args=named(connector="llama-fixed-16"))
    info = processed.infotexts[0]
    assert "ELLA tokens: fixed 16" in info and "ELLA warning" not in info, info
    [(t, row)] = prompt_rows(host)
    torch.testing.assert_close(row.float(), llama_row(folder / "llama-fixed-16.safetensors", "a red cube", t, -2,
                                                      fixed=16), atol=1e-4, rtol=1e-4)
    # Fixed named, the max left open: the connector's
    _, processed = host.run("a red cube", steps=1, args=named(connector="llama-fixed-16", token_length="Fixed"))
    assert "ELLA tokens: fixed 16" in processed.infotexts[0] and "ELLA warning" not in processed.infotexts[0]
    # a connector whose file does not say: the defaults, as before
    _, processed = host.run("a red cube", steps=1, args=[{"enabled": True, "connector": CONNECTOR,
                                                          "text_encoder": ENCODER}])
    assert "ELLA tokens: flexible" in processed.infotexts[0]


@pytest.mark.parametrize(("args", "used", "advice"), [
    (named(connector="llama-fixed-16", token_length="Flexible"), "flexible", "Fixed with 16 max tokens"),
    (named(connector="llama-fixed-16", max_length=32), "fixed 32", "Fixed with 16 max tokens"),
    (ella_args(connector="llama-fixed-16", text_encoder=LLAMA), "flexible", "Fixed with 16 max tokens"),  # the UI's
    (ella_args(connector="llama-layer-2", text_encoder=LLAMA, token_length="Fixed", max_length=64), "fixed 64",
     "Flexible"),
])
def test_an_explicit_token_length_wins_with_a_warning_when_it_is_not_the_trained_one(host, folder, args, used,
                                                                                     advice):
    _, processed = host.run("a red cube", steps=1, args=args)
    info = processed.infotexts[0]
    assert f"ELLA tokens: {used}" in info and "ELLA error" not in info
    connector = "llama-fixed-16" if "16" in advice else "llama-layer-2"
    trained = "fixed 16" if "16" in advice else "flexible, up to 64"
    assert (f"ELLA warning: the connector {connector} was trained with {trained} tokens, and ran with {used}: set the "
            f"token length to {advice} to run it as trained") in info


def test_positional_args_as_trained_run_it_as_trained_without_a_warning(host, folder, llama_row):
    _, processed = host.run("a red cube", steps=1, args=ella_args(connector="llama-fixed-16", text_encoder=LLAMA,
                                                                   token_length="Fixed", max_length=16))
    assert "ELLA tokens: fixed 16" in processed.infotexts[0] and "ELLA warning" not in processed.infotexts[0]
    [(t, row)] = prompt_rows(host)
    torch.testing.assert_close(row.float(), llama_row(folder / "llama-fixed-16.safetensors", "a red cube", t, -2,
                                                      fixed=16), atol=1e-4, rtol=1e-4)


def test_picking_a_connector_in_the_ui_sets_its_token_length_and_pasting_does_not(host, folder):
    """The connector dropdown's ``input`` event (the user's pick) sets Token length and Max tokens to the file's
    values, and leaves them for a file that does not say; its ``change`` event (which pasting and "Send to" also
    start) never touches them."""
    import gradio as gr

    from ella_ext.webui import ui

    from .test_a1111_ui_api import events

    with gr.Blocks() as demo:
        controls = host.script.ui(False)
    _, connector, _, token_length, max_length, *_ = controls
    [(fn, inputs, outputs, _, _)] = events(demo, connector, "input")
    assert fn is ui.trained_tokens
    assert [id(c) for c in inputs] == [id(connector)]
    assert [id(c) for c in outputs] == [id(token_length), id(max_length)]
    for _, _, outputs, _, _ in events(demo, connector, "change"):
        assert not {id(token_length), id(max_length)} & {id(c) for c in outputs}

    def values(name):
        return [update.get("value", "unchanged") for update in ui.trained_tokens(name)]

    assert values("llama-fixed-16") == ["Fixed", 16]
    assert values("llama-layer-2") == ["Flexible", 64]
    assert values(CONNECTOR) == ["unchanged", "unchanged"]  # no metadata (as the official file): left as they are
    assert values("bad-metadata") == ["unchanged", "unchanged"]
    assert values("not-a-connector") == ["unchanged", "unchanged"]


def test_auto_precision_on_cuda_is_the_connectors_trained_dtype_and_a_chosen_one_wins(host, folder):
    from modules import shared

    from ella_ext.connector_file import TrainingFacts, read_training_facts
    from ella_ext.webui import settings

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    bf16 = read_training_facts(folder / "llama-bf16.safetensors")
    official = read_training_facts(folder / f"{CONNECTOR}.safetensors")
    assert official == TrainingFacts()
    shared.opts.ella_llm_dtype = "auto"
    assert settings.llm_dtype(cuda, bf16) == torch.bfloat16
    assert settings.llm_dtype(cuda, official) == torch.float16  # the official connector's, as before
    # trained on fp32 features (a CPU run): fp16 on CUDA, not twice the LLM's memory
    assert settings.llm_dtype(cuda, read_training_facts(folder / "llama-layer-2.safetensors")) == torch.float16
    assert settings.llm_dtype(cpu, bf16) == torch.float32  # no fast half precision on a CPU
    for choice, dtype in (("fp16", torch.float16), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        shared.opts.ella_llm_dtype = choice
        assert settings.llm_dtype(cuda, bf16) == dtype and settings.llm_dtype(cpu, official) == dtype


def test_a_generation_asks_the_precision_rule_with_its_connectors_facts(host, folder, monkeypatch):
    from ella_ext.registry import registry
    from ella_ext.webui import settings

    asked = []
    original = settings.llm_dtype
    monkeypatch.setattr(settings, "llm_dtype", lambda device, *facts: asked.append(facts) or original(device, *facts))
    _, processed = host.run("a cube", steps=1, args=ella_args(connector="llama-bf16", text_encoder=LLAMA))
    assert "ELLA error" not in processed.infotexts[0]
    assert [facts[0].feature_dtype for facts in asked] == ["bfloat16"]
    [key] = [k for k in registry if k.kind == "text_encoder"]
    assert key.dtype == "float32" and registry.peek(key).dtype == torch.float32  # on the CPU


def test_metadata_that_cannot_be_read_never_stops_a_generation(host, folder, caplog):
    _, processed = host.run("a cube", steps=1, args=ella_args(connector="bad-metadata", text_encoder=LLAMA))
    info = processed.infotexts[0]
    assert "ELLA error" not in info and "ELLA tokens: flexible" in info
    assert "ella.llm_layer='second to last' is not a whole number" in caplog.text
