"""The vocabulary head only where a loss reads it, in chunks when the logits would be large.

A masked-LM or causal-LM student's forward ends in a head ([B, T, H] -> [B, T, V]); for a 30k-256k
vocabulary it is the largest matmul of the step and, at long sequences, gigabytes of float32. The
losses read far less: the M masked positions (MLM, masked KD), the real tokens (KD at every
position), the next-token pairs (CLM). So `HFStudent` skips the head inside the model's forward and
hands its input over, and `head_losses` runs the head on the rows the active terms read (each term
declares them: `Term.head_rows`), once for the union of those rows.

Chunked (`chunk` rows at a time), the head, the losses and their backward run chunk by chunk inside
the forward of one autograd function (`_ChunkedHeadLoss`), which keeps only the gradients for the
head's input and parameters: peak memory O(chunk x V) instead of O(rows x V), no recomputation, and
the same values as one chunk up to float32 summation order.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

# Rows per chunk when `logit_chunk` is 0 (auto): chunks of about 2^23 logits (32 MiB of float32 per
# buffer); a step whose logits fit in one chunk is computed in one (no custom autograd function).
AUTO_CHUNK_LOGITS = 1 << 23


def find_head(model: nn.Module) -> nn.Module | None:
    """The top-level child of a Hugging Face LM that holds its output embeddings, or None.

    BertForMaskedLM -> `cls` (transform + decoder), RobertaForMaskedLM -> `lm_head`, causal LMs ->
    `lm_head`, DistilBertForMaskedLM -> `vocab_projector` (its transform runs inline in forward, so it
    stays at every position; ~3% of the head's work). None where the logits are post-processed after
    the head (soft-capping, a logit scale) or there is no vocabulary head (classifiers).
    """
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None or not isinstance(getattr(out, "weight", None), torch.Tensor):
        return None
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    base = getattr(model, "base_model", None)
    for child in model.children():
        if child is base:
            continue
        if child is out or any(m is out for m in child.modules()):
            # the losses apply the projection themselves: it must be the head's last Linear
            return child if output_linear(child) is out else None
    return None


def auto_chunk(vocab: int, chunk: int) -> int:
    """Rows per chunk: `chunk` when > 0; for 0 (auto) about 2^23 logits; -1 = never chunk."""
    if chunk > 0:
        return chunk
    if chunk < 0:
        return 1 << 62
    return max(1, AUTO_CHUNK_LOGITS // max(1, vocab))


# A term on the head's rows: weight, its row indices into the union, its columns at those rows,
# and loss(logits [n, V], columns) -> the SUM over the n rows of its per-row loss.
RowTerm = tuple[float, torch.Tensor, Mapping[str, torch.Tensor], Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]]


def _terms_value(logits: torch.Tensor, s: int, e: int, terms: list[RowTerm],
                 counts: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """sum_t w_t * (sum of term t's per-row losses in rows [s, e)) / N_t, and each unweighted part;
    `logits` are rows [s, e) of the union."""
    total = logits.sum().float() * 0  # a graph even when no row is read (a batch without mask positions)
    parts = []
    for (w, local, cols, loss), n in zip(terms, counts):
        sel = (local >= s) & (local < e)
        if n == 0 or not bool(sel.any()):
            parts.append(total.new_zeros(()))
            continue
        at = local[sel] - s
        a, b = int(at[0]), int(at[-1]) + 1
        # rows a..b-1 in order (KD at every token, CLM on one sequence): a view, not a [n, V] copy
        picked = logits[a:b] if b - a == at.numel() and bool((at.diff() == 1).all()) else logits[at]
        part = loss(picked, {k: v[sel] for k, v in cols.items()}) / n
        parts.append(part)
        total = total + w * part
    return total, parts


def output_linear(head: nn.Module) -> nn.Linear | None:
    """The head's last Linear: the vocabulary projection (`find_head` checks it is the output embeddings)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _linear_input(head: nn.Module, linear: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The head's layers before its vocabulary projection, on `h` (BERT's transform; nothing for an
    lm_head that is the projection): the projection itself gets zero rows."""
    if head is linear:
        return h
    seen: list[torch.Tensor] = []

    def skip(module, args):
        seen.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = linear.register_forward_pre_hook(skip)
    try:
        head(h)
    finally:
        handle.remove()
    return seen[0]


class _ChunkedHeadLoss(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward scales them.

    Per chunk: the head's layers before the projection (autograd), the projection z = x W^T + b
    without a graph, the losses on z and their gradient dz (autograd, [chunk, V]), then the
    projection's backward by hand into running sums (gW += dz^T x, in place: no second [V, H]
    buffer), and autograd again through the layers before it.
    """

    @staticmethod
    def forward(ctx, job: "_Job", h: torch.Tensor, *params):
        lin, wants = job.linear, [p.requires_grad for p in params]
        acc = {id(p): torch.zeros_like(p) for p, w in zip(params, wants) if w}
        grad_h = torch.zeros_like(h) if h.requires_grad else None
        pre = [p for p, w in zip(params, wants) if w and p is not lin.weight and p is not lin.bias]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        parts = torch.zeros(len(job.terms), dtype=torch.float32, device=h.device)
        # The projection's weights in the forward's dtype once (under autocast F.linear would cast
        # them again for every chunk, and so would dz @ W below).
        device = h.device.type
        cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        weight = lin.weight.detach() if cast is None else lin.weight.detach().to(cast)
        bias = None if lin.bias is None else (lin.bias.detach() if cast is None else lin.bias.detach().to(cast))
        for s, e in job.chunks:
            with torch.enable_grad():
                hc = h[s:e].detach().requires_grad_(h.requires_grad)
                x = _linear_input(job.head, lin, hc)
                z = F.linear(x.detach(), weight, bias).requires_grad_()
                value, chunk_parts = _terms_value(z, s, e, job.terms, job.counts)
                dz = torch.autograd.grad(value, z)[0] if value.requires_grad else torch.zeros_like(z)
            xd = x.detach()
            if id(lin.weight) in acc:
                g = acc[id(lin.weight)]
                if dz.dtype == g.dtype and xd.dtype == g.dtype:
                    g.addmm_(dz.t(), xd)
                else:  # autocast: the product in the forward's dtype, as autograd's backward would
                    g.add_((dz.t() @ xd.to(dz.dtype)).to(g.dtype))
            if lin.bias is not None and id(lin.bias) in acc:
                acc[id(lin.bias)].add_(dz.sum(0).to(lin.bias.dtype))
            gx = (dz @ weight.to(dz.dtype)).to(x.dtype)
            inputs = ([hc] if h.requires_grad else []) + pre
            if x is hc:
                if grad_h is not None:
                    grad_h[s:e].add_(gx)
            elif inputs:
                got = torch.autograd.grad(x, inputs, grad_outputs=gx, allow_unused=True)
                targets = ([grad_h[s:e]] if h.requires_grad else []) + [acc[id(p)] for p in pre]
                for t, g in zip(targets, got):
                    if g is not None:
                        t.add_(g)
            total += value.detach()
            parts += torch.stack([p.detach().float() for p in chunk_parts])
        # Kept on ctx, not save_for_backward: they are this function's own buffers, scaled in place in
        # backward (a copy would double the [V, H] weight gradient's memory for a moment).
        ctx.grads = (grad_h, [acc.get(id(p)) for p in params])
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, grad_total, _grad_parts):
        saved, ctx.grads = ctx.grads, None  # once: the graph is not kept for a second backward
        if saved is None:
            raise RuntimeError("the chunked head loss was already back-propagated (retain_graph is not supported)")
        grad_h, grads = saved
        for g in [grad_h, *grads]:
            if g is not None:
                g.mul_(grad_total.to(g.dtype))
        return (None, grad_h, *grads)


class _Job:
    """What the chunked function needs besides tensors: the head, its projection, the terms, chunks."""

    def __init__(self, head, linear, terms, counts, chunks):
        self.head, self.linear, self.terms, self.counts, self.chunks = head, linear, terms, counts, chunks


def head_losses(head: nn.Module, hidden: torch.Tensor, terms: list[tuple[float, torch.Tensor,
                Mapping[str, torch.Tensor], Callable]], chunk: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The weighted sum of the head terms and each term's unweighted value.

    `hidden` is the head's input, [B, T, H]; each term is (weight, flat row indices into B*T, its
    columns at those rows, loss(logits [n, V], columns) -> sum over rows). The head runs once on the
    union of the rows, `chunk` rows at a time (see `auto_chunk`).
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    union = torch.unique(torch.cat([t[1] for t in terms])) if terms else flat.new_zeros(0, dtype=torch.long)
    rows = flat.index_select(0, union)  # [N, H]
    local_terms = [(w, torch.searchsorted(union, idx), cols, loss) for w, idx, cols, loss in terms]
    counts = [int(idx.numel()) for _, idx, _, _ in terms]
    n = rows.shape[0]
    linear = output_linear(head)
    size = auto_chunk(linear.out_features, chunk)
    if n <= size:  # one chunk: plain autograd
        return _terms_value(head(rows), 0, n, local_terms, counts)
    job = _Job(head, linear, local_terms, counts, [(s, min(n, s + size)) for s in range(0, n, size)])
    total, parts = _ChunkedHeadLoss.apply(job, rows, *head.parameters())
    return total, list(parts.unbind(0))


def row_columns(batch: Mapping[str, Any], names: set[str], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token columns [B, T, ...] at flat row indices into B*T."""
    out = {}
    for k in sorted(names):
        v = batch[k]
        out[k] = v.reshape(-1, *v.shape[2:]).index_select(0, idx)
    return out
