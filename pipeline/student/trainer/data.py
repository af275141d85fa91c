"""Cache -> batches: one rank's rows, deterministic and addressed by (epoch, rows consumed), so a
resumed run reads exactly the rows an uninterrupted one would have. One decode path from shard to
batch: `RankStream.batches` -> `decode_batch`; `prefetched` runs it ahead in a thread."""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import numpy as np
import torch


class RankStream:
    """Fixed-size batches over one rank's shards.

    Batch i of an epoch is rows [i·B, (i+1)·B) of the rank's row stream, whatever the shards' row
    groups: record batches are re-cut here, across shard boundaries, so `skip_rows = i·B` resumes
    on exactly the batch an uninterrupted run would read next. The last batch of an epoch may be
    short; nothing is dropped.
    """

    def __init__(self, reader, columns: list[str], batch_size: int, rank: int, world_size: int, seed: int = 0,
                 shuffle: bool = False):
        from kdcache.storage import assign_shards

        self.reader, self.columns, self.batch_size = reader, columns, batch_size
        self.rank, self.seed, self.shuffle = rank, seed, shuffle
        self.shards = assign_shards(reader.shards, rank, world_size)
        self.rows_per_epoch = sum(s.rows for s in self.shards)

    def shard_order(self, epoch: int) -> list:
        if not self.shuffle:
            return list(self.shards)
        order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(self.shards))
        return [self.shards[i] for i in order]

    def record_batches(self, epoch: int, skip_rows: int = 0):
        """(Arrow record batch of up to B rows) in order, starting `skip_rows` into the epoch."""
        import pyarrow as pa

        pending, have = [], 0
        for rb in self.reader.iter_batches(self.columns, batch_size=self.batch_size, shards=self.shard_order(epoch),
                                           skip_rows=skip_rows):
            while rb.num_rows:
                take = min(self.batch_size - have, rb.num_rows)
                pending.append(rb.slice(0, take))
                have += take
                rb = rb.slice(take)
                if have == self.batch_size:
                    yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)
                    pending, have = [], 0
        if pending:
            yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)

    def batches(self, epoch: int, skip_rows: int = 0) -> Iterator[dict[str, Any]]:
        for rb in self.record_batches(epoch, skip_rows):
            yield decode_batch(rb, self.reader.spec)


def decode_batch(rb, cache_spec) -> dict[str, Any]:
    """Arrow rows -> padded CPU tensors (the losses' shapes); `rows` counts them."""
    from kdcache.storage.columns import to_numpy
    from kdcache.storage.reader import numpy_to_torch

    out = {k: v for k, v in numpy_to_torch(to_numpy(rb, cache_spec)).items() if isinstance(v, torch.Tensor)}
    out["rows"] = rb.num_rows
    return out


def prefetched(it: Iterator, depth: int) -> Iterator:
    """Run `it` `depth` items ahead in a thread (Parquet decode overlaps the step). Order is kept."""
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def work():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)

    t = threading.Thread(target=work, daemon=True, name="kdcache-prefetch")
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
