"""One shard, end to end, inside a teacher actor (or this process): forwards on the shared teacher,
the cache's columns encoded on the device, and a Parquet writer compressing in a background thread
while the next forwards run. Thread-safe, so an actor can hold several shards in flight."""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np

from kdcache.storage import CacheSpec
from kdcache.storage.fs import Location
from kdcache.pipeline.common.faults import mid_shard
from kdcache.pipeline.teacher_pass.config import Prepared, output_spec, write_options
from kdcache.pipeline.teacher_pass.inputs import shard_batches


def auto_shards_in_flight(prep: Prepared, on_gpu: bool, cpus: float | None = None) -> int:
    """Shards one teacher works on at once: `--shards-in-flight`, or 1 on a CPU teacher (which needs
    its cores for the forward). Beside a GPU, the forwards take turns on the device while each shard's
    writer compresses on a core of its own. One writer keeps up with a GPU's top-k columns but with
    far fewer tokens/s of dense hidden states (docs/performance.md), so 4 for top-k alone, and half
    of the teacher's `cpus` (at most 16) when dense columns are cached."""
    if prep.cfg.shards_in_flight > 0:
        return prep.cfg.shards_in_flight
    if not on_gpu:
        return 1
    if prep.spec.hidden_layers or prep.spec.attention_layers:
        return int(max(4, min(16, (cpus or os.cpu_count() or 8) // 2)))
    return 4


class ShardProcessor:
    """Turns one shard's sequences into a committed shard. Runs inside an actor (or in-process).

    `process` may run on several threads at once, one shard each: shards are independent files,
    the teacher runner serialises the forwards, and everything else a call touches is its own.
    """

    def __init__(self, prep: Prepared, out_url: str, storage_options: dict | None = None):
        from kdcache.pipeline.data.masking import TokenizerInfo
        from kdcache.pipeline.teacher_pass.teacher import TeacherRunner, load_teacher

        self.prep = prep
        spec = prep.spec
        model, tokenizer, kind = load_teacher(prep.teacher_options(), need_attentions=bool(spec.attention_layers),
                                              uses_head=prep.uses_head)
        self.tok_info = TokenizerInfo.from_tokenizer(tokenizer)
        if spec.mlm and self.tok_info.mask_token_id is None:
            raise ValueError(f"teacher {prep.cfg.teacher} is a masked LM but its tokenizer has no mask token")
        self.runner = TeacherRunner(model, kind, output_spec(prep), prep.teacher_options())
        if self.runner.device.type == "cpu":
            from kdcache.pipeline.common.allocator import tune_this_process

            tune_this_process()
        self.loc = Location.parse(out_url, storage_options)
        self.options = write_options(prep.cfg)
        self.forward_calls = 0
        self._lock = threading.Lock()  # counters, and starting the batch workers once
        self.batch_workers = auto_batch_workers(prep, self.runner.device.type != "cpu")
        self._batch_pool = None
        if self.batch_workers:
            self.start_batch_workers()

    def batches(self, sequences: list) -> Iterator[dict[str, Any]]:
        if not self.batch_workers:
            return shard_batches(self.prep, self.tok_info, sequences)
        return self._pooled_batches(sequences)

    def start_batch_workers(self):
        """The batch workers' pool, started and warm: they take a second or two to import, which
        belongs to start-up, not to the first shard."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with self._lock:
            if self._batch_pool is None:
                # spawn: forking a process that holds CUDA and a dozen threads is not safe.
                self._batch_pool = ProcessPoolExecutor(self.batch_workers, multiprocessing.get_context("spawn"),
                                                       initializer=_batch_worker_init,
                                                       initargs=(self.prep, self.tok_info))
                list(self._batch_pool.map(_batch_worker_run, [[]] * self.batch_workers))
        return self._batch_pool

    def _pooled_batches(self, sequences: list) -> Iterator[dict[str, Any]]:
        pool = self.start_batch_workers()
        step = self.prep.cfg.batch_size * _CHUNK_BATCHES
        pending: collections.deque = collections.deque()
        for start in range(0, len(sequences), step):
            pending.append(pool.submit(_batch_worker_run, sequences[start:start + step]))
            if len(pending) > _AHEAD:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()

    def close(self) -> None:
        if self._batch_pool is not None:
            self._batch_pool.shutdown(cancel_futures=True)
            self._batch_pool = None

    def set_spec(self, spec: CacheSpec) -> None:
        """Adopt fitted codec parameters (only the codec may differ from the spec it started with)."""
        self.prep = dataclasses.replace(self.prep, spec=spec)

    def topk_ids(self, sequences: list) -> np.ndarray:
        """The teacher's top-k ids of these sequences' real tokens, (tokens, k): the codec's calibration sample."""
        out = []
        for batch in self.batches(sequences):
            ids = self.runner(batch)["topk_ids"]
            out.append(ids[batch["attention_mask"].astype(bool)])
        return np.concatenate(out)

    def process(self, index: int, sequences: list) -> dict[str, Any]:
        from kdcache.storage.writer import ShardWriter

        spec = self.prep.spec
        codec = spec.codec if spec.targets == "topk" else None  # beside a GPU the runner encodes top-k there
        writer = ShardWriter(self.loc, index, spec, self.options)
        # Encoding (Arrow conversion, and the codecs on a CPU teacher) runs on `encoders` threads and
        # the Parquet write + zstd on one more, in row order, so both hide behind the next forward
        # passes. numpy, Arrow and zstd release the GIL for arrays this size, so the threads really
        # run in parallel.
        encoders = self.encoder_threads
        with ThreadPoolExecutor(encoders, thread_name_prefix=f"encode-{index}") as encode_pool, \
                ThreadPoolExecutor(1, thread_name_prefix=f"write-{index}") as write_pool:
            pending: collections.deque = collections.deque()
            try:
                for n, batch in enumerate(self.batches(sequences)):
                    outputs = self.runner(batch, codec=codec)
                    with self._lock:
                        self.forward_calls += 1
                    if n == 1 or len(sequences) <= self.prep.cfg.batch_size:
                        mid_shard(index)  # injected faults (common/faults.py): one batch went to the writer
                    encoded = encode_pool.submit(writer.encode, {**batch, **outputs})
                    pending.append(write_pool.submit(lambda f=encoded: writer.write_encoded(f.result())))
                    while len(pending) > encoders:  # bounded host memory: at most this many batches in flight
                        pending.popleft().result()
                while pending:
                    pending.popleft().result()
            except BaseException:
                for f in pending:  # drop queued writes, let a running one finish before the file is dropped
                    f.cancel()
                concurrent.futures.wait(pending)
                writer.abort()
                raise
        return dataclasses.asdict(writer.close())

    @property
    def encoder_threads(self) -> int:
        """Auto: 1 on a CPU teacher (the forward needs the cores); 2 beside a GPU, where the device
        already encoded the outputs and the host only wraps them as Arrow."""
        if self.prep.cfg.encoder_threads > 0:
            return self.prep.cfg.encoder_threads
        return 1 if self.runner.device.type == "cpu" else 2

    @property
    def shards_in_flight(self) -> int:
        return auto_shards_in_flight(self.prep, self.runner.device.type != "cpu")


# Masked-LM batches are made in worker processes beside a GPU: masking is per-sequence numpy on
# small arrays, which holds the GIL, and with several shards in flight it starved the writers and the
# forward of the GIL (docs/performance.md). Workers get chunks of whole batches (masking is a pure
# function of each sequence, so where it runs changes no byte) and stay `_AHEAD` chunks ahead.
_CHUNK_BATCHES = 4
_AHEAD = 2
_worker_state: tuple | None = None  # (prep, tok_info) in a batch worker process


def _batch_worker_init(prep: Prepared, tok_info) -> None:
    global _worker_state
    _worker_state = (prep, tok_info)
    parent = os.getppid()

    def exit_with_parent() -> None:  # a killed actor cannot shut its pool down: do not outlive it
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _batch_worker_run(sequences: list) -> list[dict[str, Any]]:
    prep, tok_info = _worker_state
    return list(shard_batches(prep, tok_info, sequences))


def auto_batch_workers(prep: Prepared, on_gpu: bool) -> int:
    """Processes making masked-LM batches: none on a CPU teacher (the forward needs the cores) or
    without masking (collate alone costs about what shipping the sequences there would); beside a
    GPU 2 to 4, enough to keep ahead of the forwards (docs/performance.md)."""
    if not on_gpu or not prep.spec.mlm:
        return 0
    return max(2, min(4, (os.cpu_count() or 8) // 4))
