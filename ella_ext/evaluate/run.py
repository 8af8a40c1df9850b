"""``python -m ella_ext.train eval``: images from each connector (and the base model's own text encoder), answered by a
judge, scored by DPG-Bench's rule; ``eval.json``, ``answers.jsonl``, the images and ``report.html`` in the output.

Work is split by prompt across processes (``accelerate launch`` / ``torchrun``) and gathered by the main process. An
interrupted eval resumes: an image is reused when its key (contestant digest, prompt, seed, settings) matches, an
answer when its image key, judge and question match. Models load only for the work that is left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ELLAError
from .questions import Item, QuestionSet, read_questions
from .scoring import paired_difference, score

log = logging.getLogger("ella")
KEY_CHUNK = "ella-eval"  # the PNG text chunk holding an image's key
ANSWER_PARTS = "answers"  # folder of per-process answer files (appended while judging; kept for resuming)
JUDGE_FILE = "judge.json"  # in ANSWER_PARTS: how the judge described itself (for an eval whose answers are reused)


class EvalError(ELLAError):
    """The eval cannot run as asked: the message says what to change."""


@dataclass
class Contestant:
    key: str  # how eval.json and the report name it: the connector's file name, or "baseline"
    kind: str  # "connector" or "baseline"
    folder: str  # images/<folder>
    digest: str  # sha256 of the connector file; for the baseline, of the base's name
    path: Path | None = None
    details: dict = field(default_factory=dict)


@dataclass
class Settings:
    images: int
    official_quirks: bool
    judge: str  # the judge as the user gave it
    judge_batch: int = 16

    @property
    def judge_key(self) -> str:
        return self.judge if not Path(self.judge).exists() else Path(self.judge).resolve().name


def image_seed(seed: int, prompt: str, index: int) -> int:
    """Each image's seed from ([sample] seed, the prompt, the image's index): every contestant draws the same noise."""
    digest = hashlib.sha256(f"{seed}\n{prompt}\n{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:80]
    if name != text:
        name += "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return name


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_contestants(config, connectors: list[Path], baseline: bool) -> list[Contestant]:
    from ..connector_file import read_metadata, read_training_facts
    from ..train.model import short_name

    if not connectors and not baseline:
        raise EvalError("Nothing to score: give one or more --connector FILE, and/or --baseline.")
    result, seen = [], {}
    for path in connectors:
        path = Path(path)
        if not path.is_file():
            raise EvalError(f"--connector {path}: no such file.")
        digest = file_digest(path)
        if digest in seen:
            log.warning("ELLA eval: %s is the same file as %s; it is scored once.", path, seen[digest])
            continue
        seen[digest] = path
        facts = read_training_facts(path)
        meta = read_metadata(path)
        trained = {k: v for k, v in dataclasses.asdict(facts).items() if v not in (None, ())}
        if meta.get("ella.steps"):
            trained["steps"] = meta["ella.steps"]
        result.append(Contestant(path.name, "connector", f"{safe_name(path.stem)}-{digest[:8]}", digest, path,
                                 {"file": path.name, "sha256": digest, "trained": trained}))
    names = [c.key for c in result]
    for c in result:
        if names.count(c.key) > 1:  # two runs' connector.safetensors: name them by their folders too
            c.key = f"{c.path.parent.name}/{c.path.name}"
    if len({c.key for c in result}) != len(result):
        raise EvalError("Two --connector files share their folder and file names; copy one under another name.")
    if baseline:
        base_name = short_name(config.resolve(config.model["base"]))
        result.append(Contestant("baseline", "baseline", "baseline",
                                 hashlib.sha256(f"baseline\n{base_name}".encode()).hexdigest(), None,
                                 {"text_encoder": f"{base_name}'s own CLIP (77 tokens)"}))
    return result


# -- the run -------------------------------------------------------------------------------------------------------


def evaluate(config, connectors: list[Path], baseline: bool, questions: Path, judge: str, images: int = 4,
             limit: int | None = None, output: Path = Path("eval"), official_quirks: bool = False,
             judge_batch: int = 16) -> dict | None:
    """Run the eval; the main process returns eval.json's content (other processes None)."""
    from ..train.runtime import make_accelerator

    if images < 1:
        raise EvalError("--images-per-prompt must be at least 1.")
    question_set = read_questions(questions, official_quirks).limited(limit)
    contestants = make_contestants(config, connectors, baseline)
    from .judges import check_judge

    check_judge(judge)  # a judge that cannot load is refused now, not after hours of image making
    settings = Settings(images, official_quirks, judge, judge_batch)
    accelerator = make_accelerator(config)
    output = Path(output)
    if accelerator.is_main_process:
        (output / ANSWER_PARTS).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    share = question_set.items[accelerator.process_index :: accelerator.num_processes]
    work = _Work(config, contestants, settings, output, accelerator)
    work.make_images(share)
    records = work.answer(share)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        records = gather_object(records)
    result = None
    if accelerator.is_main_process:
        described = output / ANSWER_PARTS / JUDGE_FILE  # written by whichever process loaded the judge last
        details = work.judge_details or (json.loads(described.read_text(encoding="utf-8"))
                                         if described.is_file() else None)
        result = write_results(output, config, question_set, contestants, settings, records, details,
                               accelerator.num_processes)
    accelerator.wait_for_everyone()
    return result


class _Work:
    def __init__(self, config, contestants: list[Contestant], settings: Settings, output: Path, accelerator):
        self.config, self.contestants, self.settings = config, contestants, settings
        self.output, self.accelerator = output, accelerator
        self.device = accelerator.device
        self.main = accelerator.is_main_process
        self.judge_details: dict | None = None
        self._trained: dict[str, object] = {}  # contestant key -> the config as its connector was trained

    # -- images ----------------------------------------------------------------------------------------------------

    def image_path(self, contestant: Contestant, item: Item, index: int) -> Path:
        return self.output / "images" / contestant.folder / f"{safe_name(item.id)}-{index}.png"

    def image_key(self, contestant: Contestant, item: Item, index: int) -> dict:
        from ..train.model import short_name

        sample = self.config.sample
        key = {"contestant": contestant.digest, "prompt": item.prompt,
               "seed": image_seed(sample["seed"], item.prompt, index), "steps": sample["steps"], "cfg": sample["cfg"],
               "side": sample["resolution"] or self.config.data["resolution"],
               "base": short_name(self.config.resolve(self.config.model["base"])),
               "dtype": self.config.train["mixed_precision"]}
        if contestant.kind == "connector":
            model = self._as_trained(contestant).model
            key["llm"] = [short_name(self.config.resolve(model["llm"])), model["llm_layer"], model["token_length"],
                          model["max_length"], model["llm_dtype"]]
        return key

    def _as_trained(self, contestant: Contestant):
        from ..train.cli import config_as_trained

        if contestant.key not in self._trained:
            self._trained[contestant.key] = config_as_trained(self.config, contestant.path)
        return self._trained[contestant.key]

    def image_ready(self, contestant: Contestant, item: Item, index: int) -> bool:
        from PIL import Image

        path = self.image_path(contestant, item, index)
        if not path.is_file():
            return False
        try:
            with Image.open(path) as image:
                stored = image.text.get(KEY_CHUNK)
        except Exception:  # a damaged file is made again
            return False
        return stored == json.dumps(self.image_key(contestant, item, index), sort_keys=True)

    def make_images(self, share: list[Item]) -> None:
        from tqdm.auto import tqdm

        todo = {c.key: [(item, i) for item in share for i in range(self.settings.images)
                        if not self.image_ready(c, item, i)] for c in self.contestants}
        count = sum(len(v) for v in todo.values())
        total = len(self.contestants) * len(share) * self.settings.images
        if count == 0:
            log.info("ELLA eval: all %d images are made already", total)
            return
        if count < total:
            log.info("ELLA eval: %d of %d images are made already; making the other %d", total - count, total, count)
        models = _Models(self.config, self.device, any(c.kind == "connector" and todo[c.key]
                                                       for c in self.contestants))
        progress = tqdm(total=count, desc="images", disable=not self.main, dynamic_ncols=True)
        try:
            for contestant in self.contestants:
                if todo[contestant.key]:
                    self._contestant_images(contestant, todo[contestant.key], models, progress)
        finally:
            progress.close()
            models.close()

    def _contestant_images(self, contestant: Contestant, todo: list[tuple[Item, int]], models: _Models,
                           progress) -> None:
        from ..train.sample import connector_contexts, denoise

        by_item: dict[str, list[int]] = {}
        items = {}
        for item, index in todo:
            by_item.setdefault(item.id, []).append(index)
            items[item.id] = item
        if contestant.kind == "connector":
            connector = models.connector(contestant.path)
            trained = self._as_trained(contestant)
        for item_id, indexes in by_item.items():
            item = items[item_id]
            seeds = [image_seed(self.config.sample["seed"], item.prompt, i) for i in indexes]
            if contestant.kind == "connector":
                text, empty = models.features(trained, item.prompt), models.features(trained, "")
                context_at = connector_contexts(connector, text, empty, self.device)
                pooled, empty_pooled = models.pooled(item.prompt), models.pooled("")
            else:
                (rows, pooled), (empty_rows, empty_pooled) = models.baseline(item.prompt), models.baseline("")

                def context_at(t, rows=rows, empty_rows=empty_rows):
                    return rows.to(self.device), empty_rows.to(self.device)
            made = denoise(self.config, models.base, context_at, seeds, pooled, empty_pooled, item.prompt)
            for index, image in zip(indexes, made):
                self._save_image(image, contestant, item, index)
                progress.update(1)
        if contestant.kind == "connector":
            models.drop_connector()

    def _save_image(self, image, contestant: Contestant, item: Item, index: int) -> None:
        from PIL.PngImagePlugin import PngInfo

        from ..train.sample import sample_parameters

        key = self.image_key(contestant, item, index)
        info = PngInfo()
        name = contestant.path.name if contestant.path else "none (the base's own text encoder)"
        parameters = sample_parameters(self.config, item.prompt, 0, name).replace(
            f"Seed: {self.config.sample['seed']}", f"Seed: {key['seed']}", 1)
        info.add_text("parameters", parameters)
        info.add_text(KEY_CHUNK, json.dumps(key, sort_keys=True))
        path = self.image_path(contestant, item, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        image.save(partial, format="PNG", pnginfo=info)
        os.replace(partial, path)  # a killed eval leaves no half-written image behind

    # -- answers ---------------------------------------------------------------------------------------------------

    def answer_key(self, record: dict) -> tuple:
        return (record["contestant_digest"], record["item_id"], record["image"], record["image_key"],
                record["judge"], record["question_id"], record["question"])

    def answer(self, share: list[Item]) -> list[dict]:
        """Every answer for this process's prompts: earlier runs' where they still fit, the judge's otherwise."""
        from tqdm.auto import tqdm

        known = {self.answer_key(r): r for r in read_answer_parts(self.output)}
        records, todo = [], []
        for contestant in self.contestants:
            for item in share:
                for index in range(self.settings.images):
                    rows = self._records(contestant, item, index)
                    found = [known.get(self.answer_key(r)) for r in rows]
                    if all(found):
                        records += found
                    else:
                        todo.append((contestant, item, index, rows))
        if not todo:
            return records
        from .judges import load_judge

        judge = load_judge(self.settings.judge, self.device, batch_size=self.settings.judge_batch)
        self.judge_details = judge.describe()
        described = self.output / ANSWER_PARTS / JUDGE_FILE
        _write_text(described.with_name(f"judge-{self.accelerator.process_index}.json"),
                    json.dumps(self.judge_details, default=str))
        os.replace(described.with_name(f"judge-{self.accelerator.process_index}.json"), described)
        part = self.output / ANSWER_PARTS / f"part-{self.accelerator.process_index}.jsonl"
        progress = tqdm(total=len(todo), desc="judging", disable=not self.main, dynamic_ncols=True)
        try:
            with open(part, "a", encoding="utf-8") as out:
                for contestant, item, index, rows in todo:
                    from PIL import Image

                    with Image.open(self.image_path(contestant, item, index)) as image:
                        answers = judge.answer(image.convert("RGB"), [q.text for q in item.questions])
                    for row, answer in zip(rows, answers):
                        row.update(answer=answer.text, yes=bool(answer.yes), margin=answer.margin)
                        out.write(json.dumps(row) + "\n")
                    out.flush()  # an interrupted eval keeps every image's answers written so far
                    records += rows
                    progress.update(1)
        finally:
            progress.close()
            judge.close()
        return records

    def _records(self, contestant: Contestant, item: Item, index: int) -> list[dict]:
        key = self.image_key(contestant, item, index)
        image_key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        rel = self.image_path(contestant, item, index).relative_to(self.output).as_posix()
        return [{"contestant": contestant.key, "contestant_digest": contestant.digest, "item_id": item.id,
                 "image": index, "seed": key["seed"], "image_file": rel, "image_key": image_key,
                 "judge": self.settings.judge_key, "question_id": q.id, "question": q.text} for q in item.questions]


def read_answer_parts(output: Path) -> Iterator[dict]:
    folder = output / ANSWER_PARTS
    for part in sorted(folder.glob("part-*.jsonl")) if folder.is_dir() else []:
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
            if isinstance(record, dict) and "yes" in record:
                yield record


class _Models:
    """The base, the LLM and the base's CLIP for making images; the LLM's features and CLIP's rows cached per text."""

    def __init__(self, config, device, need_llm: bool):
        from ..train.model import load_base
        from ..train.runtime import load_encoder, weight_dtype

        self.config, self.device = config, device
        self.base = load_base(config, device, weight_dtype(config))
        self.encoder = load_encoder(config, device) if need_llm else None
        self.base_text = None
        self._connector = None
        self._features: dict[tuple, tuple] = {}
        self._pooled: dict[str, torch.Tensor | None] = {}
        self._clip: dict[str, tuple] = {}

    def connector(self, path: Path):
        from .. import load_connector
        from ..train.cli import check_connector_fits_base

        connector = load_connector(path, self.device, torch.float32)
        check_connector_fits_base(path, connector, self.base)
        self.encoder.check_fits(connector.config.in_width, path.name)
        self._connector = connector
        return connector

    def drop_connector(self) -> None:
        self._connector = None
        _free(self.device)

    def features(self, trained, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        from ..train.runtime import token_max_length

        model = trained.model
        key = (model["llm_layer"], model["token_length"], model["max_length"], text)
        if key not in self._features:
            encoder = self.encoder if self.encoder.layer is None else self.encoder.with_layer(model["llm_layer"])
            max_length = token_max_length(trained)
            features, mask = encoder.encode([text], max_length)
            self._features[key] = (features.cpu(), None if max_length is not None else mask.cpu())
        return self._features[key]

    def pooled(self, text: str) -> torch.Tensor | None:
        if text not in self._pooled:
            pooled = self.base.pooled([text])
            self._pooled[text] = None if pooled is None else pooled.cpu()
        return self._pooled[text]

    def baseline(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.base_text is None:
            from ..train.runtime import weight_dtype
            from .baseline import load_base_text

            self.base_text = load_base_text(self.config, self.base, self.device, weight_dtype(self.config))
        if text not in self._clip:
            rows, pooled = self.base_text.encode(text)
            self._clip[text] = (rows.cpu(), None if pooled is None else pooled.cpu())
        return self._clip[text]

    def close(self) -> None:
        self.base = self.encoder = self.base_text = self._connector = None
        self._features.clear()
        _free(self.device)


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# -- results -------------------------------------------------------------------------------------------------------


def write_results(output: Path, config, question_set: QuestionSet, contestants: list[Contestant], settings: Settings,
                  records: list[dict], judge_details: dict | None, processes: int) -> dict:
    """answers.jsonl (in contestant, prompt, image, question order), eval.json and report.html."""
    from .report import write_report

    order = {c.key: i for i, c in enumerate(contestants)}
    items = {item.id: i for i, item in enumerate(question_set.items)}
    records = sorted(records, key=lambda r: (order[r["contestant"]], items[r["item_id"]], r["image"],
                                             r["question_id"]))
    _write_text(output / "answers.jsonl", "".join(json.dumps(r) + "\n" for r in records))
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
        "questions": {"file": question_set.name, "format": question_set.format, "sha256": question_set.digest,
                      "prompts": len(question_set.items), "questions": question_set.question_count,
                      "official_quirks": settings.official_quirks, "notes": question_set.notes},
        "settings": _settings(config, settings),
        "versions": _versions(),
        "processes": processes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_text(output / "eval.json", json.dumps(content, indent=2, sort_keys=False) + "\n")
    write_report(output, content, question_set, records)
    return content


def comparisons(results: dict) -> dict:
    """Each contestant against the reference (the baseline when scored, else the first connector), prompt by prompt."""
    if len(results) < 2:
        return {}
    reference = "baseline" if "baseline" in results else next(iter(results))
    return {name: {"against": reference, **paired_difference(result["prompts"], results[reference]["prompts"])}
            for name, result in results.items() if name != reference}


def _settings(config, settings: Settings) -> dict:
    from ..train.model import short_name

    sample = config.sample
    return {"images_per_prompt": settings.images, "sampler": "DDIM", "steps": sample["steps"], "cfg": sample["cfg"],
            "resolution": sample["resolution"] or config.data["resolution"], "negative": "the empty text",
            "seed": sample["seed"], "image_seeds": "sha256 of (seed, prompt, image index): the same for every "
                                                   "contestant",
            "base": short_name(config.resolve(config.model["base"])),
            "llm": short_name(config.resolve(config.model["llm"])),
            "precision": config.train["mixed_precision"]}


def _versions() -> dict:
    import importlib.metadata

    from .. import __version__

    versions = {"ella_ext": __version__, "torch": torch.__version__}
    for name in ("transformers", "diffusers", "accelerate"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
