"""WebUI prompt syntax -> the text the LLM (T5) reads, with AUTOMATIC1111 v1.10.1 semantics.

Host-free: standard library only.  The host facts mirrored here come from AUTOMATIC1111/stable-diffusion-webui
v1.10.1 (commit 82a973c0): ``modules/prompt_parser.py`` (schedules, AND, emphasis, BREAK),
``modules/extra_networks.py`` (``<name:args>`` tags), ``modules/processing.py`` (the order in which they apply) and
``modules/sd_samplers_cfg_denoiser.py`` (which schedule entry a sampling step uses).

Public names
------------
``strip_extra_networks(prompt) -> str``
    Remove ``<lora:name:1>``-style tags (host ``re_extra_net``).
``split_and(prompt) -> list[tuple[str, float]]``
    ``AND`` sub-prompts with their ``:weight``, in host order (host ``get_multicond_prompt_list``).
``prompt_schedule(prompt, steps, hires_steps=None, use_old_scheduling=False) -> list[tuple[int, str]]``
    ``(end_step, text)`` pairs, the host's ``get_learned_conditioning_prompt_schedules`` for one prompt.
``attention_segments(text) -> list[tuple[str, float]]``
    The host's ``parse_prompt_attention``: text runs and their emphasis multipliers, ``("BREAK", -1.0)`` markers.
``emphasis_weights(text) -> tuple[str, list[float]]``
    The cleaned text and one emphasis multiplier per word of it.
``clean_text(text) -> str``
    Emphasis brackets, escapes and BREAK removed, whitespace normalised.
``llm_text(text) -> tuple[str | WeightedText, list[float]]``
    What the LLM reads with emphasis on: the clean text alone when every word weighs 1, else a ``WeightedText``
    (weights clamped to ``[0, MAX_EMPHASIS]``); and the weights that were out of range.

Steps
-----
``steps`` is the number the host hands the schedule (the sampler's total steps); ``step`` is the host's
``current_step``: the CFG denoiser's call counter, 0 for the first call.  The host picks the first entry with
``step <= end_step`` and, when none fits (``step > steps``), the first entry.  For the hires pass give ``hires_steps``
(the hires pass's steps); ``steps`` is then the first pass's steps and ``step`` counts from 0 again.

Decisions for the LLM text (where the host has no opinion, since CLIP never sees a plain string)
-----------------------------------------------------------------------------------------------
* Whitespace: every run of whitespace (newlines included) becomes one space; the ends are stripped.  Removed
  syntax therefore never leaves a double space.  Punctuation is left alone (``"a [b:3], c"`` -> ``"a , c"``).
* BREAK: each host break (``\\s*\\bBREAK\\b\\s*``) becomes a word boundary.  It is removed even where the host keeps
  the word (inside brackets the host multiplies the marker's weight, so CLIP then reads a literal ``BREAK``).
* Extra-network tags are removed from negative prompts too (the host strips them from positive prompts only).
* A word's multiplier is the one that covers most of its letters and digits (all its characters if it has none);
  a tie goes to the earliest.
* Duplicate ``AND`` sub-prompts stay separate rows (the host encodes a text once but keeps one row per sub-prompt).
* Prompts the host's grammar cannot parse (a ``|`` outside ``[a|b]``, a trailing ``\\``) keep their text unchanged,
  as in the host.  Where a well-formed ``[a:b:N]`` or ``[a|b]`` sits beside unmatched brackets or extra colons
  (``[a:3]]``, ``(::[a:3])``) the host's lark parser is ambiguous and its answer changes from process to process
  (it follows the string hash seed); here a well-formed ``[...]`` is always read as scheduling.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from ella_ext.errors import InputError

__all__ = [
    "MAX_EMPHASIS",
    "WeightedText",
    "attention_segments",
    "clean_text",
    "emphasis_weights",
    "llm_text",
    "plain_text",
    "prompt_schedule",
    "split_and",
    "strip_extra_networks",
]

# extra_networks.py: a tag is "<" word ":" anything-but-">" ">".
_EXTRA_NETWORK = re.compile(r"<\w+:[^>]+>")
# prompt_parser.py re_AND / re_weight: split on the word AND; a trailing ":number" is the sub-prompt's weight.
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.DOTALL)
# prompt_parser.py re_break.
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
# Schedule grammar terminals: an escape pair (backslash + any char but newline), a plain run, or one other char.
_SCHEDULE_TOKEN = re.compile(r"\\[^\n]|[^\\\[\]():|]+|[\s\S]")
# lark's SIGNED_NUMBER (ASCII digits, optional exponent) with the optional WHITESPACE around it.
_SWITCH_NUMBER = re.compile(r"\s*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*")
# prompt_parser.py re_attention, same tokens in the same priority.
_ATTENTION_TOKEN = re.compile(r"\\[()\[\]\\]|\\|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")

_ROUND_MULTIPLIER = 1.1
_SQUARE_MULTIPLIER = 1 / 1.1
_CLOSER = {"(": ")", "[": "]"}


# --------------------------------------------------------------------------------------------------- extra networks


def strip_extra_networks(prompt: str) -> str:
    """Remove every ``<name:args>`` extra-network tag, as the host does before any other parsing."""
    return _EXTRA_NETWORK.sub("", prompt)


# -------------------------------------------------------------------------------------------------------------- AND


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split on ``AND`` and read each part's trailing ``:weight`` (default 1.0), in host order.

    The text keeps its leading whitespace and loses its trailing whitespace, exactly as the host hands it on.
    """
    rows = []
    for part in _AND.split(prompt):
        match = _WEIGHT.search(part)
        assert match is not None  # the pattern matches every string
        text, weight = match.group(1), match.group(2)
        rows.append((text, float(weight) if weight is not None else 1.0))
    return rows


# ------------------------------------------------------------------------------------------------ schedule parsing


@dataclass(frozen=True)
class _Scheduled:
    """``[before:after:N]``; ``before`` is None for ``[after:N]``."""

    before: tuple[_Item, ...] | None
    after: tuple[_Item, ...]
    number: str


@dataclass(frozen=True)
class _Alternate:
    """``[a|b|...]``."""

    options: tuple[tuple[_Item, ...], ...]


_Item = str | _Scheduled | _Alternate


@dataclass
class _Frame:
    """An open ``(`` or ``[`` and what has been read inside it so far."""

    opener: str
    segments: list[list[_Item]]
    separators: list[str]


class _Unparseable(Exception):
    """The host's grammar rejects the prompt; the host then uses the prompt unchanged."""


def _parse(prompt: str) -> list[_Item]:
    """Read a prompt into text pieces and scheduling nodes, without recursion.

    Brackets can only nest, never cross, so one pass with a stack of open frames decides every bracket: a frame
    that closes well-formed becomes a node (emphasis stays text), and one that cannot makes its opener, and every
    frame around it, stray text (the grammar allows stray brackets and colons only at the top level).
    """
    top: list[_Item] = []
    frames: list[_Frame] = []
    for token in _SCHEDULE_TOKEN.findall(prompt):
        if token in ("(", "["):
            frames.append(_Frame(token, [[]], []))
        elif token in (":", "|") and frames:
            frames[-1].separators.append(token)
            frames[-1].segments.append([])
        elif token in (")", "]") and frames:
            _close_frame(frames, top, token)
        elif token in ("|", "\\"):
            raise _Unparseable
        else:
            (frames[-1].segments[-1] if frames else top).append(token)
    _collapse(frames, top)
    return top


def _close_frame(frames: list[_Frame], top: list[_Item], closer: str) -> None:
    frame = frames.pop()
    items = _reduce(frame, closer)
    if items is None:
        frames.append(frame)
        _collapse(frames, top)
        top.append(closer)
    else:
        (frames[-1].segments[-1] if frames else top).extend(items)


def _collapse(frames: list[_Frame], top: list[_Item]) -> None:
    """Turn every open frame into stray text at the top level, keeping the nodes already read inside."""
    for frame in frames:
        if "|" in frame.separators:
            raise _Unparseable
        top.append(frame.opener)
        for index, segment in enumerate(frame.segments):
            if index:
                top.append(frame.separators[index - 1])
            top.extend(segment)
    frames.clear()


def _reduce(frame: _Frame, closer: str) -> list[_Item] | None:
    """What a closed frame stands for, or None when the grammar has no rule for it."""
    if closer != _CLOSER[frame.opener]:
        return None
    separators = set(frame.separators)
    if frame.opener == "(":
        if separators <= {":"} and len(frame.separators) <= 1:
            return _as_text(frame, closer)
        return None
    if not separators:
        return _as_text(frame, closer)
    if separators == {"|"}:
        return [_Alternate(tuple(tuple(segment) for segment in frame.segments))]
    if separators == {":"} and len(frame.separators) <= 2:
        return _scheduled(frame.segments)
    return None


def _as_text(frame: _Frame, closer: str) -> list[_Item]:
    """Emphasis: the brackets and colon stay in the schedule text."""
    items: list[_Item] = [frame.opener]
    for index, segment in enumerate(frame.segments):
        if index:
            items.append(":")
        items.extend(segment)
    items.append(closer)
    return items


def _scheduled(segments: list[list[_Item]]) -> list[_Item] | None:
    *prompts, number_segment = segments
    if not all(isinstance(item, str) for item in number_segment):
        return None
    match = _SWITCH_NUMBER.fullmatch("".join(number_segment))  # type: ignore[arg-type]
    if match is None:
        return None
    before = tuple(prompts[0]) if len(prompts) == 2 else None
    return [_Scheduled(before, tuple(prompts[-1]), match.group(1))]


def _nodes(items: list[_Item]) -> Iterator[_Scheduled | _Alternate]:
    """Every node of the tree, in every branch."""
    pending: list[tuple[_Item, ...] | list[_Item]] = [items]
    while pending:
        for item in pending.pop():
            if isinstance(item, _Scheduled):
                yield item
                pending.extend(branch for branch in (item.before, item.after) if branch is not None)
            elif isinstance(item, _Alternate):
                yield item
                pending.extend(item.options)


# ----------------------------------------------------------------------------------------------- schedule timeline


@dataclass(frozen=True)
class _Timeline:
    """How the host turns ``N`` of ``[a:b:N]`` into a step (``get_learned_conditioning_prompt_schedules``)."""

    steps: int
    int_offset: int
    float_offset: float
    old: bool

    @classmethod
    def of(cls, steps: int, hires_steps: int | None, use_old_scheduling: bool) -> _Timeline:
        if hires_steps is None or use_old_scheduling:
            return cls(steps, 0, 0.0, use_old_scheduling)
        return cls(hires_steps, steps, 1.0, False)

    def switch_step(self, number: str) -> int:
        """Old: N < 1 is a fraction of the steps. New: N with a '.' is a fraction, otherwise a step number."""
        value = float(number)
        if self.old:
            value = value * self.steps if value < 1 else value
        elif "." in number:
            value = (value - self.float_offset) * self.steps
        else:
            value = value - self.int_offset
        if math.isinf(value):
            raise InputError(f"The prompt editing step {number!r} is out of range; use a step number or a fraction.")
        return min(self.steps, int(value))


def _end_steps(tree: list[_Item], timeline: _Timeline) -> list[int]:
    ends = {timeline.steps}
    for node in _nodes(tree):
        if isinstance(node, _Alternate):
            ends.update(range(1, timeline.steps + 1))
        else:
            switch = timeline.switch_step(node.number)
            if switch >= 1:
                ends.add(switch)
    return sorted(ends)


def _render(tree: list[_Item], step: int, timeline: _Timeline) -> str:
    """The schedule text at schedule step ``step`` (1-based, as the host's ``at_step``)."""
    parts: list[str] = []
    pending: list[Iterator[_Item]] = [iter(tree)]
    while pending:
        item = next(pending[-1], None)
        if item is None:
            pending.pop()
        elif isinstance(item, str):
            parts.append(item)
        elif isinstance(item, _Scheduled):
            before = item.before or ()
            pending.append(iter(before if step <= timeline.switch_step(item.number) else item.after))
        else:
            pending.append(iter(item.options[(step - 1) % len(item.options)]))
    return "".join(parts)


@functools.lru_cache(maxsize=512)
def _schedule(prompt: str, timeline: _Timeline) -> tuple[tuple[int, str], ...]:
    try:
        tree = _parse(prompt)
    except _Unparseable:
        return ((timeline.steps, prompt),)
    return tuple((end, _render(tree, end, timeline)) for end in _end_steps(tree, timeline))


def _check_steps(steps: int, hires_steps: int | None) -> None:
    for name, value in (("steps", steps), ("hires_steps", 1 if hires_steps is None else hires_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a whole number of at least 1, not {value!r}.")


def prompt_schedule(
    prompt: str, steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """``(end_step, text)`` pairs for ``[a:b:N]`` and ``[a|b]``, as the host's schedule for one prompt.

    ``text`` still carries emphasis and BREAK; each entry holds up to and including ``end_step``.
    """
    _check_steps(steps, hires_steps)
    return list(_schedule(prompt, _Timeline.of(steps, hires_steps, use_old_scheduling)))


# ------------------------------------------------------------------------------------------------ emphasis, BREAK


@dataclass
class _Piece:
    text: str
    weight: float
    is_break: bool = False


def _attention_pieces(text: str) -> list[_Piece]:
    """The host's ``parse_prompt_attention`` before its merge step; BREAK markers are flagged."""
    pieces: list[_Piece] = []
    round_starts: list[int] = []
    square_starts: list[int] = []
    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append(_Piece(token[1:], 1.0))
        elif token == "(":
            round_starts.append(len(pieces))
        elif token == "[":
            square_starts.append(len(pieces))
        elif weight is not None and round_starts:
            _scale(pieces, round_starts.pop(), _attention_weight(weight))
        elif token == ")" and round_starts:
            _scale(pieces, round_starts.pop(), _ROUND_MULTIPLIER)
        elif token == "]" and square_starts:
            _scale(pieces, square_starts.pop(), _SQUARE_MULTIPLIER)
        else:
            _add_text(pieces, token)
    for start in round_starts:
        _scale(pieces, start, _ROUND_MULTIPLIER)
    for start in square_starts:
        _scale(pieces, start, _SQUARE_MULTIPLIER)
    return pieces


def _attention_weight(number: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise InputError(f"The emphasis weight {number!r} is not a number; write it like (word:1.2).") from None


def _scale(pieces: list[_Piece], start: int, multiplier: float) -> None:
    for piece in pieces[start:]:
        piece.weight *= multiplier


def _add_text(pieces: list[_Piece], text: str) -> None:
    for index, part in enumerate(_BREAK.split(text)):
        if index:
            pieces.append(_Piece("BREAK", -1.0, is_break=True))
        pieces.append(_Piece(part, 1.0))


def attention_segments(text: str) -> list[tuple[str, float]]:
    """``(text, multiplier)`` runs exactly as the host's ``parse_prompt_attention`` (neighbours of equal weight merged,
    ``("BREAK", -1.0)`` for a break, ``[("", 1.0)]`` for nothing)."""
    merged: list[tuple[str, float]] = []
    for piece in _attention_pieces(text):
        if merged and merged[-1][1] == piece.weight:
            merged[-1] = (merged[-1][0] + piece.text, piece.weight)
        else:
            merged.append((piece.text, piece.weight))
    return merged or [("", 1.0)]


def emphasis_weights(text: str) -> tuple[str, list[float]]:
    """The cleaned text and, for each of its space-separated words, the host's emphasis multiplier."""
    words: list[list[tuple[str, float]]] = [[]]
    for piece in _attention_pieces(text):
        if piece.is_break:
            words.append([])
            continue
        for char in piece.text:
            if char.isspace():
                words.append([])
            else:
                words[-1].append((char, piece.weight))
    words = [word for word in words if word]
    return " ".join("".join(char for char, _ in word) for word in words), [_word_weight(word) for word in words]


def _word_weight(word: list[tuple[str, float]]) -> float:
    """The multiplier covering most letters and digits of the word (all characters if none); earliest on a tie."""
    counted = [weight for char, weight in word if char.isalnum()] or [weight for _, weight in word]
    counts: dict[float, int] = {}
    for weight in counted:
        counts[weight] = counts.get(weight, 0) + 1
    return max(counts, key=counts.__getitem__)


def clean_text(text: str) -> str:
    """The text with emphasis brackets, escapes and BREAK removed and whitespace normalised."""
    return emphasis_weights(text)[0]


# ------------------------------------------------------------------------------------------------ emphasis for ELLA

MAX_EMPHASIS = 10.0  # a word weighs at most this much in the connector's attention (and at least 0)


class WeightedText(NamedTuple):
    """A text for the LLM and the emphasis of each of its space-separated words (the connector's attention to the
    word's tokens is multiplied by it). A text whose words all weigh 1 is passed as a plain ``str`` instead, so that
    ``(red:1) cube`` and ``red cube`` are one text."""

    text: str
    weights: tuple[float, ...]


def llm_text(text: str) -> tuple[str | WeightedText, list[float]]:
    """What the LLM reads for ``text`` with emphasis on, and the multipliers outside ``[0, MAX_EMPHASIS]`` that were
    clamped into it (a negative one to 0: attention cannot be negative)."""
    cleaned, weights = emphasis_weights(text)
    out_of_range = [weight for weight in weights if not 0.0 <= weight <= MAX_EMPHASIS]
    clamped = tuple(min(max(weight, 0.0), MAX_EMPHASIS) for weight in weights)
    if all(weight == 1.0 for weight in clamped):
        return cleaned, out_of_range
    return WeightedText(cleaned, clamped), out_of_range


def plain_text(text: str | WeightedText) -> str:
    """The words the LLM reads, with or without weights."""
    return text.text if isinstance(text, WeightedText) else text
