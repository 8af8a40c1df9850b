"""Training data: image folders with same-name caption files (A1111 / kohya), image folders with ``metadata.jsonl``
(diffusers), and webdataset ``.tar`` shards (streamed): listing, captions, images, and what is refused before any
model loads. (Buckets and the order of batches: ``batches.py``.)

Unreadable images and records without a usable caption are skipped, each named once with its reason (``Skipped``:
a count and a few examples per reason in the log, the full list in ``skipped.txt``); empty captions follow
``[data] empty_captions``; nothing usable is an error before training starts. Images are resized to cover their
bucket and centre-cropped (no flips: ELLA's captions say where things are).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
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


def holdout_name(record: Record) -> str:
    """The name ``[validation] split`` hashes: an image's path inside its folder (or metadata.jsonl's file_name), a
    shard sample's key. Neither the source's place in the config nor the folder's location changes it."""
    return record.member or record.key.split("/", 1)[1]


def is_held_out(name: str, split: float) -> bool:
    """Whether ``[validation] split`` holds this name out: the first 8 bytes of its SHA-1 below ``split`` of their
    range. The same on every run, machine and process (Python's ``hash()`` is salted per process)."""
    return split > 0 and int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") < split * 2**64


@dataclass
class Skipped:
    """What was left out, each item once with its reason, and the empty captions kept or refused.

    The log shows per reason a count and a few examples; the full list goes to ``skipped.txt`` (one line per item:
    reason, TAB, file or location, and where there is one, TAB and what went wrong)."""

    items: list[tuple[str, str, str]] = field(default_factory=list)  # (reason, where, detail)
    counts: Counter = field(default_factory=Counter)
    kept_empty: list[str] = field(default_factory=list)  # empty_captions = "keep": trained on the empty text
    refused_empty: list[str] = field(default_factory=list)  # empty_captions = "error": named in the refusal
    _seen: set = field(default_factory=set, repr=False)

    def add(self, reason: str, where: str, detail: str = "") -> bool:
        """Record an item once; False when it was recorded already (a shard read again, a file broken every epoch)."""
        if (reason, where) in self._seen:
            return False
        self._seen.add((reason, where))
        self.items.append((reason, where, detail))
        self.counts[reason] += 1
        return True

    def summary(self) -> str:
        return ", ".join(f"{count} {reason}" for reason, count in sorted(self.counts.items()))

    def report(self, folder: Path | None = None, main: bool = True) -> Path | None:
        """Log each reason with a count and a few examples; with ``folder``, the full list goes to
        ``folder/skipped.txt`` (an old list there is replaced, or removed when nothing was skipped). Only the main
        process logs and writes (``main``); returns the list's path when one was written."""
        if not main:
            return None
        written = None
        if folder is not None:
            written = write_skipped(folder / SKIPPED_FILE, self.items, append=False)
        for reason, count in sorted(self.counts.items()):
            shown = [_shown(where, detail) for r, where, detail in self.items if r == reason][:EXAMPLES]
            more = f" and {count - len(shown)} more" if count > len(shown) else ""
            log.warning("ELLA train: skipped %d item(s): %s: %s%s", count, reason, "; ".join(shown), more)
        if self.kept_empty:
            more = f" and {len(self.kept_empty) - EXAMPLES} more" if len(self.kept_empty) > EXAMPLES else ""
            log.info("ELLA train: %d item(s) have an empty caption and train on the empty text ([data] "
                     "empty_captions = 'keep'): %s%s", len(self.kept_empty), "; ".join(self.kept_empty[:EXAMPLES]),
                     more)
        if written is not None:
            log.warning("ELLA train: the full list of the %d skipped item(s) is in %s (reason, TAB, file).",
                        len(self.items), written)
        return written

    def refuse_empty(self) -> None:
        """``empty_captions = 'error'``: refuse, naming the files, when a caption was empty."""
        if self.refused_empty:
            raise empty_caption_error(self.refused_empty)


SKIPPED_FILE = "skipped.txt"
EXAMPLES = 3  # examples per reason in the log; the rest are in skipped.txt


def _shown(where: str, detail: str) -> str:
    return f"{where} ({detail})" if detail else where


def _field(text: str) -> str:
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def write_skipped(path: Path, items: list[tuple[str, str, str]], append: bool) -> Path | None:
    """Write (or append) ``reason TAB where [TAB detail]`` lines; an empty list replaces nothing but an old file."""
    if not items:
        if not append and path.is_file():
            path.unlink()
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for reason, where, detail in items:
            f.write("\t".join(_field(x) for x in (reason, where, detail) if x) + "\n")
    return path


def empty_caption_error(where: list[str]) -> DataError:
    shown = ", ".join(where[:10]) + (f" and {len(where) - 10} more" if len(where) > 10 else "")
    return DataError(f"{len(where)} caption(s) are empty ([data] empty_captions = 'error'): {shown}. Write those "
                     "captions, or set [data] empty_captions = 'skip' (leave those images out) or 'keep' (train them "
                     "on the empty text, as caption dropout does).")


def short_error(exc: BaseException) -> str:
    """What went wrong, in one short line (PIL's messages name the file again: the name is kept, the folder cut)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = re.sub(r"'(?:[^'\n]*[/\\])([^'/\\\n]+)'", r"'\1'", text)
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


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


def source_kinds(config: Config) -> list[str]:
    """Each [[data.sources]] entry's kind; raises for a path that does not exist, local shards included."""
    if not config.sources:
        raise DataError("The config has no [[data.sources]]: add at least one with a path to your images.")
    kinds = []
    for source in config.sources:
        path = Path(config.resolve(source.path))
        kinds.append(source_kind(path))
        if kinds[-1] == "shards" and "://" not in str(path) and not str(path).startswith("pipe:"):
            urls = shard_urls(str(path))
            missing = [url for url in urls if not Path(url).is_file()]
            if missing or not urls:
                raise DataError(f"[[data.sources]] path = {source.path!r}: "
                                + (f"no such shard {missing[0]}" if missing else "it names no .tar shards")
                                + ". Give existing .tar shards, a folder of them, or a folder of images.")
    return kinds


def refuse_mixed_sources(config: Config, kinds: list[str]) -> None:
    """Training on the fly reads folders as a list and shards as a stream: one run cannot do both. A cache can."""
    folders = [s.path for s, kind in zip(config.sources, kinds) if kind != "shards"]
    shards = [s.path for s, kind in zip(config.sources, kinds) if kind == "shards"]
    if folders and shards:
        raise DataError(
            f"The sources mix image folders ({', '.join(map(repr, folders))}) and webdataset shards "
            f"({', '.join(map(repr, shards))}), which training on the fly cannot read together. Set [train] cache = "
            "\"a new folder\" in the config: `train` then encodes both into that one cache at the start and trains "
            f"from it (or make it first with `python -m ella_ext.train cache --config {config.path or 'run.toml'}`). "
            "Or pack the folders into shards.")


def _decode_problem(data: bytes, exc: UnicodeDecodeError) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"
    return (f"byte 0x{data[exc.start]:02x} at offset {exc.start} is not UTF-8 (Latin-1 or Windows-1252?); "
            "save it as UTF-8")


def _decode_caption(data: bytes) -> tuple[str | None, str]:
    """The text (a UTF-8 byte-order mark dropped, spaces stripped), or None and what is wrong with the bytes."""
    try:
        return data.decode("utf-8-sig").strip(), ""
    except UnicodeDecodeError as exc:
        return None, _decode_problem(data, exc)


def _read_caption(path: Path) -> tuple[str | None, str, str]:
    """(caption, reason, detail): the caption, or None with why it cannot be used."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"no caption file ({path.suffix})", ""
    except OSError as exc:
        return None, "caption file unreadable", short_error(exc)
    caption, problem = _decode_caption(data)
    return (caption, "", "") if caption is not None else (None, "caption file not UTF-8", problem)


EMPTY_CAPTION = "empty caption ([data] empty_captions = 'skip')"


def _accept_empty(mode: str, where: str, skipped: Skipped) -> bool:
    """An empty caption under ``[data] empty_captions``: True when the item trains on the empty text."""
    if mode == "keep":
        skipped.kept_empty.append(where)
        return True
    if mode == "error":
        skipped.refused_empty.append(where)
    else:
        skipped.add(EMPTY_CAPTION, where)
    return False


def _image_size_or_skip(image: Path | bytes, where: str, skipped: Skipped) -> tuple[int, int] | None:
    try:
        return image_size(image if isinstance(image, bytes) else str(image))
    except FileNotFoundError:
        skipped.add("image file missing", where)
    except Exception as exc:  # PIL raises many types for broken files
        skipped.add("unreadable image", where, short_error(exc))
    return None


def caption_folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def list_caption_folder(index: int, folder: Path, extension: str, skipped: Skipped,
                        empty_captions: str = "skip") -> list[Record]:
    records = []
    for image in caption_folder_images(folder):
        rel = image.relative_to(folder).as_posix()
        caption_file = image.with_suffix(extension)
        caption, reason, detail = _read_caption(caption_file)
        if caption is None:
            skipped.add(reason, str(image) if reason.startswith("no caption") else str(caption_file), detail)
            continue
        if not caption and not _accept_empty(empty_captions, str(caption_file), skipped):
            continue
        size = _image_size_or_skip(image, str(image), skipped)
        if size is not None:
            records.append(Record(f"{index:03d}/{rel}", caption, size, index, path=str(image)))
    return records


def jsonl_rows(metadata: Path) -> Iterator[tuple[str, dict | None, str, str]]:
    """(where, row, reason, detail) for each non-blank line of a metadata.jsonl: the row is None when the line
    cannot be used, and the reason and detail say why."""
    for number, raw in enumerate(metadata.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{metadata}:{number}"
        line, problem = _decode_caption(raw)
        if line is None:
            yield where, None, "metadata.jsonl line not UTF-8", problem
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            yield where, None, "metadata.jsonl line that is not JSON", ""
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            yield where, None, "metadata.jsonl line without file_name", ""
            continue
        yield where, row, "", ""


def jsonl_caption(row: dict) -> str | None:
    return next((row[k] for k in ("text", "caption") if isinstance(row.get(k), str)), None)


def list_jsonl_folder(index: int, folder: Path, skipped: Skipped, empty_captions: str = "skip") -> list[Record]:
    records = []
    for where, row, reason, detail in jsonl_rows(folder / "metadata.jsonl"):
        if row is None:
            skipped.add(reason, where, detail)
            continue
        name, caption = row["file_name"], jsonl_caption(row)
        if caption is None:
            skipped.add("metadata.jsonl line without a text (or caption) string", where)
            continue
        caption = caption.strip()
        if not caption and not _accept_empty(empty_captions, f"{where} ({name})", skipped):
            continue
        image = folder / name
        size = _image_size_or_skip(image, str(image), skipped)
        if size is not None:
            records.append(Record(f"{index:03d}/{name}", caption, size, index, path=str(image)))
    return records


def shard_urls(path: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    p = Path(path)
    if p.is_dir():
        return sorted(str(x) for x in p.glob("*.tar"))
    return list(expand_urls(path))


def iter_shard(index: int, url: str, skipped: Skipped, decode: bool = True, empty_captions: str = "skip",
               split: float = 0.0, held_out: bool = False) -> Iterator[tuple[Record, bytes]]:
    """Usable records of one shard, with the image's bytes. ``empty_captions = 'error'`` raises at the first empty
    caption met (a shard is only known once read). With ``split`` (``[validation] split``), only the samples the
    split trains on, or with ``held_out`` only those it holds out (the others are passed over unread)."""
    from webdataset.tariterators import tarfile_samples

    def keep_going(exc: Exception) -> bool:
        skipped.add(f"unreadable shard data ({type(exc).__name__})", url, short_error(exc))
        return True

    for sample in tarfile_samples([{"url": url}], handler=keep_going):
        key = sample["__key__"]
        if split and is_held_out(key, split) != held_out:
            continue
        where = f"{url}:{key}"
        image_ext = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
        caption = next((sample[k] for k in WDS_CAPTION_KEYS if k in sample), None)
        if caption is None and "json" in sample:
            try:
                meta = json.loads(sample["json"])
                caption = next((meta[k] for k in ("caption", "text") if isinstance(meta.get(k), str)), None)
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                caption = None
        if image_ext is None:
            skipped.add("shard sample without an image", where)
            continue
        if caption is None:
            skipped.add("shard sample without a caption (txt, caption, text or json)", where)
            continue
        if isinstance(caption, bytes):
            caption, problem = _decode_caption(caption)
            if caption is None:
                skipped.add("shard caption not UTF-8", where, problem)
                continue
        caption = caption.strip()
        if not caption and not _accept_empty(empty_captions, where, skipped):
            if empty_captions == "error":
                raise empty_caption_error([where])
            continue
        size = _image_size_or_skip(sample[image_ext], where, skipped)
        if size is None:
            continue
        record = Record(f"{index:03d}/{Path(url).name}/{key}", caption, size, index, path=url, member=key,
                        image_ext=image_ext)
        yield record, sample[image_ext]


def list_sources(config: Config, skipped: Skipped, kinds: list[str] | None = None,
                 held_out: list[Record] | None = None) -> tuple[list[Record], list[tuple[int, list[str]]]]:
    """Listed records of the folder sources (sorted by key) and the shard urls of the shard sources (``kinds``: the
    sources' kinds when known). With ``[data] empty_captions = 'error'``, an empty caption in a folder is refused
    here, naming every such file. With ``[validation] split``, the records it holds out are left out (and added to
    ``held_out`` when given); a split that leaves nothing to train on is refused."""
    records: list[Record] = []
    shards: list[tuple[int, list[str]]] = []
    empty_captions = config.data["empty_captions"]
    for index, (source, kind) in enumerate(zip(config.sources, kinds or source_kinds(config))):
        path = Path(config.resolve(source.path))
        if kind == "captions":
            records += list_caption_folder(index, path, config.data["caption_extension"], skipped, empty_captions)
        elif kind == "jsonl":
            records += list_jsonl_folder(index, path, skipped, empty_captions)
        else:
            urls = shard_urls(str(path))
            if not urls:
                raise DataError(f"[[data.sources]] path = {source.path!r} names no .tar shards.")
            shards.append((index, urls))
    skipped.refuse_empty()
    records.sort(key=lambda r: r.key)
    split = config.validation["split"]
    if split:
        kept = [r for r in records if not is_held_out(holdout_name(r), split)]
        if held_out is not None:
            held_out += [r for r in records if is_held_out(holdout_name(r), split)]
        if records and not kept and not shards:
            raise DataError(f"[validation] split = {split} holds out every one of the {len(records)} usable images, "
                            "which leaves none to train on. Lower it, add images, or give a folder of held-out images "
                            "as [validation] path instead.")
        records = kept
    return records, shards


# -- before any model loads ---------------------------------------------------------------------------------------


def empty_caption_places(config: Config, kinds: list[str]) -> list[str]:
    """The empty captions of the folder sources, named as the listing names them (captions are read, images are
    not; shards are only known once read)."""
    places = []
    for source, kind in zip(config.sources, kinds):
        folder = Path(config.resolve(source.path))
        if kind == "captions":
            for image in caption_folder_images(folder):
                caption_file = image.with_suffix(config.data["caption_extension"])
                if _read_caption(caption_file)[0] == "":
                    places.append(str(caption_file))
        elif kind == "jsonl":
            for where, row, _, _ in jsonl_rows(folder / "metadata.jsonl"):
                caption = jsonl_caption(row) if row is not None else None
                if caption is not None and not caption.strip():
                    places.append(f"{where} ({row['file_name']})")
    return places


def preflight(config: Config) -> None:
    """What can be refused before any model loads: a source that does not exist, folders mixed with shards for
    training on the fly (no [train] cache), with ``[data] empty_captions = 'error'`` an empty caption in a folder
    source (every such file named), and a ``[validation]`` path that does not exist or a split that holds out none
    or all of the folders' images."""
    from .validation import preflight_validation

    kinds = source_kinds(config)
    if config.cache_dir is None:
        refuse_mixed_sources(config, kinds)
    if config.data["empty_captions"] == "error":
        places = empty_caption_places(config, kinds)
        if places:
            raise empty_caption_error(places)
    preflight_validation(config, kinds)
