"""Batches: aspect-ratio buckets, a deterministic order, and per-sample random draws that depend only on (seed,
micro-batch, position in the global batch).

Two ways to make batches:

- **listed** (folders, and any data read from a cache): every process knows every record; each epoch the records
  of each bucket are shuffled from the seed and cut into global batches (``batch_size x processes``), and each
  process takes its slice. The same seed gives the same samples whatever the process count.
- **streamed** (webdataset shards): each process reads its own shards (``shards[rank::processes]``), in an order
  shuffled per epoch from the seed, and fills per-bucket queues until one holds a batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .data import DataError, Record, Skipped, iter_shard

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
                   processes: int, seed: int, skipped: Skipped, start: int = 0, empty_captions: str = "skip",
                   split: float = 0.0) -> Iterator[list[StreamItem]]:
    """This process's batches from its shards, epoch after epoch; ``start`` batches are skipped (read, not decoded).
    What a shard holds that cannot be used is added to ``skipped`` once (a shard read again adds nothing). The
    samples ``[validation] split`` holds out are passed over."""
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
            for record, image in iter_shard(index, url, skipped, empty_captions=empty_captions, split=split):
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
            raise DataError(f"The shards of this process ({', '.join(u for _, u in mine[:3])}...) hold no usable "
                            "sample (an image and a caption under the same key); skipped: "
                            f"{skipped.summary() or 'nothing'}"
                            + (f"; [validation] split = {split} held out the rest: lower it." if split else "."))
        epoch += 1
