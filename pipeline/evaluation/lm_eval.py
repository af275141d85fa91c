"""Causal-LM evaluation: perplexity on held-out text, parameter counts, CPU latency / throughput.

Used by `kdcache demo --llm` and by `kdcache eval` for LM students. Every function takes a plain
Hugging Face causal LM (anything whose `model(input_ids=..., attention_mask=...)` returns an
object with `.logits [B, T, V]`), in eval mode or not (they switch to eval and no-grad).

    seqs = pack_texts(tokenizer, texts, seq_len=128, max_sequences=64)   # held-out sequences
    ppl = perplexity(model, seqs)                                        # float
    lat = latency(model, batch_size=1, seq_len=128, repeats=5)           # {"median_s", ...}
    both = compare_latency({"teacher": t, "student": s}, 32, 128, 3)     # interleaved, same run

Perplexity is exp(mean next-token NLL) over every predicted position of every sequence (position
t predicts token t + 1; padding is never predicted nor predicted from), so it is comparable
between models that share a tokenizer — teacher and layer-copied student do.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Iterable, Mapping, Sequence

import torch


def pack_texts(tokenizer: Any, texts: Iterable[str], seq_len: int, max_sequences: int = 0) -> list[list[int]]:
    """Token-id sequences of exactly `seq_len`, packed the way the teacher pass packs (`mode=pack`:
    the tokenizer's own framing, documents joined with its separator/EOS token; the last partial
    sequence is dropped). `max_sequences` > 0 stops early."""
    from kdcache.pipeline.data.corpus import Document
    from kdcache.pipeline.data.sequences import iter_sequences

    docs = (Document(text=t, source=f"text:{i}") for i, t in enumerate(texts) if t)
    out: list[list[int]] = []
    for seq in iter_sequences(docs, tokenizer, mode="pack", max_length=seq_len):
        out.append([int(x) for x in seq.input_ids])
        if max_sequences and len(out) >= max_sequences:
            break
    if not out:
        raise ValueError(f"the texts give no full sequence of {seq_len} tokens; give more text or a smaller seq_len")
    return out


def _batches(sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int):
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, :len(s)] = 1
        yield ids, mask


@torch.no_grad()
def nll(model: torch.nn.Module, sequences: Sequence[Sequence[int]], batch_size: int = 8,
        progress: bool = False, desc: str = "perplexity") -> dict[str, float]:
    """Summed next-token negative log-likelihood (nats) and the number of predicted tokens:
    {"nll_sum", "tokens", "mean_nll", "perplexity"}."""
    if not sequences:
        raise ValueError("perplexity needs at least one sequence")
    model.eval()
    total, count = 0.0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sequences), desc=desc, unit="seq", dynamic_ncols=True)
    try:
        for ids, mask in _batches(sequences, batch_size, pad_id=0):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = ids[:, 1:]
            keep = (mask[:, 1:] * mask[:, :-1]).bool()  # a real token predicted from a real one
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                       reduction="none").view_as(target)
            total += float(losses[keep].sum())
            count += int(keep.sum())
            if bar is not None:
                bar.update(ids.shape[0])
    finally:
        if bar is not None:
            bar.close()
    if count == 0:
        raise ValueError("no predicted token: every sequence has fewer than 2 tokens")
    mean = total / count
    return {"nll_sum": total, "tokens": count, "mean_nll": mean, "perplexity": math.exp(mean)}


def perplexity(model: torch.nn.Module, sequences: Sequence[Sequence[int]], batch_size: int = 8,
               progress: bool = False) -> float:
    """exp(mean next-token NLL) of `model` over `sequences` (lists of token ids, e.g. `pack_texts`)."""
    return nll(model, sequences, batch_size, progress)["perplexity"]


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (tied input/output embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _inputs(model: torch.nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1000)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _time_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    t0 = time.perf_counter()
    model(**inputs)
    return time.perf_counter() - t0


def _summary(times: list[float], batch_size: int, seq_len: int) -> dict[str, Any]:
    med = statistics.median(times)
    return {"batch_size": batch_size, "seq_len": seq_len, "repeats": len(times), "median_s": med,
            "min_s": min(times), "times_s": times, "sequences_per_s": batch_size / med,
            "tokens_per_s": batch_size * seq_len / med}


def compare_latency(models: Mapping[str, torch.nn.Module], batch_size: int, seq_len: int, repeats: int = 3,
                    warmup: int = 1) -> dict[str, dict[str, Any]]:
    """`latency` of several models on the same inputs, repeats interleaved (A, B, A, B, ...) so that
    load from other processes hits every model alike: their ratio is what to read on a shared machine."""
    inputs = {name: _inputs(m, batch_size, seq_len) for name, m in models.items()}
    for name, m in models.items():
        m.eval()
        for _ in range(warmup):
            _time_forward(m, inputs[name])
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(max(1, repeats)):
        for name, m in models.items():
            times[name].append(_time_forward(m, inputs[name]))
    return {name: _summary(t, batch_size, seq_len) for name, t in times.items()}
