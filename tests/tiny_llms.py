"""Tiny LLMs made on the fly: a sentencepiece model trained on a few sentences, a small T5 encoder and a small
Llama, saved as real model folders (config.json, model.safetensors, tokenizer files) so the real loading code runs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

SENTENCES = [
    "a red cube on top of a blue sphere",
    "three cats sitting on a wooden bench in the park",
    "a photograph of an astronaut riding a horse on the moon",
    "the quick brown fox jumps over the lazy dog",
    "a cozy kitchen with copper pots hanging above the stove",
    "two children fly a green kite near the lighthouse at sunset",
    "an oil painting of a crocodile wearing a knitted sweater",
    "a raccoon holding an apple, studio lighting, highly detailed",
    "empty street, rain, neon signs reflected in puddles",
    "portrait of an old fisherman with a white beard and a yellow hat",
]
HIDDEN = 20  # the tiny connector's input width (tests/conftest.py TINY.input_dim)


def train_sentencepiece(path: Path, vocab_size: int = 120, model_type: str = "unigram", **ids) -> Path:
    """T5's conventions by default (pad 0, eos 1, unk 2, no bos); pass pad_id=..., etc. to change them."""
    import sentencepiece as spm

    ids = {"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1, **ids}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, minloglevel=2, hard_vocab_limit=False, **ids,
    )
    path.write_bytes(model.getvalue())
    return path


def make_t5(folder: Path, hidden: int = HIDDEN, seed: int = 0, family: str = "t5") -> Path:
    """A tiny T5-family encoder: ``family`` "t5" (T5EncoderModel) or "umt5" (UMT5, transformers 4.32 or later)."""
    import transformers

    config_class, model_class = {"t5": ("T5Config", "T5EncoderModel"), "umt5": ("UMT5Config", "UMT5EncoderModel")}[
        family]
    folder.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(folder / "spiece.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": 512, "eos_token": "</s>",
         "unk_token": "<unk>", "pad_token": "<pad>"}))
    tokenizer = transformers.T5Tokenizer.from_pretrained(str(folder))
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), d_model=hidden, d_kv=8, d_ff=48, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    getattr(transformers, model_class)(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_llama(folder: Path, hidden: int = HIDDEN, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    # Llama's conventions: a BPE model, unk 0, bos 1, eos 2, no pad token.
    train_sentencepiece(folder / "tokenizer.model", model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "model_max_length": 64, "unk_token": "<unk>", "eos_token": "</s>",
         "bos_token": "<s>", "add_bos_token": True, "add_eos_token": False, "legacy": True}))
    config = LlamaConfig(vocab_size=130, hidden_size=hidden, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)
    return folder



def t5_token_weights(folder: Path, text: str, word_weights, max_length: int | None = None) -> torch.Tensor:
    """The emphasis of each token of a T5 row, worked out apart from the extension: each word tokenized alone
    (SentencePiece pieces never cross a space), truncated as T5 truncates, EOS 1, padding 1."""
    import transformers

    tokenizer = transformers.T5Tokenizer.from_pretrained(str(folder))
    weights = [float(w) for word, w in zip(text.split(), word_weights)
               for _ in tokenizer(word, add_special_tokens=False)["input_ids"]]
    if max_length is not None:
        weights = weights[: max_length - 1]
    weights.append(1.0)
    if max_length is not None:
        weights += [1.0] * (max_length - len(weights))
    return torch.tensor(weights)
