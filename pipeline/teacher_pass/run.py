"""The teacher pass: Ray actors run the teacher once over a corpus and fill a cache.

Driver (this process): streams the corpus, tokenises it (in a worker process beside GPU teachers),
cuts it into deterministic shards, hands shards to actors with a free slot, retries shards whose
actor died (never those that raised), and commits the manifest last. Actors: load the teacher
once, then work on `shards_in_flight` shards at once, each on its own thread: forward passes (one
at a time, on the shared teacher) and a Parquet writer whose compression runs in a background
thread, overlapping the next forwards. Several writers in flight is what lets compression keep up
with a GPU: one writer is one core.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterator

from kdcache.storage import CacheWriter, ShardInfo
from kdcache.storage.fs import is_url, redact
from kdcache.storage.manifest import LOG_DIR

from kdcache.pipeline.common.console import run_console
from kdcache.pipeline.teacher_pass.config import CacheConfig, Prepared, prepare, teacher_device, write_options
from kdcache.pipeline.teacher_pass.executor import LocalExecutor, RayExecutor
from kdcache.pipeline.teacher_pass.inputs import (COUNT_LIMIT_BYTES, ShardPrefetcher, calibration_sequences,
                                                  corpus_bytes, count_shards, iter_shard_inputs)


def _needs_calibration(prep: Prepared) -> bool:
    """Top-k codecs that can fit a vocabulary order get one, once, before the first shard."""
    from kdcache.storage.codecs import TopKCodec, get_topk_codec

    spec = prep.spec
    if spec.targets != "topk" or prep.cfg.topk_calibration_sequences <= 0:
        return False
    codec = spec.codec
    fits = type(codec).fit is not TopKCodec.fit
    return fits and spec.codec_params == get_topk_codec(spec.topk_codec).params()


def run_cache_pass(cfg: CacheConfig, *, executor: str | None = None, storage_options: dict | None = None,
                   log=print) -> dict[str, Any]:
    """Fill `cfg.out` with the teacher's outputs; idempotent and resumable. Returns a summary dict."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    prep = prepare(cfg)
    for note in prep.notes:
        log(note)
    writer = CacheWriter(cfg.out, prep.header, overwrite=cfg.overwrite, storage_options=storage_options,
                         options=write_options(cfg))
    summary: dict[str, Any] = {"out": redact(cfg.out), "fingerprint": prep.header.fingerprint}
    if writer.complete is not None:
        m = writer.complete
        log(f"{redact(cfg.out)} already holds this cache ({len(m.shards)} shards, {m.tokens:,} tokens): "
            "no new inference")
        return {**summary, "shards_total": len(m.shards), "shards_written": 0, "shards_skipped": len(m.shards),
                "tokens_written": 0, "forward_calls": 0, "seconds": time.perf_counter() - started,
                "already_complete": True}
    prep = dataclasses.replace(prep, header=writer.header, spec=writer.header.spec)  # a resumed pass's fit
    committed = writer.committed()
    size = corpus_bytes(cfg.corpus)
    total = count_shards(prep) if size is not None and size <= COUNT_LIMIT_BYTES else None
    if committed:
        log(f"resuming: {len(committed)} shard(s) already committed in {redact(cfg.out)} are kept")

    counts = {"index": -1, "written": 0, "skipped": 0, "tokens": 0}

    def todo() -> Iterator[tuple[int, list]]:
        for index, seqs in source:
            counts["index"] = max(counts["index"], index)
            if index in committed:
                counts["skipped"] += 1
                bar.update(1)
                continue
            yield index, seqs

    # From here on Ray and the libraries talk: into <cache>/logs/kdcache.log, the terminal keeps our lines.
    with run_console(None if is_url(cfg.out) else os.path.join(cfg.out, LOG_DIR), say_where=log):
        bar = tqdm(total=total, unit="shard", desc="teacher pass", disable=not cfg.progress, dynamic_ncols=True)

        def on_done(info: ShardInfo) -> None:
            counts["written"] += 1
            counts["tokens"] += info.tokens
            rate = counts["tokens"] / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            bar.update(1)

        executor = executor or cfg.executor
        if executor not in ("ray", "local"):
            raise ValueError(f"executor must be ray or local, got {executor!r}")
        # A CPU teacher in this process is far slower than tokenising: there the worker process is not worth starting.
        source = ShardPrefetcher(prep) if executor == "ray" or teacher_device(cfg) != "cpu" else iter_shard_inputs(prep)
        executor_class = {"ray": RayExecutor, "local": LocalExecutor}[executor]
        try:
            ex = executor_class(prep, cfg.out, storage_options)
        except BaseException:
            source.close()
            raise
        try:
            if _needs_calibration(prep):
                ids = ex.calibrate(calibration_sequences(prep))
                fitted = prep.spec.codec.fit(ids)
                writer.set_codec_params(fitted.params())
                prep = dataclasses.replace(prep, header=writer.header, spec=writer.header.spec)
                ex.set_spec(prep.spec)
                log(f"fitted the {prep.spec.topk_codec} top-k codec on the teacher's top-k of {len(ids):,} tokens")
            t0 = time.perf_counter()  # teachers are loaded and calibrated: from here on it is the steady-state rate
            ex.run(todo(), on_done)
            elapsed = time.perf_counter() - t0  # to the last shard committed: not the actors' or the cluster's shutdown
        finally:
            source.close()
            ex.close()
            bar.close()
    n_shards = counts["index"] + 1
    if n_shards == 0:
        raise ValueError(f"the corpus {cfg.corpus} produced no sequence (every document empty, or shorter than "
                         f"one --max-length {cfg.max_length} sequence in pack mode)")
    manifest = writer.commit(expected_shards=n_shards)
    summary.update(shards_total=n_shards, shards_written=counts["written"], shards_skipped=counts["skipped"],
                   tokens_written=counts["tokens"], tokens_total=manifest.tokens, bytes_total=manifest.bytes,
                   forward_calls=ex.forward_calls, seconds=time.perf_counter() - started,
                   tokens_per_s=counts["tokens"] / max(elapsed, 1e-9), already_complete=False)
    log(f"committed {redact(cfg.out)}: {n_shards} shards ({counts['written']} written now, {counts['skipped']} "
        f"kept), {manifest.tokens:,} tokens, {manifest.bytes / 1e6:,.1f} MB")
    return summary
