"""Feeding the loop: this process's micro-batches (listed folders, a cache, or streamed shards, through a torch data
loader) and one micro-batch's model inputs with its per-sample random draws (caption dropout, timestep, noise), each
seeded by (seed, micro-batch number, position in the global batch)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .batches import ListedPlan, make_buckets, pick_bucket, sample_seed, stream_batches
from .config import Config, ConfigError
from .data import (
    EXAMPLES,
    SKIPPED_FILE,
    DataError,
    Skipped,
    list_sources,
    prepare_image,
    refuse_mixed_sources,
    short_error,
    source_kinds,
    write_skipped,
)
from .runtime import token_max_length

log = logging.getLogger("ella")


class _ListedImages(torch.utils.data.Dataset):
    def __init__(self, records, buckets_of):
        self.records, self.buckets_of = records, buckets_of

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        try:
            pixels, crop = prepare_image(record.path, self.buckets_of[index])
        except Exception as exc:  # a file that changed or broke since it was listed: the main process names it
            return {"index": index, "pixels": None, "error": short_error(exc)}
        return {"index": index, "pixels": pixels, "crop": crop}


class _ListedCache(torch.utils.data.Dataset):
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader.items)

    def __getitem__(self, index):
        item = self.reader.items[index]
        return {"index": index, **self.reader.load(item), "crop": item.crop}


class _Plan(torch.utils.data.Sampler):
    def __init__(self, plan: ListedPlan, start: int):
        self.plan, self.start = plan, start

    def __iter__(self):
        return self.plan.batches(self.start)


def _collate(items: list[dict]) -> list[dict]:
    return items


BROKEN = "image unreadable while training (its place in the batch taken by another)"


@dataclass
class Data:
    """This process's micro-batches: ``next(data)`` -> list of dicts (record, pixels or cached tensors, crop).

    What breaks or is skipped while training (an image broken since it was listed, a shard's bad sample) is named
    here, in this process, once per item: a log line (the first few per reason) and a line appended to
    ``skipped_file``. Data loader workers are separate processes: they return the reason with the item."""

    iterator: object
    records: list
    buckets_of: list | None
    cached: bool
    empty: dict | None = None
    skipped: Skipped = field(default_factory=Skipped)
    skipped_file: Path | None = None
    streamed: bool = False
    held_out: list | None = None  # [validation] split's records, left out of the listing (None: not listed here)

    def __next__(self):
        try:
            batch = next(self.iterator)
        except DataError as exc:  # from a data loader worker: its message holds the worker's traceback
            raise DataError(str(exc).strip().rsplit("DataError: ", 1)[-1]) from None
        if self.streamed:  # the stream's worker sends what it skipped since the last batch
            for reason, where, detail in batch["skipped"]:
                self.name_once(reason, where, detail)
            batch = batch["items"]
        return batch

    def name_once(self, reason: str, where: str, detail: str = "") -> None:
        if not self.skipped.add(reason, where, detail):
            return
        if self.skipped_file is not None:
            write_skipped(self.skipped_file, [(reason, where, detail)], append=True)
        count = self.skipped.counts[reason]
        listed = f"; every one is listed in {self.skipped_file}" if self.skipped_file is not None else ""
        if count <= EXAMPLES:
            log.warning("ELLA train: %s: %s%s", reason, where, f" ({detail})" if detail else "")
        elif count == EXAMPLES + 1:
            log.warning("ELLA train: more items: %s (not logged one by one%s)", reason, listed)


def make_data(config: Config, accelerator, start_micro: int, base, cache_reader=None) -> Data:
    rank, processes = accelerator.process_index, accelerator.num_processes
    batch = config.train["batch_size"]
    seed = config.train["seed"]
    workers = config.train["workers"]
    buckets = make_buckets(config.data["resolution"], config.data["bucket_step"], config.data["bucket_max_ratio"],
                           config.data["bucketing"])
    bad = [b for b in buckets if b[0] % base.latent_multiple or b[1] % base.latent_multiple]
    if bad:
        raise ConfigError(f"Bucket {bad[0][0]}x{bad[0][1]} is not a multiple of {base.latent_multiple} pixels, which "
                          "this UNet needs; make [data] resolution and bucket_step multiples of "
                          f"{base.latent_multiple}.")
    repeats_of_source = [s.repeats for s in config.sources]
    skipped_file = config.output / SKIPPED_FILE
    if cache_reader is not None:
        items = cache_reader.items
        records = [i.record for i in items]
        buckets_of = [i.bucket for i in items]
        dataset = _ListedCache(cache_reader)
        cached = True
        _point_at_the_cache_list(cache_reader.folder, skipped_file, accelerator.is_main_process)
    else:
        kinds = source_kinds(config)
        refuse_mixed_sources(config, kinds)
        skipped, held_out = Skipped(), []
        records, shards = list_sources(config, skipped, kinds, held_out)
        skipped.report(config.output, main=accelerator.is_main_process)
        if processes > 1:
            accelerator.wait_for_everyone()  # the list is written before any process appends to it
        if shards:
            return _stream_data(config, shards, buckets, rank, processes, start_micro, skipped_file)
        if not records:
            raise DataError("No usable image in the [[data.sources]] (every item was skipped; see the log above). "
                            "Each image needs a caption: a same-name .txt file, or a metadata.jsonl line.")
        buckets_of = [pick_bucket(r.size, buckets) for r in records]
        dataset = _ListedImages(records, buckets_of)
        cached = False
    plan = ListedPlan(buckets_of, [repeats_of_source[r.source] for r in records], batch, rank, processes, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_Plan(plan, start_micro), num_workers=workers,
                                         collate_fn=_collate, persistent_workers=False,
                                         multiprocessing_context="spawn" if workers else None)
    data = Data(iter(loader), records, buckets_of, cached, skipped_file=skipped_file)
    if cache_reader is not None:
        data.empty = cache_reader.empty()
    else:
        data.skipped, data.held_out = skipped, held_out
    return data


def _point_at_the_cache_list(cache: Path, skipped_file: Path, main: bool) -> None:
    """Training from a cache: what the cache left out is in its own list (an older list of this run's is stale)."""
    if not main:
        return
    if skipped_file.is_file():
        skipped_file.unlink()
    listed = cache / SKIPPED_FILE
    if listed.is_file():
        count = sum(1 for _ in listed.open(encoding="utf-8"))
        log.warning("ELLA train: the cache left out %d item(s) when it was made; they are listed in %s.", count,
                    listed)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, args):
        self.args = args

    def __iter__(self):
        skipped = Skipped()  # this reader's own: what it adds goes to the main process with the next batch
        sent = 0
        for group in stream_batches(*self.args[:6], skipped, *self.args[6:]):
            out = []
            for item in group:
                try:
                    pixels, crop = prepare_image(item.image, item.bucket)
                except Exception as exc:
                    out.append({"record": item.record, "pixels": None, "bucket": item.bucket,
                                "error": short_error(exc)})
                    continue
                out.append({"record": item.record, "pixels": pixels, "crop": crop, "bucket": item.bucket})
            yield {"items": out, "skipped": skipped.items[sent:]}
            sent = len(skipped.items)


def _stream_data(config, shards, buckets, rank, processes, start_micro, skipped_file) -> Data:
    args = (shards, buckets, config.train["batch_size"], rank, processes, config.train["seed"], start_micro,
            config.data["empty_captions"], config.validation["split"])
    workers = min(1, config.train["workers"])  # one reader keeps the stream's order
    loader = torch.utils.data.DataLoader(_Stream(args), batch_size=None, num_workers=workers,
                                         multiprocessing_context="spawn" if workers else None)
    return Data(iter(loader), [], None, False, skipped_file=skipped_file, streamed=True)


# -- one micro-batch ----------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    latents: torch.Tensor
    features: torch.Tensor
    mask: torch.Tensor | None
    timesteps: torch.Tensor
    noise: torch.Tensor
    pooled: torch.Tensor | None
    time_ids: torch.Tensor | None


def _pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(r.shape[0] for r in rows)
    features = torch.zeros(len(rows), length, rows[0].shape[-1])
    for i, row in enumerate(rows):
        features[i, : row.shape[0]] = row.float()
    lengths = torch.tensor([r.shape[0] for r in rows])
    return features, torch.arange(length)[None, :] < lengths[:, None]


def _fill_failed(items: list[dict], data: Data) -> list[dict]:
    """An image that broke since it was listed is replaced by the batch's first good one; each such file is named
    once (log and skipped.txt), however many epochs meet it."""
    failed = [i for i in items if i.get("pixels", 0) is None]
    for item in failed:
        record = item["record"] if "record" in item else data.records[item["index"]]
        data.name_once(BROKEN, f"{record.path}:{record.member}" if record.member else record.path,
                       item.get("error", ""))
    good = next((i for i in items if i.get("pixels", 0) is not None), None)
    if good is None:
        raise DataError("Every image of a batch failed to load (named above); the files changed since they were "
                        "listed. Fix or remove them.")
    return [good if item.get("pixels", 0) is None else item for item in items]


def sample_noise(shape: torch.Size, generator: torch.Generator, offset: float) -> torch.Tensor:
    """One sample's noise; with [train] noise_offset, plus ``offset`` times one normal draw per channel (offset
    noise: Guttenberg, "Diffusion with offset noise", 2023), which lets a model learn images brighter or darker
    overall than zero-mean noise allows. Drawn after the plain noise from the same generator: the same seed gives
    the same plain noise with or without it."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(shape[0], 1, 1, generator=generator)
    return noise


def make_inputs(items: list[dict], data: Data, micro: int, config: Config, accelerator, base, encoder) -> Inputs:
    device = accelerator.device
    rank, batch = accelerator.process_index, len(items)
    items = _fill_failed(items, data) if not data.cached else items
    records = [i["record"] if "record" in i else data.records[i["index"]] for i in items]
    buckets = [i.get("bucket") or data.buckets_of[i["index"]] for i in items]
    dropout = [config.sources[r.source].caption_dropout for r in records]
    timesteps, drop, generators = [], [], []
    steps = base.scheduler.config.num_train_timesteps
    for position in range(batch):
        generator = torch.Generator().manual_seed(sample_seed(config.train["seed"], micro, rank * batch + position))
        drop.append(bool(torch.rand((), generator=generator).item() < dropout[position]))
        timesteps.append(torch.randint(0, steps, (), generator=generator))
        generators.append(generator)
    captions = ["" if d else r.caption for d, r in zip(drop, records)]
    max_length = token_max_length(config)
    if data.cached:
        latents = torch.stack([i["latent"] for i in items]).to(device)
        rows = [data.empty["features"] if d else i["features"] for d, i in zip(drop, items)]
        features, mask = _pad(rows)
        pooled = (torch.stack([(data.empty["pooled"] if d else i["pooled"]).float() for d, i in zip(drop, items)])
                  if "pooled" in items[0] else None)
    else:
        latents = base.encode_pixels(torch.stack([i["pixels"] for i in items]))
        features, mask = encoder.encode(captions, max_length)
        pooled = base.pooled(captions)
    latents = base.scale_latents(latents).to(device)
    noise = torch.stack([sample_noise(latents.shape[1:], g, config.train["noise_offset"])
                         for g in generators]).to(device)
    time_ids = None
    if base.family == "sdxl":
        time_ids = torch.tensor([[r.size[1], r.size[0], i["crop"][0], i["crop"][1], b[1], b[0]]
                                 for r, i, b in zip(records, items, buckets)], dtype=torch.float32)
    return Inputs(latents, features.to(device), mask.to(device) if max_length is None else None,
                  torch.stack(timesteps).to(device), noise, pooled, time_ids)
