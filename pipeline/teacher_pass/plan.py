"""`kdcache plan`: what a teacher pass will cost before a GPU is spent on it.

Bytes per token per column come from the codecs' measured compression on real teacher outputs
(`kdcache bench storage`, docs/performance.md); they are estimates, printed as such.
"""
from __future__ import annotations

import time
from typing import Any

from kdcache.pipeline.teacher_pass.sizes import bytes_per_token, human_bytes


def make_plan(prep, *, sequences: int | None = None, tokens: int | None = None,
              tokens_per_s: float | None = None) -> dict[str, Any]:
    """Sequences, tokens, bytes per column and in total, teacher time: all before any inference."""
    spec = prep.spec
    if tokens is None:
        from kdcache.pipeline.teacher_pass.inputs import iter_shard_inputs

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
    from kdcache.pipeline.teacher_pass.shard import ShardProcessor
    from kdcache.pipeline.teacher_pass.inputs import iter_shard_inputs

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
