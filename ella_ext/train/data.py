"""Training data: image folders with same-name caption files (A1111 / kohya), image folders with ``metadata.jsonl``
(diffusers), and webdataset ``.tar`` shards (streamed). Aspect-ratio buckets, deterministic order, per-sample
random draws that depend only on (seed, micro-batch, position in the global batch).

Two ways to make batches:

- **listed** (folders, and any data read from a cache): every process knows every record; each epoch the records
  of each bucket are shuffled from the seed and cut into global batches (``batch_size x processes``), and each
  process takes its slice. The same seed gives the same samples whatever the process count.
- **streamed** (webdataset shards): each process reads its own shards (``shards[rank::processes]``), in an order
  shuffled per epoch from the seed, and fills per-bucket queues until one holds a batch.

Unreadable images and records without a caption are skipped and counted; nothing usable is an error before
training starts. Images are resized to cover their bucket and centre-cropped (no flips: ELLA's captions say where
things are).
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ELLAError
from .config import Config

log = logging.getLogger("ella")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
WDS_CAPTION_KEYS = ("txt", "caption", "text")


class DataError(ELLAError):
    """The training data cannot be used: the message names the source and what to do."""


@dataclass(frozen=True)
class Record:
    """One usable image and its caption (metadata only; pixels are read when the batch is made)."""

    key: str  # unique and sortable: "{source:03d}/{relative path or shard/key}"
    caption: str
    size: tuple[int, int]  # original (width, height)
    source: int
    path: str = ""  # an image file; for shards, the shard url
    member: str = ""  # shards: the sample's key inside the shard
    image_ext: str = ""  # shards: the member extension holding the image


@dataclass
class Skipped:
    """What was left out, by reason, for the log."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, where)

    def report(self) -> None:
        for reason, count in sorted(self.counts.items()):
            log.warning("ELLA train: skipped %d item(s): %s (e.g. %s)", count, reason, self.examples[reason])


# -- buckets ------------------------------------------------------------------------------------------------------


def make_buckets(resolution: int, step: int, max_ratio: float, bucketing: bool) -> list[tuple[int, int]]:
    """(width, height) pairs of about ``resolution^2`` pixels, sides multiples of ``step``, sorted."""
    if not bucketing:
        return [(resolution, resolution)]
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = step
    while width <= area // step:
        height = (area // width) // step * step
        if height >= step and max(width, height) / min(width, height) <= max_ratio + 1e-9:
            buckets.add((width, height))
        width += step
    return sorted(buckets)


def pick_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log ratio); ties go to the first."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


# -- images -------------------------------------------------------------------------------------------------------


def _open_image(data: bytes | str):
    from PIL import Image

    return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)


def image_size(data: bytes | str) -> tuple[int, int]:
    """The image's (width, height) from its header (raises for an unreadable file)."""
    with _open_image(data) as image:
        if image.width < 1 or image.height < 1:
            raise ValueError("empty image")
        return image.size


def prepare_image(data: bytes | str, bucket: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pixels in [-1, 1], ``[3, H, W]`` at the bucket's size, and the crop's (top, left) in the resized image.

    The image is resized (Lanczos) so it covers the bucket, then centre-cropped."""
    from PIL import Image

    with _open_image(data) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert("RGB")
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(resized, Image.Resampling.LANCZOS)
    left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return pixels, (top, left)


# -- listing ------------------------------------------------------------------------------------------------------


def source_kind(path: Path) -> str:
    """'shards' (a .tar, a folder of .tar files, a brace pattern or a URL), 'jsonl' or 'captions'."""
    text = str(path)
    if "{" in text or "://" in text or text.startswith("pipe:") or text.endswith(".tar"):
        return "shards"
    if not path.exists():
        raise DataError(f"[[data.sources]] path = {text!r} does not exist. Give a folder of images with captions, "
                        "a folder with metadata.jsonl, or webdataset .tar shards.")
    if path.is_file():
        raise DataError(f"[[data.sources]] path = {text!r} is a file; give a folder of images or .tar shards.")
    if (path / "metadata.jsonl").is_file():
        return "jsonl"
    if any(p.suffix == ".tar" for p in path.iterdir()) and not any(
            p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
        return "shards"
    return "captions"


def _read_caption(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def list_caption_folder(index: int, folder: Path, extension: str, skipped: Skipped) -> list[Record]:
    records = []
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    for image in images:
        rel = image.relative_to(folder).as_posix()
        caption = _read_caption(image.with_suffix(extension))
        if caption is None:
            skipped.add(f"no readable caption file ({extension})", str(image))
            continue
        try:
            size = image_size(str(image))
        except Exception:  # PIL raises many types for broken files
            skipped.add("unreadable image", str(image))
            continue
        records.append(Record(f"{index:03d}/{rel}", caption, size, index, path=str(image)))
    return records


def list_jsonl_folder(index: int, folder: Path, skipped: Skipped) -> list[Record]:
    records = []
    metadata = folder / "metadata.jsonl"
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{metadata}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped.add("metadata.jsonl line that is not JSON", where)
            continue
        name = row.get("file_name") if isinstance(row, dict) else None
        caption = next((row[k] for k in ("text", "caption") if isinstance(row.get(k), str)), None) \
            if isinstance(row, dict) else None
        if not isinstance(name, str):
            skipped.add("metadata.jsonl line without file_name", where)
            continue
        if caption is None:
            skipped.add("metadata.jsonl line without a text (or caption) string", where)
            continue
        image = folder / name
        try:
            size = image_size(str(image))
        except Exception:
            skipped.add("missing or unreadable image", str(image))
            continue
        records.append(Record(f"{index:03d}/{name}", caption.strip(), size, index, path=str(image)))
    return records


def shard_urls(path: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    p = Path(path)
    if p.is_dir():
        return sorted(str(x) for x in p.glob("*.tar"))
    return list(expand_urls(path))


def iter_shard(index: int, url: str, skipped: Skipped, decode: bool = True) -> Iterator[tuple[Record, bytes]]:
    """Usable records of one shard, with the image's bytes."""
    from webdataset.tariterators import tarfile_samples

    def keep_going(exc: Exception) -> bool:
        skipped.add(f"unreadable shard data ({type(exc).__name__})", url)
        return True

    for sample in tarfile_samples([{"url": url}], handler=keep_going):
        key = sample["__key__"]
        where = f"{url}:{key}"
        image_ext = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
        caption = next((sample[k] for k in WDS_CAPTION_KEYS if k in sample), None)
        if caption is None and "json" in sample:
            try:
                meta = json.loads(sample["json"])
                caption = next((meta[k] for k in ("caption", "text") if isinstance(meta.get(k), str)), None)
            except (json.JSONDecodeError, AttributeError):
                caption = None
        if image_ext is None:
            skipped.add("shard sample without an image", where)
            continue
        if caption is None:
            skipped.add("shard sample without a caption (txt, caption, text or json)", where)
            continue
        if isinstance(caption, bytes):
            try:
                caption = caption.decode("utf-8")
            except UnicodeDecodeError:
                skipped.add("shard caption that is not UTF-8", where)
                continue
        try:
            size = image_size(sample[image_ext])
        except Exception:
            skipped.add("unreadable image", where)
            continue
        record = Record(f"{index:03d}/{Path(url).name}/{key}", caption.strip(), size, index, path=url, member=key,
                        image_ext=image_ext)
        yield record, sample[image_ext]


def list_sources(config: Config, skipped: Skipped) -> tuple[list[Record], list[tuple[int, list[str]]]]:
    """Listed records of the folder sources (sorted by key) and the shard urls of the shard sources."""
    if not config.sources:
        raise DataError("The config has no [[data.sources]]: add at least one with a path to your images.")
    records: list[Record] = []
    shards: list[tuple[int, list[str]]] = []
    for index, source in enumerate(config.sources):
        path = Path(config.resolve(source.path))
        kind = source_kind(path)
        if kind == "captions":
            records += list_caption_folder(index, path, config.data["caption_extension"], skipped)
        elif kind == "jsonl":
            records += list_jsonl_folder(index, path, skipped)
        else:
            urls = shard_urls(str(path))
            if not urls:
                raise DataError(f"[[data.sources]] path = {source.path!r} names no .tar shards.")
            shards.append((index, urls))
    if records and shards:
        raise DataError("The sources mix image folders and webdataset shards. Train on one kind, or run "
                        "`cache` first (a cache is read as one listed data set), or pack the folders into shards.")
    return sorted(records, key=lambda r: r.key), shards


# -- batch plans --------------------------------------------------------------------------------------------------


def _rng(*numbers: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(n) for n in numbers]))


def sample_seed(seed: int, micro: int, position: int) -> int:
    """The seed of one sample's draws (caption dropout, timestep, noise): the same whatever the process count."""
    return int(np.random.SeedSequence([seed, micro, position]).generate_state(1, np.uint64)[0] >> 1)


class ListedPlan:
    """Global batches over listed records; ``batches(start)`` yields, from micro-batch ``start`` on, the record
    indices of this process's slice."""

    def __init__(self, buckets_of: list[tuple[int, int]], repeats: list[int], batch: int, rank: int,
                 processes: int, seed: int):
        self.buckets_of = buckets_of
        self.batch, self.rank, self.processes, self.seed = batch, rank, processes, seed
        self.by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, (bucket, repeat) in enumerate(zip(buckets_of, repeats)):
            self.by_bucket.setdefault(bucket, []).extend([index] * repeat)
        self.order = sorted(self.by_bucket)

    @property
    def global_batch(self) -> int:
        return self.batch * self.processes

    def _epochs(self) -> Iterator[list[list[int]]]:
        carry: dict[tuple[int, int], list[int]] = {b: [] for b in self.order}
        epoch = 0
        while True:
            rng = _rng(self.seed, epoch, 1)
            batches = []
            for bucket in self.order:
                items = self.by_bucket[bucket]
                pool = carry[bucket] + [items[i] for i in rng.permutation(len(items))]
                full = len(pool) // self.global_batch * self.global_batch
                batches += [pool[i : i + self.global_batch] for i in range(0, full, self.global_batch)]
                carry[bucket] = pool[full:]
            yield [batches[i] for i in rng.permutation(len(batches))]
            epoch += 1

    def batches(self, start: int = 0) -> Iterator[list[int]]:
        micro = 0
        for epoch in self._epochs():
            for batch in epoch:
                if micro >= start:
                    yield batch[self.rank * self.batch : (self.rank + 1) * self.batch]
                micro += 1


@dataclass
class StreamItem:
    record: Record
    image: bytes
    bucket: tuple[int, int]


def stream_batches(shards: list[tuple[int, list[str]]], buckets: list[tuple[int, int]], batch: int, rank: int,
                   processes: int, seed: int, skipped: Skipped, start: int = 0) -> Iterator[list[StreamItem]]:
    """This process's batches from its shards, epoch after epoch; ``start`` batches are skipped (read, not decoded)."""
    mine = [(index, url) for index, urls in shards for url in urls]
    mine = mine[rank::processes]
    if not mine:
        total = sum(len(urls) for _, urls in shards)
        raise DataError(f"{total} shard(s) for {processes} processes: every process needs a shard of its own. "
                        "Split the data into more .tar shards, or use fewer processes.")
    queues: dict[tuple[int, int], list[StreamItem]] = {}
    made = 0
    epoch = 0
    while True:
        rng = _rng(seed, epoch, 2, rank)
        produced = 0
        for position in rng.permutation(len(mine)):
            index, url = mine[position]
            for record, image in iter_shard(index, url, skipped):
                produced += 1
                bucket = pick_bucket(record.size, buckets)
                queue = queues.setdefault(bucket, [])
                queue.append(StreamItem(record, image, bucket))
                if len(queue) == batch:
                    queues[bucket] = []
                    made += 1
                    if made > start:
                        yield queue
        if produced == 0:
            skipped.report()
            raise DataError(f"The shards of this process ({', '.join(u for _, u in mine[:3])}...) hold no usable "
                            "sample (an image and a caption under the same key).")
        epoch += 1
