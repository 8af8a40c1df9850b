"""A sampling pass's calls foreseen: at each call, which (text, timestep) pair each row will ask for, host-free.

``Foreseen`` is what a dry run of the pass's sampler found (``sampler_probe``): the noise level it hands the denoiser
at each call, in call order. ``plan_pass`` turns it into a ``PassPlan`` at the pass's first call, with the host's own
functions, so that nothing is derived differently from the per-call path:
- ``callback_sigma``: the noise level the denoiser callback will see for what the sampler hands the denoiser (the
  same, or Forge's conversion of a timestep sampler's timestep to a sigma);
- ``timesteps_of``: the host's mapping of a callback's sigma column to each row's timestep, applied to a column of the
  same shape, dtype and device as the call's (elementwise kernels can round a value differently by its position in a
  tensor, so the column is built as the call will build it);
- then the rows are split and keyed as the per-call path splits and keys them (``row_timesteps``,
  ``timestep_keys``), and each call's texts are the pass's schedule at that call's step (prompt editing: a text only
  for the steps it covers).
At a call, ``PassPlan.timesteps`` gives the rows' timestep keys for the call's sigma column as read back from the
host, or nothing for a column that was not foreseen (that call is then computed per call).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .conditioning import timestep_keys
from .pass_rows import PassTexts, row_timesteps


@dataclass
class Foreseen:
    """The noise level a pass's sampler will hand ``denoiser`` at each call (one value per image), in call order."""

    denoiser: Any
    sigmas: list[torch.Tensor]
    hires: bool
    batch: int


@dataclass
class PassPlan:
    denoiser: Any
    hires: bool
    batch: int
    source: Any  # what maps sigmas to timesteps at this pass's calls (a refiner switch replaces it)
    uncond_rows: int
    timesteps: dict[tuple[float, ...], list[float]] = field(default_factory=dict)  # sigma column -> rows' keys
    calls: list[list[tuple[str, float]]] = field(default_factory=list)  # each foreseen call's (text, timestep) rows

    def fits(self, denoiser: Any, hires: bool, batch: int, uncond_rows: int, source: Any) -> bool:
        return (denoiser is self.denoiser and hires == self.hires and batch == self.batch
                and uncond_rows == self.uncond_rows and source is self.source)


def column_key(sigma: torch.Tensor) -> tuple[float, ...] | None:
    """A call's sigma column as a lookup key (read back from the device: the call's one sync)."""
    if not isinstance(sigma, torch.Tensor) or sigma.dim() != 1:
        return None
    return tuple(sigma.tolist())


def plan_pass(
    foreseen: Foreseen,
    texts: PassTexts,
    column: torch.Tensor,
    uncond_rows: int,
    callback_sigma: Callable[[torch.Tensor], torch.Tensor],
    timesteps_of: Callable[[torch.Tensor], torch.Tensor],
    source: Any,
) -> PassPlan | None:
    """The plan of a pass from its first call's sigma ``column``; None when the first call is not the foreseen one
    (the dry run did not predict this pass) or the column cannot be keyed."""
    plan = PassPlan(foreseen.denoiser, foreseen.hires, foreseen.batch, source, uncond_rows)
    first = column_key(column)
    if first is None:
        return None
    for step, sigma in enumerate(foreseen.sigmas):
        values = callback_sigma(sigma).reshape(-1).tolist()
        if not values or any(v != values[0] for v in values):  # images at different noise levels: not foreseen
            continue
        like = torch.full_like(column, values[0])
        key = tuple(like.tolist())
        keys = plan.timesteps.get(key)
        if keys is None:
            cond_t, uncond_t = row_timesteps(timesteps_of(like), texts.counts, uncond_rows)
            keys = plan.timesteps[key] = timestep_keys(torch.cat([cond_t, uncond_t]))
        cond_texts, uncond_texts = texts.at(step)
        plan.calls.append(list(zip([*cond_texts, *uncond_texts[:uncond_rows]], keys)))
    if first not in plan.timesteps:
        return None
    return plan
