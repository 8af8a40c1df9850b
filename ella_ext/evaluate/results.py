"""eval's results: answers.jsonl in a fixed order, the scores and comparisons in eval.json, and report.html."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from .questions import QuestionSet
from .scoring import paired_difference, score


def write_results(output: Path, config, question_set: QuestionSet, contestants: list, settings,
                  records: list[dict], judge_details: dict | None, processes: int) -> dict:
    """answers.jsonl (in contestant, prompt, image, question order), eval.json and report.html."""
    from .report import write_report

    order = {c.key: i for i, c in enumerate(contestants)}
    items = {item.id: i for i, item in enumerate(question_set.items)}
    records = sorted(records, key=lambda r: (order[r["contestant"]], items[r["item_id"]], r["image"],
                                             r["question_id"]))
    write_text(output / "answers.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    results = {}
    for contestant in contestants:
        answers: dict[tuple[str, int], dict[int, bool]] = {}
        for r in records:
            if r["contestant"] == contestant.key:
                answers.setdefault((r["item_id"], r["image"]), {})[r["question_id"]] = r["yes"]
        results[contestant.key] = score(question_set.items, answers, settings.images, settings.official_quirks)
    content = {
        "results": results,
        "comparisons": comparisons(results),
        "contestants": {c.key: {"kind": c.kind, "images": f"images/{c.folder}", **c.details} for c in contestants},
        "judge": judge_details or {"name": settings.judge_key},
        "judge_identity": settings.judge_key,
        "questions": {"file": question_set.name, "format": question_set.format, "sha256": question_set.digest,
                      "prompts": len(question_set.items), "questions": question_set.question_count,
                      "official_quirks": settings.official_quirks, "notes": question_set.notes},
        "settings": _settings(config, settings),
        "versions": _versions(),
        "processes": processes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text(output / "eval.json", json.dumps(content, indent=2, sort_keys=False) + "\n")
    write_report(output, content, question_set, records)
    return content


def comparisons(results: dict) -> dict:
    """Each contestant against the reference (the baseline when scored, else the first connector), prompt by prompt."""
    if len(results) < 2:
        return {}
    reference = "baseline" if "baseline" in results else next(iter(results))
    return {name: {"against": reference, **paired_difference(result["prompts"], results[reference]["prompts"])}
            for name, result in results.items() if name != reference}


def _settings(config, settings) -> dict:
    from ..train.model import short_name

    sample = config.sample
    return {"images_per_prompt": settings.images, "sampler": "DDIM", "steps": sample["steps"], "cfg": sample["cfg"],
            "resolution": sample["resolution"] or config.data["resolution"],
            "negative": "connectors: the TSC's rows of the empty text; the baseline: CLIP's encoding of the empty "
                        "text (SD 1.5), zeros (SDXL, as diffusers' SDXL pipeline)",
            "seed": sample["seed"], "image_seeds": "sha256 of (seed, prompt, image index): the same for every "
                                                   "contestant",
            "base": short_name(config.resolve(config.model["base"])),
            "llm": short_name(config.resolve(config.model["llm"])),
            "precision": config.train["mixed_precision"], "image_batch": settings.image_batch or "all of a prompt's"}


def _versions() -> dict:
    import importlib.metadata

    from .. import __version__

    versions = {"ella_ext": __version__, "torch": torch.__version__}
    for name in ("transformers", "diffusers", "accelerate"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def write_atomic(path: Path, write) -> Path:
    """``write(partial_path)`` then a rename: a killed eval never leaves a half-written file under the real name."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda partial: partial.write_text(text, encoding="utf-8"))
