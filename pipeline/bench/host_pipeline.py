"""Host-pipeline throughput of the teacher pass: everything but the teacher's forward.

    python -m kdcache.pipeline.bench.host_pipeline [--tokens 262144] [--shards-in-flight 4] [--json]

The real pass as it runs beside a GPU (`ShardPrefetcher` reading and tokenising the corpus in a
worker process, `LocalExecutor` -> `ShardProcessor` with its batch workers masking and collating,
host copies, Arrow conversion, Parquet + zstd, commit) on a BERT-base-shaped masked LM (2 layers of
768, vocabulary 30,522) whose forward and device work are replaced by outputs computed once: what a
GPU would hand over, so the tokens/s printed are the ceiling the host sets on a GPU teacher pass.
Two cases: top-64 only, and top-64 + 3 hidden layers of 768 (float16).

`--encode device` (default) hands over the codec's leaves and float16 hidden states, as the runner
does beside a GPU; `--encode host` hands over raw top-k ids and float32 log-probs, which the writer
encodes with numpy (the path of a CPU teacher, and of every GPU teacher before device encoding).
On a machine with a GPU the fake outputs live there, so the timed host copies are real ones.

The fake top-k comes from Zipf-biased random logits and the hidden states are Gaussian: both
compress a little worse than a trained teacher's, so these figures are on the safe side.
"""
from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

CASES = {"topk64": "none", "topk64_hidden3": "0,1,2"}


def _fake_top_k(rows: int, vocab: int, k: int, seed: int = 0):
    """[rows, k] ids and float32 log-probs of Zipf-biased random logits (made in chunks: the full
    [rows, vocab] logits of a 16k-token batch would need 2 GB)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    bias = -torch.log1p(torch.arange(vocab, dtype=torch.float32))  # frequent (small) ids lead, as in a real vocabulary
    ids, lps = [], []
    for start in range(0, rows, 1024):
        n = min(1024, rows - start)
        logp = torch.log_softmax(torch.randn(n, vocab, generator=gen) * 2 + bias, dim=-1)
        lp, i = torch.topk(logp, k, dim=-1)
        ids.append(i)
        lps.append(lp)
    return torch.cat(ids), torch.cat(lps)


def install_fake_teacher(processor, seed: int = 0, encode: str = "device") -> None:
    """Replace the processor's forward and device work by outputs computed once (then sliced to
    each batch's shape); the host copy, and everything after it, stay real."""
    import torch

    runner, prep = processor.runner, processor.prep
    cfg, spec = prep.cfg, prep.spec
    B, T, dev = cfg.batch_size, cfg.max_length, runner.device
    runner.encode_on_device = encode == "device"
    codec = spec.codec if runner.encode_on_device else None
    ids, lp = _fake_top_k(B * T, spec.vocab_size, spec.k, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.inference_mode():
        full = runner.topk_columns(ids.reshape(B, T, -1).to(dev), lp.reshape(B, T, -1).to(dev), codec)
        for layer in spec.hidden_layers:
            hidden = torch.randn(B, T, spec.hidden_size, generator=gen).to(dev)
            full.update(runner.dense_columns(f"hidden_{layer}", hidden, spec.hidden_dtype, encode=codec is not None))

    def fake_outputs(batch: dict[str, Any], codec) -> dict[str, Any]:
        b, t = batch["input_ids"].shape
        return {name: ({leaf: x[:b, :t] for leaf, x in v.items()} if isinstance(v, dict) else v[:b, :t])
                for name, v in full.items()}

    runner._device_outputs = fake_outputs


def measure(teacher: str, corpus: str, out: str, *, hidden_layers: str, tokens: int, batch_size: int,
            max_length: int, shard_tokens: int, shards_in_flight: int, encoder_threads: int, device: str,
            encode: str, batch_workers: int = -1) -> dict[str, Any]:
    """One host-only cache pass; its tokens/s, from the first shard handed out to the commit."""
    from kdcache.pipeline.teacher_pass.shard import auto_shards_in_flight
    from kdcache.pipeline.teacher_pass.shard import auto_batch_workers
    from kdcache.pipeline.teacher_pass.inputs import ShardPrefetcher
    from kdcache.pipeline.teacher_pass.config import prepare
    from kdcache.pipeline.teacher_pass.config import CacheConfig, write_options
    from kdcache.pipeline.teacher_pass.executor import LocalExecutor
    from kdcache.storage import CacheWriter

    cfg = CacheConfig(teacher=teacher, corpus=[corpus], out=out, max_length=max_length, batch_size=batch_size,
                      top_k=64, hidden_layers=hidden_layers, max_sequences=max(1, tokens // max_length),
                      shard_tokens=shard_tokens, topk_calibration_sequences=0, overwrite=True, progress=False,
                      device=device, shards_in_flight=shards_in_flight, encoder_threads=encoder_threads or 2)
    prep = prepare(cfg)
    # 0: what the pass would choose beside a GPU, also where the fake outputs live on a CPU.
    cfg.shards_in_flight = auto_shards_in_flight(prep, on_gpu=True)
    writer = CacheWriter(out, prep.header, overwrite=True, options=write_options(cfg))
    ex = LocalExecutor(prep, out)
    if batch_workers < 0:  # what the pass would choose beside a GPU
        batch_workers = auto_batch_workers(prep, on_gpu=True)
    ex.processor.batch_workers = batch_workers
    if batch_workers:
        ex.processor.start_batch_workers()
    install_fake_teacher(ex.processor, encode=encode)
    done = {"tokens": 0, "shards": 0}

    def on_done(info) -> None:
        done["tokens"] += info.tokens
        done["shards"] += 1

    # As run_cache_pass beside a GPU, the corpus is read in a worker process; timed from its first
    # shard, so that neither its start-up nor a head start (the pass starts it while the teacher
    # loads) counts.
    prefetcher = ShardPrefetcher(prep)
    source = iter(prefetcher)
    first = next(source)
    t0 = time.perf_counter()
    try:
        ex.run(itertools.chain([first], source), on_done)
    finally:
        prefetcher.close()
        ex.close()
    manifest = writer.commit(expected_shards=done["shards"])
    seconds = time.perf_counter() - t0
    return {"tokens": done["tokens"], "seconds": seconds, "tokens_per_s": done["tokens"] / seconds,
            "shards": done["shards"], "shards_in_flight": ex.processor.shards_in_flight,
            "encoder_threads": ex.processor.encoder_threads, "batch_workers": batch_workers,
            "device": str(ex.processor.runner.device),
            "mb": manifest.bytes / 1e6}


def _corpus(folder: Path, tokens: int) -> str:
    """A jsonl corpus of at least `tokens` words (the bench corpus' texts, repeated as needed)."""
    import json

    from kdcache.pipeline.bench.cache import _texts

    texts = _texts(max(64, tokens // 100))
    path = folder / "corpus.jsonl"
    words = 0
    with open(path, "w") as f:
        while words < tokens:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
                words += len(t.split())
    return str(path)


def main(argv: list[str] | None = None) -> int:
    import os

    from kdcache.pipeline.common.jsonout import print_json

    from kdcache.pipeline.bench.cache import _bert_base_teacher
    from kdcache.pipeline.data.assets import CACHE_HOME

    p = argparse.ArgumentParser(prog="python -m kdcache.pipeline.bench.host_pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=262_144, help="tokens per run (default 262144: 16 batches)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--shard-tokens", type=int, default=0, help="default: 4 batches per shard, as bench cache")
    p.add_argument("--shards-in-flight", type=int, default=0, help="default: the auto value beside a GPU")
    p.add_argument("--encoder-threads", type=int, default=0, help="per shard; default: the auto value beside a GPU")
    p.add_argument("--batch-workers", type=int, default=-1,
                   help="processes making masked batches (default: the auto value beside a GPU; 0 = in-thread)")
    p.add_argument("--encode", choices=("device", "host"), default="device",
                   help="device: the runner's encoded leaves (GPU path); host: raw top-k, numpy codec")
    p.add_argument("--device", default="auto", help="where the fake outputs live (auto: cuda if available)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--repeats", type=int, default=3, help="runs per case (median reported)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    args = p.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kdcache-bench-host-"))
    try:
        teacher = _bert_base_teacher(CACHE_HOME / "bench-host-bert", layers=2, hidden=768)
        corpus = _corpus(work, args.tokens)
        shard_tokens = args.shard_tokens or args.batch_size * args.max_length * 4
        results: dict[str, Any] = {"cpus": os.cpu_count(), "encode": args.encode, "tokens": args.tokens,
                                   "batch_size": args.batch_size, "max_length": args.max_length}
        for case in args.cases.split(","):
            runs = []
            for _ in range(args.repeats):
                out = work / f"cache-{case}"
                shutil.rmtree(out, ignore_errors=True)
                runs.append(measure(teacher, corpus, str(out), hidden_layers=CASES[case], tokens=args.tokens,
                                    batch_size=args.batch_size, max_length=args.max_length, shard_tokens=shard_tokens,
                                    shards_in_flight=args.shards_in_flight, encoder_threads=args.encoder_threads,
                                    device=args.device, encode=args.encode, batch_workers=args.batch_workers))
            rate = statistics.median(r["tokens_per_s"] for r in runs)
            last = runs[-1]
            results[case] = {"tokens_per_s": rate, "runs": [r["tokens_per_s"] for r in runs],
                             "mb": last["mb"], "bytes_per_token": last["mb"] * 1e6 / last["tokens"]}
            print(f"{case:<16} {rate:>12,.0f} tokens/s   ({last['tokens']:,} tokens, {last['shards']} shards, "
                  f"{last['shards_in_flight']} in flight, {last['encoder_threads']} encoder thread(s) each, "
                  f"{last['batch_workers']} batch worker(s), "
                  f"{args.encode} encoding, outputs on {last['device']}, {last['mb'] * 1e6 / last['tokens']:,.0f} "
                  f"B/token)", flush=True)
            results.update(device=last["device"], shards_in_flight=last["shards_in_flight"],
                           encoder_threads=last["encoder_threads"], batch_workers=last["batch_workers"])
        if args.json:
            print_json(results)
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
