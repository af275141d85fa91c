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
    """Fixed-size batches over one rank's rows of an epoch (`kdcache.storage.assign`).

    Every rank of a world gets the same number of batches per epoch, whatever the cache's shard
    count. Batch i of an epoch is rows [i·B, (i+1)·B) of the rank's row stream,
    re-cut across row groups and shards, so `skip_rows = i·B` resumes on exactly the batch an
    uninterrupted run reads next. A rank's last batch of an epoch may be short.

    With `shuffle`, the epoch's row-group order is permuted by (seed, epoch), and rows are permuted
    within consecutive windows of `shuffle_buffer` rows of the rank's stream by (seed, epoch, rank,
    window): memory holds one window, and a resume re-reads only the window it stopped in.
    """

    def __init__(self, reader, columns: list[str], batch_size: int, rank: int, world_size: int, seed: int = 0,
                 shuffle: bool = False, shuffle_buffer: int = 0):
        self.reader, self.columns, self.batch_size = reader, columns, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.shuffle_buffer = shuffle_buffer or default_shuffle_buffer(batch_size)
        # Every epoch's split has the same sizes; this raises AssignmentError here, at start, for too many ranks.
        self.rows_per_epoch = self.assignment(0).rows_per_rank[rank]

    def assignment(self, epoch: int):
        from kdcache.storage import assign

        return assign(self.reader.row_groups(), self.world_size, self.batch_size, epoch=epoch, seed=self.seed,
                      shuffle=self.shuffle)

    def record_batches(self, epoch: int, skip_rows: int = 0):
        """(Arrow record batch of up to B rows) in order, starting `skip_rows` into the epoch."""
        import pyarrow as pa

        pending, have = [], 0
        for rb in self._rows(epoch, skip_rows):
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

    def _rows(self, epoch: int, skip_rows: int):
        """The rank's rows of the epoch from `skip_rows` on, as record batches of any size."""
        import pyarrow as pa

        from kdcache.storage.assign import take

        spans = self.assignment(epoch).spans[self.rank]
        if not self.shuffle:
            yield from self.reader.read_spans(take(spans, skip_rows), self.columns, batch_size=self.batch_size)
            return
        w = self.shuffle_buffer
        for window in range(skip_rows // w, -(-self.rows_per_epoch // w)):
            parts = list(self.reader.read_spans(take(spans, window * w, (window + 1) * w), self.columns,
                                                batch_size=self.batch_size))
            table = pa.Table.from_batches(parts).combine_chunks()
            perm = np.random.default_rng([self.seed, epoch, self.rank, window]).permutation(table.num_rows)
            start = skip_rows - window * w if window == skip_rows // w else 0
            yield from table.take(perm[start:]).to_batches()

    def batches(self, epoch: int, skip_rows: int = 0) -> Iterator[dict[str, Any]]:
        for rb in self.record_batches(epoch, skip_rows):
            yield decode_batch(rb, self.reader.spec)


def default_shuffle_buffer(batch_size: int) -> int:
    """Rows permuted together with `shuffle` when `shuffle_buffer` is 0: four batches' worth, so a
    batch mixes rows of several row groups while memory stays a few batches."""
    return 4 * batch_size


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
