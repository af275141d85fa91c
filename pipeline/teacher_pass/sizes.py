"""Size estimates for `kdcache plan`: compressed bytes per token per column, from the codecs' measured
figures, so that a pass's disk cost is known before any teacher runs."""
from __future__ import annotations

from kdcache.storage import CacheSpec

# Compressed bytes per stored value: `kdcache bench storage` on SmolLM2-135M over wiki text, 2026-11-27
# (docs/performance.md holds the full measurement).
MEASURED = {
    "input_id": 1.6,  # estimate (not benched)
    "topk_entry": 1.65,  # default top-k codec (fitted), per (id, log-prob) pair
    "topk_tail": 2.0,  # float16 log tail per token
    "sampled_entry": 3.2,  # estimate: id + float16 weight per unique draw (not benched)
    "float16": 1.52,  # hidden states, per value (PLAIN + zstd, the default; 1.41 with --float16-byte-stream-split)
    "bfloat16": 1.21,
    "int8": 0.89,
    "attention_float16": 0.93,  # attention probabilities, per value (PLAIN; 0.88 split)
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
