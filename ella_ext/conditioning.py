"""One generation's conditioner: (text, timestep) per row -> ELLA context rows ``[rows, latents, width]``.

- The LLM runs once per distinct text (batched; its encodings are also cached across generations by the encoder).
  Call ``prepare(texts)`` when the generation starts, so the LLM never runs on the per-call path.
- Each call runs at most ONE batched TSC pass, over the (text, timestep) pairs it has not computed yet; identical rows
  are computed once, and a pair seen earlier in the generation (second-order samplers evaluate the next step's sigma
  twice) is reused. ``precompute(timesteps)`` can compute a whole schedule in a few large passes up front.
- Results stay on the connector's device; no host-to-device copy of features after ``prepare``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from .errors import InputError

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
        self._rows: dict[tuple[str, ...], tuple[list[int], torch.Tensor]] = {}
        self._pairs: OrderedDict[tuple[int, float], torch.Tensor] = OrderedDict()
        self.tsc_passes = 0  # how many TSC passes ran: for tests and benchmarks
        self.tsc_pairs = 0

    # -- texts ---------------------------------------------------------------------------------------------------------

    def prepare(self, texts: Sequence[str]) -> None:
        """Encode the texts not seen yet in one LLM batch and keep their features on the connector's device."""
        new = list(dict.fromkeys(t for t in texts if t not in self._index))
        if not new:
            return
        features, mask = self.encoder.encode(new, self.max_length)
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

    def _row_map(self, texts: Sequence[str]) -> tuple[list[int], torch.Tensor]:
        """For a tuple of row texts: their text indices, and the same as a tensor on the device (memoised)."""
        key = tuple(texts)
        found = self._rows.get(key)
        if found is None:
            self.prepare(key)
            indices = [self._index[t] for t in key]
            found = (indices, torch.tensor(indices, device=self.connector.device))
            self._rows[key] = found
        return found

    # -- per call ------------------------------------------------------------------------------------------------------

    def __call__(self, texts: Sequence[str], timesteps: torch.Tensor | Sequence[float] | float) -> torch.Tensor:
        """Context rows for each (text, timestep) row: ``[rows, latents, out_width]`` on the connector's device."""
        if isinstance(texts, str) or not texts:
            raise InputError("The conditioner takes a non-empty list of texts, one per row.")
        rows = len(texts)
        steps = _as_floats(timesteps, rows)
        text_rows, _ = self._row_map(texts)
        keys = list(zip(text_rows, steps))
        unique = list(dict.fromkeys(keys))
        self._compute([k for k in unique if k not in self._pairs])
        results = torch.stack([self._remember(k) for k in unique])
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
        for start in range(0, len(pairs), TSC_CHUNK):
            self._compute(pairs[start : start + TSC_CHUNK])

    def _compute(self, pairs: list[tuple[int, float]]) -> None:
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
        with torch.inference_mode():
            out = self.connector(features, timesteps, mask)
        self.tsc_passes += 1
        self.tsc_pairs += len(pairs)
        for key, row in zip(pairs, out.unbind(0)):
            self._pairs[key] = row
        while len(self._pairs) > self.cache_entries:
            self._pairs.popitem(last=False)

    def _remember(self, key: tuple[int, float]) -> torch.Tensor:
        self._pairs.move_to_end(key)
        return self._pairs[key]

    def release(self) -> None:
        """Drop everything this generation holds (call after the generation)."""
        self._features = self._mask = None
        self._lengths = []
        self._index.clear()
        self._rows.clear()
        self._pairs.clear()


def _as_floats(timesteps, rows: int | None) -> list[float]:
    if isinstance(timesteps, torch.Tensor):
        values = timesteps.detach().float().reshape(-1).cpu().tolist()
    elif isinstance(timesteps, (int, float)):
        values = [float(timesteps)]
    else:
        values = [float(t) for t in timesteps]
    if rows is not None:
        if len(values) == 1:
            values = values * rows
        elif len(values) != rows:
            raise InputError(f"Give one timestep or one per row: got {len(values)} timesteps for {rows} rows.")
    return values


def _concat_padded(a: torch.Tensor, a_mask: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor):
    length = max(a.shape[1], b.shape[1])

    def pad(x, m):
        extra = length - x.shape[1]
        if extra == 0:
            return x, m
        return torch.nn.functional.pad(x, (0, 0, 0, extra)), torch.nn.functional.pad(m, (0, extra))

    (a, a_mask), (b, b_mask) = pad(a, a_mask), pad(b, b_mask)
    return torch.cat([a, b]), torch.cat([a_mask, b_mask])


def concat_with_clip(ella: torch.Tensor, clip: torch.Tensor, ella_first: bool = True) -> torch.Tensor:
    """ELLA's tokens and CLIP's along the token axis (``[R, 64 + 77k, W]``), in CLIP's dtype and device."""
    if ella.shape[0] != clip.shape[0] or ella.shape[-1] != clip.shape[-1]:
        raise InputError(
            f"ELLA + CLIP needs the same rows and width: ELLA gives {list(ella.shape)}, CLIP {list(clip.shape)}. "
            "The connector's output width must match the checkpoint's text width."
        )
    ella = ella.to(device=clip.device, dtype=clip.dtype)
    return torch.cat([ella, clip] if ella_first else [clip, ella], dim=1)
