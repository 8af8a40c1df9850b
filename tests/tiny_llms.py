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


# --------------------------------------------------------------------------------------------------------------------
# Decoder-only families with their own tokenizer.json (made here with the `tokenizers` library, as a release ships it)

# family: (model_type, config class, model class, tokenizer kind, special tokens in id order, tokenizer_config.json)
FAMILIES = {
    "llama": ("llama", "LlamaConfig", "LlamaForCausalLM", "sentencepiece", ["<unk>", "<s>", "</s>"],
              {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "add_bos_token": True, "add_eos_token": False}),
    "mistral": ("mistral", "MistralConfig", "MistralForCausalLM", "sentencepiece", ["<unk>", "<s>", "</s>"],
                {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                 "add_bos_token": True, "add_eos_token": False}),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "byte-level", ["<|endoftext|>"],
              {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "unk_token": None}),
    "gemma": ("gemma", "GemmaConfig", "GemmaForCausalLM", "sentencepiece", ["<pad>", "<eos>", "<bos>", "<unk>"],
              {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
               "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}),
    "gemma2": ("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "sentencepiece", ["<pad>", "<eos>", "<bos>", "<unk>"],
               {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
                "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}),
    "phi3": ("phi3", "Phi3Config", "Phi3ForCausalLM", "sentencepiece", ["<unk>", "<s>", "</s>"],
             {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": "</s>", "add_bos_token": False, "add_eos_token": False}),
}


def _metaspace(cls, prefix: bool):
    """tokenizers' Metaspace in either spelling: `prepend_scheme` (0.14 and later) or `add_prefix_space` (before)."""
    try:
        return cls(replacement="▁", prepend_scheme="first" if prefix else "never")
    except TypeError:
        return cls(replacement="▁", add_prefix_space=prefix)


def make_tokenizer_json(path: Path, kind: str, special_tokens: list[str], bos: str | None = None,
                        vocab_size: int = 160) -> int:
    """A tokenizer.json trained on SENTENCES with the installed `tokenizers`, in the file format that version writes:
    "sentencepiece" (a BPE over "▁"-marked words, as Llama, Mistral, Gemma and Phi-3 ship) or "byte-level" (GPT-2
    style byte-level BPE, as Qwen2 ships). The special tokens get the first ids, in order; ``bos`` (one of them) is
    put before every text. Returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [*SENTENCES, "a photo of a cat"] * 4
    if kind == "sentencepiece":
        tokenizer = Tokenizer(models.BPE(unk_token=special_tokens[-1] if "<unk>" in special_tokens else None,
                                         fuse_unk=True))
        tokenizer.pre_tokenizer = _metaspace(pre_tokenizers.Metaspace, prefix=special_tokens[0] != "<pad>")
        tokenizer.decoder = _metaspace(decoders.Metaspace, prefix=special_tokens[0] != "<pad>")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False)
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=special_tokens, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    if bos:  # as releases ship it: the tokenizer.json's post-processor adds the BOS token
        from tokenizers import processors

        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, special_tokens.index(bos))])
    tokenizer.save(str(path))
    return tokenizer.get_vocab_size()


def family_config(family: str, vocab_size: int, hidden: int = HIDDEN) -> dict:
    """The config.json of a tiny model of ``family`` (what a release's config.json holds, at a tiny size)."""
    model_type, _, model_class, _, specials, tokenizer_config = FAMILIES[family]
    ids = {f"{name}_token_id": specials.index(tokenizer_config[f"{name}_token"])
           for name in ("bos", "eos", "pad") if tokenizer_config.get(f"{name}_token")}
    config = {"model_type": model_type, "architectures": [model_class], "vocab_size": vocab_size,
              "hidden_size": hidden, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False, **ids}
    if family in ("gemma", "gemma2"):
        config.update(head_dim=hidden // 2, tie_word_embeddings=True)
    if family == "gemma2":
        config.update(query_pre_attn_scalar=hidden // 2, sliding_window=32)
    if family == "phi3":
        config.update(original_max_position_embeddings=64)
    return config


def make_family(folder: Path, family: str, hidden: int = HIDDEN, seed: int = 0) -> Path:
    """A tiny random ``family`` model ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3") with its own
    tokenizer.json and tokenizer_config.json. Where the installed transformers lacks the family, only config.json and
    the tokenizer files are written (what a user's folder holds, less the weights: the load stops at the config)."""
    import transformers

    _, config_class, model_class, kind, specials, tokenizer_config = FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    bos = tokenizer_config["bos_token"] if tokenizer_config.get("add_bos_token") else None
    vocab = make_tokenizer_json(folder / "tokenizer.json", kind, specials, bos)
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 64}))
    config = family_config(family, vocab + 2, hidden)
    if not hasattr(transformers, config_class):
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return folder
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def modern_tokenizer_json(path: Path) -> None:
    """Rewrite a tokenizer.json in the format current `tokenizers` write (merges as pairs, Metaspace's
    `prepend_scheme` and `split`, BPE's `ignore_merges`, as 0.20.3 and 0.23.3 write it) when an old one (0.13.3, A1111
    1.10's) wrote it: what a model downloaded today ships, which the old library cannot parse. A file already in that
    format is left as it is."""
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data["model"]
    if model["merges"] and isinstance(model["merges"][0], str):
        model["merges"] = [merge.split(" ", 1) for merge in model["merges"]]
    model.setdefault("ignore_merges", False)
    for part in (data.get("pre_tokenizer"), data.get("decoder")):
        if part and part.get("type") == "Metaspace" and "add_prefix_space" in part:
            prefix = part.pop("add_prefix_space")
            part.update(prepend_scheme="first" if prefix else "never", split=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Which families load on this stack, across stacks: ``python -m tests.tiny_llms make FOLDER`` makes a tiny model
    of every family (and T5) in FOLDER/<family> with this stack's transformers and tokenizers (what a download made
    today holds, when run on a current stack); ``python -m tests.tiny_llms try FOLDER`` loads each with
    ``load_text_encoder`` (a decoder-only at layer -2) and encodes a prompt, one line per family."""
    import argparse

    import tokenizers
    import transformers

    parser = argparse.ArgumentParser(prog="python -m tests.tiny_llms")
    parser.add_argument("action", choices=["make", "try"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    print(f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")
    if args.action == "make":
        make_t5(args.folder / "t5")
        for family in FAMILIES:
            make_family(args.folder / family, family)
        return
    from ella_ext import load_text_encoder
    from ella_ext.errors import TextEncoderError

    for folder in sorted(path for path in args.folder.iterdir() if path.is_dir()):
        try:
            features, _ = load_text_encoder(folder, layer=-2).encode(["a photo of a cat"], max_length=None)
            print(f"{folder.name}: encodes, features {tuple(features.shape)}")
        except TextEncoderError as exc:
            print(f"{folder.name}: {exc}")


if __name__ == "__main__":
    main()
