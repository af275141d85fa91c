"""Shard inputs: the corpus streamed, tokenised and cut into deterministic shards of sequences, and the
batches (masked where the teacher is a masked LM) that one shard's forwards take. Tokenising runs in a
worker process beside a GPU teacher so the driver keeps the device fed."""
from __future__ import annotations

from typing import Any, Iterator

from kdcache.pipeline.teacher_pass.config import Prepared


def iter_shard_inputs(prep: Prepared) -> Iterator[tuple[int, list]]:
    """(shard index, sequences) in deterministic order: the same corpus and options, the same shards."""
    import itertools

    from transformers import AutoTokenizer

    from kdcache.pipeline.data.corpus import CorpusSpec, iter_documents
    from kdcache.pipeline.data.sequences import iter_sequences, plan_shards

    cfg = prep.cfg
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher, revision=cfg.revision,
                                              trust_remote_code=cfg.trust_remote_code)
    corpus = CorpusSpec(paths=cfg.corpus, text_field=cfg.text_field, label_field=cfg.label_field,
                        label_map=cfg.label_map, include_labels=cfg.include_labels, txt_mode=cfg.txt_mode,
                        encoding_errors=cfg.encoding_errors, format=cfg.corpus_format)
    seqs = iter_sequences(iter_documents(corpus), tokenizer, mode=cfg.mode, max_length=cfg.max_length)
    if cfg.max_sequences:
        seqs = itertools.islice(seqs, cfg.max_sequences)
    return plan_shards(seqs, prep.sequences_per_shard)


class ShardPrefetcher:
    """`iter_shard_inputs` in a worker process, up to `ahead` shards ahead of the pass.

    Reading and tokenising the corpus is Python around the tokenizer's Rust calls, holding the GIL
    (docs/performance.md): beside the teacher it takes the GIL from the forwards and the writers,
    and in a Ray driver an actor's free slot waits while the next shard is tokenised. The worker
    starts at once, so the first shards are ready when the teachers are. Shards arrive in order; an
    error in the worker is raised here, by the iteration.
    """

    def __init__(self, prep: Prepared, ahead: int = 2):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # the driver may hold CUDA and threads: no fork
        self._queue = ctx.Queue(maxsize=ahead)
        self._proc = ctx.Process(target=_produce_shards, args=(prep, self._queue), name="kdcache-corpus", daemon=True)
        self._proc.start()

    def __iter__(self) -> Iterator[tuple[int, list]]:
        import queue

        try:
            while True:
                try:
                    kind, payload = self._queue.get(timeout=1.0)
                except queue.Empty:
                    if self._proc.is_alive():
                        continue
                    try:  # it may have put its last item just before it exited
                        kind, payload = self._queue.get(timeout=1.0)
                    except queue.Empty:
                        raise RuntimeError("the corpus reader process died "
                                           f"(exit code {self._proc.exitcode})") from None
                if kind == "done":
                    return
                if kind == "error":
                    raise payload
                yield payload
        finally:
            self.close()

    def close(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
        self._queue.close()


def _produce_shards(prep: Prepared, out) -> None:
    import pickle

    try:
        for item in iter_shard_inputs(prep):
            out.put(("shard", item))
        out.put(("done", None))
    except BaseException as exc:  # noqa: BLE001 - handed to the driver, which raises it
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - an exception that cannot travel travels as its message
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        out.put(("error", exc))


def shard_batches(prep: Prepared, tok_info, sequences: list) -> Iterator[dict[str, Any]]:
    """The padded teacher batches of one shard (static masking applied for masked-LM teachers), in the
    cache's own padding, so the writer stores them as they come."""
    from kdcache.pipeline.data.masking import iter_masked
    from kdcache.pipeline.data.sequences import batch_sequences

    cfg = prep.cfg
    seqs = sequences
    if prep.spec.mlm:
        seqs = iter_masked(sequences, tok_info, dupe_factor=cfg.dupe_factor, seed=cfg.seed,
                           probability=cfg.mlm_probability)
    yield from batch_sequences(seqs, cfg.batch_size, prep.pad_id)


COUNT_LIMIT_BYTES = 256 << 20  # below this, count the corpus first so the progress bar has a total


def corpus_bytes(paths: list[str]) -> int | None:
    """The corpus files' total size, or None when it cannot be known cheaply."""
    import fsspec

    from kdcache.pipeline.data.corpus import expand_paths

    try:
        total = 0
        for p in expand_paths(paths):
            loc_fs, path = fsspec.core.url_to_fs(p)
            total += loc_fs.du(path) if loc_fs.isdir(path) else loc_fs.size(path)
        return total
    except Exception:  # noqa: BLE001 - only used to decide whether to count
        return None


def calibration_sequences(prep: Prepared) -> list:
    """The first N sequences of the corpus: deterministic, so a rerun fits the same parameters."""
    seqs = []
    for _, shard in iter_shard_inputs(prep):
        seqs += shard
        if len(seqs) >= prep.cfg.topk_calibration_sequences:
            break
    return seqs[: prep.cfg.topk_calibration_sequences]


def count_shards(prep: Prepared) -> int:
    """Shards the pass will write (the corpus read and tokenised once more): the progress bar's total."""
    return sum(1 for _ in iter_shard_inputs(prep))
