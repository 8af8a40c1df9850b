"""The held-out loss during training (``[validation]``): ``val_loss`` in metrics.jsonl and the trackers.

The held-out images come from ``[validation] path`` (a folder or shards of their own) or ``[validation] split`` (a
fraction of the training data, chosen by a SHA-1 of each file name or shard sample key, so the same files on every
run and process; the listing, the cache and the shard stream all leave them out). Each is scored at every one of
``[validation] timesteps`` with the plain MSE against the UNet's target: no Min-SNR weighting, no caption dropout, no
offset noise, the VAE's latent mean, the connector in eval mode (the EMA weights when ``[train] ema`` is on). The
noise of each (image, timestep) comes from its own generator seeded by ``[validation] seed``, the image's name and
the timestep, so the same weights give the same number on any process count, and two runs with the same held-out set
and base give comparable numbers.

Under several processes the held-out batches are dealt out whole (batch ``j`` to process ``j % processes``), so
each batch holds what it holds under one process; each (image, timestep) loss goes, in float64, into its own place
of a table that the processes add up (every other process adds 0 there), and the means are taken from that table in
one order: the number is one process's (measured with two CPU processes: equal to 1e-8, the weights themselves
differing by up to 1e-6 after training).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .batches import make_buckets, pick_bucket
from .config import Config, ConfigError
from .data import (
    DataError,
    Record,
    Skipped,
    caption_folder_images,
    holdout_name,
    is_held_out,
    iter_shard,
    jsonl_rows,
    list_caption_folder,
    list_jsonl_folder,
    list_sources,
    prepare_image,
    shard_urls,
    short_error,
    source_kind,
    source_kinds,
)
from .feed import Inputs, _pad
from .objective import predict
from .runtime import token_max_length

log = logging.getLogger("ella")
VALIDATION_FILE = "validation.txt"
VALIDATED = "validated"
NOT_VALIDATED = "held out, not scored ([validation] max_items)"


def validation_on(config: Config) -> bool:
    """Held-out images are configured ([validation] path or split)."""
    return bool(config.validation["path"] or config.validation["split"])


# -- before any model loads ---------------------------------------------------------------------------------------


def _path(config: Config) -> tuple[Path, str]:
    """[validation] path, resolved, and its kind; refused by its key when it does not exist."""
    raw = config.validation["path"]
    path = Path(config.resolve(raw))
    try:
        kind = source_kind(path)
    except DataError as exc:
        raise DataError(str(exc).replace("[[data.sources]] path", "[validation] path")) from None
    text = str(path)
    if kind == "shards" and "://" not in text and not text.startswith("pipe:"):
        urls = shard_urls(text)
        missing = [url for url in urls if not Path(url).is_file()]
        if missing or not urls:
            raise DataError(f"[validation] path = {raw!r}: "
                            + (f"no such shard {missing[0]}" if missing else "it names no .tar shards")
                            + ". Give a folder of held-out images with captions, or existing .tar shards.")
    return path, kind


def _folder_names(config: Config, kinds: list[str]) -> list[str]:
    """The names ``[validation] split`` hashes, for the folder sources (no image is opened)."""
    names = []
    for source, kind in zip(config.sources, kinds):
        folder = Path(config.resolve(source.path))
        if kind == "captions":
            names += [image.relative_to(folder).as_posix() for image in caption_folder_images(folder)]
        elif kind == "jsonl":
            names += [row["file_name"] for _, row, _, _ in jsonl_rows(folder / "metadata.jsonl") if row is not None]
    return names


def preflight_validation(config: Config, kinds: list[str]) -> None:
    """Refuse before any model loads: a [validation] path that does not exist; a split that holds out none, or
    all, of the folder sources' images (shards are only known once read). A path that is also a training source
    is allowed with a warning (its images are trained on, so val_loss then measures fitting, not generalisation)."""
    validation = config.validation
    if validation["path"]:
        path, _ = _path(config)
        held = path.resolve()
        for source in config.sources:
            trained = Path(config.resolve(source.path)).resolve()
            # folders are read with their subfolders: one inside the other shares images
            if trained == held or held.is_relative_to(trained) or trained.is_relative_to(held):
                log.warning("ELLA train: [validation] path %s %s the [[data.sources]] path %s: its images are "
                            "trained on, so val_loss measures how well they are fitted, not how the connector does "
                            "on images it never saw. Move the held-out images out of the training folders.",
                            validation["path"], "is" if trained == held else "overlaps", source.path)
    split = validation["split"]
    if not split or "shards" in kinds:
        return
    names = _folder_names(config, kinds)
    held = sum(is_held_out(name, split) for name in names)
    if names and held == 0:
        raise DataError(f"[validation] split = {split} holds out none of the {len(names)} images of the "
                        f"[[data.sources]] (a file is held out when a hash of its name falls below the split: about "
                        f"{split * len(names):.2f} expected here). Raise it (about {min(0.5, 3 / len(names)):.2g} "
                        "holds out a few), or give a folder of held-out images as [validation] path instead.")
    if names and held == len(names):
        raise DataError(f"[validation] split = {split} holds out every one of the {len(names)} images of the "
                        "[[data.sources]], which leaves none to train on. Lower it, add images, or give a folder of "
                        "held-out images as [validation] path instead.")


# -- the held-out items -------------------------------------------------------------------------------------------


def _where(record: Record) -> str:
    return f"{record.path}:{record.member}" if record.member else record.path


def held_out_items(config: Config, held: list[Record] | None = None) -> tuple[list[tuple[Record, str | bytes]],
                                                                               Skipped, bool]:
    """The held-out items in file order, with their image (a file, or a shard sample's bytes): every one of listed
    folders; from shards only as many as are scored (they are read until [validation] max_items are found).
    ``held``: the split's held-out records when the training listing already found them. Returns the items, what
    was skipped among them, and whether shards were read."""
    validation, skipped = config.validation, Skipped()
    empty_captions, cap = config.data["empty_captions"], validation["max_items"]
    split = validation["split"]
    if validation["path"]:
        path, kind = _path(config)
        shards: list[tuple[int, list[str]]] = []
        if kind == "captions":
            records = list_caption_folder(0, path, config.data["caption_extension"], skipped, empty_captions)
        elif kind == "jsonl":
            records = list_jsonl_folder(0, path, skipped, empty_captions)
        else:
            records, shards = [], [(0, shard_urls(str(path)))]
    else:
        if held is None:  # training reads a cache or shards: list the folders for their held-out records
            held = []
            list_sources(config, Skipped(), held_out=held)  # (what training skips is the training's to report)
        records = held
        shards = [(i, shard_urls(config.resolve(s.path))) for i, (s, kind) in
                  enumerate(zip(config.sources, source_kinds(config))) if kind == "shards"]
    items: list[tuple[Record, str | bytes]] = [(r, r.path) for r in sorted(records, key=lambda r: r.key)]
    read_shards = False
    for index, urls in shards:
        for url in urls:
            if len(items) >= cap:
                break
            read_shards = True
            for record, image in iter_shard(index, url, skipped, empty_captions=empty_captions, split=split,
                                            held_out=bool(split)):
                items.append((record, image))
                if len(items) >= cap:
                    break
    skipped.refuse_empty()
    return items, skipped, read_shards


def _empty_message(config: Config) -> str:
    validation = config.validation
    if validation["path"]:
        return (f"[validation] path = {validation['path']!r} holds no usable image (each needs a caption: a "
                "same-name .txt file, a metadata.jsonl line or a shard txt; see the log for what was skipped). Give a "
                "folder of captioned images that training does not use.")
    return (f"[validation] split = {validation['split']} held out no usable image of the [[data.sources]] (a file is "
            "held out when a hash of its name falls below the split). Raise it, or give a folder of held-out images "
            "as [validation] path instead.")


def _noise_seed(seed: int, name: str, timestep: int) -> int:
    """The seed of one (image, timestep)'s noise: from [validation] seed, the image's name and the timestep alone,
    so it is the same whatever else is held out, however the items are batched and on any process count."""
    name_hash = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big")
    return int(np.random.SeedSequence([seed, 0x56414C, name_hash, timestep]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class _Batch:
    places: list[int]  # each item's place in Validation.items
    names: list[str]
    latents: torch.Tensor  # scaled latents (CPU, float32)
    features: torch.Tensor
    mask: torch.Tensor | None
    pooled: torch.Tensor | None
    time_ids: torch.Tensor | None


class Validation:
    """The held-out set of this run, encoded once (this process's share), and its loss at any step."""

    def __init__(self, config: Config, accelerator, base, items, skipped: Skipped, done: int = 0):
        self.config, self.accelerator, self.base = config, accelerator, base
        validation = config.validation
        self.every, self.seed = validation["every"], validation["seed"]
        self.timesteps = list(validation["timesteps"])
        steps = base.scheduler.config.num_train_timesteps
        if max(self.timesteps) >= steps:
            raise ConfigError(f"[validation] timesteps = {self.timesteps}: this base's scheduler has {steps} training "
                              f"timesteps (0 to {steps - 1}); use timesteps in that range.")
        self.held = items
        self.items = items[: validation["max_items"]]
        self.skipped = skipped
        self.done = done  # the step last scored (a resumed run's checkpoint step: scored by the run that saved it)
        self.ema = bool(config.train["ema"])
        self.batches: list[_Batch] = []
        self.failed: list[tuple[str, str]] = []
        self.read_shards = False  # shards are read only until max_items are found: more may be held out

    @property
    def count(self) -> int:
        return len(self.items) - len(self.failed)

    def due(self, step: int, end: bool = False) -> bool:
        """Score at this step: every [validation] every steps, and at the end of training."""
        return step != self.done and (end or bool(self.every) and step % self.every == 0)

    # -- set up ------------------------------------------------------------------------------------------------

    def encode(self, encoder) -> None:
        """Latents, features and SDXL's conditions of this process's batches (batch j goes to process j %
        processes: every batch is made exactly as one process makes it)."""
        config, base = self.config, self.base
        buckets = make_buckets(config.data["resolution"], config.data["bucket_step"], config.data["bucket_max_ratio"],
                               config.data["bucketing"])
        size = config.validation["batch_size"] or config.train["batch_size"]
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for place, (record, _) in enumerate(self.items):
            by_bucket.setdefault(pick_bucket(record.size, buckets), []).append(place)
        groups = [(bucket, places[i : i + size]) for bucket, places in sorted(by_bucket.items())
                  for i in range(0, len(places), size)]
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        max_length = token_max_length(config)
        for number, (bucket, places) in enumerate(groups):
            good, pixels, crops = [], [], []
            for place in places:  # every process reads every image: which ones fail is known everywhere
                record, image = self.items[place]
                try:
                    tensor, crop = prepare_image(image, bucket)
                except Exception as exc:  # broken since it was listed
                    self.failed.append((_where(record), short_error(exc)))
                    continue
                if number % processes == rank:
                    pixels.append(tensor)
                good.append(place)
                crops.append(crop)
            if not good or number % processes != rank:
                continue
            records = [self.items[p][0] for p in good]
            captions = [r.caption for r in records]
            latents = base.scale_latents(base.encode_pixels(torch.stack(pixels))).cpu()
            features, mask = encoder.encode(captions, max_length)
            if max_length is None:  # flexible: the real tokens, padded per batch as the cache's rows are
                features, mask = _pad([features[i, : int(mask[i].sum())].cpu() for i in range(len(good))])
            pooled = base.pooled(captions)
            time_ids = None
            if base.family == "sdxl":
                time_ids = torch.tensor([[r.size[1], r.size[0], c[0], c[1], bucket[1], bucket[0]]
                                         for r, c in zip(records, crops)], dtype=torch.float32)
            self.batches.append(_Batch(good, [holdout_name(r) for r in records], latents, features.float().cpu(),
                                       mask.cpu() if max_length is None else None,
                                       pooled.cpu() if pooled is not None else None, time_ids))
        if not self.count:
            raise DataError(f"None of the {len(self.items)} held-out image(s) could be read: "
                            f"{'; '.join(f'{w} ({d})' for w, d in self.failed[:3])}. Fix or replace them.")

    def write_list(self, folder: Path) -> Path:
        """``validation.txt``: one line per held-out item known, ``validated`` or why not, TAB, the file."""
        failed = {where: detail for where, detail in self.failed}
        lines = []
        for place, (record, _) in enumerate(self.held):
            where = _where(record)
            status = VALIDATED if place < len(self.items) else NOT_VALIDATED
            if where in failed:
                status = f"unreadable image, not scored ({failed[where]})"
            lines.append(f"{status}\t{where}\n")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / VALIDATION_FILE
        path.write_text("".join(lines), encoding="utf-8")
        return path

    def summary(self) -> list[str]:
        validation = self.config.validation
        if validation["path"]:
            where = f"from [validation] path {Path(validation['path']).name}"
        else:
            where = f"[validation] split {validation['split']} of the data, never trained on"
        if self.read_shards:
            where += "; shards read until max_items were found"
        every = f"every {self.every} steps and at the end" if self.every else "at the end"
        skipped = f"; skipped {self.skipped.summary()}" if sum(self.skipped.counts.values()) else ""
        return [f"validation: {len(self.held)} held-out image(s) ({where}{skipped}); {self.count} scored at "
                f"timesteps {self.timesteps} {every}, with the {'EMA' if self.ema else 'trained'} weights; the list "
                f"is in {VALIDATION_FILE}"]

    def record(self) -> dict:
        """For the run record (``ella.training``): names and counts only."""
        validation = self.config.validation
        return {"source": Path(validation["path"]).name if validation["path"] else None,
                "split": validation["split"], "held_out": len(self.held), "images": self.count,
                "timesteps": self.timesteps, "seed": self.seed, "ema": self.ema}

    # -- the loss ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def loss(self, model, step: int) -> dict:
        """The held-out loss of ``model`` (the connector): the mean over scored images and timesteps of each
        one's MSE, and per timestep; the same on every process. Returns the metrics entry."""
        accelerator, base = self.accelerator, self.base
        device = accelerator.device
        table = torch.zeros(len(self.items), len(self.timesteps), dtype=torch.float64)
        scored = torch.zeros(len(self.items), dtype=torch.float64)
        was_training = model.training
        model.eval()
        try:
            for batch in self.batches:
                latents = batch.latents.to(device)
                for column, timestep in enumerate(self.timesteps):
                    noise = torch.stack([
                        torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(
                            _noise_seed(self.seed, name, timestep))) for name in batch.names]).to(device)
                    timesteps = torch.full((len(batch.places),), timestep, dtype=torch.long, device=device)
                    inputs = Inputs(latents, batch.features.to(device),
                                    batch.mask.to(device) if batch.mask is not None else None, timesteps, noise,
                                    batch.pooled, batch.time_ids)
                    prediction, target = predict(model, base, inputs, accelerator)
                    per_item = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                    table[batch.places, column] = per_item.double().cpu()
                scored[batch.places] = 1.0
        finally:
            model.train(was_training)
        if accelerator.num_processes > 1:  # each place is filled by one process: the sum is exact
            table = accelerator.reduce(table.to(device), "sum").cpu()
            scored = accelerator.reduce(scored.to(device), "sum").cpu()
        rows = table[scored > 0]
        self.done = step
        entry = {"step": step, "val_loss": rows.mean().item()}
        for column, timestep in enumerate(self.timesteps):
            entry[f"val_loss_t{timestep}"] = rows[:, column].mean().item()
        entry["val_images"] = rows.shape[0]
        log.info("ELLA train: step %d val_loss %.6f (%d images x %d timesteps%s)", step, entry["val_loss"],
                 rows.shape[0], len(self.timesteps), ", EMA weights" if self.ema else "")
        return entry


def make_validation(config: Config, accelerator, base, encoder, data, done: int = 0) -> Validation | None:
    """The run's held-out set, ready to score (None when [validation] path and split are unset); the main process
    writes ``validation.txt`` and warns about skipped or unreadable held-out images."""
    if not validation_on(config):
        return None
    items, skipped, read_shards = held_out_items(config, getattr(data, "held_out", None))
    if not items:
        raise DataError(_empty_message(config))
    validation = Validation(config, accelerator, base, items, skipped, done)
    validation.read_shards = read_shards
    validation.encode(encoder)
    if accelerator.is_main_process:
        for reason, count in sorted(skipped.counts.items()):
            shown = [where for r, where, _ in skipped.items if r == reason][:3]
            log.warning("ELLA train: validation: skipped %d held-out item(s): %s: %s", count, reason,
                        "; ".join(shown))
        for where, detail in validation.failed:
            log.warning("ELLA train: validation: a held-out image cannot be read, not scored: %s (%s)", where, detail)
        validation.write_list(config.output)
    return validation
