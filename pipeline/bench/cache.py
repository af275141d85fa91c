"""`kdcache bench cache`: the full teacher pass against a bare forward loop, same teacher, same batches.

The bare loop (`model(**batch)` in one process, nothing kept) is the physical limit of a teacher
pass; the teacher runner adds log-softmax + top-k and the storage codecs on the device and the
copy of the encoded leaves to the host; the cache pass adds corpus reading, tokenising, masking,
Arrow conversion, compression and writing (`shards_in_flight` writers in parallel), and the actor
machinery. All run in this one process tree, one after the other, on the same machine.
"""
from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kdcache.pipeline.data.assets import CACHE_HOME


def _bert_base_teacher(folder: Path, layers: int, hidden: int) -> str:
    """A BERT-base-shaped masked LM (random init: the speed is the same as trained weights)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    if (folder / "config.json").exists():
        return str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _words() + [f"tok{i}" for i in range(30522)]
    (folder / "vocab.txt").write_text("\n".join(vocab[:30522]) + "\n")
    tok = BertTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                       num_attention_heads=heads, intermediate_size=4 * hidden))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _words() -> list[str]:
    return sorted(set(" ".join(_texts(400)).lower().replace(".", " ").replace(",", " ").split()))[:20000]


def _texts(n: int) -> list[str]:
    try:
        from kdcache.pipeline.bench.common import wiki_texts

        return wiki_texts(n)
    except FileNotFoundError:
        import numpy as np

        rng = np.random.default_rng(0)
        words = [f"w{i}" for i in range(5000)]
        return [" ".join(rng.choice(words, size=120)) for _ in range(n)]


def _corpus(folder: Path, n_docs: int, words: int = 0) -> str:
    """`n_docs` texts, repeated until the corpus holds `words` words: the packaged Wikipedia extracts
    hold ~200k tokens, and a run at GPU speed needs more than that to reach its steady state."""
    path = folder / "corpus.jsonl"
    texts = _texts(n_docs)
    written = 0
    with open(path, "w") as f:
        while True:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
                written += len(t.split())
            if written >= words:
                break
    return str(path)


def _bare_tokens_per_s(prep, batches: list[dict[str, Any]], device: str) -> float:
    """model(**batch) and nothing else, on the teacher pass's own batches."""
    import torch

    from kdcache.pipeline.common.runtime import amp_dtype
    from kdcache.pipeline.teacher_pass.teacher import load_teacher

    model, _, _ = load_teacher(prep.teacher_options(), need_attentions=bool(prep.spec.attention_layers),
                             uses_head=prep.uses_head)
    dev = next(model.parameters()).device
    amp = amp_dtype(prep.cfg.autocast, dev)
    want_h, want_a = bool(prep.spec.hidden_layers), bool(prep.spec.attention_layers)

    def forward(batch):
        ids = torch.as_tensor(batch["input_ids"], dtype=torch.long).to(dev)
        mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long).to(dev)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            model(input_ids=ids, attention_mask=mask, output_hidden_states=want_h, output_attentions=want_a)

    forward(batches[0])  # warm-up (kernels, allocator)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = 0
    for b in batches:
        forward(b)
        tokens += int(b["lengths"].sum())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0)


def _runner_tokens_per_s(prep, batches: list[dict[str, Any]]) -> float:
    """The teacher runner alone: forward, top-k, codecs on the device and the copy to host memory,
    nothing written. Between the bare loop and the full pass: what the device work adds, and what
    the host pipeline adds on top of it."""
    from kdcache.pipeline.teacher_pass.config import output_spec
    from kdcache.pipeline.teacher_pass.teacher import TeacherRunner, load_teacher

    spec = prep.spec
    opts = prep.teacher_options()
    model, _, kind = load_teacher(opts, need_attentions=bool(spec.attention_layers), uses_head=prep.uses_head)
    runner = TeacherRunner(model, kind, output_spec(prep), opts)
    codec = spec.codec if spec.targets == "topk" else None
    runner(batches[0], codec=codec)  # warm-up (kernels, allocators, pinned memory)
    t0 = time.perf_counter()
    tokens = 0
    for b in batches:
        runner(b, codec=codec)  # returns only once its outputs are in host memory
        tokens += int(b["lengths"].sum())
    return tokens / (time.perf_counter() - t0)


def run(args) -> int:
    from transformers import AutoTokenizer

    from kdcache.pipeline.common import allocator
    from kdcache.pipeline.teacher_pass.run import run_cache_pass
    from kdcache.pipeline.teacher_pass.inputs import shard_batches
    from kdcache.pipeline.teacher_pass.inputs import iter_shard_inputs
    from kdcache.pipeline.teacher_pass.config import teacher_device
    from kdcache.pipeline.teacher_pass.config import prepare
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.pipeline.common.jsonout import print_json
    from kdcache.pipeline.data.masking import TokenizerInfo

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kdcache-bench-cache-"))
    try:
        if args.teacher in ("bert-base", "bert-tiny"):
            layers, hidden = (12, 768) if args.teacher == "bert-base" else (2, 128)
            teacher = _bert_base_teacher(CACHE_HOME / f"bench-{args.teacher}", layers, hidden)
            desc = f"BERT-{'base' if layers == 12 else 'tiny'}-shaped masked LM ({layers} layers, {hidden}), random init"
        else:
            teacher, desc = args.teacher, args.teacher
        n_seq = max(1, args.tokens // args.max_length)
        cfg = CacheConfig(teacher=teacher, corpus=[_corpus(work, max(64, n_seq), words=args.tokens)],
                          out=str(work / "cache"),
                          max_length=args.max_length, top_k=args.top_k, hidden_layers=args.hidden_layers,
                          attention_layers=args.attention_layers, batch_size=args.batch_size, actors=args.actors,
                          cpus_per_actor=args.cpus_per_actor, max_sequences=n_seq, overwrite=True, progress=False,
                          device=args.device, shard_tokens=args.shard_tokens or args.batch_size * args.max_length * 4,
                          shards_in_flight=args.shards_in_flight)
        prep = prepare(cfg)
        # The exact batches the cache pass will run (masking included), for the bare loop.
        tok_info = TokenizerInfo.from_tokenizer(AutoTokenizer.from_pretrained(teacher))
        proc_batches = [b for _, seqs in iter_shard_inputs(prep) for b in shard_batches(prep, tok_info, seqs)]
        # A CPU teacher process runs with tuned malloc settings (pipeline/common/allocator.py); the bare loop
        # gets them too, so the ratio compares like with like. Measured once first without them:
        # the plain script a user would write.
        bare_default = None
        if teacher_device(cfg) == "cpu" and allocator.enabled():
            bare_default = _bare_tokens_per_s(prep, proc_batches, args.device)
            allocator.tune_this_process()
        bare, runner, cached, runs = [], [], [], []
        for rep in range(args.repeats):
            bare.append(_bare_tokens_per_s(prep, proc_batches, args.device))
            runner.append(_runner_tokens_per_s(prep, proc_batches))
            shutil.rmtree(cfg.out, ignore_errors=True)  # every run pays the teacher again
            summary = run_cache_pass(cfg, executor=args.executor, log=lambda *_: None)
            cached.append(summary["tokens_per_s"])
            runs.append(summary)
            print(f"run {rep + 1}: bare {bare[-1]:,.0f} tok/s   runner {runner[-1]:,.0f} tok/s   "
                  f"cache pass {cached[-1]:,.0f} tok/s   ratio {cached[-1] / bare[-1]:.3f}", flush=True)
        b, r, c = statistics.median(bare), statistics.median(runner), statistics.median(cached)
        result = {"teacher": desc, "device": _device_name(args.device), "executor": args.executor,
                  "actors": args.actors or 1, "tokens": runs[-1]["tokens_total"], "batch_size": args.batch_size,
                  "max_length": args.max_length, "top_k": args.top_k, "hidden_layers": args.hidden_layers,
                  "attention_layers": args.attention_layers, "bare_tokens_per_s": b, "runner_tokens_per_s": r,
                  "cache_tokens_per_s": c, "shards_in_flight": args.shards_in_flight or "auto",
                  "ratio": c / b, "ratios": [x / y for x, y in zip(cached, bare)],
                  "cache_mb": runs[-1]["bytes_total"] / 1e6, "malloc_tuned": bare_default is not None}
        if bare_default is not None:
            result.update(bare_default_malloc_tokens_per_s=bare_default, ratio_vs_default_malloc=c / bare_default)
        print(f"\nteacher {desc} on {result['device']}; {result['tokens']:,} tokens per run, {args.repeats} runs")
        print(f"bare forward loop   {b:>12,.0f} tokens/s")
        print(f"teacher runner      {r:>12,.0f} tokens/s   (+ top-k, codecs, host copy; nothing written)")
        print(f"full cache pass     {c:>12,.0f} tokens/s   ({args.executor}, {result['actors']} actor(s))")
        print(f"ratio               {c / b:>12.3f}   (goal >= 0.95)")
        if bare_default is not None:
            print(f"bare loop, glibc malloc defaults {bare_default:,.0f} tokens/s: full pass / that = "
                  f"{c / bare_default:.3f} (the pass and the bare loop above run with pipeline/common/allocator.py)")
        if args.json:
            print_json(result)
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _device_name(device: str) -> str:
    import torch

    if (device in ("auto", "cuda")) and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
