"""Latents and LLM features on disk, made once and split across processes.

Layout of a cache folder:

- ``manifest.json``: what the cache was made from (a fingerprint of the config keys that change its contents) and
  how many items it holds; written last, by the main process, so a cache without it is incomplete;
- ``index-{rank}.jsonl``: one line per item (key, caption, bucket, original size, crop, file, entry, source);
- ``part-{rank}-{n}.safetensors``: ``{entry}.latent`` (the VAE's unscaled latent mean, in the VAE's dtype),
  ``{entry}.features`` (the LLM's features in its dtype: every ``max_length`` position for fixed length, only the
  real tokens for flexible length), ``{entry}.pooled`` (SDXL: CLIP-G's pooled embedding);
- ``empty.safetensors``: the same for the empty text (caption dropout).

A cache is read as one listed data set whatever made it (folders or shards), with the same order for any process
count.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ELLAError
from .config import Config
from .data import DataError, Record, Skipped, iter_shard, list_sources, make_buckets, pick_bucket, prepare_image

log = logging.getLogger("ella")
PART_SIZE = 256
FINGERPRINT_MODEL_KEYS = ("base", "base_config", "llm", "llm_layer", "token_length", "max_length")
FINGERPRINT_DATA_KEYS = ("resolution", "bucketing", "bucket_step", "bucket_max_ratio", "caption_extension")


class CacheError(ELLAError):
    """A cache folder is incomplete or was made from another config."""


def fingerprint(config: Config, feature_dtype: str) -> dict:
    return {
        **{f"model.{k}": config.model[k] for k in FINGERPRINT_MODEL_KEYS},
        "model.feature_dtype": feature_dtype,
        **{f"data.{k}": config.data[k] for k in FINGERPRINT_DATA_KEYS},
        "data.sources": [s.path for s in config.sources],
    }


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
    skipped = Skipped()
    records, shards = list_sources(config, skipped)
    buckets = make_buckets(config.data["resolution"], config.data["bucket_step"], config.data["bucket_max_ratio"],
                           config.data["bucketing"])
    max_length = config.model["max_length"] if config.model["token_length"] == "fixed" else None

    def my_items():
        for record in records[rank::processes]:
            yield record, record.path
        mine = [(i, url) for i, urls in shards for url in urls][rank::processes]
        for index, url in mine:
            yield from iter_shard(index, url, skipped)

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
        except Exception:
            skipped.add("unreadable image", record.key)
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
    skipped.report()
    counts = accelerator.gather(torch.tensor([len(index_lines)], device=accelerator.device)).sum().item()
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
        manifest = {"fingerprint": fingerprint(config, feature_dtype), "processes": processes, "items": counts}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        log.info("ELLA train: cached %d items in %s", counts, folder)
    accelerator.wait_for_everyone()


class CacheReader:
    """A complete cache, checked against the config; items sorted by key."""

    def __init__(self, folder: Path, config: Config, feature_dtype: str):
        self.folder = folder
        if not cache_complete(folder):
            raise CacheError(f"The cache {folder} is incomplete (no manifest.json): delete it and run `cache` again.")
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        expected = fingerprint(config, feature_dtype)
        changed = sorted(k for k in expected if manifest["fingerprint"].get(k) != expected[k])
        if changed:
            raise CacheError(f"The cache {folder} was made with other settings ({', '.join(changed)} differ). Delete "
                             "the folder, or point [train] cache at a new one; it is made again at the start.")
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

        return load_file(str(self.folder / "empty.safetensors"))

    def load(self, item: CachedItem) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

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
        return out

    def __getstate__(self):  # data loader workers open their own handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
