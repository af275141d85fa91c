"""`kdcache plan`: what a teacher pass will cost before a GPU is spent on it.

Bytes per token per column come from the codecs' measured compression on real teacher outputs
(`kdcache bench storage`, docs/performance.md); they are estimates, printed as such.
"""
from __future__ import annotations

import time
from typing import Any

from storage import CacheSpec

# Compressed bytes per stored value, measured by `kdcache bench storage` (SmolLM2-135M, wiki text).
MEASURED = {  # docs/performance.md, `kdcache bench storage` on SmolLM2-135M, 2026-11-27
    "input_id": 1.6,  # estimate (not benched)
    "topk_entry": 1.65,  # default top-k codec (fitted), per (id, log-prob) pair
    "topk_tail": 2.0,  # float16 log tail per token
    "sampled_entry": 3.2,  # estimate: id + float16 weight per unique draw (not benched)
    "float16": 1.41,  # hidden states, per value (BYTE_STREAM_SPLIT + zstd)
    "bfloat16": 1.21,
    "int8": 0.89,
    "attention_float16": 0.88,  # attention probabilities, per value
    "attention_bfloat16": 0.72,
    "attention_uint8": 0.36,
}


def bytes_per_token(spec: CacheSpec, mean_length: float | None = None) -> dict[str, float]:
    """Estimated compressed bytes per token for each column group of a cache with these options."""
    n = mean_length or spec.max_length  # attention grows with the row's length
    out = {"input_ids": MEASURED["input_id"]}
    if spec.mlm:
        out["mlm"] = 0.15 * 2 * MEASURED["input_id"]
    if spec.targets == "topk":
        out["topk"] = spec.k * MEASURED["topk_entry"] + MEASURED["topk_tail"]
    elif spec.targets == "sampled":
        out["sampled"] = 0.6 * spec.num_samples * MEASURED["sampled_entry"]  # ~60% of draws are unique
    if spec.hidden_layers:
        per = MEASURED[spec.hidden_dtype] * spec.hidden_size + (4 if spec.hidden_dtype == "int8" else 0)
        out["hidden"] = per * len(spec.hidden_layers)
    if spec.attention_layers:
        per = MEASURED[f"attention_{spec.attention_dtype}"] * spec.num_heads * n
        out["attention"] = per * len(spec.attention_layers)
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} PB"


def make_plan(prep, *, sequences: int | None = None, tokens: int | None = None,
              tokens_per_s: float | None = None) -> dict[str, Any]:
    """Sequences, tokens, bytes per column and in total, teacher time: all before any inference."""
    spec = prep.spec
    if tokens is None:
        from .cache_pass import iter_shard_inputs

        sequences, tokens = 0, 0
        for _, seqs in iter_shard_inputs(prep):
            sequences += len(seqs)
            tokens += sum(len(s.input_ids) for s in seqs)
        tokens *= prep.header.generation.get("dupe_factor") or 1
        sequences *= prep.header.generation.get("dupe_factor") or 1
    elif sequences is None:
        sequences = tokens // spec.max_length
    mean_len = tokens / max(sequences, 1)
    per_token = bytes_per_token(spec, mean_len)
    columns = {name: {"bytes_per_token": b, "bytes": b * tokens} for name, b in per_token.items()}
    total = sum(c["bytes"] for c in columns.values())
    shards = max(1, -(-sequences // prep.sequences_per_shard))
    plan = {"sequences": sequences, "tokens": tokens, "shards": shards, "columns": columns,
            "bytes_per_token": sum(per_token.values()), "total_bytes": total, "options": spec.to_json(),
            "teacher": prep.header.teacher.get("name_or_path")}
    if tokens_per_s:
        plan["tokens_per_s"] = tokens_per_s
        plan["teacher_seconds"] = tokens / tokens_per_s
    return plan


def measure_tokens_per_s(prep, batches: int = 3) -> float:
    """Time a few real teacher forwards (after one warm-up) on this machine."""
    from .cache_pass import ShardProcessor, iter_shard_inputs

    proc = ShardProcessor(prep, prep.cfg.out or "memory://kdcache-plan")
    _, seqs = next(iter(iter_shard_inputs(prep)))
    it = proc.batches(seqs)
    proc.runner(next(it))  # warm-up
    done, start = 0, time.perf_counter()
    for _, batch in zip(range(batches), it):
        proc.runner(batch)
        done += int(batch["lengths"].sum())
    return done / max(time.perf_counter() - start, 1e-9)


def format_plan(plan: dict[str, Any]) -> str:
    lines = [f"teacher   {plan['teacher']}",
             f"corpus    {plan['sequences']:,} sequences, {plan['tokens']:,} tokens, {plan['shards']:,} shards"]
    lines.append(f"\n{'column':<12}{'B/token':>12}{'total':>14}")
    for name, col in plan["columns"].items():
        lines.append(f"{name:<12}{col['bytes_per_token']:>12,.1f}{human_bytes(col['bytes']):>14}")
    lines.append(f"{'total':<12}{plan['bytes_per_token']:>12,.1f}{human_bytes(plan['total_bytes']):>14}")
    if "teacher_seconds" in plan:
        hours = plan["teacher_seconds"] / 3600
        lines.append(f"\nteacher time at {plan['tokens_per_s']:,.0f} tokens/s: {hours:,.2f} h "
                     "(divide by the number of actors)")
    lines.append("(sizes are estimates from measured compression ratios; see docs/performance.md)")
    return "\n".join(lines)
