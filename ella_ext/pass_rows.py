"""What a WebUI generation needs between the host's tensors and the conditioner, host-free.

- ``PassTexts``: for one sampling pass (first pass or hires), the LLM text of every cond row (one per ``AND``
  sub-prompt, image by image, in the host's order) and of every uncond row, at any sampler call; schedules are parsed
  once per pass, so a call only looks texts up. With emphasis on, a text whose words do not all weigh 1 is a
  ``WeightedText``.
- ``row_timesteps``: the timestep of each cond and uncond row, whether the host stacks cond and uncond rows in its
  sigma (A1111) or gives one sigma per image (Forge).
- ``assemble``: ELLA rows -> the host's context tensor (CLIP concatenated or not, ControlNet's marker row kept,
  the host's dtype and device).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import InputError
from .prompts import WeightedText, clean_text, llm_text, prompt_schedule, split_and, strip_extra_networks

# sd-webui-controlnet marks every context row with a first token of +-1024 (scripts/hook.py, POSITIVE_MARK_TOKEN).
CONTROLNET_MARK = 1024.0


@dataclass(frozen=True)
class Schedule:
    """One row's ``(end_step, LLM text)`` entries, as the host resolves them at a call's step."""

    entries: tuple[tuple[int, str | WeightedText], ...]

    def at(self, step: int) -> str | WeightedText:
        for end, text in self.entries:
            if step <= end:
                return text
        return self.entries[0][1]  # the host's answer past the last entry


def _schedule(text: str, steps: int, hires_steps: int | None, use_old_scheduling: bool, emphasis: bool,
              out_of_range: list[float]) -> Schedule:
    """The row's schedule; with ``emphasis``, the multipliers outside the allowed range are added to
    ``out_of_range`` (they are clamped)."""
    entries = prompt_schedule(text, steps, hires_steps, use_old_scheduling)
    if not emphasis:
        return Schedule(tuple((end, clean_text(part)) for end, part in entries))
    texts = []
    for end, part in entries:
        found, clamped = llm_text(part)
        out_of_range += clamped
        texts.append((end, found))
    return Schedule(tuple(texts))


class PassTexts:
    """LLM texts for the rows of one sampling pass.

    ``prompts`` / ``negatives``: the host's per-image prompts of the current batch (extra-network tags may still be
    in them: they are removed). ``steps`` / ``hires_steps``: what the host hands its prompt schedules (for the hires
    pass: the first pass's total steps and the hires pass's). ``llm_prompt``: a separate prompt for the LLM; per image,
    an ``AND`` part of it replaces the same part of the prompt when both have as many parts, and a single-part LLM
    prompt replaces every part. ``empty_negative``: uncond rows read the empty string (the reference's setting).
    ``emphasis``: the prompt's emphasis weights the connector's attention to each word (``prompts.llm_text``); the
    multipliers that had to be clamped are in ``out_of_range``.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        negatives: Sequence[str],
        steps: int,
        hires_steps: int | None = None,
        *,
        llm_prompt: str = "",
        empty_negative: bool = False,
        use_old_scheduling: bool = False,
        emphasis: bool = False,
    ):
        self.out_of_range: list[float] = []

        def schedule(text: str) -> Schedule:
            return _schedule(text, steps, hires_steps, use_old_scheduling, emphasis, self.out_of_range)

        self.cond: list[list[Schedule]] = [
            [schedule(part) for part in _llm_parts(prompt, llm_prompt)] for prompt in prompts
        ]
        negatives = [""] * len(negatives) if empty_negative else negatives
        self.uncond: list[Schedule] = [schedule(strip_extra_networks(text)) for text in negatives]
        self.counts = [len(parts) for parts in self.cond]
        self.max_calls = steps if hires_steps is None else hires_steps  # the most denoiser calls the pass makes
        self._rows = [row for parts in self.cond for row in parts]
        self._at: dict[int, tuple[list[str | WeightedText], list[str | WeightedText]]] = {}

    @property
    def cond_rows(self) -> int:
        return len(self._rows)

    @property
    def uncond_rows(self) -> int:
        return len(self.uncond)

    def at(self, step: int) -> tuple[list[str | WeightedText], list[str | WeightedText]]:
        """``(cond texts, uncond texts)`` at the host's step counter (memoised: a pass has few steps)."""
        found = self._at.get(step)
        if found is None:
            found = self._at[step] = ([r.at(step) for r in self._rows], [r.at(step) for r in self.uncond])
        return found

    def every_text(self) -> list[str | WeightedText]:
        """Every text any call of this pass can ask for, each once (to encode them all before sampling)."""
        texts = (text for row in [*self._rows, *self.uncond] for _, text in row.entries)
        return list(dict.fromkeys(texts))


def _llm_parts(prompt: str, llm_prompt: str) -> list[str]:
    parts = [text for text, _ in split_and(strip_extra_networks(prompt))]
    if not llm_prompt.strip():
        return parts
    llm_parts = [text for text, _ in split_and(strip_extra_networks(llm_prompt))]
    if len(llm_parts) == 1:
        return llm_parts * len(parts)
    if len(llm_parts) == len(parts):
        return llm_parts
    raise InputError(
        f"The ELLA prompt has {len(llm_parts)} AND parts but the prompt has {len(parts)}: give the ELLA prompt "
        "one part, or as many parts as the prompt."
    )


def row_timesteps(
    timesteps: torch.Tensor, counts: Sequence[int], uncond_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-row timesteps into (cond rows, uncond rows).

    ``timesteps`` either has one value per cond row followed by one per uncond row (A1111 stacks them so), or one
    value per image (Forge; image ``i`` owns ``counts[i]`` cond rows and uncond row ``i``), or a single value.
    """
    timesteps = timesteps.reshape(-1)
    cond_rows = sum(counts)
    if timesteps.numel() >= cond_rows + uncond_rows:
        return timesteps[:cond_rows], timesteps[cond_rows : cond_rows + uncond_rows]
    images = len(counts)
    if timesteps.numel() == 1:
        timesteps = timesteps.expand(images)
    if timesteps.numel() != images:
        raise InputError(
            f"ELLA: the sampler gave {timesteps.numel()} timesteps for {images} images and {cond_rows} prompt rows."
        )
    owner = torch.repeat_interleave(torch.arange(images), torch.tensor(counts)).to(timesteps.device)
    return timesteps[owner], timesteps[:uncond_rows]


def has_controlnet_mark(context: torch.Tensor) -> bool:
    """True when every row starts with sd-webui-controlnet's +-1024 marker token."""
    if context.ndim != 3 or context.shape[1] < 2:
        return False
    first = context[:, 0].float().abs()
    return bool(((first - CONTROLNET_MARK).abs() < 1e-3).all())


def assemble(ella: torch.Tensor, host: torch.Tensor, *, with_clip: bool, marked: bool) -> torch.Tensor:
    """The context to hand back in place of ``host`` ([rows, tokens, width]).

    ``ella``: the connector's rows for the same rows. ``with_clip``: append the host's CLIP tokens after ELLA's (the
    "ELLA + CLIP" mode). ``marked``: the host rows carry ControlNet's marker token first; it stays first.
    """
    if ella.shape[0] != host.shape[0] or ella.shape[-1] != host.shape[-1]:
        raise InputError(
            f"ELLA: the connector gave {tuple(ella.shape)} for a context of {tuple(host.shape)}; its width must be "
            f"the checkpoint's ({host.shape[-1]})."
        )
    ella = ella.to(device=host.device, dtype=host.dtype)
    clip = host[:, 1:] if marked else host
    parts = [host[:, :1]] if marked else []
    parts.append(ella)
    if with_clip:
        parts.append(clip)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
