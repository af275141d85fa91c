"""Knowledge-transfer schedules: which loss terms are active, and which parameters train, at each step.

MobileBERT (Sun et al. 2020, §3.5) compares three ways to use layer-wise transfer terms; a run's
`knowledge_transfer` picks one (`KNOWLEDGE_TRANSFER`), for any preset with layer-wise terms:

* ``auxiliary``: every term, layer-wise and prediction, summed into one loss at every step; every
  parameter trains. One phase: what every recipe does unless it says otherwise.
* ``joint``: the layer-wise terms first, then the prediction terms; every parameter trains in both.
* ``progressive``: one phase per student layer of the layer map, bottom up. In phase l only layer
  l's terms are active and only layer l trains: the layers below are **frozen** (requires_grad off;
  not the paper's reduced-rate variant), the layers above do not reach the loss. Phase 0 (the
  embedding output) trains the embedding module except the token table, which stays as
  `init-student` projected it from the teacher's. Then, if the spec has prediction terms, a last
  phase with those and every parameter training.

With only layer-wise terms (general distillation from an encoder-only teacher, which has no
prediction head to distil), joint and auxiliary are the same single phase; the prediction stage is
then its own run (MobileBERT's task stage). Steps are split evenly between phases (the first ones
take the remainder), and the learning-rate schedule restarts in each: warmup and decay over the
phase's own steps. A phase is a step range, so a resumed run re-enters the phase it stopped in.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from kdcache.pipeline.student.terms import TERMS, LossSpec

__all__ = ["Phase", "KNOWLEDGE_TRANSFER", "build_phases", "layer_group", "apply_phase"]


@dataclass
class Phase:
    name: str
    start: int  # optimiser steps taken before it
    end: int  # optimiser steps taken at its end
    spec: LossSpec  # its active terms (and, for a layer phase, its layer pairs)
    train: tuple[int, ...] | None = None  # layer groups that train (None = every parameter); 0 = embeddings
    columns: list[str] = field(default_factory=list)  # what it reads from the cache (set by the plan)

    @property
    def steps(self) -> int:
        return self.end - self.start

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "steps": [self.start, self.end], "losses": self.spec.active(),
                "layer_map": self.spec.layer_map, "trains": "all" if self.train is None else list(self.train),
                "columns": self.columns}


def _split(steps: int, n: int) -> list[tuple[int, int]]:
    base, extra = divmod(steps, n)
    bounds, start = [], 0
    for i in range(n):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _parts(spec: LossSpec) -> tuple[dict[str, float], dict[str, float]]:
    """(layer-wise weights, the others)."""
    active = spec.active()
    layerwise = {n: w for n, w in active.items() if TERMS[n].layerwise}
    return layerwise, {n: w for n, w in active.items() if n not in layerwise}


def auxiliary(spec: LossSpec, steps: int) -> list[Phase]:
    return [Phase("all terms", 0, steps, spec)]


def joint(spec: LossSpec, steps: int) -> list[Phase]:
    layerwise, rest = _parts(spec)
    if not layerwise or not rest:
        return auxiliary(spec, steps)
    if steps < 2:
        raise ValueError(f"knowledge_transfer=joint runs the layer-wise terms, then the prediction terms, but the run "
                         f"has {steps} step(s): give it at least 2 (steps=N)")
    (a0, a1), (b0, b1) = _split(steps, 2)
    return [Phase("layer-wise terms", a0, a1, dataclasses.replace(spec, weights=layerwise)),
            Phase("prediction terms", b0, b1, dataclasses.replace(spec, weights=rest))]


def progressive(spec: LossSpec, steps: int) -> list[Phase]:
    layerwise, rest = _parts(spec)
    if not layerwise or not spec.layer_map:
        raise ValueError("knowledge_transfer=progressive trains one layer at a time from layer-wise terms "
                         f"(emb/hidden/attn/fmt/at over a layer map), but the loss has {sorted(spec.active())}: "
                         "use knowledge_transfer=auxiliary, or a preset with layer-wise terms")
    specs: list[tuple[str, LossSpec, tuple[int, ...] | None]] = []
    for s in sorted({p[0] for p in spec.layer_map}):
        pairs = [p for p in spec.layer_map if p[0] == s]
        one = dataclasses.replace(spec, layer_map=pairs)
        weights = {n: w for n, w in layerwise.items() if TERMS[n].layers(one)}
        if weights:
            name = "embeddings" if s == 0 else f"layer {s}"
            specs.append((name, dataclasses.replace(one, weights=weights), (s,)))
    if rest:
        specs.append(("prediction terms", dataclasses.replace(spec, weights=rest), None))
    if steps < len(specs):
        raise ValueError(f"knowledge_transfer=progressive has {len(specs)} phases ({', '.join(n for n, _, _ in specs)}) "
                         f"but the run has {steps} steps: give it at least one step per phase (steps=N)")
    return [Phase(name, a, b, sp, train) for (name, sp, train), (a, b) in zip(specs, _split(steps, len(specs)))]


KNOWLEDGE_TRANSFER: dict[str, Callable[[LossSpec, int], list[Phase]]] = {
    "auxiliary": auxiliary, "joint": joint, "progressive": progressive}


def build_phases(kind: str, spec: LossSpec, steps: int) -> list[Phase]:
    if kind not in KNOWLEDGE_TRANSFER:
        raise ValueError(f"knowledge_transfer must be one of {', '.join(KNOWLEDGE_TRANSFER)}, got {kind!r}")
    return KNOWLEDGE_TRANSFER[kind](spec, steps)


# A transformer block's parameters: `...layer.3.` (BERT family), `layers.3.` (Llama), `h.3.` (GPT-2).
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_group(name: str) -> int | None:
    """The layer a parameter belongs to, as the layer map counts: block i → i + 1, the embedding
    module → 0; None for the rest (pooler, classifier, heads, final norm)."""
    m = _BLOCK.search(name)
    if m:
        return int(m.group(1)) + 1
    if "embeddings." in name or name.startswith(("embed", "wte.", "wpe.")) or ".embed_tokens." in name:
        return 0
    return None


def apply_phase(module: nn.Module, phase: Phase, trainable: set[int] | None = None) -> int:
    """Switch `requires_grad` for the phase; returns how many parameters train.

    `trainable`: ids of the parameters the run trains at all (the optimiser's); one frozen by the
    student itself (a factory's fixed embedding table) stays frozen in every phase. Frozen
    parameters get no gradient, so AdamW leaves them (and their moments) untouched, and the
    backward pass stops at the lowest trainable layer.
    """
    inner = getattr(module, "model", module)
    getter = getattr(inner, "get_input_embeddings", None)
    table = getter() if callable(getter) else None
    token_table = getattr(table, "weight", None)
    n = 0
    for name, p in module.named_parameters():
        on = (trainable is None or id(p) in trainable) and (
            phase.train is None or (layer_group(name) in phase.train and p is not token_table))
        p.requires_grad_(on)
        n += p.numel() if on else 0
    if n == 0:
        raise ValueError(f"phase {phase.name!r} trains layer group(s) {phase.train}, but the student has no "
                         "parameters there (block names layer.N / layers.N / h.N, embeddings in *embeddings.*)")
    return n
