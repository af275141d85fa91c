"""`kdcache bench train --teacher smollm2`: the chunked KD loss at an LLM's vocabulary, measured.

    kdcache bench train --teacher smollm2 [--quick] [--seq-lens 1024,2048] [--json]

A causal-LM student with SmolLM2-135M's sizes (vocabulary 49,152, width 576, 9 heads / 3 KV heads,
FFN 1,536, tied embeddings; 2 blocks, random init: the head is what is measured) trained on one
sequence with the LM recipe's logit terms (top-64 KD with tail bucket at T = 2, weight 5; next-token
CE, weight 2), the cached targets made up in memory. Three ways to compute the same loss:

  full       the model's own head at every position ([T, V] logits), then the losses
  one_chunk  the head only where a loss reads it, in one chunk (`logit_chunk=-1`)
  chunked    the same, `--chunk` rows at a time (`kdcache.pipeline.student.head`)

Figures per sequence length:
  loss_peak_mb      peak memory above the start of the head + losses, forward and backward, on a fixed
                    head input (the loss's activation memory; the head's weight gradient included)
  step_peak_mb      the same for a whole training step (forward, backward, AdamW), after a warm-up step
  step_s            median step time, the variants interleaved step by step
  loss_activation_mb  loss_peak_mb less the projection's weight gradient ([V, H] float32, 108 MiB here),
                    which every training step holds whatever the loss: what the logits cost
  loss_peak_ratio   chunked / one_chunk loss_peak_mb
  loss_activation_ratio  chunked / one_chunk loss_activation_mb (goal <= 1/8 at 2,048)
  step_time_ratio   chunked / one_chunk step_s (goal <= 1.05)

Memory is read from the kernel (VmHWM after `clear_refs` 5) in a fresh process per measurement, with
glibc's mmap threshold fixed at 64 KiB so that freed tensors go back to the kernel at once.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

from kdcache.pipeline.bench.common import log, run_child, status_kb

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, tie_word_embeddings=True, max_position_embeddings=8192)
K = 64
VARIANTS = {"full": None, "one_chunk": -1}  # chunked: --chunk rows


def _model(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **SMOLLM2)).train()


def _batch(seq: int, seed: int = 0) -> dict:
    """One sequence of token ids and cached-looking top-64 + tail targets."""
    import torch

    g = torch.Generator().manual_seed(seed)
    V = SMOLLM2["vocab_size"]
    probs = torch.softmax(torch.randn(1, seq, K + 1, generator=g) * 2, -1).sort(-1, descending=True).values
    return {"input_ids": torch.randint(0, V, (1, seq), generator=g),
            "attention_mask": torch.ones(1, seq, dtype=torch.long),
            "topk_ids": torch.randint(0, V, (1, seq, K), generator=g),
            "topk_logprobs": probs[..., :K].log(), "topk_log_tail": probs[..., K].log()}


def _parts(layers: int, chunk: int | None):
    from kdcache.pipeline.student.terms import LossSpec
    from kdcache.pipeline.student.trainer.adapter import HFStudent
    from kdcache.pipeline.student.trainer.step import DistillLoss

    model = _model(layers)
    student = HFStudent(model)
    student.capture_head = chunk is not None
    spec = LossSpec({"kd": 5.0, "clm": 2.0}, temperature=2.0)
    loss_fn = DistillLoss(spec, None, None, "all", head=chunk is not None, logit_chunk=chunk or 0)
    return model, student, loss_fn


def _step(student, loss_fn, optimizer, batch) -> None:
    out = student(batch["input_ids"], batch["attention_mask"])
    total, _ = loss_fn(out, batch)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process: the loss alone or a whole step."""
    import torch

    from kdcache.pipeline.student.trainer.adapter import StudentOutputs

    torch.set_num_threads(spec["threads"] or torch.get_num_threads())
    model, student, loss_fn = _parts(spec["layers"], spec["chunk"])
    batch = _batch(spec["seq"])
    if spec["what"] == "loss":
        head = student.head
        h = torch.randn(1, spec["seq"], SMOLLM2["hidden_size"], requires_grad=True)
        _reset_peak()
        before = status_kb("VmRSS")
        if spec["chunk"] is None:
            out = StudentOutputs(logits=head(h))
        else:
            out = StudentOutputs(head_input=h, head=head)
        total, _ = loss_fn(out, batch)
        total.backward()
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        _step(student, loss_fn, optimizer, batch)  # warm-up: optimiser state, first-touch pages
        _reset_peak()
        before = status_kb("VmRSS")
        _step(student, loss_fn, optimizer, batch)
    return {"peak_mb": (status_kb("VmHWM") - before) / 1024}


def run(args) -> int:
    if args.llm_child:
        print(json.dumps(child(json.loads(args.llm_child))))
        return 0
    import torch

    from kdcache.pipeline.common.jsonout import print_json

    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    seqs = [int(x) for x in (args.seq_lens or ("512,1024" if quick else "1024,2048")).split(",")]
    chunk, layers, rounds = args.chunk, 2, (3 if quick else 5)
    variants = {**VARIANTS, "chunked": chunk}
    t_start = time.perf_counter()
    figures: dict[str, Any] = {}
    for seq in seqs:
        row: dict[str, Any] = {"loss_peak_mb": {}, "step_peak_mb": {}, "step_s": {}}
        for name, c in variants.items():
            for what in ("loss", "step"):
                spec = {"seq": seq, "chunk": c, "layers": layers, "what": what, "threads": args.threads}
                # glibc's mmap threshold fixed: freed tensors go back to the kernel at once
                got = run_child(["--llm-child", json.dumps(spec)], f"memory child {spec}",
                                {"MALLOC_MMAP_THRESHOLD_": "65536"})
                row[f"{what}_peak_mb"][name] = got["peak_mb"]
            log(f"seq {seq} {name}: loss peak {row['loss_peak_mb'][name]:.0f} MB, "
                 f"step peak {row['step_peak_mb'][name]:.0f} MB")
        # time: the three variants on copies of one model, interleaved step by step
        runs = {}
        for name, c in variants.items():
            model, student, loss_fn = _parts(layers, c)
            runs[name] = (student, loss_fn, torch.optim.AdamW(model.parameters(), lr=1e-4))
        batch = _batch(seq)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for name, (student, loss_fn, opt) in runs.items():
            _step(student, loss_fn, opt, batch)  # warm-up
        order, rng = list(runs), random.Random(0)
        for _ in range(rounds):
            rng.shuffle(order)
            for name in order:
                t = time.perf_counter()
                _step(*runs[name], batch)
                times[name].append(time.perf_counter() - t)
        row["step_s"] = {k: statistics.median(v) for k, v in times.items()}
        del runs
        row["loss_peak_ratio"] = row["loss_peak_mb"]["chunked"] / max(1e-9, row["loss_peak_mb"]["one_chunk"])
        grad_mb = SMOLLM2["vocab_size"] * SMOLLM2["hidden_size"] * 4 / 2**20
        row["loss_activation_mb"] = {k: v - grad_mb for k, v in row["loss_peak_mb"].items()}
        row["loss_activation_ratio"] = (row["loss_activation_mb"]["chunked"]
                                        / max(1e-9, row["loss_activation_mb"]["one_chunk"]))
        row["step_peak_ratio"] = row["step_peak_mb"]["chunked"] / max(1e-9, row["step_peak_mb"]["one_chunk"])
        row["step_time_ratio"] = row["step_s"]["chunked"] / row["step_s"]["one_chunk"]
        figures[str(seq)] = row
        log(f"seq {seq}: step " + ", ".join(f"{k} {v:.2f}s" for k, v in row["step_s"].items()))
    result = {"llm": figures, "chunk": chunk, "sizes": {**SMOLLM2, "layers": layers, "k": K, "batch": 1,
                                                        "rounds": rounds},
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "seconds": time.perf_counter() - t_start}
    for seq, row in figures.items():
        lp, sp, st = row["loss_peak_mb"], row["step_peak_mb"], row["step_s"]
        print(f"seq {seq}: loss peak MB full {lp['full']:.0f} / one chunk {lp['one_chunk']:.0f} / chunked "
              f"{lp['chunked']:.0f}  (chunked / one chunk {row['loss_peak_ratio']:.3f}; less the weight gradient "
              f"{row['loss_activation_ratio']:.3f}, goal <= 0.125)")
        print(f"seq {seq}: step peak MB full {sp['full']:.0f} / one chunk {sp['one_chunk']:.0f} / chunked "
              f"{sp['chunked']:.0f}")
        print(f"seq {seq}: step s full {st['full']:.2f} / one chunk {st['one_chunk']:.2f} / chunked {st['chunked']:.2f}"
              f"  (chunked / one chunk {row['step_time_ratio']:.3f}, goal <= 1.05)")
    if args.json:
        print_json(result)
    return 0
