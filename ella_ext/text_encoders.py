"""LLM text encoders for ELLA: the T5 family (encoder-only) and decoder-only LLMs (a chosen layer's hidden states).

``load_text_encoder(path_or_id)`` returns a ``TextEncoder`` whose ``encode(texts, max_length)`` gives
``(features [B, S, D] float32, mask [B, S] bool)``:

- fixed length (``max_length=N``, 128 in the reference): every text padded or truncated to N tokens, EOS kept, as
  the reference tokenises; the mask marks the real tokens (the reference's TSC ignores it and attends to all N);
- flexible length (``max_length=None``): no padding per text; a batch is padded to its longest text and the mask
  says which positions are real. Texts longer than the model's limit are truncated there, with a warning.

Precision: fp16 on CUDA by default (the connector was trained against fp16 T5), fp32 on CPU and MPS; bf16 or fp32
on request. A non-finite output (flan-T5 can overflow in fp16) is recomputed in fp32, with a warning.
Features are returned as float32 on the model's device (the connector casts them to its own dtype) and cached in
CPU memory, in a bounded LRU by (model, text, length mode).

Emphasis: ``token_weights(text, word_weights, max_length)`` gives each token of that row the weight of the
space-separated word it comes from (special tokens and padding: 1), for the connector's attention. The token-to-word
alignment is made word by word: the tokens of the text's first k words are the tokens of the whole text that the
prefix ending at word k also gives (exact for every tokenizer whose tokens do not cross a space; a token that does
goes to the later word). A fast tokenizer's character offsets are used only where that fails (the row's tokens are
not the text's own tokens in order): they are not trusted first because some are wrong (transformers 5's Llama
tokenizer shifts them after a character outside its vocabulary). The alignment is computed once per text and length
mode and kept in a bounded LRU beside the encodings.
"""

from __future__ import annotations

import bisect
import copy
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .connector import own_precision
from .errors import InputError, TextEncoderError
from .llm_files import T5_FAMILY, read_config, read_model, read_tokenizer, token_limit
from .model_files import encoder_folder_problem

log = logging.getLogger("ella")

DEFAULT_FIXED_LENGTH = 128
CPU = torch.device("cpu")
ALIGNMENT_ENTRIES = 256  # token-to-word alignments kept per encoder
_WORD = re.compile(r"\S+")


class EncodingCache:
    """Bounded LRU of per-text encodings ``(features [S, D] in CPU memory, real tokens)``, keyed by (model, text,
    max_length); the encoder also keeps its token-to-word alignments in one. Thread-safe."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Any | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: tuple, value: Any) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


@dataclass
class _Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class TextEncoder:
    """An LLM and its tokenizer. Use ``load_text_encoder`` to make one."""

    def __init__(self, model, tokenizer, name: str, *, layer: int | None = None, cache: EncodingCache | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.layer = layer  # None: encoder-only (last_hidden_state); an index: that hidden state of a decoder
        self.cache = cache if cache is not None else EncodingCache()
        self._lock = threading.Lock()
        self._alignments = EncodingCache(ALIGNMENT_ENTRIES)  # (text, max_length) -> token_words

    # -- properties ------------------------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return getattr(config, "d_model", None) or config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def token_limit(self) -> int:
        """The most tokens the model takes; flexible mode truncates there."""
        return token_limit(self.model.config, self.tokenizer)

    def to(self, device: str | torch.device) -> TextEncoder:
        self.model.to(device)
        return self

    @property
    def hidden_states(self) -> int | None:
        """How many hidden states a decoder-only LLM gives (its layers + the embeddings); None for T5 encoders."""
        if self.layer is None:
            return None
        layers = getattr(self.model.config, "num_hidden_layers", None)
        return None if layers is None else int(layers) + 1

    def with_layer(self, layer: int) -> TextEncoder:
        """This encoder giving the hidden state ``layer`` (a decoder-only LLM; a T5-family encoder has one output and
        is returned as it is). The result shares the model, the tokenizer, the lock and the caches (whose keys
        include the layer): a connector trained at another layer costs no second copy of the weights."""
        if self.layer is None or layer == self.layer:
            return self
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise InputError(f"A layer is a whole number (-1: the last hidden state); got {layer!r}.")
        count = self.hidden_states
        if count is not None and not -count <= layer < count:
            raise TextEncoderError(
                f"The connector reads hidden state {layer} of its LLM, but {self.name} has {count} hidden states "
                f"(-{count} to {count - 1}). Pick the LLM the connector was trained with."
            )
        view = copy.copy(self)
        view.layer = layer
        return view

    def check_fits(self, in_width: int, connector_name: str = "the connector") -> None:
        if self.hidden_size != in_width:
            raise TextEncoderError(
                f"The text encoder {self.name} has hidden size {self.hidden_size}, but {connector_name} reads "
                f"{in_width}-wide features. Pick the text encoder the connector was trained with (flan-T5-XL, 2048, "
                "for the official SD 1.5 connector)."
            )

    # -- encoding --------------------------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """Tokens the LLM sees for ``text`` (special tokens included), before any padding or truncation."""
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode(self, texts: list[str] | str, max_length: int | None = DEFAULT_FIXED_LENGTH):
        """``(features [B, S, D] float32, mask [B, S] bool)``; ``max_length=None`` is flexible length."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("encode() takes a non-empty list of strings.")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise InputError(f"max_length must be a positive whole number or None (flexible); got {max_length!r}.")
        with self._lock:
            rows = self._cached_rows(texts, max_length)
        return _stack(rows, self.device)

    def is_cached(self, texts: list[str], max_length: int | None = DEFAULT_FIXED_LENGTH) -> bool:
        """Whether ``encode(texts, max_length)`` would be served from the cache alone (the model would not run)."""
        with self._lock:
            return all(self.cache.get(self._cache_key(text, max_length)) is not None for text in texts)

    def _cache_key(self, text: str, max_length: int | None) -> tuple:
        return (self.name, str(self.dtype), self.layer, text, max_length)

    def _cached_rows(self, texts: list[str], max_length: int | None) -> list[tuple[torch.Tensor, int]]:
        keys = {text: self._cache_key(text, max_length) for text in texts}
        found = {text: self.cache.get(key) for text, key in keys.items()}
        missing = [text for text, value in found.items() if value is None]
        if missing:
            for text, row in zip(missing, self._encode_uncached(missing, max_length)):
                self.cache.put(keys[text], row)
                found[text] = row
        return [found[text] for text in texts]

    def _length_args(self, max_length: int | None) -> dict:
        """The tokenizer's padding and truncation for a length mode (the encoding and the alignment share them)."""
        if max_length is not None:
            return {"max_length": max_length, "padding": "max_length", "truncation": True}
        return {"padding": "longest", "truncation": True, "max_length": self.token_limit}

    def _tokenize(self, texts: list[str], max_length: int | None) -> _Batch:
        if max_length is None:
            limit = self.token_limit
            too_long = [t for t in texts if self.count_tokens(t) > limit]
            if too_long:
                log.warning("ELLA: a prompt has more than %d tokens, the limit of %s; the LLM reads its first %d.",
                            limit, self.name, limit)
        out = self.tokenizer(texts, return_tensors="pt", add_special_tokens=True, **self._length_args(max_length))
        return _Batch(out["input_ids"], out["attention_mask"].bool())

    def _encode_uncached(self, texts: list[str], max_length: int | None) -> list[tuple[torch.Tensor, int]]:
        batch = self._tokenize(texts, max_length)
        features = self._run(batch)
        if not torch.isfinite(features).all():
            features = self._run_fp32_fallback(batch)
        lengths = batch.attention_mask.sum(dim=1).tolist()
        # Cached rows live in CPU memory, each in a storage of its own: the cache outlives generations and must hold
        # nothing on the accelerator (where neither Forge's memory manager nor --lowvram would see it).
        if max_length is not None:  # fixed: keep the padding positions, the reference's TSC reads them
            return [(row.to(CPU, copy=True), length) for row, length in zip(features.unbind(0), lengths)]
        return [(row[:length].to(CPU, copy=True), length) for row, length in zip(features.unbind(0), lengths)]

    def _run(self, batch: _Batch) -> torch.Tensor:
        ids = batch.input_ids.to(self.device)
        attention = batch.attention_mask.to(self.device).long()
        try:
            with torch.inference_mode(), own_precision(self.device):
                if self.layer is None:
                    hidden = self.model(input_ids=ids, attention_mask=attention).last_hidden_state
                else:
                    out = self.model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
                    hidden = out.hidden_states[self.layer]
        except RuntimeError as exc:
            if "Half" in str(exc) or "BFloat16" in str(exc):
                raise TextEncoderError(
                    f"The text encoder cannot run in {self.dtype} on {self.device} ({exc}). Set the LLM precision "
                    "to fp32 (CPU and Apple MPS need fp32)."
                ) from exc
            raise
        return hidden.float()

    def _run_fp32_fallback(self, batch: _Batch) -> torch.Tensor:
        log.warning("ELLA: %s gave non-finite features in %s; recomputing this batch in fp32.", self.name, self.dtype)
        dtypes = {name: t.dtype for name, t in _tensors(self.model)}
        try:
            self.model.float()
            features = self._run(batch)
        finally:
            for name, tensor in _tensors(self.model):
                tensor.data = tensor.data.to(dtypes[name])
        if not torch.isfinite(features).all():
            raise TextEncoderError(
                f"The text encoder {self.name} gives non-finite features even in fp32: its weights are probably "
                "corrupt. Download the text encoder again."
            )
        return features


    # -- emphasis ---------------------------------------------------------------------------------------------------

    def token_weights(
        self, text: str, word_weights: Sequence[float], max_length: int | None = DEFAULT_FIXED_LENGTH
    ) -> torch.Tensor:
        """float32 ``[tokens]`` on the CPU, one weight per position of the row ``encode([text], max_length)`` gives:
        the weight of the space-separated word of ``text`` the token comes from; special tokens (EOS, BOS) and
        padding get 1."""
        weights = [float(w) for w in word_weights]
        count = sum(1 for _ in _WORD.finditer(text))
        if len(weights) != count:
            raise InputError(f"token_weights() takes one weight per word: {text!r} has {count} words, "
                             f"got {len(weights)} weights.")
        if not all(0.0 <= w < float("inf") for w in weights):
            raise InputError(f"Emphasis weights must be finite and at least 0; got {weights}.")
        words = self.token_words(text, max_length)
        return torch.tensor([*weights, 1.0], dtype=torch.float32)[torch.tensor(words, dtype=torch.long)]

    def token_words(self, text: str, max_length: int | None = DEFAULT_FIXED_LENGTH) -> list[int]:
        """For each position of the row ``encode([text], max_length)`` gives, the index of the word of ``text`` its
        token comes from; -1 for special tokens and padding (and for every token when the tokenizer's tokens cannot
        be matched to the words: then emphasis is ignored for this text, with a warning)."""
        key = (text, max_length)
        found = self._alignments.get(key)
        if found is None:
            with self._lock:  # the tokenizer: one thread at a time
                found = self._align(text, max_length)
            self._alignments.put(key, found)
        return found

    def _align(self, text: str, max_length: int | None) -> list[int]:
        fast = bool(getattr(self.tokenizer, "is_fast", False))
        out = self.tokenizer(text, add_special_tokens=True, return_special_tokens_mask=True,
                             return_offsets_mapping=fast, **self._length_args(max_length))
        ids = list(out["input_ids"])
        content = [i for i, (special, real) in enumerate(zip(out["special_tokens_mask"], out["attention_mask"]))
                   if real and not special]
        words = _words_by_prefixes(self.tokenizer, text, [ids[i] for i in content])
        if words is None and fast:
            words = _words_by_offsets(text, [tuple(out["offset_mapping"][i]) for i in content])
        if words is None:
            log.warning("ELLA: the tokens of %s could not be matched to the words of %r; emphasis is ignored for it.",
                        self.name, text)
            return [-1] * len(ids)
        aligned = [-1] * len(ids)
        for position, word in zip(content, words):
            aligned[position] = word
        return aligned


def _words_by_offsets(text: str, spans: list[tuple[int, int]]) -> list[int]:
    """Each token's word from its character span: the word of the span's first non-space character (a span of
    spaces alone, such as a lone SentencePiece "▁", belongs to the word that follows)."""
    starts = [match.start() for match in _WORD.finditer(text)]
    if not starts:
        return [-1] * len(spans)
    words = []
    for start, _end in spans:
        found = _WORD.search(text, start)
        words.append(len(starts) - 1 if found is None else max(bisect.bisect_right(starts, found.start()) - 1, 0))
    return words


def _words_by_prefixes(tokenizer, text: str, content: list[int]) -> list[int] | None:
    """Word by word, for tokenizers without offsets: the first k words of ``text`` own the tokens that the prefix
    ending at word k shares with the whole text. None when the row's tokens are not the text's own."""
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if content != plain[: len(content)]:
        return None
    ends = [match.end() for match in _WORD.finditer(text)]
    if not ends:
        return [-1] * len(content)
    bounds, owned = [], 0
    for end in ends:
        prefix = tokenizer(text[:end], add_special_tokens=False)["input_ids"]
        owned = max(owned, _common_prefix(plain, prefix))
        bounds.append(owned)
    return [min(bisect.bisect_right(bounds, k), len(ends) - 1) for k in range(len(content))]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tensors(model):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _stack(rows: list[tuple[torch.Tensor, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(row.shape[0] for row, _ in rows)
    features = torch.zeros(len(rows), length, rows[0][0].shape[-1], device=device)
    for i, (row, _) in enumerate(rows):  # once per generation per new text, never on the per-call path
        features[i, : row.shape[0]] = row.to(device)
    real = torch.tensor([n for _, n in rows], device=device)
    mask = torch.arange(length, device=device)[None, :] < real[:, None]
    return features, mask


def load_text_encoder(
    path_or_id: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    layer: int = -1,
    cache: EncodingCache | None = None,
) -> TextEncoder:
    """Load an encoder from a local folder or a hub id.

    T5-family models run their encoder (``last_hidden_state``); any other model is treated as a decoder-only LLM
    and ``layer`` picks which hidden state is returned (-1: the last).
    """
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    name = str(path_or_id)
    config = read_config(name)
    if Path(name).expanduser().is_dir():  # before transformers can fall back to a pickle beside missing safetensors
        problem = encoder_folder_problem(Path(name).expanduser())
        if problem:
            raise TextEncoderError(f"The text encoder cannot be loaded: {problem}")
    tokenizer = read_tokenizer(name, config.model_type)
    model = read_model(name, config, dtype)
    model.requires_grad_(False)
    model.eval()
    # Every weight in the chosen dtype, as the reference runs T5 (``.to(device, dtype=torch.float16)``). transformers
    # may keep T5's ``wo`` in fp32 (only when accelerate is installed); the non-finite fallback covers overflow.
    model.to(device=device, dtype=dtype)
    is_t5 = config.model_type in T5_FAMILY
    log.info("ELLA: loaded text encoder %s (%s, %s) on %s", name, config.model_type, dtype, device)
    return TextEncoder(model, tokenizer, name, layer=None if is_t5 else layer, cache=cache)
