"""Text encoders against transformers called directly, the way the reference calls them."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ella_ext import load_text_encoder
from ella_ext.errors import InputError, TextEncoderError
from ella_ext.text_encoders import EncodingCache, default_dtype

from .conftest import CPU_FP16
from .tiny_llms import HIDDEN

TEXTS = ["a red cube on top of a blue sphere", "three cats", "", "an oil painting of a crocodile wearing a sweater"]


def direct_t5(folder, texts, **tokenizer_args):
    from transformers import T5EncoderModel, T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(str(folder))
    model = T5EncoderModel.from_pretrained(str(folder)).eval()
    tokens = tokenizer(texts, return_tensors="pt", add_special_tokens=True, **tokenizer_args)
    with torch.no_grad():
        out = model(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return out, tokens.attention_mask.bool()


@pytest.fixture(scope="module")
def t5(tiny_t5_dir):
    return load_text_encoder(tiny_t5_dir)


def test_fixed_length_is_the_reference_tokenisation(t5, tiny_t5_dir):
    features, mask = t5.encode(TEXTS, max_length=16)
    expected, expected_mask = direct_t5(tiny_t5_dir, TEXTS, max_length=16, padding="max_length", truncation=True)
    assert features.shape == (len(TEXTS), 16, HIDDEN) and features.dtype == torch.float32
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=1e-5)
    assert t5.encode(["x"], max_length=None)[0].shape[1] < 16


def test_flexible_rows_equal_each_text_alone(t5, tiny_t5_dir):
    features, mask = t5.encode(TEXTS, max_length=None)
    for row, text in enumerate(TEXTS):
        alone, _ = direct_t5(tiny_t5_dir, [text])  # no padding at all, as the reference's flexible mode
        n = alone.shape[1]
        assert int(mask[row].sum()) == n and bool(mask[row, :n].all())
        torch.testing.assert_close(features[row, :n], alone[0], atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(features[row, n:]) == 0
    assert features.shape[1] == max(int(m.sum()) for m in mask)


def test_empty_prompt_is_eos_only(t5):
    features, mask = t5.encode([""], max_length=None)
    assert features.shape == (1, 1, HIDDEN) and bool(mask.all())
    assert t5.tokenizer("").input_ids == [t5.tokenizer.eos_token_id]
    features, mask = t5.encode([""], max_length=128)
    assert features.shape == (1, 128, HIDDEN) and int(mask.sum()) == 1


def test_thousand_token_prompt(t5, caplog):
    long_text = " ".join(["crocodile sweater kitchen lighthouse"] * 250)
    assert t5.count_tokens(long_text) > 1000
    features, mask = t5.encode([long_text], max_length=128)
    assert features.shape[1] == 128 and bool(mask.all())
    with caplog.at_level(logging.WARNING, logger="ella"):
        features, mask = t5.encode([long_text], max_length=None)
    assert features.shape[1] == t5.token_limit == 512
    assert "more than 512 tokens" in caplog.text
    assert torch.isfinite(features).all()


def test_cache_is_used_and_bounded(tiny_t5_dir):
    encoder = load_text_encoder(tiny_t5_dir, cache=EncodingCache(max_entries=3))
    calls = []
    encoder.model.register_forward_hook(lambda module, args, output: calls.append(1))
    first = encoder.encode(["a", "b"], max_length=None)
    assert len(calls) == 1  # one batched run for both texts
    again = encoder.encode(["b", "a", "a"], max_length=None)
    assert len(calls) == 1
    torch.testing.assert_close(again[0][1], first[0][0])
    encoder.encode(["a"], max_length=8)  # the length mode is part of the key
    assert len(calls) == 2
    encoder.encode(["c", "d"], max_length=None)
    assert len(encoder.cache) == 3
    encoder.encode(["b"], max_length=None)  # "b" was the least recently used and fell out
    assert len(calls) == 4


class OnAccelerator(torch.Tensor):
    """Stands for a tensor in accelerator memory on this GPU-less machine: whatever is computed from it stays
    there; only ``.to("cpu")`` / ``.cpu()`` brings a copy back to CPU memory (a plain tensor)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = super().__torch_function__(func, types, args, kwargs)
        to_cpu = func is torch.Tensor.cpu or (
            func is torch.Tensor.to and any(_is_cpu(a) for a in [*args[1:], *kwargs.values()])
        )
        return result.as_subclass(torch.Tensor) if to_cpu and isinstance(result, torch.Tensor) else result


def _is_cpu(value) -> bool:
    return (isinstance(value, str) and value.startswith("cpu")) or (
        isinstance(value, torch.device) and value.type == "cpu"
    )


def test_cached_encodings_leave_accelerator_memory(tiny_t5_dir, monkeypatch):
    """The cache outlives generations: it must hold nothing in the LLM's (accelerator) memory. The LLM's output is
    marked as accelerator memory; every cached row must be a CPU copy with a storage of its own."""
    encoder = load_text_encoder(tiny_t5_dir)
    run = type(encoder)._run
    monkeypatch.setattr(type(encoder), "_run", lambda self, batch: run(self, batch).as_subclass(OnAccelerator))
    for max_length in (None, 8):
        features, _ = encoder.encode(["a red cube", "a much longer prompt about a blue sphere"], max_length)
        assert isinstance(features, torch.Tensor)
    rows = [row for row, _ in encoder.cache._entries.values()]
    assert len(rows) == 4
    for row in rows:
        assert type(row) is torch.Tensor and row.device.type == "cpu", "a cached row stayed in accelerator memory"
        assert row.untyped_storage().nbytes() == row.numel() * row.element_size(), "a view keeps the batch alive"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none in CI)")
def test_encodings_of_many_prompts_hold_no_gpu_memory(tiny_t5_dir):
    encoder = load_text_encoder(tiny_t5_dir, device="cuda", dtype=torch.float32)
    encoder.encode(["warm up"], max_length=None)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i in range(50):
        encoder.encode([f"prompt number {i} with a few words"], max_length=None)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_decoder_only_hidden_state_of_chosen_layer(tiny_llama_dir):
    from transformers import AutoModel, AutoTokenizer

    # sentencepiece's own ids on every transformers (4.30's fast one gives others)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir), use_fast=False)
    model = AutoModel.from_pretrained(str(tiny_llama_dir)).eval()
    for layer in (-1, 1):
        encoder = load_text_encoder(tiny_llama_dir, layer=layer)
        features, mask = encoder.encode(TEXTS[:2], max_length=None)
        for row, text in enumerate(TEXTS[:2]):
            tokens = tokenizer([text], return_tensors="pt")
            with torch.no_grad():
                hidden = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                               output_hidden_states=True).hidden_states[layer][0]
            n = hidden.shape[0]
            assert int(mask[row].sum()) == n
            torch.testing.assert_close(features[row, :n], hidden, atol=1e-5, rtol=1e-5)
    assert encoder.token_limit == 64


def test_non_finite_output_is_recomputed_in_fp32(tiny_t5_dir, tmp_path, caplog):
    # A final norm weight that fits fp16 but drives outputs past fp16's range (65504): fp16 gives inf.
    folder = tmp_path / "overflowing-t5"
    shutil.copytree(tiny_t5_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["encoder.final_layer_norm.weight"] = torch.full_like(weights["encoder.final_layer_norm.weight"], 3e4)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})

    half = load_text_encoder(folder, dtype=torch.float16)
    dtypes = {name: p.dtype for name, p in half.model.named_parameters()}
    assert set(dtypes.values()) == {torch.float16}  # all fp16, as the reference runs T5
    if not CPU_FP16:  # torch 2.1 (A1111 1.10's) cannot run fp16 on the CPU at all: the user is told what to set
        with pytest.raises(TextEncoderError, match="Set the LLM precision to fp32"):
            half.encode(TEXTS[:1], max_length=None)
        return
    ids = half.tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        raw = half.model(**ids).last_hidden_state
    assert not torch.isfinite(raw).all(), "the fixture no longer overflows in fp16"
    with caplog.at_level(logging.WARNING, logger="ella"):
        features, _ = half.encode(TEXTS[:1], max_length=None)
    assert "non-finite" in caplog.text
    assert torch.isfinite(features).all()
    assert {name: p.dtype for name, p in half.model.named_parameters()} == dtypes  # restored after the fallback
    full = load_text_encoder(folder, dtype=torch.float32)
    expected, _ = full.encode(TEXTS[:1], max_length=None)
    assert ((features - expected).norm() / expected.norm()) < 1e-2  # fp16-rounded weights, fp32 arithmetic


def test_hidden_size_mismatch_names_both(t5):
    t5.check_fits(HIDDEN)
    with pytest.raises(TextEncoderError, match=rf"hidden size {HIDDEN}.*reads 2048-wide"):
        t5.check_fits(2048)


def test_missing_and_broken_folders(tmp_path, tiny_t5_dir):
    with pytest.raises(TextEncoderError, match="No text encoder found"):
        load_text_encoder(tmp_path / "nowhere")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_t5_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(TextEncoderError, match="safetensors"):
        load_text_encoder(no_weights)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_t5_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(TextEncoderError, match="could not be loaded"):
        load_text_encoder(corrupt)
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_t5_dir, no_tokenizer)
    (no_tokenizer / "spiece.model").unlink()
    with pytest.raises(TextEncoderError, match="tokenizer"):
        load_text_encoder(no_tokenizer)


def test_a_folder_with_only_a_pickle_is_never_loaded(tmp_path, tiny_t5_dir, monkeypatch):
    """transformers 4.30 (A1111 1.10's) quietly loads pytorch_model.bin when a folder has no safetensors weights,
    even with use_safetensors=True: the folder is refused before transformers sees it."""
    from safetensors.torch import load_file

    folder = tmp_path / "bin-only"
    shutil.copytree(tiny_t5_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    loaded = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append(a) or pytest.fail("a pickle was loaded"))
    with pytest.raises(TextEncoderError, match=r"only pickled weights \(pytorch_model.bin\)"):
        load_text_encoder(folder)
    assert not loaded


def test_bad_encode_arguments(t5):
    with pytest.raises(InputError):
        t5.encode([], max_length=None)
    with pytest.raises(InputError):
        t5.encode(["a"], max_length=0)
    with pytest.raises(InputError):
        t5.encode([None], max_length=None)


def test_precision_policy():
    assert default_dtype(torch.device("cuda")) == torch.float16
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("mps")) == torch.float32


def test_umt5_encoder(tmp_path):
    import transformers

    if not hasattr(transformers, "UMT5EncoderModel"):  # transformers 4.30.2 (A1111 1.10) predates UMT5
        import json

        folder = tmp_path / "umt5-config-only"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "umt5", "d_model": 8}))
        with pytest.raises(TextEncoderError, match="update transformers"):
            load_text_encoder(folder)
        return
    from transformers import T5Tokenizer, UMT5EncoderModel

    from .tiny_llms import make_t5

    folder = make_t5(tmp_path / "tiny-umt5", family="umt5")
    encoder = load_text_encoder(folder)
    assert type(encoder.model).__name__ == "UMT5EncoderModel"
    features, mask = encoder.encode(TEXTS[:2], max_length=None)
    tokenizer = T5Tokenizer.from_pretrained(str(folder))
    model = UMT5EncoderModel.from_pretrained(str(folder)).eval()
    for row, text in enumerate(TEXTS[:2]):
        tokens = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            alone = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state[0]
        n = alone.shape[0]
        assert int(mask[row].sum()) == n
        torch.testing.assert_close(features[row, :n], alone, atol=1e-5, rtol=1e-5)


# -- emphasis: which word each token comes from ----------------------------------------------------------------------

ALIGNED_TEXTS = [
    "a crocodile wearing a knitted sweater, studio lighting",  # words of several tokens, a comma inside a word
    "red cube",
    "zzqx-kite!! (the) end.",  # rare letters, punctuation glued to words
    "a{b} c",  # characters outside the tiny vocabularies
    "x",
]


def pieces_by_word(tokenizer, text, words_of):
    """The token strings of each word, from an alignment (specials and padding dropped)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    grouped = {}
    for token, word in zip(tokens, words_of):
        if word >= 0:
            grouped.setdefault(word, []).append(token)
    return grouped


def spelled(pieces, unk):
    """A word as its tokens spell it: SentencePiece's word-start mark dropped, an unknown token as '?'."""
    return "".join("?" if piece == unk else piece.replace("\u2581", "") for piece in pieces)


def check_alignment(encoder, text):
    words = text.split(" ")
    words_of = encoder.token_words(text, max_length=None)
    ids = encoder.tokenizer(text, add_special_tokens=True)["input_ids"]
    assert len(words_of) == len(ids)
    specials = set(encoder.tokenizer.all_special_ids) - {encoder.tokenizer.unk_token_id}
    assert [w for w, i in zip(words_of, ids) if i in specials] == [-1] * sum(i in specials for i in ids)
    assert sorted(set(words_of) - {-1}) == list(range(len(words)))  # every word has tokens, in order
    content = [w for w in words_of if w != -1]
    assert content == sorted(content)  # never backwards
    grouped = pieces_by_word(encoder.tokenizer, text, words_of)
    unk = encoder.tokenizer.unk_token
    for index, word in enumerate(words):
        got = spelled(grouped[index], unk)
        known = "".join(c if encoder.tokenizer.convert_tokens_to_ids(c) != encoder.tokenizer.unk_token_id else "?"
                        for c in word)
        # the word's tokens spell the word (an unknown character is one '?' or is merged with its unknown
        # neighbours into one '?' or is dropped by the tokenizer)
        assert got.replace("?", "") == known.replace("?", "") or got == word, (text, word, grouped[index])


@pytest.mark.parametrize("text", ALIGNED_TEXTS)
def test_t5_tokens_align_with_words(t5, text):
    check_alignment(t5, text)


@pytest.fixture(scope="module")
def llamas(tiny_llama_dir):
    """The tiny Llama with the fast tokenizer and with the slow one (the encoder picks the slow one on transformers
    before 4.46 for a folder without tokenizer.json, the fast one after)."""
    import copy

    import transformers

    fast = load_text_encoder(tiny_llama_dir)
    if not getattr(fast.tokenizer, "is_fast", False):
        fast = copy.copy(fast)
        fast.tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_llama_dir), use_fast=True)
        fast.tokenizer.pad_token = fast.tokenizer.eos_token
        fast.tokenizer.padding_side = "right"
    slow = load_text_encoder(tiny_llama_dir)
    if hasattr(transformers, "LlamaTokenizer") and getattr(fast.tokenizer, "is_fast", False):
        try:
            slow_tokenizer = transformers.LlamaTokenizer.from_pretrained(str(tiny_llama_dir))
        except (ImportError, ValueError):  # transformers 5 has one Llama tokenizer
            slow_tokenizer = None
        if slow_tokenizer is not None and not getattr(slow_tokenizer, "is_fast", False):
            slow_tokenizer.pad_token = slow_tokenizer.eos_token
            slow.tokenizer = slow_tokenizer
    return fast, slow


@pytest.mark.parametrize("text", ALIGNED_TEXTS)
def test_llama_tokens_align_with_words(llamas, text):
    for encoder in llamas:
        check_alignment(encoder, text)


def test_word_by_word_agrees_with_offsets_where_offsets_are_right(t5, llamas):
    """A fast tokenizer's character offsets, where they are right, give the same words as the word-by-word
    alignment the encoder uses. (Texts with characters outside the vocabulary are left out: transformers 5's Llama
    tokenizer drops those characters and shifts every later offset, the reason offsets are not trusted first.)"""
    from ella_ext.text_encoders import _words_by_offsets

    checked = 0
    for encoder in (t5, *llamas):
        if not getattr(encoder.tokenizer, "is_fast", False):
            continue
        for text in ALIGNED_TEXTS[:2]:
            out = encoder.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True,
                                    return_special_tokens_mask=True)
            content = [i for i, s in enumerate(out["special_tokens_mask"]) if not s]
            words = encoder.token_words(text, max_length=None)
            assert _words_by_offsets(text, [out["offset_mapping"][i] for i in content]) == [words[i] for i in content]
            checked += 1
    assert checked >= 2  # the Llama tokenizer is fast on every stack


def test_token_weights_fixed_and_flexible(t5):
    text = "a crocodile wearing a knitted sweater"
    word_weights = [1.0, 1.5, 1.0, 0.0, 2.0, 0.5]
    per_word = [len(t5.tokenizer(word, add_special_tokens=False)["input_ids"]) for word in text.split()]
    expected = [w for w, n in zip(word_weights, per_word) for _ in range(n)] + [1.0]  # EOS: 1
    flexible = t5.token_weights(text, word_weights, max_length=None)
    assert flexible.dtype == torch.float32 and flexible.tolist() == expected
    assert flexible.shape[0] == t5.encode([text], max_length=None)[0].shape[1]
    fixed = t5.token_weights(text, word_weights, max_length=32)
    assert fixed.tolist() == expected + [1.0] * (32 - len(expected))  # padding: 1 (the fixed mode attends to it)
    truncated = t5.token_weights(text, word_weights, max_length=6)  # 5 words' tokens cut to 5, then EOS
    assert truncated.tolist() == expected[:5] + [1.0]
    assert t5.token_words(text, max_length=6)[-1] == -1


def test_llama_bos_and_padding_weigh_one(llamas):
    for encoder in llamas:
        weights = encoder.token_weights("red cube", [3.0, 0.5], max_length=10)
        n_red = len(encoder.tokenizer("red", add_special_tokens=False)["input_ids"])
        assert weights[0] == 1.0  # BOS
        assert weights[1 : 1 + n_red].tolist() == [3.0] * n_red
        real = int(encoder.encode(["red cube"], max_length=10)[1].sum())
        assert set(weights[1 + n_red : real].tolist()) == {0.5} and set(weights[real:].tolist()) == {1.0}


def test_alignment_is_cached_per_text_and_length(tiny_t5_dir):
    encoder = load_text_encoder(tiny_t5_dir)
    calls = []
    original = encoder.tokenizer.__class__.__call__

    class Counting(encoder.tokenizer.__class__):
        def __call__(self, *args, **kwargs):
            calls.append(args)
            return original(self, *args, **kwargs)

    encoder.tokenizer.__class__ = Counting
    first = encoder.token_weights("red cube", [2.0, 3.0], max_length=None)
    made = len(calls)
    assert made > 0
    other = encoder.token_weights("red cube", [0.5, 3.0], max_length=None)
    assert len(calls) == made  # other weights for the same text: no tokenizer call
    assert torch.equal(other, torch.where(first == 2.0, 0.5, first))
    encoder.token_weights("red cube", [2.0, 1.0], max_length=8)
    assert len(calls) > made  # the length mode is part of the key


def test_token_weights_bad_input(t5):
    with pytest.raises(InputError, match="2 words, got 3 weights"):
        t5.token_weights("red cube", [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="finite and at least 0"):
        t5.token_weights("red cube", [1.0, -2.0])
    assert t5.token_weights("", [], max_length=None).tolist() == [1.0]  # EOS alone


@pytest.fixture
def a1111_after_a_checkpoint_load():
    """What AUTOMATIC1111 1.10 leaves behind after every checkpoint load (modules/sd_disable_initialization.py): its
    replacement of PreTrainedModel._load_pretrained_model is undone with ``setattr(cls, name, getattr(cls, name))``
    as read before, i.e. a method bound to PreTrainedModel where transformers has a classmethod."""
    from transformers import PreTrainedModel

    name = "_load_pretrained_model"
    real = vars(PreTrainedModel)[name]
    original = getattr(PreTrainedModel, name)  # the host's ReplaceHelper.replace: getattr, then setattr
    setattr(PreTrainedModel, name, lambda *args, **kwargs: None)
    setattr(PreTrainedModel, name, original)  # ... and its restore
    yield
    setattr(PreTrainedModel, name, real)


def _embedding_of_file(folder):
    return load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]


def test_a_decoder_llm_loads_its_weights_after_a1111_loaded_a_checkpoint(tiny_llama_dir,
                                                                          a1111_after_a_checkpoint_load):
    from transformers import PreTrainedModel

    encoder = load_text_encoder(tiny_llama_dir, "cpu", torch.float32)
    assert torch.equal(encoder.model.get_input_embeddings().weight, _embedding_of_file(tiny_llama_dir))
    assert type(vars(PreTrainedModel)["_load_pretrained_model"]) is not classmethod  # the host's state, as found


def test_weights_that_did_not_load_are_refused(tiny_llama_dir, monkeypatch):
    """Whatever the cause (here a loader that builds the model without reading the file), an LLM left at its random
    initialisation is refused by name instead of giving wrong features."""
    import transformers

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained",
                        lambda path, config=None, **kwargs: transformers.AutoModel.from_config(config))
    with pytest.raises(TextEncoderError, match=r"weights of tiny-llama did not load.*random initialisation"):
        load_text_encoder(tiny_llama_dir, "cpu", torch.float32)


def test_a_sentencepiece_llm_reads_sentencepieces_own_ids(tiny_llama_dir):
    """A folder with tokenizer.model and no tokenizer.json: the ids are the sentencepiece model's on every
    transformers (4.30's converted fast tokenizer gives others for Llama-style models)."""
    import sentencepiece as spm

    text = "a red book and a yellow vase"
    pieces = spm.SentencePieceProcessor(model_file=str(tiny_llama_dir / "tokenizer.model"))
    encoder = load_text_encoder(tiny_llama_dir, "cpu", torch.float32)
    ids = encoder.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == pieces.encode(text), (ids, pieces.encode(text))
