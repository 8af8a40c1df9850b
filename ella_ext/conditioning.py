"""One generation's conditioner: (text, timestep) per row -> ELLA context rows ``[rows, latents, width]``.

- The LLM runs once per distinct text (batched; its encodings are also cached across generations by the encoder).
  Call ``prepare(texts)`` when the generation starts, so the LLM never runs on the per-call path.
- A sampling pass whose calls are foreseen gets an arrangement (``arrange``): every (text, timestep) pair it will ask
  for, in a few large TSC passes ("chunks": whole timesteps, at most ``TSC_CHUNK`` pairs and ``PASS_BYTES`` of
  activations each). When the pass's rows fit in the memory given, every chunk is computed at once (before the
  pass's first call needs a row) and each call is a lookup: one gather. Otherwise each chunk is computed at the first
  call that needs one of its pairs, and only as many chunks as fit are kept. Either way a pair's row comes from the
  same TSC pass over the same pairs, so it is the same to the last bit whether it was computed ahead or at the call
  (a TSC pass over other rows can round differently: matrix products pick their kernels by shape).
- Pairs no arrangement foresaw (a sampler whose noise levels depend on its model's output, a schedule another
  extension changed, no arrangement at all) are computed per call as before: each call runs at most ONE batched TSC
  pass over the pairs it has not computed yet; identical rows are computed once, and a pair seen earlier in the
  generation is reused from a bounded cache.
- Results stay on the connector's device; no host-to-device copy of features after ``prepare``.
- A connector with an attention pool (SDXL's pooled text vector) pools each text once, in ``prepare``, from the same
  features and mask its TSC passes read; ``pooled(texts)`` gathers the rows' vectors. The pool has no timestep and
  reads no emphasis (as CLIP-G's pooled vector in the hosts ignores it): a text and its weighted form pool alike.
- A text is a ``str`` or a ``prompts.WeightedText`` (the same text with an emphasis per word): the key of a row is
  the text with its weights, so the same words with other weights are another row, while the LLM encodes the words
  once. A pass whose texts carry no weights hands the connector none (no extra work); a pass with some hands it
  ``[pairs, tokens]`` weights from the CPU, 1 for the rows without.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .connector import own_precision
from .errors import InputError
from .prompts import WeightedText, plain_text

log = logging.getLogger("ella")

TSC_CHUNK = 256  # the most pairs in one TSC pass of an arrangement
PASS_BYTES = 32 * 1024**2  # the activations one TSC pass of an arrangement may take (fewer pairs when they would not)

Key = tuple[int, float]  # (text index, timestep as a float32-rounded Python float)


class Conditioner:
    def __init__(self, connector, encoder, *, max_length: int | None = None, cache_entries: int = 1024):
        """``max_length=None``: flexible length (text positions masked); an int: the reference's fixed length."""
        encoder.check_fits(connector.config.in_width)
        self.connector = connector
        self.encoder = encoder
        self.max_length = max_length
        self.cache_entries = cache_entries
        self._index: dict[str, int] = {}
        self._features: torch.Tensor | None = None  # [texts, S, D] on the connector's device
        self._mask: torch.Tensor | None = None
        self._lengths: list[int] = []  # real tokens per text, kept on the host so no call has to sync for it
        self._weights: torch.Tensor | None = None  # [texts, S] on the CPU: each token's emphasis (1: none)
        self._weighted: list[bool] = []  # per text: whether any of its weights differs from 1
        self._rows: dict[tuple[str, ...], list[int]] = {}
        self.has_pool = bool(getattr(connector, "has_pool", False))
        self._pooled: torch.Tensor | None = None  # [texts, pooled_width] on the connector's device (with a pool)
        self._pooled_index: dict[tuple, torch.Tensor] = {}  # a call's row texts -> their text indices on the device
        self._pairs: OrderedDict[Key, torch.Tensor] = OrderedDict()  # pairs computed per call (bounded)
        # the arrangement of the current pass
        self._chunks: list[list[Key]] = []
        self._arranged: dict[Key, tuple[int, int]] = {}  # pair -> (chunk, row in the chunk's output)
        self._resident: OrderedDict[int, torch.Tensor] = OrderedDict()  # chunk -> its TSC output, newest last
        self._max_resident = 0
        self._gathers: dict[tuple, tuple[int, torch.Tensor]] = {}  # a call's rows -> (chunk, row index on device)
        self.ahead = False  # whether the current arrangement was computed before its calls
        self.tsc_passes = 0  # how many TSC passes ran: for tests and benchmarks
        self.tsc_pairs = 0

    # -- texts ---------------------------------------------------------------------------------------------------------

    def prepare(self, texts: Sequence[str | WeightedText]) -> None:
        """Encode the texts not seen yet in one LLM batch and keep their features on the connector's device."""
        new = list(dict.fromkeys(t for t in texts if t not in self._index))
        if not new:
            return
        features, mask = self.encoder.encode([plain_text(t) for t in new], self.max_length)
        self._add_weights(new, features.shape[1])
        features = features.to(self.connector.device, self.connector.dtype)
        mask = mask.to(self.connector.device)
        if self.has_pool:
            # fixed length reads every position, as the TSC passes do
            with torch.inference_mode(), own_precision(features.device):
                pooled = self.connector.pooled(features, mask if self.max_length is None else None)
            self._pooled = pooled if self._pooled is None else torch.cat([self._pooled, pooled])
        if self._features is None:
            self._features, self._mask = features, mask
        else:
            self._features, self._mask = _concat_padded(self._features, self._mask, features, mask)
        for text in new:
            self._index[text] = len(self._index)
        self._lengths += mask.sum(dim=1).tolist()
        self._rows.clear()

    def _add_weights(self, new: list[str | WeightedText], tokens: int) -> None:
        """The token weights of the new texts (computed once per text, here, beside the encoding)."""
        weights = torch.ones(len(new), tokens)
        for row, text in enumerate(new):
            if isinstance(text, WeightedText):
                found = self.encoder.token_weights(text.text, text.weights, self.max_length)
                weights[row, : found.shape[0]] = found
        self._weighted += (weights != 1).any(dim=1).tolist()
        if self._weights is None:
            self._weights = weights
        else:
            width = max(self._weights.shape[1], tokens)
            self._weights = torch.cat([_pad_ones(self._weights, width), _pad_ones(weights, width)])

    def needs_llm(self, texts: Sequence[str | WeightedText]) -> bool:
        """Whether ``prepare(texts)`` would run the LLM (some text is neither prepared nor in the encoder's cache)."""
        new = [plain_text(t) for t in dict.fromkeys(texts) if t not in self._index]
        return bool(new) and not self.encoder.is_cached(new, self.max_length)

    def _row_map(self, texts: Sequence[str | WeightedText]) -> list[int]:
        """The text index of each row (memoised per tuple of row texts)."""
        key = tuple(texts)
        found = self._rows.get(key)
        if found is None:
            self.prepare(key)
            found = self._rows[key] = [self._index[t] for t in key]
        return found

    # -- per call ------------------------------------------------------------------------------------------------------

    def pooled(self, texts: Sequence[str | WeightedText]) -> torch.Tensor | None:
        """The attention pool's vector of each row's text, ``[rows, pooled_width]`` on the connector's device,
        computed once per text in ``prepare`` (the per-call path gathers, nothing more); None without a pool."""
        if not self.has_pool:
            return None
        key = tuple(texts)
        index = self._pooled_index.get(key)
        if index is None:
            index = self._pooled_index[key] = torch.tensor(self._row_map(texts), device=self.connector.device)
        return self._pooled.index_select(0, index)

    def __call__(
        self, texts: Sequence[str | WeightedText], timesteps: torch.Tensor | Sequence[float] | float
    ) -> torch.Tensor:
        """Context rows for each (text, timestep) row: ``[rows, latents, out_width]`` on the connector's device."""
        if isinstance(texts, str) or not texts:
            raise InputError("The conditioner takes a non-empty list of texts, one per row.")
        return self._gather(self._row_map(texts), _as_floats(timesteps, len(texts)))

    def lookup(self, texts: Sequence[str], timesteps: Sequence[float]) -> torch.Tensor:
        """``self(texts, timesteps)`` for timesteps already given as ``timestep_keys`` gave them, one per row: the
        per-call path of a foreseen pass, which reads no tensor back."""
        if len(timesteps) != len(texts):
            raise InputError(f"Give one timestep per row: got {len(timesteps)} timesteps for {len(texts)} rows.")
        return self._gather(self._row_map(texts), timesteps)

    def _gather(self, indices: list[int], steps: Sequence[float]) -> torch.Tensor:
        memo = (tuple(indices), tuple(steps))
        found = self._gathers.get(memo)
        if found is not None:  # a foreseen call (or one seen before): one gather from one chunk
            chunk, index = found
            self._ensure(chunk, keep=(chunk,))
            return self._resident[chunk].index_select(0, index)
        keys = list(zip(indices, steps))
        unique = list(dict.fromkeys(keys))
        chunks = list(dict.fromkeys(self._arranged[k][0] for k in unique if k in self._arranged))
        for chunk in chunks:
            self._ensure(chunk, keep=chunks)
        loose = [k for k in unique if k not in self._arranged]
        for key in loose:  # refresh what is cached before anything new can evict it
            if key in self._pairs:
                self._pairs.move_to_end(key)
        self._compute([k for k in loose if k not in self._pairs], keep=len(loose))
        if not loose and len(chunks) == 1:
            index = torch.tensor([self._arranged[k][1] for k in keys], device=self.connector.device)
            self._gathers[memo] = (chunks[0], index)
            return self._resident[chunks[0]].index_select(0, index)
        results = torch.stack([self._row(k) for k in unique])
        if len(unique) == len(keys):
            return results
        position = {k: i for i, k in enumerate(unique)}
        return results[torch.tensor([position[k] for k in keys], device=results.device)]

    def _row(self, key: Key) -> torch.Tensor:
        found = self._arranged.get(key)
        if found is None:
            return self._pairs[key]
        return self._resident[found[0]][found[1]]

    # -- the arrangement of a pass -------------------------------------------------------------------------------------

    def arrange(self, calls: Sequence[Sequence[tuple[str, float]]], *, max_bytes: int | None = None) -> bool:
        """Arrange the TSC passes of a sampling pass: ``calls`` are the rows its calls will ask for, each call's
        (text, timestep) pairs in row order and the calls in the order they will come (timesteps as
        ``timestep_keys`` gives them). Every chunk is computed now when all the rows take at most ``max_bytes``
        (None: no bound); otherwise each is computed at the first call that needs it, keeping as many as
        ``max_bytes`` holds (at least one). Each call's gather (its rows' places in a chunk) is prepared now too, so
        that a foreseen call copies nothing to the device. Returns whether the rows were computed now. Replaces the
        previous arrangement."""
        self.forget_arrangement()
        calls = [list(call) for call in calls if call]
        if not calls:
            return False
        self.prepare(list(dict.fromkeys(text for call in calls for text, _ in call)))
        steps = iter(_as_floats([t for call in calls for _, t in call], None))
        call_keys = [[(self._index[text], next(steps)) for text, _ in call] for call in calls]
        keys = list(dict.fromkeys(key for call in call_keys for key in call))
        by_timestep: dict[float, list[Key]] = {}
        for key in keys:
            by_timestep.setdefault(key[1], []).append(key)
        per_pass = self._pairs_per_pass(self._longest(keys))
        chunks: list[list[Key]] = []
        for group in by_timestep.values():  # a chunk holds whole timesteps: a call's rows come from one chunk
            if chunks and len(chunks[-1]) + len(group) <= per_pass:
                chunks[-1] += group
            else:
                chunks.append(list(group))
        self._chunks = chunks
        self._arranged = {key: (c, r) for c, chunk in enumerate(chunks) for r, key in enumerate(chunk)}
        for call in call_keys:
            places = [self._arranged[key] for key in call]
            if all(chunk == places[0][0] for chunk, _ in places):
                index = torch.tensor([row for _, row in places], device=self.connector.device)
                self._gathers[(tuple(i for i, _ in call), tuple(t for _, t in call))] = (places[0][0], index)
        row_bytes = self._row_bytes()
        self.ahead = max_bytes is None or len(keys) * row_bytes <= max_bytes
        chunk_bytes = max(len(chunk) for chunk in chunks) * row_bytes
        self._max_resident = len(chunks) if self.ahead else max(1, max_bytes // chunk_bytes)
        if self.ahead:
            for chunk in range(len(chunks)):
                self._ensure(chunk)
        return self.ahead

    def precompute(self, timesteps: Sequence[float], texts: Sequence[str] | None = None) -> None:
        """Arrange and compute every (text, timestep) pair of ``texts`` (default: every prepared text) x
        ``timesteps`` now."""
        if texts is not None:
            self.prepare(texts)
        texts = list(dict.fromkeys(texts)) if texts is not None else list(self._index)
        self.arrange([[(text, t) for text in texts] for t in _as_floats(timesteps, None)])

    def forget_arrangement(self) -> None:
        self._chunks = []
        self._arranged.clear()
        self._resident.clear()
        self._gathers.clear()
        self._max_resident = 0
        self.ahead = False

    def _ensure(self, chunk: int, keep: Sequence[int] = ()) -> None:
        """The chunk's rows resident: computed in one TSC pass if they are not; the least recently used chunks beyond
        the bound are dropped, but never one in ``keep`` (the current call's)."""
        if chunk in self._resident:
            self._resident.move_to_end(chunk)
            return
        self._resident[chunk] = self._pass(self._chunks[chunk])
        for victim in [c for c in self._resident if c != chunk and c not in keep]:
            if len(self._resident) <= self._max_resident:
                break
            del self._resident[victim]

    def _longest(self, keys: Sequence[Key]) -> int:
        if self.max_length is not None:
            return self._features.shape[1]
        return max(self._lengths[i] for i, _ in keys)

    def _pairs_per_pass(self, text_tokens: int) -> int:
        per_pair = self._activation_elements(text_tokens) * self.connector.dtype.itemsize
        return max(1, min(TSC_CHUNK, PASS_BYTES // per_pair))

    # -- TSC passes ----------------------------------------------------------------------------------------------------

    def _pass(self, pairs: list[Key]) -> torch.Tensor:
        """One TSC pass over ``pairs``: their rows, ``[pairs, latents, out_width]``."""
        device = self.connector.device
        text_index = torch.tensor([i for i, _ in pairs], device=device)
        timesteps = torch.tensor([t for _, t in pairs], dtype=torch.float32, device=device)
        features = self._features.index_select(0, text_index)
        mask = None
        if self.max_length is None:  # flexible: mask the padding, and cut it down to this pass's longest text
            longest = max(self._lengths[i] for i, _ in pairs)
            features, mask = features[:, :longest], self._mask.index_select(0, text_index)[:, :longest]
        weights = None
        if any(self._weighted[i] for i, _ in pairs):  # else none: an unweighted pass costs nothing extra
            rows = torch.tensor([i for i, _ in pairs])
            weights = self._weights.index_select(0, rows)[:, : features.shape[1]]
        with torch.inference_mode(), own_precision(device):
            out = self.connector(features, timesteps, mask, weights)
        self.tsc_passes += 1
        self.tsc_pairs += len(pairs)
        return out

    def _compute(self, pairs: list[Key], keep: int = 0) -> None:
        """Run one TSC pass over ``pairs`` and cache the rows; evict the oldest beyond the bound, but never the
        ``keep`` most recent entries (the current call's)."""
        if not pairs:
            return
        for key, row in zip(pairs, self._pass(pairs).unbind(0)):
            self._pairs[key] = row
        while len(self._pairs) > max(self.cache_entries, keep):
            self._pairs.popitem(last=False)

    # -- memory --------------------------------------------------------------------------------------------------------

    def _activation_elements(self, text_tokens: int) -> int:
        """Elements one row of a TSC pass allocates beyond the weights and the prepared features."""
        cfg = self.connector.config
        tokens = cfg.num_latents + text_tokens
        return (text_tokens * cfg.in_width  # the features gathered for the pass
                + 8 * tokens * cfg.width  # projected text, norms, keys and values of latents and text
                + cfg.heads * cfg.num_latents * tokens  # attention scores
                + 8 * cfg.num_latents * cfg.width)  # modulated latents and the 4x MLP

    def _row_bytes(self) -> int:
        cfg = self.connector.config
        return cfg.num_latents * cfg.out_width * self.connector.dtype.itemsize

    def working_bytes(self, rows: int, calls: int, ahead_bytes: int = 0) -> int:
        """A bound on the accelerator memory a pass of ``calls`` calls of ``rows`` rows allocates beyond what is
        resident now (weights and prepared features): its largest TSC pass (an arranged chunk, or one call's rows),
        the arranged rows it keeps (``ahead_bytes`` computed ahead, or one chunk), and the results the per-call cache
        can gain."""
        text = 0 if self._features is None else self._features.shape[1]
        pairs = rows * calls  # the most (text, timestep) pairs the pass can ask for
        pass_rows = max(rows, min(pairs, self._pairs_per_pass(text)))
        row_bytes = self._row_bytes()
        arranged = min(pairs * row_bytes, max(ahead_bytes, pass_rows * row_bytes))
        new_pairs = min(max(self.cache_entries - len(self._pairs), 0), pairs)  # a full cache evicts instead
        activations = pass_rows * self._activation_elements(text) * self.connector.dtype.itemsize
        return activations + arranged + new_pairs * row_bytes

    def release(self) -> None:
        """Drop everything this generation holds (call after the generation)."""
        self._features = self._mask = self._weights = self._pooled = None
        self._pooled_index.clear()
        self._lengths = []
        self._weighted = []
        self._index.clear()
        self._rows.clear()
        self._pairs.clear()
        self.forget_arrangement()


def timestep_keys(timesteps: torch.Tensor | Sequence[float] | float) -> list[float]:
    """Timesteps as the conditioner keys them: Python floats rounded through float32 (read back once if on a GPU)."""
    return _as_floats(timesteps, None)


def _as_floats(timesteps, rows: int | None) -> list[float]:
    """Timesteps as Python floats rounded through float32 (the TSC's precision), so that 412.37 given as a number
    and as a float32 tensor are the same cache key. A tensor on the GPU is read back once (one sync)."""
    if isinstance(timesteps, torch.Tensor):
        values = timesteps.detach().float().reshape(-1).cpu().tolist()
    else:
        numbers = [timesteps] if isinstance(timesteps, (int, float)) else list(timesteps)
        values = torch.tensor(numbers, dtype=torch.float32).tolist()
    if rows is not None:
        if len(values) == 1:
            values = values * rows
        elif len(values) != rows:
            raise InputError(f"Give one timestep or one per row: got {len(values)} timesteps for {rows} rows.")
    return values


def _pad_ones(weights: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(weights, (0, width - weights.shape[1]), value=1.0)


def _concat_padded(a: torch.Tensor, a_mask: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor):
    length = max(a.shape[1], b.shape[1])

    def pad(x, m):
        extra = length - x.shape[1]
        if extra == 0:
            return x, m
        return torch.nn.functional.pad(x, (0, 0, 0, extra)), torch.nn.functional.pad(m, (0, extra))

    (a, a_mask), (b, b_mask) = pad(a, a_mask), pad(b, b_mask)
    return torch.cat([a, b]), torch.cat([a_mask, b_mask])
