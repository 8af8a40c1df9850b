"""DPG-Bench's scoring rule, and the two places where DPG-Bench's own scorer differs from it.

Per image, a question scores 1 when the judge answered yes and 0 otherwise; a question any of whose parents scored 0
scores 0 (parents are settled first, so a chain propagates); the image's score is the mean over the prompt's
questions. A prompt's score is the mean over its images, and the benchmark's the mean over prompts, times 100.
Category scores pool every question of every image, after the parent rule, by its fine category (e.g.
``entity - whole``) and by its broad one (the text before `` - ``, e.g. ``entity``).

``official_quirks`` reproduces ``dpg_bench/compute_dpg_bench.py`` in the ELLA repository, so a user can compare with
published tables: its first CSV data row is skipped (see ``questions.read_questions``); its category scores use only
the last image's answers, before the parent rule; parents are settled in the file's order; and the broad category is
the text before the first ``-``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from .questions import Item, dependency_order

Answers = Mapping[tuple[str, int], Mapping[int, bool]]  # (item id, image index) -> question id -> answered yes


def after_parents(item: Item, yes: Mapping[int, bool], file_order: bool = False) -> dict[int, int]:
    """Each question's score on one image: 1 for yes, 0 for no or when a parent scored 0."""
    scores = {q.id: int(bool(yes[q.id])) for q in item.questions}
    for q in item.questions if file_order else dependency_order(item):
        if any(scores.get(parent, 1) == 0 for parent in q.parents):
            scores[q.id] = 0
    return scores


def fine_category(category: str, official_quirks: bool = False) -> str:
    """The fine category as reported: the tuple's text before "(" (a dangling " -", as in ``global - (x)``, dropped
    unless the official scorer's names are asked for)."""
    return category if official_quirks else category.rstrip(" -").strip() or category


def broad_category(category: str, official_quirks: bool = False) -> str:
    return category.split("-" if official_quirks else " - ")[0].strip()


def score(items: list[Item], answers: Answers, images: int, official_quirks: bool = False) -> dict:
    """``{"overall", "categories", "subcategories", "prompts"}``, each on a 0-100 scale; categories are the broad
    ones (L1), subcategories the fine ones (L2)."""
    if images < 1:
        raise ValueError("images must be at least 1")
    prompt_scores: dict[str, float] = {}
    fine: dict[str, list[int]] = defaultdict(list)
    for item in items:
        image_scores = []
        for index in range(images):
            key = (item.id, index)
            if key not in answers:
                raise KeyError(f"no answers for prompt {item.id!r}, image {index}")
            yes = answers[key]
            scores = after_parents(item, yes, file_order=official_quirks)
            image_scores.append(sum(scores.values()) / len(scores))
            if not official_quirks:
                for q in item.questions:
                    fine[fine_category(q.category)].append(scores[q.id])
        if official_quirks:  # the last image's answers, before the parent rule
            last = answers[(item.id, images - 1)]
            for q in item.questions:
                fine[q.category].append(int(bool(last[q.id])))
        prompt_scores[item.id] = sum(image_scores) / images
    broad: dict[str, list[int]] = defaultdict(list)
    for category, values in fine.items():
        broad[broad_category(category, official_quirks)].extend(values)
    return {
        "overall": _percent(list(prompt_scores.values())),
        "categories": {name: _percent(values) for name, values in sorted(broad.items())},
        "subcategories": {name: _percent(values) for name, values in sorted(fine.items())},
        "prompts": {item_id: value * 100 for item_id, value in prompt_scores.items()},
    }


def _percent(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else float("nan")


def paired_difference(a: Mapping[str, float], b: Mapping[str, float]) -> dict:
    """How much ``a`` beats ``b`` over the prompts both were scored on: the mean of the per-prompt differences (0-100
    points), its 95% interval from the paired standard error (normal approximation; meaningful from a few dozen
    prompts on), and how many prompts went each way. An interval that holds 0 says the eval cannot tell them apart."""
    shared = [key for key in a if key in b]
    differences = [a[key] - b[key] for key in shared]
    count = len(differences)
    mean = sum(differences) / count if count else float("nan")
    if count > 1:
        variance = sum((d - mean) ** 2 for d in differences) / (count - 1)
        half = 1.96 * (variance / count) ** 0.5
    else:
        half = float("nan")
    return {"mean": mean, "ci95": [mean - half, mean + half], "prompts": count,
            "better": sum(d > 0 for d in differences), "worse": sum(d < 0 for d in differences)}
