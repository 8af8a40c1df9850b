"""One generation's conditioner: (text, timestep) per row -> ELLA context rows ``[rows, latents, width]``.

- The LLM runs once per distinct text (batched; its encodings are also cached across generations by the encoder).
  Call ``prepare(texts)`` when the generation starts, so the LLM never runs on the per-call path.
- Each call runs at most ONE batched TSC pass, over the (text, timestep) pairs it has not computed yet; identical rows
  are computed once, and a pair seen earlier in the generation (second-order samplers evaluate the next step's sigma
  twice) is reused. ``precompute(timesteps)`` can compute a whole schedule in a few large passes up front.
- Results stay on the connector's device; no host-to-device copy of features after ``prepare``.
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

from .errors import InputError
from .prompts import WeightedText, plain_text

log = logging.getLogger("ella")

TSC_CHUNK = 256  # pairs per TSC pass in precompute(), to bound activation memory


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
        self._pairs: OrderedDict[tuple[int, float], torch.Tensor] = OrderedDict()
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

    def __call__(
        self, texts: Sequence[str | WeightedText], timesteps: torch.Tensor | Sequence[float] | float
    ) -> torch.Tensor:
        """Context rows for each (text, timestep) row: ``[rows, latents, out_width]`` on the connector's device."""
        if isinstance(texts, str) or not texts:
            raise InputError("The conditioner takes a non-empty list of texts, one per row.")
        rows = len(texts)
        steps = _as_floats(timesteps, rows)
        keys = list(zip(self._row_map(texts), steps))
        unique = list(dict.fromkeys(keys))
        for key in unique:  # refresh what is cached before anything new can evict it
            if key in self._pairs:
                self._pairs.move_to_end(key)
        self._compute([k for k in unique if k not in self._pairs], keep=len(unique))
        results = torch.stack([self._pairs[k] for k in unique])
        if len(unique) == rows:
            return results
        position = {k: i for i, k in enumerate(unique)}
        return results[torch.tensor([position[k] for k in keys], device=results.device)]

    def precompute(self, timesteps: Sequence[float], texts: Sequence[str] | None = None) -> None:
        """Compute every (text, timestep) pair up front, in passes of at most ``TSC_CHUNK`` pairs."""
        if texts is not None:
            self.prepare(texts)
        indices = [self._index[t] for t in texts] if texts is not None else list(self._index.values())
        steps = _as_floats(timesteps, None)
        pairs = [(i, t) for t in dict.fromkeys(steps) for i in dict.fromkeys(indices) if (i, t) not in self._pairs]
        if len(self._pairs) + len(pairs) > self.cache_entries:
            log.info("ELLA: raising the conditioner's cache from %d to %d pairs to hold the precomputed schedule",
                     self.cache_entries, len(self._pairs) + len(pairs))
            self.cache_entries = len(self._pairs) + len(pairs)
        for start in range(0, len(pairs), TSC_CHUNK):
            self._compute(pairs[start : start + TSC_CHUNK])

    def _compute(self, pairs: list[tuple[int, float]], keep: int = 0) -> None:
        """Run one TSC pass over ``pairs`` and cache the rows; evict the oldest beyond the bound, but never the
        ``keep`` most recent entries (the current call's)."""
        if not pairs:
            return
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
        with torch.inference_mode():
            out = self.connector(features, timesteps, mask, weights)
        self.tsc_passes += 1
        self.tsc_pairs += len(pairs)
        for key, row in zip(pairs, out.unbind(0)):
            self._pairs[key] = row
        while len(self._pairs) > max(self.cache_entries, keep):
            self._pairs.popitem(last=False)

    def working_bytes(self, rows: int, calls: int) -> int:
        """A bound on the accelerator memory ``calls`` calls of ``rows`` rows allocate beyond what is resident now
        (weights and prepared features): one TSC pass over ``rows`` pairs, plus the results the cache can gain."""
        cfg = self.connector.config
        text = 0 if self._features is None else self._features.shape[1]
        tokens = cfg.num_latents + text
        per_row = (text * cfg.in_width  # the features gathered for the pass
                   + 8 * tokens * cfg.width  # projected text, norms, keys and values of latents and text
                   + cfg.heads * cfg.num_latents * tokens  # attention scores
                   + 8 * cfg.num_latents * cfg.width)  # modulated latents and the 4x MLP
        new_pairs = min(max(self.cache_entries - len(self._pairs), 0), rows * calls)  # a full cache evicts instead
        cached = new_pairs * cfg.num_latents * cfg.out_width
        return (rows * per_row + cached) * self.connector.dtype.itemsize

    def release(self) -> None:
        """Drop everything this generation holds (call after the generation)."""
        self._features = self._mask = self._weights = None
        self._lengths = []
        self._weighted = []
        self._index.clear()
        self._rows.clear()
        self._pairs.clear()


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
