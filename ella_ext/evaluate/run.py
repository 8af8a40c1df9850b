"""``python -m ella_ext.train eval``: images from each connector (and the base model's own text encoder), answered by a
judge, scored by DPG-Bench's rule; ``eval.json``, ``answers.jsonl``, the images and ``report.html`` in the output.

Work is split by prompt across processes (``accelerate launch`` / ``torchrun``) and gathered by the main process. An
interrupted eval resumes: an image is reused when its key (contestant digest, prompt, seed, settings) matches, an
answer when its image key, judge and question match. Models load only for the work that is left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ELLAError
from .questions import Item, read_questions
from .results import write_atomic, write_results, write_text

log = logging.getLogger("ella")
KEY_CHUNK = "ella-eval"  # the PNG text chunk holding an image's key
ANSWER_PARTS = "answers"  # folder of per-process answer files (appended while judging; kept for resuming)
ANSWER_FIELDS = ("answer", "yes", "margin")  # what a judge said (the rest of a record is named afresh on reuse)


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
    judge_key: str  # what answers are keyed by: the judge's name and a fingerprint of its files (judges.identity)
    judge_batch: int = 16
    judge_dtype: str = "auto"
    image_batch: int = 0  # images per UNet batch (0: all of a prompt's)

    def judge_file(self, output: Path) -> Path:
        """How the judge described itself, per judge (an eval whose answers are all reused loads no judge)."""
        return output / ANSWER_PARTS / f"judge-{hashlib.sha1(self.judge_key.encode()).hexdigest()[:12]}.json"


def image_seed(seed: int, prompt: str, index: int) -> int:
    """Each image's seed from ([sample] seed, the prompt, the image's index): every contestant draws the same noise."""
    digest = hashlib.sha256(f"{seed}\n{prompt}\n{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def safe_name(text: str) -> str:
    """A file name for an item id: ids that needed changes, or hold capitals (which macOS and Windows file systems
    fold), get a hash of the id, so two ids never share a file."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:80]
    if name != text or name != name.lower():
        name += "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return name


def fingerprint(value: str) -> str:
    """A cheap identity of a local model file or folder: its name and a hash of its files' names, sizes and change
    times (a re-download or an edit changes it; nothing is read); anything else (a hub id) as written."""
    path = Path(value).expanduser() if value else None
    if path is None or not path.exists():
        return value
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.relative_to(path) if f != path else f.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return f"{path.name}@{digest.hexdigest()[:12]}"


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


def adopt_image_folders(output: Path, contestants: list[Contestant]) -> None:
    """A connector renamed since an earlier eval keeps its images: its folder (named by file and digest) is found by
    the digest and renamed."""
    images = output / "images"
    for c in contestants:
        if c.kind != "connector" or (images / c.folder).exists() or not images.is_dir():
            continue
        earlier = sorted(images.glob(f"*-{c.digest[:8]}"))
        if earlier:
            earlier[0].rename(images / c.folder)
            log.info("ELLA eval: %s's images were made as %s; reused", c.key, earlier[0].name)


# -- the run -------------------------------------------------------------------------------------------------------


def evaluate(config, connectors: list[Path], baseline: bool, questions: Path, judge: str, images: int = 4,
             limit: int | None = None, output: Path = Path("eval"), official_quirks: bool = False,
             judge_batch: int = 16, judge_dtype: str = "auto", image_batch: int = 0) -> dict | None:
    """Run the eval; the main process returns eval.json's content (other processes None)."""
    from ..train.runtime import make_accelerator
    from .judges import check_judge, identity

    if images < 1:
        raise EvalError("--images-per-prompt must be at least 1.")
    question_set = read_questions(questions, official_quirks).limited(limit)
    contestants = make_contestants(config, connectors, baseline)
    check_judge(judge)  # a judge that cannot load is refused now, not after hours of image making
    settings = Settings(images, official_quirks, judge, identity(judge), judge_batch, judge_dtype, image_batch)
    accelerator = make_accelerator(config)
    output = Path(output)
    if accelerator.is_main_process:
        (output / ANSWER_PARTS).mkdir(parents=True, exist_ok=True)
        adopt_image_folders(output, contestants)
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
        described = settings.judge_file(output)  # written by whichever process loaded this judge
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
        self._model_keys: dict[str, dict] = {}

    # -- images ----------------------------------------------------------------------------------------------------

    def image_path(self, contestant: Contestant, item: Item, index: int) -> Path:
        return self.output / "images" / contestant.folder / f"{safe_name(item.id)}-{index}.png"

    def image_key(self, contestant: Contestant, item: Item, index: int) -> dict:
        """Everything that decides an image's pixels: an image on disk is reused only when its key is this one."""
        sample = self.config.sample
        return {"contestant": contestant.digest, "prompt": item.prompt,
                "seed": image_seed(sample["seed"], item.prompt, index), **self._models_key(contestant)}

    def _models_key(self, contestant: Contestant) -> dict:
        """The settings and models part of the image key (the files' fingerprints are taken once per eval)."""
        from ..train.runtime import llm_dtype

        if contestant.key in self._model_keys:
            return self._model_keys[contestant.key]
        config, sample, model = self.config, self.config.sample, self.config.model
        key = {"steps": sample["steps"], "cfg": sample["cfg"],
               "side": sample["resolution"] or config.data["resolution"],
               "base": fingerprint(config.resolve(model["base"])),
               "base_config": fingerprint(config.resolve(model["base_config"])),
               "vae": fingerprint(config.resolve(model["vae"])), "vae_dtype": model["vae_dtype"],
               "family": model["family"], "prediction": model["prediction"],
               "precision": config.train["mixed_precision"], "device": self.device.type}
        if contestant.kind == "connector":
            trained = self._as_trained(contestant)
            key["llm"] = [fingerprint(config.resolve(trained.model["llm"])), trained.model["llm_layer"],
                          trained.model["token_length"], trained.model["max_length"],
                          str(llm_dtype(trained, self.device))]
        else:
            key["negative"] = "empty text (SD 1.5) / zeros (SDXL)"
        self._model_keys[contestant.key] = key
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
        from .models import ImageModels

        models = ImageModels(self.config, self.device, any(c.kind == "connector" and todo[c.key]
                                                           for c in self.contestants))
        progress = tqdm(total=count, desc="images", disable=not self.main, dynamic_ncols=True)
        try:
            for contestant in self.contestants:
                if todo[contestant.key]:
                    self._contestant_images(contestant, todo[contestant.key], models, progress)
        finally:
            progress.close()
            models.close()

    def _contestant_images(self, contestant: Contestant, todo: list[tuple[Item, int]], models, progress) -> None:
        from ..train.sample import connector_contexts, denoise, pooled_pair
        from .models import free

        by_item: dict[str, list[int]] = {}
        items = {}
        for item, index in todo:
            by_item.setdefault(item.id, []).append(index)
            items[item.id] = item
        connector = models.connector(contestant.path) if contestant.kind == "connector" else None
        batch = self.settings.image_batch or self.settings.images
        for item_id, indexes in by_item.items():
            item = items[item_id]
            if connector is not None:
                trained = self._as_trained(contestant)
                text, empty = models.features(trained, item.prompt), models.features(trained, "")
                context_at = connector_contexts(connector, text, empty, self.device)
                pooled, empty_pooled = pooled_pair(connector, text, empty, models.pooled(item.prompt),
                                                   models.pooled(""))
            else:
                (rows, pooled), (empty_rows, empty_pooled) = models.baseline(item.prompt), models.baseline("")
                if models.base.family == "sdxl":  # diffusers' SDXL pipeline: zeros for an empty negative prompt
                    empty_rows, empty_pooled = torch.zeros_like(rows), torch.zeros_like(pooled)

                def context_at(t, rows=rows, empty_rows=empty_rows):
                    return rows.to(self.device), empty_rows.to(self.device)
            for start in range(0, len(indexes), batch):
                chunk = indexes[start : start + batch]
                seeds = [image_seed(self.config.sample["seed"], item.prompt, i) for i in chunk]
                made = denoise(self.config, models.base, context_at, seeds, pooled, empty_pooled, item.prompt)
                for index, image in zip(chunk, made):
                    self._save_image(image, contestant, item, index)
                    progress.update(1)
        del connector
        free(self.device)

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
        write_atomic(path, lambda partial: image.save(partial, format="PNG", pnginfo=info))

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
                    if all(found):  # the judge's words from before; names and paths as they are now
                        records += [{**row, **{k: f[k] for k in ANSWER_FIELDS}} for row, f in zip(rows, found)]
                    else:
                        todo.append((contestant, item, index, rows))
        if not todo:
            return records
        from .judges import load_judge

        dtype = None if self.settings.judge_dtype == "auto" else getattr(torch, self.settings.judge_dtype)
        judge = load_judge(self.settings.judge, self.device, dtype, batch_size=self.settings.judge_batch)
        self.judge_details = judge.describe()
        rank = self.accelerator.process_index
        described = self.settings.judge_file(self.output)
        mine = write_text(described.with_name(f"{described.stem}.{rank}.json"),
                          json.dumps(self.judge_details, default=str))
        mine.replace(described)  # every process loading this judge writes the same description
        part = self.output / ANSWER_PARTS / f"part-{rank}.jsonl"
        _end_line(part)
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


def _end_line(path: Path) -> None:
    """A part file cut short mid-line by a killed eval gets its line ended, so the next record starts a line."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as handle:
            handle.seek(-1, 2)
            ended = handle.read(1) == b"\n"
        if not ended:
            with open(path, "ab") as handle:
                handle.write(b"\n")


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


