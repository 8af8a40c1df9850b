"""Latents and LLM features on disk, made once and split across processes.

Layout of a cache folder:

- ``manifest.json``: what the cache was made from (a fingerprint of the config keys that change its contents, and
  per source a digest of its files: names, sizes, modification times and caption hashes) and how many items it
  holds; written last, by the main process, so a cache without it is incomplete;
- ``fingerprint-{source}.jsonl``: per source, one line per file behind the digest (``[name, size, mtime_ns,
  caption hash]``; for shards one per shard), read only when the digest differs, to say what changed;
- ``skipped.txt``: what the cache left out, one line per item (reason, TAB, file);
- ``index-{rank}.jsonl``: one line per item (key, caption, bucket, original size, crop, file, entry, source);
- ``part-{rank}-{n}.safetensors``: ``{entry}.latent`` (the VAE's unscaled latent mean, in the VAE's dtype),
  ``{entry}.features`` (the LLM's features in its dtype: every ``max_length`` position for fixed length, only the
  real tokens for flexible length), ``{entry}.pooled`` (SDXL: CLIP-G's pooled embedding);
- ``empty.safetensors``: the same for the empty text (caption dropout).

A cache is read as one listed data set whatever made it (folders, shards, or both), with the same order for any
process count. Reading it checks the data again (a stat per file and a read per caption file, no image is opened):
an added, removed or changed image or an edited caption makes the cache out of date, and the message says which.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ELLAError
from .batches import make_buckets, pick_bucket
from .config import Config
from .data import (
    DataError,
    Record,
    Skipped,
    caption_folder_images,
    iter_shard,
    jsonl_caption,
    jsonl_rows,
    list_sources,
    prepare_image,
    shard_urls,
    short_error,
    source_kinds,
)

log = logging.getLogger("ella")
PART_SIZE = 256
FINGERPRINT_MODEL_KEYS = ("base", "base_config", "llm", "llm_layer", "token_length", "max_length")
FINGERPRINT_DATA_KEYS = ("resolution", "bucketing", "bucket_step", "bucket_max_ratio", "caption_extension",
                         "empty_captions")
SHOWN = 3  # names shown per kind of change


class CacheError(ELLAError):
    """A cache folder is incomplete or was made from another config."""


# Keys a fingerprint holds only when set: a cache made without them (or before they existed) stays valid while they
# are off, and one made with them is refused once they change or go.
OPTIONAL_KEYS = ("validation.split",)


def fingerprint(config: Config, feature_dtype: str) -> dict:
    out = {
        **{f"model.{k}": config.model[k] for k in FINGERPRINT_MODEL_KEYS},
        "model.feature_dtype": feature_dtype,
        **{f"data.{k}": config.data[k] for k in FINGERPRINT_DATA_KEYS},
        "data.sources": [s.path for s in config.sources],
    }
    if config.validation["split"]:  # the items it holds out are not in the cache
        out["validation.split"] = config.validation["split"]
    return out


# -- what the data was when the cache was made -------------------------------------------------------------------


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _stat(path: Path | str) -> tuple[int, int]:
    try:
        info = os.stat(path)
    except OSError:
        return -1, 0
    return info.st_size, info.st_mtime_ns


def source_entries(config: Config, index: int, kind: str) -> Iterator[list]:
    """``[name, size, mtime_ns, caption hash]`` for each file of one source the cache depends on: an image and its
    caption file's bytes, a metadata.jsonl line's image and text, a shard (its captions are inside it). A stat per
    file and a read per caption file; no image is opened."""
    folder = Path(config.resolve(config.sources[index].path))
    if kind == "captions":
        extension = config.data["caption_extension"]
        for image in caption_folder_images(folder):
            try:
                caption = _hash(image.with_suffix(extension).read_bytes())
            except OSError:
                caption = "-"
            yield [image.relative_to(folder).as_posix(), *_stat(image), caption]
    elif kind == "jsonl":
        for _, row, _, _ in jsonl_rows(folder / "metadata.jsonl"):
            if row is not None:
                caption = jsonl_caption(row)
                yield [row["file_name"], *_stat(folder / row["file_name"]),
                       _hash(caption.encode("utf-8")) if caption is not None else "-"]
    else:
        for url in shard_urls(str(folder)):
            local = "://" not in url and not url.startswith("pipe:")
            yield [url, *(_stat(url) if local else (-1, 0)), "-"]  # a remote shard is not checked


def _digest(entries, write_to: Path | None = None) -> tuple[str, int]:
    digest = hashlib.blake2b(digest_size=16)
    count = 0
    with open(write_to, "w", encoding="utf-8") if write_to is not None else contextlib.nullcontext() as out:
        for entry in entries:
            line = json.dumps(entry, ensure_ascii=False) + "\n"
            digest.update(line.encode("utf-8"))
            count += 1
            if out is not None:
                out.write(line)
    return digest.hexdigest(), count


def data_fingerprint(config: Config, folder: Path | None = None) -> list[dict]:
    """Per source: its path, kind, file count and digest; with ``folder``, each source's entries are written to
    ``folder/fingerprint-{index}.jsonl`` (the detail that says what changed)."""
    out = []
    for index, kind in enumerate(source_kinds(config)):
        write_to = folder / f"fingerprint-{index}.jsonl" if folder is not None else None
        digest, count = _digest(source_entries(config, index, kind), write_to)
        out.append({"path": config.sources[index].path, "kind": kind, "files": count, "digest": digest})
    return out


def _names(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _changes(config: Config, folder: Path, index: int, kind: str) -> str:
    """What changed in one source since the cache was made, from its stored entries."""
    try:
        lines = (folder / f"fingerprint-{index}.jsonl").read_text(encoding="utf-8").splitlines()
        old = {entry[0]: entry for entry in map(json.loads, lines)}
    except (OSError, ValueError):
        return f"its files changed (fingerprint-{index}.jsonl, which would say how, is missing)"
    new = {entry[0]: entry for entry in source_entries(config, index, kind)}
    both = sorted(new.keys() & old.keys())
    noun = "shard" if kind == "shards" else "image"
    changes = {
        f"{noun}(s) added": sorted(new.keys() - old.keys()),
        f"{noun}(s) removed": sorted(old.keys() - new.keys()),
        f"{noun}(s) changed (size or modification time)": [n for n in both if new[n][1:3] != old[n][1:3]],
    }
    edited = [n for n in both if new[n][3] != old[n][3]]
    if kind == "captions":
        extension = config.data["caption_extension"]
        changes["caption file(s) edited, added or removed"] = [str(Path(n).with_suffix(extension)) for n in edited]
    else:
        changes["metadata.jsonl caption(s) edited, for"] = edited
    told = [f"{len(names)} {what}: {_names(names)}" for what, names in changes.items() if names]
    return "; ".join(told) or "its listing changed (order or repeated names)"


def _again(config: Config) -> str:
    return (f"Make it again with `python -m ella_ext.train cache --config {config.path or 'run.toml'} --force` (or "
            "delete the folder: `train` makes it again at the start), or point [train] cache at a new folder.")


def check_data(config: Config, folder: Path, manifest: dict) -> None:
    """Refuse a cache whose data changed since it was made, saying what changed and what to do."""
    told = []
    for index, (now, then) in enumerate(zip(data_fingerprint(config), manifest["data"])):
        if now["kind"] != then["kind"]:
            told.append(f"source {index + 1} ({now['path']!r}) was {then['kind']} and is now {now['kind']}")
        elif now["digest"] != then["digest"]:
            told.append(f"source {index + 1} ({now['path']!r}): {_changes(config, folder, index, now['kind'])}")
    if told:
        raise CacheError(f"The cache {folder} is out of date: the data changed since it was made. "
                         f"{'. '.join(told)}. {_again(config)}")


@dataclass(frozen=True)
class CachedItem:
    record: Record
    bucket: tuple[int, int]
    crop: tuple[int, int]
    file: str
    entry: int


def cache_complete(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


def build_cache(config: Config, folder: Path, accelerator, base, encoder, feature_dtype: str, batch: int = 8) -> None:
    """Encode this process's share of the data into ``folder``; the main process writes the manifest."""
    from safetensors.torch import save_file

    rank, processes = accelerator.process_index, accelerator.num_processes
    folder.mkdir(parents=True, exist_ok=True)
    kinds = source_kinds(config)
    data = data_fingerprint(config, folder) if accelerator.is_main_process else None  # before anything is read
    accelerator.wait_for_everyone()
    skipped = Skipped()
    records, shards = list_sources(config, skipped, kinds)
    empty_captions = config.data["empty_captions"]
    buckets = make_buckets(config.data["resolution"], config.data["bucket_step"], config.data["bucket_max_ratio"],
                           config.data["bucketing"])
    max_length = config.model["max_length"] if config.model["token_length"] == "fixed" else None

    def my_items():
        for record in records[rank::processes]:
            yield record, record.path
        mine = [(i, url) for i, urls in shards for url in urls][rank::processes]
        for index, url in mine:
            yield from iter_shard(index, url, skipped, empty_captions=empty_captions,
                                  split=config.validation["split"])

    index_lines: list[str] = []
    part: dict[str, torch.Tensor] = {}
    part_number = 0
    pending: dict[tuple[int, int], list] = {}

    def flush_part():
        nonlocal part, part_number
        if part:
            save_file(part, str(folder / f"part-{rank}-{part_number:05d}.safetensors"))
            part_number += 1
            part = {}

    def encode(group):
        nonlocal part
        pixels = torch.stack([p for _, p, _, _ in group])
        latents = base.encode_pixels(pixels).cpu()
        captions = [r.caption for r, _, _, _ in group]
        features, mask = encoder.encode(captions, max_length)
        pooled = base.pooled(captions)
        for i, (record, _, crop, bucket) in enumerate(group):
            length = int(mask[i].sum())
            row = features[i] if max_length is not None else features[i, :length]
            tensors = {"latent": latents[i].contiguous(), "features": row.to(encoder.dtype).cpu().contiguous()}
            if pooled is not None:
                tensors["pooled"] = pooled[i].cpu().contiguous()
            entry = len(index_lines)
            for name, tensor in tensors.items():
                part[f"{entry}.{name}"] = tensor
            index_lines.append(json.dumps({
                "key": record.key, "caption": record.caption, "size": list(record.size), "source": record.source,
                "bucket": list(bucket), "crop": list(crop), "file": f"part-{rank}-{part_number:05d}.safetensors",
                "entry": entry}))
            if len(part) >= PART_SIZE * len(tensors):
                flush_part()

    for record, image in my_items():
        bucket = pick_bucket(record.size, buckets)
        try:
            pixels, crop = prepare_image(image, bucket)
        except Exception as exc:  # a header that reads but pixels that do not (a truncated file)
            where = f"{record.path}:{record.member}" if record.member else record.path
            skipped.add("unreadable image", where, short_error(exc))
            continue
        group = pending.setdefault(bucket, [])
        group.append((record, pixels, crop, bucket))
        if len(group) == batch:
            encode(group)
            pending[bucket] = []
    for group in pending.values():
        if group:
            encode(group)
    flush_part()
    (folder / f"index-{rank}.jsonl").write_text("".join(line + "\n" for line in index_lines), encoding="utf-8")
    counts = accelerator.gather(torch.tensor([len(index_lines)], device=accelerator.device)).sum().item()
    _report_skipped(accelerator, skipped, folder)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if counts == 0:
            raise DataError("No usable image in the [[data.sources]] (every item was skipped; see the log).")
        features, mask = encoder.encode([""], max_length)
        empty = {"features": (features[0] if max_length is not None else features[0, : int(mask[0].sum())])
                 .to(encoder.dtype).cpu().contiguous()}
        pooled = base.pooled([""])
        if pooled is not None:
            empty["pooled"] = pooled[0].cpu().contiguous()
        save_file(empty, str(folder / "empty.safetensors"))
        manifest = {"fingerprint": fingerprint(config, feature_dtype), "data": data, "processes": processes,
                    "items": counts}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        log.info("ELLA train: cached %d items in %s", counts, folder)
    accelerator.wait_for_everyone()


def _report_skipped(accelerator, skipped: Skipped, folder: Path) -> None:
    """Every process's skipped items, once each (every process lists the folders), logged and written to
    ``folder/skipped.txt`` by the main process."""
    from accelerate.utils import gather_object

    everyone = gather_object([(skipped.items, skipped.kept_empty)]) if accelerator.num_processes > 1 \
        else [(skipped.items, skipped.kept_empty)]
    if accelerator.is_main_process:
        merged = Skipped()
        for items, kept in everyone:
            for item in items:
                merged.add(*item)
            merged.kept_empty += [k for k in kept if k not in merged.kept_empty]
        merged.report(folder)


class CacheReader:
    """A complete cache, checked against the config; items sorted by key."""

    def __init__(self, folder: Path, config: Config, feature_dtype: str):
        self.folder = folder
        if not cache_complete(folder):
            raise CacheError(f"The cache {folder} is incomplete (no manifest.json): delete it and run `cache` again.")
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if "data" not in manifest:
            raise CacheError(f"The cache {folder} was made by an older trainer that did not record the data's files, "
                             f"so it cannot tell whether they changed. {_again(config)}")
        expected, stored = fingerprint(config, feature_dtype), manifest["fingerprint"]
        keys = set(expected) | (set(stored) & set(OPTIONAL_KEYS))
        changed = sorted(k for k in keys if stored.get(k) != expected.get(k))
        if changed:
            raise CacheError(f"The cache {folder} was made with other settings ({', '.join(changed)} differ). "
                             f"{_again(config)}")
        check_data(config, folder, manifest)
        items = []
        for index_file in sorted(folder.glob("index-*.jsonl")):
            for line in index_file.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                record = Record(row["key"], row["caption"], tuple(row["size"]), row["source"])
                items.append(CachedItem(record, tuple(row["bucket"]), tuple(row["crop"]), row["file"], row["entry"]))
        self.items = sorted(items, key=lambda item: item.record.key)
        if len(self.items) != manifest["items"]:
            raise CacheError(f"The cache {folder} lists {len(self.items)} items but its manifest says "
                             f"{manifest['items']}: delete it and run `cache` again.")
        self._handles: dict[str, object] = {}

    def empty(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        try:
            return load_file(str(self.folder / "empty.safetensors"))
        except Exception as exc:  # missing, or safetensors' own error types
            raise self._broken("empty.safetensors", exc) from exc

    def load(self, item: CachedItem) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        try:
            handle = self._handles.get(item.file)
            if handle is None:
                if len(self._handles) > 16:
                    self._handles.clear()
                handle = self._handles[item.file] = safe_open(str(self.folder / item.file), framework="pt")
            out = {}
            for name in ("latent", "features", "pooled"):
                key = f"{item.entry}.{name}"
                if key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    out[name] = handle.get_tensor(key)
        except Exception as exc:  # a part deleted or damaged since the cache was made
            raise self._broken(item.file, exc) from exc
        return out

    def _broken(self, name: str, exc: Exception) -> CacheError:
        return CacheError(f"The cache {self.folder} cannot be read: {name} is missing or damaged ({exc}). Make it "
                          "again: `cache --force` (or delete the folder; train makes it at the start).")

    def __getstate__(self):  # data loader workers open their own handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
