"""`kdcache plan`: what a teacher pass will cost before a GPU is spent on it.

Bytes per token per column come from the codecs' measured compression on real teacher outputs
(`kdcache bench storage`, docs/performance.md); they are estimates, printed as such.
"""
from __future__ import annotations

import time
from typing import Any

from kdcache.pipeline.teacher_pass.sizes import bytes_per_token, human_bytes


def make_plan(prep, *, sequences: int | None = None, tokens: int | None = None,
              tokens_per_s: float | None = None, train_workers: int = 0,
              train_batch_size: int = 32) -> dict[str, Any]:
    """Sequences, tokens, bytes per column and in total, teacher time: all before any inference;
    with `train_workers`, how training would split the cache (rows and batches per worker)."""
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
    groups = planned_row_groups(sequences, prep.sequences_per_shard, prep.cfg.batch_size)
    plan["row_groups"] = len(groups)  # one per teacher batch: the most training workers the cache can feed
    if train_workers:
        from kdcache.storage import AssignmentError, assign

        try:
            plan["training"] = assign(groups, train_workers, train_batch_size).summary()
        except AssignmentError as exc:
            plan["training"] = {"workers": train_workers, "error": str(exc)}
    if tokens_per_s:
        plan["tokens_per_s"] = tokens_per_s
        plan["teacher_seconds"] = tokens / tokens_per_s
    return plan


def planned_row_groups(sequences: int, per_shard: int, batch_size: int) -> list:
    """The row groups the pass will write: shards of `per_shard` sequences, one group per teacher batch."""
    from kdcache.storage import Group, ShardInfo

    out, index = [], 0
    for start in range(0, max(sequences, 1), per_shard):
        n = min(per_shard, sequences - start)
        sizes = [min(batch_size, n - b) for b in range(0, n, batch_size)]
        info = ShardInfo(file="", index=index, rows=n, tokens=0, bytes=0, checksum="", sample_id_first=start,
                         sample_id_last=start + n - 1, row_groups=tuple(sizes))
        out += [Group(info, g, k) for g, k in enumerate(sizes)]
        index += 1
    return out


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
    lines.append(f"training  any number of workers up to {plan['row_groups']:,} (the row groups, one per teacher batch)")
    t = plan.get("training")
    if t and "error" in t:
        lines.append(f"          --workers {t['workers']}: {t['error']}")
    elif t:
        extra = f"; {t['repeated_rows']} row(s) read twice per epoch" if t["repeated_rows"] else ""
        lines.append(f"          --workers {t['workers']}: rows per worker {min(t['rows_per_rank']):,}-"
                     f"{max(t['rows_per_rank']):,}, {max(t['batches_per_rank']):,} batches each per epoch{extra}")
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
