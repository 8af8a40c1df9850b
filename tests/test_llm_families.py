"""Which LLM families load with the installed transformers, and what the extension says when one cannot.

Each family is a tiny random model with its own tokenizer.json (tests/tiny_llms.py): on a stack whose transformers
has the family it must load and encode at layer -2 as transformers computes it; on an older one (transformers 4.30.2,
AUTOMATIC1111 1.10's) the error must name the family, the transformers it needs, the installed one and what to do.
The messages are also checked on every stack by playing the old versions (monkeypatched), and a Llama whose
tokenizer.json is in today's format is tried for real: `tokenizers` before 0.14 cannot parse it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ella_ext import llm_files, load_text_encoder
from ella_ext.errors import TextEncoderError

from .tiny_llms import FAMILIES, HIDDEN, make_family, make_t5, modern_tokenizer_json, train_sentencepiece

TEXTS = ["a photo of a cat", "three cats sitting on a wooden bench in the park"]
# What transformers 4.30.2 (A1111 1.10) knows of the families tried here, and what it raises for the others
# (AutoConfig.from_pretrained: KeyError(model_type), seen on .venv-oldest).
OLD_KNOWN = {"t5", "mt5", "llama"}
OLD_VERSIONS = ("4.30.2", "0.13.3")
# The Rust parser's error for a current tokenizer.json in tokenizers 0.13.3 (seen on .venv-oldest and A1111's venv).
OLD_PARSE_ERROR = "data did not match any variant of untagged enum PyPreTokenizerTypeWrapper at line 40 column 3"


def _version(text: str) -> tuple[int, ...]:
    return llm_files._version(text)


def _transformers_has(family: str) -> bool:
    return FAMILIES[family][0] in llm_files._known_model_types()


def _tokenizers_reads_current_files() -> bool:
    """0.20.3 (Forge's) and 0.23.3 read today's tokenizer.json, 0.13.3 (A1111 1.10's) does not; others not tried."""
    import tokenizers

    return _version(tokenizers.__version__) >= (0, 20)


@pytest.fixture()
def old_webui(monkeypatch):
    """This process plays AUTOMATIC1111 1.10's transformers 4.30.2 / tokenizers 0.13.3, as far as messages go."""
    monkeypatch.setattr(llm_files, "installed_versions", lambda: OLD_VERSIONS)
    monkeypatch.setattr(llm_files, "_known_model_types", lambda: set(OLD_KNOWN))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_encodes_or_says_which_transformers_it_needs(family, tmp_path):
    import transformers

    folder = make_family(tmp_path / family, family)
    needed = llm_files.FIRST_TRANSFORMERS[family]
    assert _transformers_has(family) == (_version(transformers.__version__) >= _version(needed))
    if not _transformers_has(family):  # the real outcome on transformers 4.30.2
        with pytest.raises(TextEncoderError) as error:
            load_text_encoder(folder, layer=-2)
        _check_needs_message(str(error.value), family, transformers.__version__)
        return
    encoder = load_text_encoder(folder, layer=-2)
    features, mask = encoder.encode(TEXTS, max_length=None)
    assert features.shape[0] == 2 and features.shape[2] == HIDDEN and torch.isfinite(features).all()
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    for row, text in enumerate(TEXTS):
        tokens = encoder.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            alone = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                          output_hidden_states=True).hidden_states[-2][0]
        assert int(mask[row].sum()) == alone.shape[0]
        torch.testing.assert_close(features[row, : alone.shape[0]], alone, rtol=1e-4, atol=1e-5)


def _check_needs_message(message: str, family: str, installed: str) -> None:
    name = llm_files.FAMILY_NAMES[family]
    needed = llm_files.FIRST_TRANSFORMERS[family]
    assert f"is a {name} model" in message and repr(FAMILIES[family][0]) in message
    assert f"{name} needs transformers {needed} or later" in message
    assert f"this transformers ({installed})" in message
    assert f"run it in the current Forge (its transformers 4.46.1 has {name})" in message
    assert "update transformers in this WebUI's own Python environment (pip install transformers==4.46.1" in message
    assert "AUTOMATIC1111 1.10 (and Forge classic) pin transformers 4.30.2" in message and "may break" in message
    assert f"pip install transformers=={installed} undoes it" in message
    assert "(T5, mT5, Llama)" in message
    assert "spiece.model" not in message


@pytest.mark.parametrize("family", [family for family in FAMILIES if family != "llama"])
def test_families_newer_than_transformers_4_30_name_what_they_need(family, tmp_path, monkeypatch, old_webui):
    """Played on every stack: transformers 4.30.2 raises KeyError(model_type) for a config it does not know."""
    import transformers

    folder = make_family(tmp_path / family, family)

    def old_auto_config(*args, **kwargs):
        raise KeyError(FAMILIES[family][0])

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", old_auto_config)
    with pytest.raises(TextEncoderError) as error:
        load_text_encoder(folder, layer=-2)
    _check_needs_message(str(error.value), family, "4.30.2")


def test_a_family_newer_than_every_table_entry(tmp_path):
    folder = tmp_path / "future"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen9", "hidden_size": 8}))
    with pytest.raises(TextEncoderError) as error:
        load_text_encoder(folder)
    message = str(error.value)
    import transformers

    assert "is a qwen9 model" in message and f"a transformers newer than {transformers.__version__}" in message
    assert "run it in the current Forge" not in message and "update transformers" in message
    assert "pip install -U transformers" in message and f"transformers=={transformers.__version__} undoes it" in message


def test_the_first_transformers_of_each_family_is_known_to_forge():
    """The current Forge's transformers 4.46.1 has every family tried here (the messages send users there)."""
    for family, first in llm_files.FIRST_TRANSFORMERS.items():
        assert _version(first) <= _version(llm_files.FORGE_TRANSFORMERS), family
        assert family in llm_files.FAMILY_NAMES


def _llama_with_current_tokenizer_json(folder, slow_file: bool):
    """A tiny Llama whose tokenizer.json is in the format current `tokenizers` write (what a download has today),
    with or without the sentencepiece tokenizer.model of its slow tokenizer."""
    make_family(folder, "llama")
    modern_tokenizer_json(folder / "tokenizer.json")
    if slow_file:  # Llama's conventions: unk 0, bos 1, eos 2; the model's vocabulary is larger than this one's
        train_sentencepiece(folder / "tokenizer.model", model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    return folder


@pytest.mark.parametrize("slow_file", [True, False])
def test_a_current_tokenizer_json_on_an_old_tokenizers(tmp_path, slow_file):
    """The real outcome: transformers 4.30.2's tokenizers (0.13.3) cannot parse it; later ones load it."""
    folder = _llama_with_current_tokenizer_json(tmp_path / "llama", slow_file)
    if _tokenizers_reads_current_files():
        features, _ = load_text_encoder(folder, layer=-2).encode(TEXTS, max_length=None)
        assert torch.isfinite(features).all()
        return
    with pytest.raises(TextEncoderError) as error:
        load_text_encoder(folder, layer=-2)
    _check_tokenizer_message(str(error.value), slow_file, *llm_files.installed_versions())
    assert "did not match any variant" in str(error.value)


@pytest.mark.parametrize("slow_file", [True, False])
def test_an_unreadable_tokenizer_json_names_the_slow_file(tmp_path, monkeypatch, old_webui, slow_file):
    """Played on every stack: the old tokenizers' parse error, as transformers 4.30.2 passes it on."""
    import transformers

    folder = _llama_with_current_tokenizer_json(tmp_path / "llama", slow_file)

    def old_parser(*args, **kwargs):
        raise Exception(OLD_PARSE_ERROR)

    monkeypatch.setattr(llm_files, "_unreadable_tokenizer_json", lambda file: OLD_PARSE_ERROR if file else "")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", old_parser)
    with pytest.raises(TextEncoderError) as error:
        load_text_encoder(folder, layer=-2)
    _check_tokenizer_message(str(error.value), slow_file, *OLD_VERSIONS)


def _check_tokenizer_message(message: str, slow_file: bool, transformers_version: str, tokenizers_version: str):
    assert "The tokenizer.json of the Llama model" in message
    assert f"tokenizers library ({tokenizers_version}, with transformers {transformers_version})" in message
    assert "written by a newer tokenizers" in message
    if slow_file:
        assert "the folder has one (the sentencepiece tokenizer.model): move tokenizer.json out" in message
    else:
        assert "put the sentencepiece tokenizer.model of the Llama release" in message
    assert "run it in the current Forge (its transformers 4.46.1 reads it)" in message
    assert "update transformers in this WebUI" in message and "may break" in message
    assert "spiece.model" not in message and "T5" not in message


def test_the_slow_tokenizer_file_advice_works(tmp_path):
    """What the message says to do, done: with tokenizer.json moved out, the slow tokenizer reads tokenizer.model
    (on every stack; on transformers 4.30.2 this is the way such a folder loads)."""
    folder = _llama_with_current_tokenizer_json(tmp_path / "llama", slow_file=True)
    (folder / "tokenizer.json").rename(tmp_path / "tokenizer.json.moved")
    encoder = load_text_encoder(folder, layer=-2)
    features, mask = encoder.encode(TEXTS, max_length=None)
    assert torch.isfinite(features).all() and mask.any()


def test_a_damaged_tokenizer_json_is_not_called_too_new(tmp_path):
    folder = make_family(tmp_path / "llama", "llama")
    if not _transformers_has("llama"):
        pytest.skip("no Llama in this transformers")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(TextEncoderError) as error:
        load_text_encoder(folder, layer=-2)
    message = str(error.value)
    assert "The tokenizer of the Llama model" in message and "newer tokenizers" not in message
    assert "tokenizer.json or the sentencepiece tokenizer.model" in message and "spiece.model" not in message


def test_a_t5_tokenizer_failure_still_names_spiece_model(tmp_path):
    folder = make_t5(tmp_path / "t5")
    (folder / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TextEncoderError) as error:
        load_text_encoder(folder)
    message = str(error.value)
    assert "T5 model" in message and "spiece.model" in message


def test_current_format_rewrite_is_what_current_tokenizers_read(tmp_path):
    """modern_tokenizer_json (which plays a downloaded file on the old stack) writes a file that a current
    `tokenizers` reads as the same tokenizer, and leaves a file already in that format as it is."""
    if not _tokenizers_reads_current_files():
        pytest.skip("this tokenizers cannot read the current format (the other tests check that it fails)")
    from tokenizers import Tokenizer

    folder = make_family(tmp_path / "llama", "llama")
    current = folder / "tokenizer.json"
    written = current.read_text(encoding="utf-8")
    modern_tokenizer_json(current)
    assert json.loads(current.read_text(encoding="utf-8")) == json.loads(written)
    old = json.loads(written)  # the same tokenizer as tokenizers 0.13 writes it
    old["model"]["merges"] = [" ".join(pair) for pair in old["model"]["merges"]]
    del old["model"]["ignore_merges"]
    for part in (old["pre_tokenizer"], old["decoder"]):
        scheme = part.pop("prepend_scheme")
        part.pop("split")
        part["add_prefix_space"] = scheme != "never"
    rewritten = tmp_path / "rewritten.json"
    rewritten.write_text(json.dumps(old), encoding="utf-8")
    modern_tokenizer_json(rewritten)
    for text in TEXTS:
        assert Tokenizer.from_file(str(rewritten)).encode(text).ids == Tokenizer.from_file(str(current)).encode(
            text).ids
    shutil.rmtree(folder)
