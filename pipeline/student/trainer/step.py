"""One optimisation step: the loss module, AdamW, the schedule, forward/backward, the gradient
all-reduce between ranks, clipping. `Components` holds what a step needs; `build_components` makes it
the same way on every rank."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from kdcache.pipeline.common.runtime import amp_dtype
from kdcache.pipeline.student.config import TrainConfig
from kdcache.pipeline.student.head import head_losses
from kdcache.pipeline.student.phases import Phase, apply_phase
from kdcache.pipeline.student.terms import TERMS, CompositeLoss
from kdcache.pipeline.student.trainer.adapter import HFStudent, build_student
from kdcache.pipeline.student.trainer.plan import RunPlan


class DistillLoss(nn.Module):
    """`CompositeLoss`, plus the terms that read vocabulary logits computed where they read them.

    `head=True` (a student that hands over its head's input, `StudentOutputs.head_input`): the
    `on_head` terms (kd, rskd, mlm, clm) run the head only on their rows (the real tokens, the mask
    positions, the next-token pairs), `logit_chunk` rows at a time (`kdcache.pipeline.student.head`).
    Otherwise, with `kd_positions="masked"`, the KD term gathers the student logits and its columns at
    the M masked positions ([B, M, ...]) so the log-softmax runs at M, not T, positions.
    """

    def __init__(self, spec, student_hidden: int | None, teacher_hidden: int | None, kd_positions: str = "all",
                 head: bool = False, logit_chunk: int = 0):
        super().__init__()
        self.kd_positions, self.head, self.logit_chunk = kd_positions, head, logit_chunk
        # Built once for the whole spec: it owns the learned projection (in the optimiser and the
        # checkpoint); a phase of the run (`select`) uses a subset of its terms and layer pairs.
        self.composite = CompositeLoss(spec, student_hidden, teacher_hidden)
        self.select(spec)

    def select(self, spec) -> None:
        """Compute `spec`'s terms from now on (a knowledge-transfer phase: a subset of the run's)."""
        self.spec = spec
        self.kd_name = next((t.name for t in spec.active_terms() if t.token_kd), None)
        self.masked = self.kd_positions == "masked" and self.kd_name is not None
        active = spec.active()
        self.head_terms = [(t.name, active[t.name]) for t in spec.active_terms() if t.on_head] if self.head else []
        self.kd_weight = active.get(self.kd_name, 0.0) if self.masked and not self.head_terms else 0.0
        apart = {n for n, _ in self.head_terms} | ({self.kd_name} if self.kd_weight else set())
        self.rest = dataclasses.replace(spec, weights={k: v for k, v in active.items() if k not in apart})

    def forward(self, outputs, batch):
        total, parts = self.composite(outputs, batch, self.rest) if self.rest.active() else (None, {})
        if self.head_terms:
            hidden = getattr(outputs, "head_input", None)
            if hidden is None:
                raise ValueError("the loss expects the student's head input (StudentOutputs.head_input), got none")
            mask = batch["attention_mask"]
            rows = []
            for name, w in self.head_terms:
                term = TERMS[name]
                idx, cols = term.head_rows(self.spec, batch, mask, self.masked)
                rows.append((w, idx, cols, partial(term.head_loss, self.spec)))
            value, values = head_losses(outputs.head, hidden, rows, self.logit_chunk)
            parts = {**parts, **{name: v.detach() for (name, _), v in zip(self.head_terms, values)}}
            total = value if total is None else total + value
        elif self.kd_weight:
            term = TERMS[self.kd_name]
            pos = batch["mlm_positions"].long()
            valid = pos >= 0
            idx = pos.clamp(min=0)

            def at(x):  # [B, T, ...] -> [B, M, ...]
                return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))

            columns = {k: at(batch[k]) for k in sorted(term.columns(self.spec))}
            kd = term.compute(self.spec, {"logits": at(outputs.logits)}, columns, valid, None)
            parts = {**parts, self.kd_name: kd.detach()}
            total = self.kd_weight * kd if total is None else total + self.kd_weight * kd
        return total, parts


def build_optimizer(cfg: TrainConfig, modules: list[nn.Module]) -> torch.optim.Optimizer:
    """AdamW; matrices decay, biases and norms do not (nanoGPT's split)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:  # tied weights appear once
                seen.add(id(p))
                (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    betas = tuple(float(b) for b in cfg.adam_betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps)


def build_scheduler(cfg: TrainConfig, optimizer, total_steps: int, phases: list[Phase] | None = None):
    """Warmup then the schedule's decay; with several phases it restarts in each, over its own steps."""
    bounds = [(p.start, p.end) for p in phases] if phases else [(0, total_steps)]

    def factor(step: int) -> float:  # step = optimiser steps already taken
        start, end = next(((a, b) for a, b in bounds if step < b), bounds[-1])
        n, step = end - start, step - start
        warmup = min(cfg.warmup_steps, n) if cfg.warmup_steps else int(round(cfg.warmup_ratio * n))
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, n - warmup))
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_seed(seed: int, step: int, rank: int) -> int:
    # Dropout masks depend only on (seed, step, rank): a resumed step draws what the original did.
    return (seed * 1_000_003 + step * 4099 + rank) % (2**63 - 1)


def _allreduce_grads(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average gradients over ranks.

    Not DDP: the loss module's projection must be averaged too, losses that do not read some
    student output (e.g. no logits in TinyBERT's general stage) leave parameters without a
    gradient, and a non-HF student should not need DDP's find_unused_parameters traversal.
    """
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat.div_(world_size)
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)

    for g in grads:  # ~32M elements a bucket: one flat copy at a time, not the whole model
        bucket.append(g)
        size += g.numel()
        if size >= 32 << 20:
            flush()
            bucket, size = [], 0
    if bucket:
        flush()


@dataclass
class Components:
    student: nn.Module
    loss_fn: DistillLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list
    device: torch.device
    amp: torch.dtype | None
    world_size: int = 1
    max_grad_norm: float = 0.0


def build_components(cfg: TrainConfig, plan: RunPlan, device: torch.device, world_size: int = 1) -> Components:
    torch.manual_seed(cfg.seed)  # the projection's init: the same on every rank
    student = build_student(cfg, plan.needs_hidden, plan.needs_attentions).to(device)
    # The vocabulary head only where a loss reads it: an HF student with a head the losses read.
    head = (isinstance(student, HFStudent) and student.head is not None and not cfg.full_logits
            and any(t.on_head for t in plan.loss_spec.active_terms()))
    if isinstance(student, HFStudent):
        student.capture_head = head
    loss_fn = DistillLoss(plan.loss_spec, plan.student["hidden_size"], plan.teacher_hidden, cfg.kd_positions,
                          head=head, logit_chunk=cfg.logit_chunk).to(device)
    optimizer = build_optimizer(cfg, [student, loss_fn])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    amp = amp_dtype(cfg.autocast, device)
    return Components(student, loss_fn, optimizer, build_scheduler(cfg, optimizer, plan.steps, plan.phases), params,
                      device, amp, world_size, cfg.max_grad_norm)


def enter_phase(c: Components, phase: Phase) -> int:
    """From now on: the phase's terms, and only its parameters train (the optimiser was built over
    all of them, so a later phase can unfreeze what this one freezes). Returns the trainable count."""
    c.loss_fn.select(phase.spec)
    return apply_phase(c.student, phase, trainable={id(p) for p in c.params})


def train_step(c: Components, batch: dict[str, Any], seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, loss, backward, gradient sync, clip, optimiser and schedule step."""
    torch.manual_seed(seed)
    with torch.autocast(c.device.type, dtype=c.amp, enabled=c.amp is not None):
        outputs = c.student(batch["input_ids"], batch["attention_mask"])
        total, parts = c.loss_fn(outputs, batch)
    c.optimizer.zero_grad(set_to_none=True)
    total.backward()
    if c.world_size > 1:
        _allreduce_grads(c.params, c.world_size)
    if c.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(c.params, c.max_grad_norm)
    c.optimizer.step()
    c.scheduler.step()
    return total.detach(), parts


def lr_at(c: Components, step: int) -> float:
    # LambdaLR: lr(step k) = base_lr * factor(k - 1); after scheduler.step() last_epoch == step.
    group = c.optimizer.param_groups[0]
    return float(group["initial_lr"] * c.scheduler.lr_lambdas[0](step - 1))


def broadcast_parameters(c: Components) -> None:
    """Rank 0's parameters everywhere: the same start, whatever a factory did at init."""
    import torch.distributed as dist

    with torch.no_grad():
        for p in c.params:
            dist.broadcast(p.data, src=0)
