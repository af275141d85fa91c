"""`kdcache bench train`: what training from the cache costs, measured in one run on one machine.

    kdcache bench train [--quick] [--json]
    .venv/bin/python -m kdcache.pipeline.bench.train --quick --json

Setup: a BERT-base-sized masked-LM teacher (12 layers, 768 wide, 12 heads, vocab 30,522; random
init, no download) over a synthetic corpus, cached by the real teacher pass (`run_cache_pass(...,
executor="local")`: top-k 64, mask positions, last hidden layer), and a 6-layer student copied from
it (`init_student_from_teacher`, DistilBERT style). The DistilBERT loss preset throughout.

Figures (step = forward + backward + optimiser step of the student, on the same batches):
  cache_path_overhead             step from the cache (reader + decode + step) / step with the
                                  same targets already decoded in memory
  cached_over_online_step         step from the cache / online KD (teacher forward every step,
                                  same student, batches and loss), KD at every position
  cached_over_online_step_masked  the same with KD restricted to the masked positions; the online
                                  teacher then runs its vocabulary projection only there
  cached_over_limit_step          step from the cache / the limit: a bare PyTorch step of the same
                                  student, loss and optimiser, head only where a loss reads it, the
                                  targets already in memory, no kdcache code but the loss formulas
                                  (limit_step_s_all / limit_step_s_masked); KD at every position
  cached_over_limit_step_masked   the same, KD at the masked positions
  kd_over_ce_step                 step from the cache with KD (top-64 at the mask positions) + MLM /
                                  the same student's plain MLM cross-entropy step from the cache
  reader_over_train               shard-reader tokens/s (read + decode to tensors, one process) /
                                  student training tokens/s of one worker
  reader_over_train_2_workers     the same for the slower of 2 ranks reading their halves of a
                                  1-shard cache at once (2 processes; no shard per worker needed)
  rss_ratio_10x                   peak RSS of a fresh process streaming a 10x larger cache / the
                                  1x cache (1.0 = streaming: memory does not grow with the cache)
  ray_train_startup_s             TorchTrainer.fit() to the first batch in the worker (1 worker)

`--teacher smollm2` measures the LLM case instead (`kdcache.pipeline.bench.train_llm`): the chunked
KD loss against one chunk at SmolLM2's vocabulary and long sequences.

Variants are interleaved step by step (one step of each per round, in a shuffled order) after
warm-up steps, and the median step time per variant is used: on a shared 2-core machine the speed
drifts by tens of percent within minutes, and interleaving exposes every variant to the same drift.
Cache reads are not prefetched in the timed steps (the training loop decodes `prefetch` batches
ahead in a thread): interleaved, a prefetch thread would decode during the other variants' steps, so
the figures charge every byte of reading and decoding to the step (an upper bound on the overhead).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kdcache.pipeline.bench.common import finish_child, log, run_child, start_child, status_kb

SIZES = {
    # sequences in the 1x cache, tokens per sequence, rows per step, warm-up steps per variant, rounds
    # (one step of every variant per round, in a shuffled order)
    "quick": dict(sequences=48, seq_len=64, batch=4, warmup=1, rounds=7),
    "full": dict(sequences=160, seq_len=128, batch=8, warmup=2, rounds=11),
}
VOCAB = 30522


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smaller sizes: under 3 minutes on 2 cores")
    p.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    p.add_argument("--workdir", default=None, help="where to put teacher, caches, student (default: a temp dir)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray Train start-up measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--teacher", choices=("bert-base", "smollm2"), default="bert-base",
                   help="bert-base: the figures above; smollm2: the chunked KD loss at SmolLM2's vocabulary "
                        "(49,152) and sequences 1,024 and 2,048 (peak memory, step time)")
    p.add_argument("--seq-lens", default="", help="smollm2 only: sequence lengths (default 1024,2048; --quick 512,1024)")
    p.add_argument("--chunk", type=int, default=128, help="smollm2 only: rows per chunk of the chunked variant")
    p.add_argument("--llm-child", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)  # internal: one streaming reader
    p.add_argument("--reader-child", default=None, help=argparse.SUPPRESS)  # internal: one rank's reader
    p.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)


# --------------------------------------------------------------------------------------------- #
# setup
# --------------------------------------------------------------------------------------------- #


def make_teacher(folder: Path, seed: int = 0) -> str:
    """BERT-base config, random init, with a 30,522-entry WordPiece vocab of made-up words."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(special + [f"w{i}" for i in range(VOCAB - len(special))]) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(folder))
    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok)))  # bert-base-uncased's sizes
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def make_corpus(path: Path, tokens: int, seed: int = 0) -> str:
    """Zipf-distributed words from the vocabulary, enough for `tokens` tokens in pack mode."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_words = VOCAB - 5
    with open(path, "w") as f:
        written = 0
        while written < tokens * 1.1:
            n = int(rng.integers(50, 400))
            ids = np.minimum(rng.zipf(1.2, size=n), n_words) - 1
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in ids)}) + "\n")
            written += n
    return str(path)


def copy_cache(src: str, dst: str, copies: int, one_shard_rows: int = 0) -> None:
    """Write `copies` x the rows of `src` (sample ids shifted) into a new cache with the same options;
    with `one_shard_rows`, everything into one shard of row groups of that many rows."""
    import dataclasses

    from kdcache.storage import CacheReader, CacheWriter

    reader = CacheReader(src, verify="off")
    header = dataclasses.replace(reader.manifest.header,
                                 generation={**reader.manifest.header.generation, "bench_copies": copies})
    writer = CacheWriter(dst, header, overwrite=True)
    n_rows = reader.manifest.rows
    index = 0
    if one_shard_rows:
        with writer.shard_writer(0) as w:
            for c in range(copies):
                for batch in reader.iter_numpy(None, batch_size=one_shard_rows):
                    batch["sample_id"] = batch["sample_id"] + c * n_rows
                    w.write(batch)
        writer.commit(expected_shards=1)
        return
    for c in range(copies):
        for shard in reader.shards:
            with writer.shard_writer(index) as w:
                for batch in reader.iter_numpy(None, batch_size=64, shards=[shard]):
                    batch["sample_id"] = batch["sample_id"] + c * n_rows
                    w.write(batch)
            index += 1
    writer.commit(expected_shards=index)


# --------------------------------------------------------------------------------------------- #
# online KD: the teacher's targets computed every step, in torch, shaped like the cache's
# --------------------------------------------------------------------------------------------- #


def online_targets(teacher, batch: dict, k: int, last_layer: int, masked: bool) -> dict:
    import torch

    with torch.no_grad():  # not inference_mode: the losses save these tensors for backward
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if not masked:
            out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            logp = torch.log_softmax(out.logits.float(), -1)
            hidden = out.hidden_states[last_layer]
        else:
            # The vocabulary projection (the expensive head) only at the M masked positions.
            hidden = teacher.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            pos = batch["mlm_positions"].clamp(min=0)
            h_m = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
            logp = torch.log_softmax(teacher.cls(h_m).float(), -1)  # [B, M, V]
        top_lp, top_ids = torch.topk(logp, k, dim=-1)
        tail = torch.log(-torch.expm1(torch.logsumexp(top_lp, -1)).clamp(max=0)).clamp(min=-1e4)  # log(1 - mass)
        if masked:  # back to [B, T, ...], where the masked KD loss gathers them
            B, T = ids.shape
            full_ids = torch.zeros(B, T, k, dtype=top_ids.dtype)
            full_lp = torch.zeros(B, T, k)
            full_tail = torch.zeros(B, T)
            idx = pos[..., None].expand(-1, -1, k)
            full_ids.scatter_(1, idx, top_ids)
            full_lp.scatter_(1, idx, top_lp)
            full_tail.scatter_(1, pos, tail)
            top_ids, top_lp, tail = full_ids, full_lp, full_tail
    return {**batch, "topk_ids": top_ids, "topk_logprobs": top_lp, "topk_log_tail": tail,
            f"hidden_{last_layer}": hidden}


# --------------------------------------------------------------------------------------------- #
# measurements
# --------------------------------------------------------------------------------------------- #


def rss_child(cache: str, batch_size: int) -> dict[str, Any]:
    """In a fresh process: stream the whole cache the way a training worker does; peak RSS."""
    from kdcache.storage import CacheReader

    from kdcache.pipeline.student.trainer import RankStream, prefetched

    before = status_kb()
    reader = CacheReader(cache, verify="full")
    cols = reader.resolve_columns(["input_ids", "topk", "mlm", f"hidden_{max(reader.spec.hidden_layers)}"])
    stream = RankStream(reader, cols, batch_size, 0, 1)
    rows = tokens = 0
    for batch in prefetched(stream.batches(0), 2):
        rows += batch["rows"]
        tokens += int(batch["attention_mask"].sum())
    peak = status_kb()
    return {"rows": rows, "tokens": tokens, "bytes": reader.manifest.bytes, "rss_after_imports_kb": before,
            "peak_rss_kb": peak}


def _reader_tokens_per_s(cache: str, columns: list[str], batch_size: int, min_s: float, rank: int = 0,
                         world: int = 1) -> float:
    from kdcache.storage import CacheReader

    from kdcache.pipeline.student.trainer import RankStream

    reader = CacheReader(cache, verify="full")
    stream = RankStream(reader, columns, batch_size, rank, world)
    tokens, t0, epoch = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < min_s or epoch == 0:
        for batch in stream.batches(epoch):
            tokens += int(batch["attention_mask"].sum())
        epoch += 1
    return tokens / (time.perf_counter() - t0)


def limit_step(model, optimizer, params, batch: dict, masked: bool, temperature: float, last_layer: int,
               weights=(5.0, 2.0, 1.0), max_grad_norm: float = 5.0) -> None:
    """The student side's physical limit: the DistilBERT loss in bare PyTorch, the head only at the
    rows a loss reads (the real tokens or the mask positions for KD, the mask positions for MLM)."""
    import torch
    import torch.nn.functional as F

    from kdcache.pipeline.student.losses import cosine_hidden_loss, topk_kd_loss

    ids, mask = batch["input_ids"], batch["attention_mask"]
    h = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
    B, T, H = h.shape
    flat = h.reshape(-1, H)
    pos = batch["mlm_positions"].long()
    mlm_rows = (torch.arange(B)[:, None] * T + pos.clamp(min=0))[pos >= 0]
    kd_rows = mlm_rows if masked else mask.reshape(-1).nonzero().squeeze(1)
    z_kd = model.cls(flat[kd_rows])
    z_mlm = z_kd if masked else model.cls(flat[mlm_rows])

    def at(name):
        v = batch[name]
        return v.reshape(-1, *v.shape[2:])[kd_rows][None]

    ones = torch.ones(1, len(kd_rows), dtype=torch.bool)
    kd = topk_kd_loss(z_kd[None], at("topk_ids"), at("topk_logprobs"), at("topk_log_tail"), ones, temperature)
    mlm = F.cross_entropy(z_mlm.float(), batch["mlm_labels"].long()[pos >= 0])
    cos = cosine_hidden_loss(h, batch[f"hidden_{last_layer}"], mask)
    total = weights[0] * kd + weights[1] * mlm + weights[2] * cos
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()


def run(args) -> int:
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.batch_size)))
        return 0
    if args.reader_child:  # one rank of a world reading its rows, beside the other ranks' processes
        cache, rank, world, min_s, columns = args.reader_child.split("|")
        print(json.dumps({"tokens_per_s": _reader_tokens_per_s(cache, columns.split(","), args.batch_size,
                                                               float(min_s), int(rank), int(world))}))
        return 0
    if args.teacher == "smollm2" or args.llm_child:
        from kdcache.pipeline.bench.train_llm import run as run_llm

        return run_llm(args)
    import dataclasses
    import itertools

    import torch
    from transformers.utils import logging as hf_logging

    from kdcache.pipeline.teacher_pass.run import run_cache_pass
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.pipeline.common.jsonout import print_json
    from kdcache.pipeline.student.models import init_student_from_teacher
    from kdcache.pipeline.student.trainer import RankStream, build_components, plan_run, step_seed, to_device
    from kdcache.pipeline.student.trainer.step import train_step
    from kdcache.pipeline.student.config import load_train_config
    from kdcache.storage import CacheReader

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else "full"]
    t_start = time.perf_counter()
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kdcache-bench-train-")
        work = Path(tmp.name)
    B, T, K = size["batch"], size["seq_len"], 64
    try:
        # -- teacher, cache, student --------------------------------------------------------------
        teacher_dir = make_teacher(work / "teacher")
        corpus = make_corpus(work / "corpus.jsonl", size["sequences"] * T)
        cache = str(work / "cache")
        t0 = time.perf_counter()
        cc = CacheConfig(teacher=teacher_dir, corpus=[corpus], out=cache, max_length=T, top_k=K, hidden_layers="12",
                         batch_size=B, shard_tokens=max(T, size["sequences"] * T // 4), max_sequences=size["sequences"],
                         overwrite=True, progress=False)
        cache_summary = run_cache_pass(cc, executor="local", log=lambda *_: None)
        teacher_pass_s = time.perf_counter() - t0
        log(f"teacher pass: {cache_summary['tokens_total']} tokens in {teacher_pass_s:.1f}s, "
            f"{cache_summary['bytes_total'] / 1e6:.1f} MB")
        student_dir = work / "student"
        init_student_from_teacher(teacher_dir, student_dir, num_layers=6)

        # -- the same components a training worker builds -----------------------------------------
        def config(kd_positions: str, *overrides: str):
            return load_train_config("distilbert", None, {
                "cache": cache, "student": str(student_dir), "out": str(work / "run"), "batch_size": B,
                "steps": 10_000, "no_ray": True, "kd_positions": kd_positions, "progress": False}, list(overrides))

        cfg_all, cfg_masked = config("all"), config("masked")
        cfg_kd = config("masked", "loss_weights.cos=0")  # KD + MLM
        cfg_ce = config("all", "loss_weights.cos=0", "loss_weights.kd=0")  # MLM alone: no teacher targets
        plan_all, plan_masked = plan_run(cfg_all), plan_run(cfg_masked)
        plan_kd, plan_ce = plan_run(cfg_kd), plan_run(cfg_ce)
        device = torch.device("cpu")
        comp = build_components(cfg_all, plan_all, device)

        def sharing(cfg, plan):  # the same student and optimiser, another loss
            return dataclasses.replace(comp, loss_fn=build_components(cfg, plan, device).loss_fn)

        comp_masked, comp_kd, comp_ce = sharing(cfg_masked, plan_masked), sharing(cfg_kd, plan_kd), sharing(cfg_ce, plan_ce)
        reader = CacheReader(cache, verify="full")

        def stream_of(plan):  # endless, epoch after epoch; decoded inside the timed step (no prefetch)
            s = RankStream(reader, plan.columns, B, 0, 1)
            return itertools.chain.from_iterable(s.batches(e) for e in itertools.count())

        memory = [b for b in RankStream(reader, plan_masked.columns, B, 0, 1).batches(0) if b["rows"] == B]
        mem_iter = itertools.cycle(memory)
        from transformers import BertForMaskedLM

        teacher = BertForMaskedLM.from_pretrained(teacher_dir).eval()  # only the online baselines use it
        last = max(reader.spec.hidden_layers)

        def prep(batch):
            batch = dict(batch)
            batch.pop("rows", None)
            batch.pop("sample_id", None)
            return to_device(batch, device)

        variants = {
            "memory": (comp, lambda: prep(next(mem_iter))),
            "cache": (comp, lambda it=stream_of(plan_all): prep(next(it))),
            "online": (comp, lambda: online_targets(teacher, prep(next(mem_iter)), K, last, masked=False)),
            "cache_masked": (comp_masked, lambda it=stream_of(plan_masked): prep(next(it))),
            "online_masked": (comp_masked, lambda: online_targets(teacher, prep(next(mem_iter)), K, last, masked=True)),
            "limit": (None, lambda: prep(next(mem_iter))),
            "limit_masked": (None, lambda: prep(next(mem_iter))),
            "cache_kd": (comp_kd, lambda it=stream_of(plan_kd): prep(next(it))),
            "cache_ce": (comp_ce, lambda it=stream_of(plan_ce): prep(next(it))),
        }
        # The limit's own optimiser over the same parameters, with kdcache's decay split and settings
        bare = comp.student.model
        limit_params = [p for p in bare.parameters() if p.requires_grad]
        limit_opt = torch.optim.AdamW([{"params": [p for p in limit_params if p.dim() >= 2],
                                        "weight_decay": cfg_all.weight_decay},
                                       {"params": [p for p in limit_params if p.dim() < 2], "weight_decay": 0.0}],
                                      lr=cfg_all.lr, eps=cfg_all.adam_eps)
        temperature = plan_all.loss_spec.temperature
        times: dict[str, list[float]] = {k: [] for k in variants}
        tokens: dict[str, int] = {k: 0 for k in variants}
        step = 0

        def one(name: str) -> tuple[float, int]:
            nonlocal step
            c, get = variants[name]
            t = time.perf_counter()
            batch = get()  # data (cache read/decode, or the teacher's forward) is part of the step
            step += 1
            if c is None:
                torch.manual_seed(step_seed(0, step, 0))
                limit_step(bare, limit_opt, limit_params, batch, name == "limit_masked", temperature, last,
                           max_grad_norm=cfg_all.max_grad_norm)
            else:
                train_step(c, batch, step_seed(0, step, 0))
            return time.perf_counter() - t, int(batch["attention_mask"].sum())

        for name in variants:  # warm-up: first calls allocate and fault in memory
            for _ in range(size["warmup"]):
                one(name)
        order = list(variants)
        rng = random.Random(0)
        for r in range(size["rounds"]):
            rng.shuffle(order)
            for name in order:
                dt, n = one(name)
                times[name].append(dt)
                tokens[name] += n
            log(f"round {r + 1}/{size['rounds']}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
        med = {k: statistics.median(v) for k, v in times.items()}
        train_tps = tokens["cache"] / (med["cache"] * len(times["cache"]))  # at the median step time

        # -- reader throughput, one process -------------------------------------------------------
        reader_tps = _reader_tokens_per_s(cache, plan_all.columns, B, min_s=3.0 if args.quick else 8.0)

        # -- two workers on a one-shard cache: each rank reads its half, both processes at once -----
        cache1 = str(work / "cache-1shard")
        copy_cache(cache, cache1, 1, one_shard_rows=B)
        min_s = 3.0 if args.quick else 8.0
        spec = "|".join([cache1, "{rank}", "2", str(min_s), ",".join(plan_all.columns)])
        procs = [start_child(["--reader-child", spec.format(rank=r), "--batch-size", str(B)]) for r in range(2)]
        reader2_tps = min(finish_child(p, "reader child")["tokens_per_s"] for p in procs)

        # -- streaming memory: 1x vs 10x cache, each in a fresh process --------------------------
        cache10 = str(work / "cache10")
        t0 = time.perf_counter()
        copy_cache(cache, cache10, 10)
        log(f"10x cache written in {time.perf_counter() - t0:.1f}s")
        rss1, rss10 = (run_child(["--rss-child", c, "--batch-size", str(B)], "RSS child") for c in (cache, cache10))

        # -- Ray Train start-up -------------------------------------------------------------------
        ray_startup = ray_init_s = None
        if not args.no_ray:
            import ray

            from kdcache.pipeline.student.trainer import train

            del teacher, comp, comp_masked, comp_kd, comp_ce, variants, bare, limit_opt, limit_params
            t0 = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            ray_init_s = time.perf_counter() - t0
            try:
                rc = load_train_config("distilbert", None, {
                    "cache": cache, "student": str(student_dir), "out": str(work / "ray-run"), "batch_size": B,
                    "steps": 2, "workers": 1, "progress": False, "tensorboard": False})
                summary = train(rc, log=log)
                ray_startup = summary["startup_s"]
            finally:
                ray.shutdown()

        result = {
            "cache_path_overhead": med["cache"] / med["memory"],
            "cached_over_online_step": med["cache"] / med["online"],
            "cached_over_online_step_masked": med["cache_masked"] / med["online_masked"],
            "limit_step_s_all": med["limit"],
            "limit_step_s_masked": med["limit_masked"],
            "cached_over_limit_step": med["cache"] / med["limit"],
            "cached_over_limit_step_masked": med["cache_masked"] / med["limit_masked"],
            "kd_over_ce_step": med["cache_kd"] / med["cache_ce"],
            "reader_over_train": reader_tps / train_tps,
            "reader_over_train_2_workers": reader2_tps / train_tps,
            "reader_tokens_per_s_2_workers": reader2_tps,
            "rss_ratio_10x": rss10["peak_rss_kb"] / rss1["peak_rss_kb"],
            "ray_train_startup_s": ray_startup,
            "ray_init_s": ray_init_s,
            "step_s": med,
            "reader_tokens_per_s": reader_tps,
            "train_tokens_per_s": train_tps,
            "rss_kb": {"1x": rss1, "10x": rss10},
            "teacher_pass_s": teacher_pass_s,
            "cache_tokens": cache_summary["tokens_total"],
            "cache_bytes": cache_summary["bytes_total"],
            "sizes": {**size, "k": K, "teacher": "bert-base config (12x768), random init", "student_layers": 6},
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__},
            "seconds": time.perf_counter() - t_start,
        }
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(f"cache path overhead (cache / in-memory targets)   {result['cache_path_overhead']:.3f}x")
    print(f"cached / online KD step, KD at every position     {result['cached_over_online_step']:.3f}x")
    print(f"cached / online KD step, KD at masked positions   {result['cached_over_online_step_masked']:.3f}x")
    print(f"cached step / bare-PyTorch limit, KD everywhere   {result['cached_over_limit_step']:.3f}x (goal <= 1.05)")
    print(f"cached step / bare-PyTorch limit, KD masked       {result['cached_over_limit_step_masked']:.3f}x "
          "(goal <= 1.05)")
    print(f"KD + MLM step / MLM-only step, both from cache    {result['kd_over_ce_step']:.3f}x (goal <= 1.10)")
    print(f"reader tokens/s / training tokens/s per worker    {result['reader_over_train']:.1f}x "
          f"({reader_tps:,.0f} vs {train_tps:,.0f})")
    print(f"the same, 2 workers sharing a 1-shard cache       {result['reader_over_train_2_workers']:.1f}x "
          f"({reader2_tps:,.0f} per worker, both reading at once)")
    print(f"peak RSS streaming 10x / 1x cache                 {result['rss_ratio_10x']:.3f} "
          f"({rss10['peak_rss_kb'] / 1024:.0f} vs {rss1['peak_rss_kb'] / 1024:.0f} MB)")
    if ray_startup is not None:
        print(f"Ray Train start-up (fit() -> first batch)         {ray_startup:.1f}s (+ ray.init {ray_init_s:.1f}s)")
    print("step medians: " + ", ".join(f"{k} {v:.3f}s" for k, v in result["step_s"].items()))
    if args.json:
        print_json(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdcache.pipeline.bench.train", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
