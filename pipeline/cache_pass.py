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

import collections
import concurrent.futures
import dataclasses
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from storage import CacheSpec, CacheWriter, Header, ShardInfo, WriteOptions
from storage.fs import Location, redact

from .faults import mid_shard

DEFAULT_SHARD_BYTES = 256 << 20


@dataclass
class CacheConfig:
    """Every option of `kdcache cache` / `kdcache plan` (YAML keys = these names)."""

    teacher: str
    corpus: list[str]
    out: str = ""
    mode: str = "pack"  # pack (pretraining distillation) | examples (task distillation)
    max_length: int = 128
    top_k: int = 64  # 0 = no soft targets
    sample: int = 0  # > 0: RS-KD targets with this many draws per token instead of top-k
    hidden_layers: str = "none"  # "0,3,6" | all | none (0 = embedding output)
    attention_layers: str = "none"  # "6" | all | none (1-based)
    dtype: str = "float16"  # hidden states: float16 | bfloat16 | int8
    attention_dtype: str = ""  # float16 | bfloat16 | uint8; default: dtype (uint8 when dtype=int8)
    mlm_probability: float = 0.15  # masked-LM teachers only
    dupe_factor: int = 1
    seed: int = 0
    batch_size: int = 32
    actors: int = 0  # 0 = one per GPU, or 1 on a machine without GPUs
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 0.0  # 0 = auto: a CPU actor gets its share of the cluster's CPUs, a GPU actor 1
    shard_tokens: int = 0  # 0 = auto: about 256 MB per shard
    text_field: str = "text"
    label_field: str | None = None
    label_map: dict | None = None
    include_labels: list | None = None
    txt_mode: str = "line"
    encoding_errors: str = "strict"
    corpus_format: str | None = None
    task_logits: bool = True  # classifier teachers: cache per-example logits
    topk_codec: str = ""  # default: storage.codecs.DEFAULT_TOPK_CODEC
    topk_calibration_sequences: int = 128  # teacher top-k of the first N sequences fits the codec (0 = off)
    zstd_level: int = 3
    encoder_threads: int = 0  # threads per shard turning teacher outputs into Arrow (0 = auto: 1 on CPU, 2 on GPU)
    shards_in_flight: int = 0  # per teacher, one writer each (0 = auto: 1 on CPU; GPU: 4, more with dense columns)
    overwrite: bool = False
    max_retries: int = 3  # per shard, for system failures (actor/node death) only
    teacher_kind: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    device: str = "auto"
    autocast: str = "auto"
    address: str | None = None  # Ray cluster; default: RAY_ADDRESS or a local cluster
    executor: str = "ray"  # ray (teacher actors) | local (this process: debugging, machines without Ray)
    max_sequences: int = 0  # stop after this many sequences (0 = whole corpus)
    progress: bool = True


def parse_layers(value: str | list | tuple, n_layers: int, first: int, what: str) -> tuple[int, ...]:
    """'0,3,6' | 'all' | 'none' -> sorted layer indices, checked against the teacher's depth."""
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = [v for v in str(value).replace(" ", "").split(",") if v]
    if items in (["none"], []):
        return ()
    if items == ["all"]:
        return tuple(range(first, n_layers + 1))
    try:
        layers = sorted({int(v) for v in items})
    except ValueError:
        raise ValueError(f"--{what}: expected comma-separated integers, 'all' or 'none', got {value!r}") from None
    bad = [layer for layer in layers if not first <= layer <= n_layers]
    if bad:
        raise ValueError(f"--{what}: layer(s) {bad} out of range; the teacher has layers {first}..{n_layers}")
    return tuple(layers)


@dataclass
class Prepared:
    """What the driver derives before any actor starts."""

    cfg: CacheConfig
    spec: CacheSpec
    header: Header
    kind: str
    sequences_per_shard: int
    pad_id: int


def output_spec(prep: Prepared):
    """What the teacher runner extracts for this cache (`teacher.OutputSpec`)."""
    from .teacher import OutputSpec

    spec = prep.spec
    return OutputSpec(targets=spec.targets, k=spec.k, num_samples=spec.num_samples, hidden_layers=spec.hidden_layers,
                      hidden_dtype=spec.hidden_dtype, attention_layers=spec.attention_layers,
                      attention_dtype=spec.attention_dtype, task_logits=spec.num_labels > 0, seed=prep.cfg.seed,
                      vocab_size=spec.vocab_size)


def prepare(cfg: CacheConfig) -> Prepared:
    """Read the teacher's config and tokenizer (never its weights) and fix the cache's options."""
    from transformers import AutoConfig, AutoTokenizer

    from storage.codecs import DEFAULT_TOPK_CODEC, get_topk_codec
    from .teacher import (check_weights, detect_kind, teacher_fingerprint_from_config, teacher_options_from,
                          tokenizer_fingerprint)

    opts = teacher_options_from(cfg)
    check_weights(cfg.teacher, cfg.allow_pickle)
    config = AutoConfig.from_pretrained(cfg.teacher, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher, revision=cfg.revision,
                                              trust_remote_code=cfg.trust_remote_code)
    kind = detect_kind(config) if cfg.teacher_kind == "auto" else cfg.teacher_kind
    n_layers = config.num_hidden_layers
    has_lm_head = kind in ("masked-lm", "causal-lm")
    if cfg.mode not in ("pack", "examples"):
        raise ValueError(f"--mode must be pack or examples, got {cfg.mode!r}")
    if cfg.sample and cfg.top_k and cfg.sample > 0 and cfg.top_k != 64:
        raise ValueError("give either --top-k or --sample, not both")
    targets = "none"
    if has_lm_head and cfg.sample > 0:
        targets = "sampled"
    elif has_lm_head and cfg.top_k > 0:
        targets = "topk"
    vocab_size = max(int(config.vocab_size), len(tokenizer))
    codec_name = cfg.topk_codec or DEFAULT_TOPK_CODEC
    if targets == "topk" and cfg.top_k > vocab_size:
        raise ValueError(f"--top-k {cfg.top_k} is larger than the vocabulary ({vocab_size} tokens)")
    hidden_dtype = cfg.dtype
    attention_dtype = cfg.attention_dtype or ("uint8" if cfg.dtype == "int8" else cfg.dtype)
    if cfg.max_length > getattr(config, "max_position_embeddings", cfg.max_length):
        raise ValueError(f"--max-length {cfg.max_length} exceeds the teacher's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    spec = CacheSpec(
        vocab_size=vocab_size, max_length=cfg.max_length, targets=targets, k=cfg.top_k if targets == "topk" else 64,
        num_samples=cfg.sample if targets == "sampled" else 0, topk_codec=codec_name,
        # Always recorded, so a later change of a codec's defaults cannot change how this cache decodes.
        codec_params=get_topk_codec(codec_name).params(),
        hidden_layers=parse_layers(cfg.hidden_layers, n_layers, 0, "hidden-layers"), hidden_size=config.hidden_size,
        hidden_dtype=hidden_dtype,
        attention_layers=parse_layers(cfg.attention_layers, n_layers, 1, "attention-layers"),
        num_heads=config.num_attention_heads, attention_dtype=attention_dtype,
        mlm=kind == "masked-lm", num_labels=int(config.num_labels) if kind == "classifier" and cfg.task_logits else 0,
        has_labels=cfg.mode == "examples" and cfg.label_field is not None,
    )
    generation = {
        "mode": cfg.mode, "max_length": cfg.max_length, "seed": cfg.seed,
        "mlm_probability": cfg.mlm_probability if spec.mlm else None, "dupe_factor": cfg.dupe_factor if spec.mlm else 1,
        "temperature": 1.0, "corpus": [redact(p) for p in cfg.corpus], "text_field": cfg.text_field,
        "label_field": cfg.label_field, "label_map": cfg.label_map, "include_labels": cfg.include_labels,
        "txt_mode": cfg.txt_mode, "encoding_errors": cfg.encoding_errors, "max_sequences": cfg.max_sequences,
        "autocast": cfg.autocast,
    }
    header = Header(spec=spec, teacher=teacher_fingerprint_from_config(opts, config, kind),
                    tokenizer=tokenizer_fingerprint(tokenizer), generation=generation)
    shard_tokens = cfg.shard_tokens or auto_shard_tokens(spec)
    per_shard = max(1, shard_tokens // cfg.max_length)
    header.generation["sequences_per_shard"] = per_shard
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return Prepared(cfg=cfg, spec=spec, header=header, kind=kind, sequences_per_shard=per_shard, pad_id=int(pad))


def auto_shard_tokens(spec: CacheSpec) -> int:
    from .plan import bytes_per_token

    per_token = sum(bytes_per_token(spec).values())
    return int(min(max(DEFAULT_SHARD_BYTES / per_token, 4096), 4_000_000))


def iter_shard_inputs(prep: Prepared) -> Iterator[tuple[int, list]]:
    """(shard index, sequences) in deterministic order: the same corpus and options, the same shards."""
    import itertools

    from transformers import AutoTokenizer

    from .corpus import CorpusSpec, iter_documents
    from .sequences import iter_sequences, plan_shards

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

    Reading and tokenising the corpus is Python around the tokenizer's Rust calls (~0.25 s of GIL
    per 1M tokens, measured): beside the teacher it takes the GIL from the forwards and the writers,
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
    """The padded teacher batches of one shard (static masking applied for masked-LM teachers)."""
    from .masking import iter_masked
    from .sequences import batch_sequences

    cfg = prep.cfg
    seqs = sequences
    if prep.spec.mlm:
        seqs = iter_masked(sequences, tok_info, dupe_factor=cfg.dupe_factor, seed=cfg.seed,
                           probability=cfg.mlm_probability)
    for batch in batch_sequences(seqs, cfg.batch_size, prep.pad_id):
        if "mlm_positions" in batch:  # collate pads positions with 0; the format pads with -1
            batch["mlm_positions"] = np.where(batch["mlm_labels"] >= 0, batch["mlm_positions"], -1)
        yield batch


# Masked-LM batches are made in worker processes beside a GPU: masking is per-sequence numpy on
# small arrays, which holds the GIL (~13 ms per 16k-token batch), and with several shards in flight
# it starved the writers and the forward of the GIL. Workers get chunks of whole batches (masking is
# a pure function of each sequence, so where it runs changes no byte) and stay `_AHEAD` chunks ahead.
_CHUNK_BATCHES = 4
_AHEAD = 2
_worker_state: tuple | None = None


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
    GPU 2 to 4 (one makes ~1.4M tokens/s of masked batches)."""
    if not on_gpu or not prep.spec.mlm:
        return 0
    return max(2, min(4, (os.cpu_count() or 8) // 4))


def auto_shards_in_flight(prep: Prepared, on_gpu: bool, cpus: float | None = None) -> int:
    """Shards one teacher works on at once: `--shards-in-flight`, or 1 on a CPU teacher (which needs
    its cores for the forward). Beside a GPU, the forwards take turns on the device while each shard's
    writer compresses on a core of its own. One writer keeps up with ~600k top-k tokens/s but only
    ~30k tokens/s of three float16 hidden layers (pipeline/bench/host_pipeline.py), so 4 for top-k
    alone, and half of the teacher's `cpus` (at most 16) when dense columns are cached."""
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
        from .masking import TokenizerInfo
        from .teacher import TeacherRunner, load_teacher, teacher_options_from

        self.prep = prep
        spec = prep.spec
        model, tokenizer, kind = load_teacher(teacher_options_from(prep.cfg), need_attentions=bool(spec.attention_layers))
        self.tok_info = TokenizerInfo.from_tokenizer(tokenizer)
        if spec.mlm and self.tok_info.mask_token_id is None:
            raise ValueError(f"teacher {prep.cfg.teacher} is a masked LM but its tokenizer has no mask token")
        self.runner = TeacherRunner(model, kind, output_spec(prep), teacher_options_from(prep.cfg))
        if self.runner.device.type == "cpu":
            from .allocator import tune_this_process

            tune_this_process()
        self.loc = Location.parse(out_url, storage_options)
        self.options = WriteOptions(zstd_level=prep.cfg.zstd_level)
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
        from storage.writer import ShardWriter

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
                        mid_shard(index)  # injected faults (pipeline/faults.py): one batch went to the writer
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


COUNT_LIMIT_BYTES = 256 << 20  # below this, count the corpus first so the progress bar has a total


def _corpus_bytes(paths: list[str]) -> int | None:
    from .corpus import expand_paths

    try:
        total = 0
        for p in expand_paths(paths):
            loc_fs, path = __import__("fsspec").core.url_to_fs(p)
            total += loc_fs.du(path) if loc_fs.isdir(path) else loc_fs.size(path)
        return total
    except Exception:  # noqa: BLE001 - only used to decide whether to count
        return None


def _needs_calibration(prep: Prepared) -> bool:
    """Top-k codecs that can fit a vocabulary order get one, once, before the first shard."""
    from storage.codecs import TopKCodec, get_topk_codec

    spec = prep.spec
    if spec.targets != "topk" or prep.cfg.topk_calibration_sequences <= 0:
        return False
    codec = spec.codec
    fits = type(codec).fit is not TopKCodec.fit
    return fits and spec.codec_params == get_topk_codec(spec.topk_codec).params()


def _calibration_sequences(prep: Prepared) -> list:
    """The first N sequences of the corpus: deterministic, so a rerun fits the same parameters."""

    seqs = []
    for _, shard in iter_shard_inputs(prep):
        seqs += shard
        if len(seqs) >= prep.cfg.topk_calibration_sequences:
            break
    return seqs[: prep.cfg.topk_calibration_sequences]


def _teacher_device(cfg: CacheConfig) -> str:
    from .teacher import resolve_device

    return resolve_device(cfg.device).type


def count_shards(prep: Prepared) -> int:
    return sum(1 for _ in iter_shard_inputs(prep))


def run_cache_pass(cfg: CacheConfig, *, executor: str | None = None, storage_options: dict | None = None,
                   log=print) -> dict[str, Any]:
    """Fill `cfg.out` with the teacher's outputs; idempotent and resumable. Returns a summary dict."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    prep = prepare(cfg)
    writer = CacheWriter(cfg.out, prep.header, overwrite=cfg.overwrite, storage_options=storage_options,
                         options=WriteOptions(zstd_level=cfg.zstd_level))
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
    size = _corpus_bytes(cfg.corpus)
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
    source = ShardPrefetcher(prep) if executor == "ray" or _teacher_device(cfg) != "cpu" else iter_shard_inputs(prep)
    run_on = {"ray": "pipeline.executor:RayExecutor", "local": "pipeline.executor:LocalExecutor"}[executor]
    module, cls = run_on.split(":")
    try:
        ex = getattr(__import__(module, fromlist=[cls]), cls)(prep, cfg.out, storage_options)
    except BaseException:
        source.close()
        raise
    try:
        if _needs_calibration(prep):
            ids = ex.calibrate(_calibration_sequences(prep))
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
