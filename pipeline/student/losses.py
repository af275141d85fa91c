"""Distillation losses that read only cached teacher tensors and student outputs.

Nothing here touches a teacher model: every loss is a plain function of tensors,
so a student that is not a Hugging Face transformer (an RNN, a CNN over tokens,
anything that emits logits / hidden states) can use them as long as it produces
tensors of the documented shapes.

Conventions shared by every function:

* Batches are padded: per-token tensors are ``[B, T, ...]`` and come with
  ``mask [B, T]`` (1 = real token, 0 = padding). Reductions are means over real
  tokens only, and padded positions are *replaced* (``torch.where``), never just
  multiplied by 0, so NaN/Inf garbage in a padded slot of a cached column cannot
  leak into the loss or its gradient.
* Soft-max arithmetic runs in float32 whatever the autocast dtype: a bf16
  log-softmax over a 50k+ vocabulary loses the tail probabilities KD is about.
* Every loss returns a scalar tensor.

The terms a ``LossSpec`` weights (what each reads from the cache and the
student, how it is checked) are declared in ``kdcache.pipeline.student.terms``;
the published recipes in ``kdcache.pipeline.student.presets``.

Layer indexing (used by the layer maps, the cache column names and
``CompositeLoss``) follows Hugging Face's ``hidden_states`` tuple:

* ``hidden_{l}`` is ``hidden_states[l]``: 0 = embedding output, ``l`` = output of
  transformer layer ``l`` (1-based), ``L`` = last layer.
* ``attention_{l}`` is the attention of transformer layer ``l`` (1-based), i.e.
  ``attentions[l - 1]``, so that one pair ``(s, t)`` of a layer map names the
  same block for hidden states and attention maps. There is no ``attention_0``.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "topk_kd_loss",
    "sampled_kd_loss",
    "mlm_loss",
    "causal_lm_loss",
    "cosine_hidden_loss",
    "HiddenProjection",
    "hidden_mse_loss",
    "embedding_mse_loss",
    "attention_mse_loss",
    "feature_map_losses",
    "attention_transfer_loss",
    "soft_cross_entropy",
    "hard_ce",
    "uniform_layer_map",
    "parse_layer_map",
]

# Teacher log-probs are clamped to this floor before use: exp(-1e4) == 0 in
# float32, so a cached -inf (an empty tail, an fp16 underflow) becomes a
# probability of exactly 0 without producing 0 * inf = NaN in p * log p.
_LOG_FLOOR = -1.0e4

# Student tail mass below this is not resolvable: it is computed as
# 1 - sum(top-k probs), and float32 log-softmax values near 0 carry ~1e-7
# absolute error. We cap log(sum of top-k student probs) at log(1 - 1e-6).
_TAIL_EPS = 1.0e-6
_MAX_LOG_HEAD = math.log1p(-_TAIL_EPS)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_token [B, T]`` over positions where ``mask`` is true."""
    m = _bool_mask(mask)
    total = torch.where(m, per_token, torch.zeros_like(per_token)).sum()
    # clamp: an all-padding batch gives 0 (with a graph), not 0/0 = NaN.
    return total / m.sum().clamp(min=1).to(total.dtype)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both ends (Maechler 2012)."""
    return torch.where(
        x > -math.log(2.0),
        torch.log(-torch.expm1(x)),
        torch.log1p(-torch.exp(x)),
    )


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over the last dim; p = exp(log_p) with p = 0 → 0."""
    p = log_p.exp()
    return (p * (log_p - log_q)).sum(-1)


# --------------------------------------------------------------------------- #
# logit distillation
# --------------------------------------------------------------------------- #


def topk_kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    log_tail: torch.Tensor | None,
    mask: torch.Tensor,
    temperature: float = 1.0,
    tail: str = "bucket",
) -> torch.Tensor:
    """Forward KL(teacher ‖ student) from cached top-k teacher log-probs, × T².

    Args:
        student_logits: ``[B, T, V]``.
        topk_ids: ``[B, T, k]`` int64, the teacher's top-k token ids.
        topk_logprobs: ``[B, T, k]`` the teacher's *untempered* full-vocabulary
            log-probs at those ids.
        log_tail: ``[B, T]`` log of the teacher mass outside the top-k
            (``log(1 - Σ exp(topk_logprobs))``); only read for ``tail="bucket"``.
        mask: ``[B, T]`` 1 = real token.
        temperature: T; both sides are softened by T and the result is scaled
            by T² so gradient magnitudes do not shrink as 1/T² (Hinton et al.).
        tail: how the mass outside the top-k is handled.

            ``"renorm"``: the teacher is renormalised over its k ids,
            ``p_T ∝ exp(logp / T)``; the student term is the full-vocabulary
            ``log_softmax(z / T)`` gathered at the ids. The student is therefore
            pushed to move *all* its mass into the teacher's top-k (the known
            bias of top-k KD); the loss is ≥ 0 and is 0 only when the student's
            tempered distribution equals the renormalised teacher.

            ``"bucket"``: a (k+1)-way distribution, the k ids plus one bucket for
            everything else. Student bucket = 1 − Σ student probs at the ids.
            Teacher bucket at temperature T: the cache only holds the *total*
            untempered tail mass, and Σ_j p_j^{1/T} is not a function of Σ_j p_j,
            so it cannot be recovered. We treat the tail as a single token of
            log-prob ``log_tail``: ``p_T = softmax([logp_1..k, log_tail] / T)``.
            This is exact at T = 1 (it is then the coarse-grained teacher, and
            by the data-processing inequality the loss is ≤ the full-vocab KL)
            and for T > 1 under-estimates the tempered tail, since
            (Σ p_j)^{1/T} ≤ Σ p_j^{1/T}.

    At k = V both modes equal the full-vocabulary tempered KL exactly.
    """
    if tail not in ("renorm", "bucket"):
        raise ValueError(f"tail must be 'renorm' or 'bucket', got {tail!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    m = _bool_mask(mask)
    topk_ids = topk_ids.long()  # the cache stores the narrowest uint; gather wants int64
    # Sanitise padding so arbitrary cached values (-1 ids, NaN) stay harmless.
    ids = torch.where(m[..., None] & (topk_ids >= 0), topk_ids, torch.zeros_like(topk_ids))
    t_logp = torch.where(m[..., None], topk_logprobs.float(), torch.zeros((), device=mask.device))
    t_logp = t_logp.clamp(min=_LOG_FLOOR)

    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_k = s_logp.gather(-1, ids)  # [B, T, k]

    if tail == "renorm":
        t_k = F.log_softmax(t_logp / temperature, dim=-1)
        per_tok = _kl_terms(t_k, s_k)
    else:
        if log_tail is None:
            raise ValueError("tail='bucket' needs log_tail (cache column topk_log_tail)")
        lt = torch.where(m, log_tail.float(), torch.zeros((), device=mask.device))
        lt = lt.clamp(min=_LOG_FLOOR)
        t_full = F.log_softmax(torch.cat([t_logp, lt[..., None]], dim=-1) / temperature, dim=-1)
        # log(1 - Σ_k q): from the log-sum of the gathered log-probs, capped so a
        # student that put (numerically) everything in the top-k gives a finite
        # log instead of log(0) or log(negative).
        head = torch.logsumexp(s_k, dim=-1).clamp(max=_MAX_LOG_HEAD)
        s_full = torch.cat([s_k, _log1mexp(head)[..., None]], dim=-1)
        per_tok = _kl_terms(t_full, s_full)

    return _masked_mean(per_tok, m) * (temperature**2)


def sampled_kd_loss(
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_weights: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    pad_id: int = -1,
) -> torch.Tensor:
    """RS-KD: cross-entropy with the sparse, importance-weighted teacher sample.

    Random-Sampling KD (Anshumann et al. 2025, "Sparse Logit Sampling") caches,
    per token, n ids drawn i.i.d. from a proposal r (r = p, the teacher, or a
    tempered/flattened p) with weights w_i = p(id_i) / (n · r(id_i)); with r = p
    every draw has weight 1/n (duplicates may be merged by summing weights). The
    loss is

        L = − Σ_i w_i · log q(id_i),       q = softmax(student_logits / T).

    Why it is unbiased for the KL gradient: for any f,
    E_{id~r}[p(id)/r(id) · f(id)] = Σ_v p(v) f(v), so with f = −∇ log q

        E[∇L] = Σ_v p(v) · (−∇ log q(v)) = ∇ CE(p, q) = ∇ KL(p ‖ q),

    because KL(p‖q) = CE(p, q) − H(p) and H(p) does not depend on the student.
    (Top-k truncation, by contrast, is biased: it never shows the student the
    tail.) The *value* is a CE estimate, i.e. KL plus the teacher's entropy, so
    it does not go to 0. If the cache self-normalised the weights (Σ w = 1 with
    r ≠ p) the estimator is consistent rather than exactly unbiased.

    Args:
        student_logits: ``[B, T, V]``.
        sample_ids: ``[B, T, n]`` int64; ``pad_id`` marks unused slots.
        sample_weights: ``[B, T, n]``; slots with weight 0 are ignored as well.
            Weights are used as cached (they sum to 1 per token), not renormalised.
        mask: ``[B, T]``.
        temperature: the student is softened by T and the loss scaled by T²; the
            cached draws must come from the teacher at the same T.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    m = _bool_mask(mask)
    sample_ids = sample_ids.long()
    valid = m[..., None] & (sample_ids != pad_id) & (sample_ids >= 0)
    ids = torch.where(valid, sample_ids, torch.zeros_like(sample_ids))
    w = torch.where(valid, sample_weights.float(), torch.zeros((), device=mask.device))
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, ids)
    per_tok = -(w * s_logp).sum(-1)
    return _masked_mean(per_tok, m) * (temperature**2)


# --------------------------------------------------------------------------- #
# hard-label losses
# --------------------------------------------------------------------------- #


def mlm_loss(
    student_logits: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy at the cached MLM positions.

    ``positions [B, M]`` are token indices into T (-1 = padding) and
    ``labels [B, M]`` the original token ids there (``ignore_index`` also skips).
    The student must see the *same* masked ``input_ids`` the teacher saw; that
    is the loader's job (the cache stores the masked inputs).
    """
    positions, labels = positions.long(), labels.long()
    valid = (positions >= 0) & (labels != ignore_index)
    pos = torch.where(valid, positions, torch.zeros_like(positions))
    V = student_logits.size(-1)
    picked = student_logits.gather(1, pos[..., None].expand(-1, -1, V))  # [B, M, V]
    tgt = torch.where(valid, labels, torch.zeros_like(labels))
    nll = F.cross_entropy(picked.float().reshape(-1, V), tgt.reshape(-1), reduction="none")
    return _masked_mean(nll.view_as(tgt), valid)


def causal_lm_loss(
    student_logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Next-token cross-entropy: logits at t predict input_ids at t+1.

    A pair counts only if both t and t+1 are real, which handles right *and*
    left padding (a left-pad slot must not "predict" the first real token).
    """
    m = _bool_mask(mask)
    logits = student_logits[:, :-1].float()
    tgt = input_ids[:, 1:].long()
    valid = m[:, 1:] & m[:, :-1]
    tgt = torch.where(valid, tgt, torch.zeros_like(tgt))
    V = logits.size(-1)
    nll = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), reduction="none")
    return _masked_mean(nll.view_as(tgt), valid)


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """TinyBERT prediction-layer loss: −Σ softmax(t/T) · log_softmax(s/T).

    ``[..., C]`` inputs (e.g. ``[B, C]`` task logits); summed over classes and
    averaged over the rest. TinyBERT's code averages over classes too
    (``.mean()`` over B·C), which only rescales by 1/C; and it applies no T²
    factor (it uses T = 1), so neither do we.
    """
    t = F.softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(t * s).sum(-1).mean()


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Tang et al. 2019's distillation loss: ||z_teacher − z_student||², summed over classes and
    averaged over the rest (``[..., C]`` raw logits, no softmax, no temperature)."""
    # fp16/bf16 logits are upcast (a sum of squares overflows/rounds in half precision); fp64 stays fp64
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    return (student_logits.to(dtype) - teacher_logits.to(dtype)).pow(2).sum(-1).mean()


def hard_ce(
    student_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Plain cross-entropy with gold labels; ``[..., C]`` logits, ``[...]`` labels.

    Returns 0 (not NaN) when every label is ``ignore_index``.
    """
    C = student_logits.size(-1)
    labels = labels.long()  # cached labels are int32
    valid = labels != ignore_index
    tgt = torch.where(valid, labels, torch.zeros_like(labels))
    nll = F.cross_entropy(student_logits.float().reshape(-1, C), tgt.reshape(-1), reduction="none")
    nll = torch.where(valid.reshape(-1), nll, torch.zeros_like(nll))
    return nll.sum() / valid.sum().clamp(min=1)


# --------------------------------------------------------------------------- #
# intermediate-layer losses
# --------------------------------------------------------------------------- #


def _check_width(student_h: torch.Tensor, teacher_h: torch.Tensor, what: str) -> None:
    if student_h.shape[-1] != teacher_h.shape[-1]:
        raise ValueError(
            f"{what}: student width {student_h.shape[-1]} != teacher width "
            f"{teacher_h.shape[-1]}; add a projection (HiddenProjection, TinyBERT's W_h) "
            "or use hidden_mse_loss(..., proj=...)"
        )
    if student_h.shape[:-1] != teacher_h.shape[:-1]:
        raise ValueError(f"{what}: shapes {tuple(student_h.shape)} vs {tuple(teacher_h.shape)}")


def cosine_hidden_loss(
    student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """DistilBERT's cosine loss: mean over real tokens of 1 − cos(h_s, h_t).

    Widths must match (DistilBERT keeps the teacher width); otherwise ValueError.
    """
    _check_width(student_h, teacher_h, "cosine_hidden_loss")
    m = _bool_mask(mask)
    t = torch.where(m[..., None], teacher_h.float(), torch.zeros((), device=mask.device))
    cos = F.cosine_similarity(student_h.float(), t, dim=-1, eps=1e-8)
    return _masked_mean(1.0 - cos, m)


class HiddenProjection(nn.Module):
    """Learnable student-width → teacher-width maps (TinyBERT's W_h).

    ``num_maps=1`` shares one map for every layer (and the embeddings), which is
    what TinyBERT's released code does (one ``fit_dense``); ``num_maps=n`` gives
    one per mapped layer, selected by ``index``. Trained with the student, so
    its parameters must be in the optimiser; discarded after distillation.
    """

    def __init__(self, student_width: int, teacher_width: int, num_maps: int = 1, bias: bool = True):
        super().__init__()
        if num_maps < 1:
            raise ValueError("num_maps must be >= 1")
        self.maps = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=bias) for _ in range(num_maps))

    def forward(self, h: torch.Tensor, index: int = 0) -> torch.Tensor:
        lin = self.maps[0] if len(self.maps) == 1 else self.maps[index]
        # Let autocast pick the matmul dtype; the loss casts to float32 after.
        return lin(h)


def hidden_mse_loss(
    student_h: torch.Tensor,
    teacher_h: torch.Tensor,
    mask: torch.Tensor,
    proj: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """TinyBERT hidden-state loss: MSE(proj(h_s), h_t) over real tokens.

    Averaged over real tokens and the hidden dimension (``nn.MSELoss`` on an
    unpadded batch). ``proj`` is any callable, e.g. a ``HiddenProjection`` or
    ``functools.partial(projection, index=i)``; without one, widths must match.
    """
    if proj is not None:
        student_h = proj(student_h)
    _check_width(student_h, teacher_h, "hidden_mse_loss")
    m = _bool_mask(mask)
    t = torch.where(m[..., None], teacher_h.float(), torch.zeros((), device=mask.device))
    se = (student_h.float() - t).pow(2).mean(-1)
    return _masked_mean(se, m)


def embedding_mse_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    mask: torch.Tensor,
    proj: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """TinyBERT embedding-layer loss: ``hidden_mse_loss`` on hidden state 0."""
    return hidden_mse_loss(student_emb, teacher_emb, mask, proj)


def attention_mse_loss(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "probs",
    average_heads: bool = False,
) -> torch.Tensor:
    """TinyBERT attention loss on one layer: ``[B, heads, T, T]`` maps.

    The cache stores *post-softmax attention probabilities* (what HF returns
    with ``output_attentions=True``), not TinyBERT-paper pre-softmax scores,
    which HF does not expose. So:

    * ``kind="probs"``: MSE between probability maps (TinyBERT-code / common
      reimplementation variant), averaged over heads × real queries × real keys.
    * ``kind="kl"``: MiniLM's KL(teacher row ‖ student row), summed over real
      keys, averaged over heads × real queries.

    Padded queries *and* keys are excluded (pair mask = mask_q ∧ mask_k), so
    whatever the loader put in padded slots does not matter. Student maps must
    come from eager attention (SDPA/flash return none) and with attention
    dropout off: HF returns the *post-dropout* weights (see ``load_student``).

    Head counts must match, or pass ``average_heads=True`` to compare the
    head-averaged maps ``[B, 1, T, T]`` (coarser, but works for any counts).
    """
    if kind not in ("probs", "kl"):
        raise ValueError(f"kind must be 'probs' or 'kl', got {kind!r}")
    if student_attn.shape[-2:] != teacher_attn.shape[-2:] or student_attn.shape[0] != teacher_attn.shape[0]:
        raise ValueError(f"attention shapes {tuple(student_attn.shape)} vs {tuple(teacher_attn.shape)}")
    s = student_attn.float()
    t = teacher_attn.float()
    if s.shape[1] != t.shape[1]:
        if not average_heads:
            raise ValueError(
                f"student has {s.shape[1]} attention heads, teacher {t.shape[1]}; "
                "use a student with the teacher's head count or average_heads=True"
            )
    if average_heads:
        s = s.mean(1, keepdim=True)
        t = torch.nan_to_num(t).mean(1, keepdim=True)  # padded NaNs would poison the mean
    m = _bool_mask(mask)
    pair = (m[:, None, :, None] & m[:, None, None, :]).expand_as(s)  # [B, h, T, T]
    t = torch.where(pair, t, torch.zeros((), device=t.device))
    heads = s.shape[1]
    if kind == "probs":
        se = torch.where(pair, (s - t).pow(2), torch.zeros((), device=s.device))
        return se.sum() / (pair.sum().clamp(min=1))
    # KL per query row; clamp the student log so an exact 0 does not give -inf.
    log_s = torch.log(s.clamp(min=1e-12))
    kl = torch.where(pair, torch.xlogy(t, t) - t * log_s, torch.zeros((), device=s.device)).sum(-1)
    return _masked_mean(kl, m[:, None, :].expand(-1, heads, -1))


def feature_map_losses(
    student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MobileBERT's feature-map transfer on one layer, split as its reference code does.

    Returns, each averaged over real tokens:

    * the MSE between the layer-normalised (no γ/β) teacher and student states, per hidden unit;
    * the mean term: (μ_t − μ_s)², μ = a token's mean over the hidden units;
    * the variance term: |σ²_t − σ²_s|, σ² = a token's variance over the hidden units.

    Normalising first makes the main term independent of the scale that NoNorm (MobileBERT's
    elementwise γ·h + β) leaves free; the two statistics terms then match that scale. Widths must be
    equal (MobileBERT's student is as wide as its teacher between blocks: no projection).
    """
    _check_width(student_h, teacher_h, "feature_map_losses")
    m = _bool_mask(mask)
    t = torch.where(m[..., None], teacher_h.float(), torch.zeros((), device=mask.device))
    s = student_h.float()
    mu_t, mu_s = t.mean(-1, keepdim=True), s.mean(-1, keepdim=True)
    var_t, var_s = t.var(-1, unbiased=False, keepdim=True), s.var(-1, unbiased=False, keepdim=True)
    norm_t = (t - mu_t) * torch.rsqrt(var_t + eps)
    norm_s = (s - mu_s) * torch.rsqrt(var_s + eps)
    mse = _masked_mean((norm_s - norm_t).pow(2).mean(-1), m)
    mean = _masked_mean((mu_s - mu_t).pow(2).squeeze(-1), m)
    var = _masked_mean((var_s - var_t).abs().squeeze(-1), m)
    return mse, mean, var


def attention_transfer_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """MobileBERT's attention transfer on one layer: KL(teacher row ‖ student row) per head.

    Summed over real keys, averaged over heads × real queries (padded queries and keys contribute
    nothing). The cached rows (uint8 or fp16) are renormalised over the real keys first, so a
    quantised row is a distribution again.

    Head mapping: with S student heads and T = g·S teacher heads, student head h is compared with
    the mean of teacher heads h·g … h·g + g − 1 (a mean of distributions is a distribution); S must
    divide T.
    """
    s_heads, t_heads = student_attn.shape[1], teacher_attn.shape[1]
    if t_heads % s_heads:
        raise ValueError(f"attention transfer: the student's {s_heads} heads do not divide the teacher's "
                         f"{t_heads}; give the student a head count that divides {t_heads}")
    m = _bool_mask(mask)
    keys = m[:, None, None, :]
    t = torch.where(keys, torch.nan_to_num(teacher_attn.float()), torch.zeros((), device=mask.device))
    if t_heads != s_heads:
        B, _, T, K = t.shape
        t = t.view(B, s_heads, t_heads // s_heads, T, K).mean(2)
    t = t / t.sum(-1, keepdim=True).clamp(min=1e-12)
    return attention_mse_loss(student_attn, t, mask, kind="kl")


# --------------------------------------------------------------------------- #
# layer maps
# --------------------------------------------------------------------------- #


def uniform_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """TinyBERT's uniform strategy: student layer i ↔ teacher layer i·L_T/L_S.

    Indices are hidden-state indices, i = 0..L_S, with 0 = embeddings, so the
    map has L_S + 1 pairs and always ends at (L_S, L_T). Non-divisible depths
    use the floor.
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"layer counts must be >= 1, got student={n_student}, teacher={n_teacher}")
    if n_student > n_teacher:
        raise ValueError(f"student ({n_student} layers) is deeper than the teacher ({n_teacher})")
    return [(i, (i * n_teacher) // n_student) for i in range(n_student + 1)]


def parse_layer_map(
    text: str, n_student: int | None = None, n_teacher: int | None = None
) -> list[tuple[int, int]]:
    """Parse ``"0:0,1:2,2:4"`` (student:teacher hidden-state indices).

    Raises ValueError on bad syntax, negative indices, a student layer listed
    twice, or (when the counts are given) indices outside 0..L.
    """
    pairs: list[tuple[int, int]] = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        mm = re.fullmatch(r"(-?\d+):(-?\d+)", item)
        if mm is None:
            raise ValueError(f"bad layer map entry {item!r} in {text!r}; expected 'student:teacher'")
        s, t = int(mm.group(1)), int(mm.group(2))
        for idx, n, who in ((s, n_student, "student"), (t, n_teacher, "teacher")):
            if idx < 0 or (n is not None and idx > n):
                hi = "L" if n is None else str(n)
                raise ValueError(f"{who} layer {idx} in {text!r} is out of range 0..{hi}")
        pairs.append((s, t))
    if not pairs:
        raise ValueError(f"empty layer map {text!r}")
    seen = [s for s, _ in pairs]
    if len(set(seen)) != len(seen):
        raise ValueError(f"student layer listed twice in {text!r}")
    return pairs
