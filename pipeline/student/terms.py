"""The loss-term registry: every term a `LossSpec` can weight, each declared in one place.

A term says what it reads (cache columns and teacher layers; student outputs), what it needs from
the student and the cache beyond its columns (`problem`: the reason and the remedy, or None), and
how it is computed. `LossSpec`, `required_columns`, `CompositeLoss`, the trainer's plan and its
masked-KD path all read `TERMS`, so adding a term is one class here, decorated with `@register`.

`TERMS` keeps registration order, which is also the order of the plan's checks. Layer indices
follow `kdcache.pipeline.student.losses`: `hidden_{l}` is `hidden_states[l]` (0 = embeddings),
`attention_{l}` is `attentions[l - 1]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcache.pipeline.student.head import row_columns
from kdcache.pipeline.student.losses import (
    HiddenProjection,
    attention_mse_loss,
    attention_transfer_loss,
    causal_lm_loss,
    cosine_hidden_loss,
    feature_map_losses,
    hard_ce,
    hidden_mse_loss,
    logit_mse,
    mlm_loss,
    sampled_kd_loss,
    soft_cross_entropy,
    topk_kd_loss,
)

__all__ = ["LossSpec", "Term", "TERMS", "register", "required_columns", "CompositeLoss"]


@dataclass
class LossSpec:
    """What to optimise: loss name → weight, plus the knobs those losses need.

    ``layer_map`` pairs are (student, teacher) hidden-state indices (see module
    docstring); ``cos_layer`` defaults to the last pair. A weight of 0 disables
    a loss (it is neither computed nor required from the cache).
    """

    weights: dict[str, float]
    temperature: float = 1.0
    kd_tail: str = "bucket"
    layer_map: list[tuple[int, int]] | None = None
    cos_layer: tuple[int, int] | None = None
    attention_kind: str = "probs"
    average_heads: bool = False
    per_layer_projection: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown loss names {sorted(unknown)}; known: {sorted(TERMS)}")
        if self.kd_tail not in ("renorm", "bucket"):
            raise ValueError(f"kd_tail must be 'renorm' or 'bucket', got {self.kd_tail!r}")
        if self.layer_map is not None:
            self.layer_map = [(int(s), int(t)) for s, t in self.layer_map]
        if self.cos_layer is not None:
            self.cos_layer = (int(self.cos_layer[0]), int(self.cos_layer[1]))

    def active(self) -> dict[str, float]:
        return {k: float(w) for k, w in self.weights.items() if w != 0}

    def active_terms(self) -> list[Term]:
        """The active terms in registry order (the order of the plan's checks)."""
        active = self.active()
        return [t for name, t in TERMS.items() if name in active]

    def _pairs(self, what: str) -> list[tuple[int, int]]:
        if self.layer_map is None:
            raise ValueError(f"loss {what!r} needs LossSpec.layer_map")
        return self.layer_map

    def all_pairs(self, what: str) -> list[tuple[int, int]]:
        return list(self._pairs(what))

    def emb_pairs(self) -> list[tuple[int, int]]:
        return [p for p in self._pairs("emb") if p[0] == 0]

    def layer_pairs(self, what: str = "hidden") -> list[tuple[int, int]]:
        return [p for p in self._pairs(what) if p[0] >= 1]

    def cos_pair(self) -> tuple[int, int]:
        if self.cos_layer is not None:
            return self.cos_layer
        return self._pairs("cos")[-1]


# --------------------------------------------------------------------------- #
# the registry
# --------------------------------------------------------------------------- #

# A projection for a (student, teacher) pair, or None: CompositeLoss's learned W_h.
ProjFor = Callable[[tuple[int, int]], Callable[[torch.Tensor], torch.Tensor] | None]


class Term:
    """One loss term: subclass, set the attributes, override what differs, decorate with `@register`."""

    name: str = ""
    about: str = ""  # what it computes, one line
    outputs: tuple[str, ...] = ("logits",)  # student outputs it reads: logits, hidden_states, attentions
    token_kd: bool = False  # per-token KD on the logits: kd_positions=masked restricts it to the mask positions
    projected: bool = False  # compares hidden states through a learned projection when the widths differ
    on_head: bool = False  # reads vocabulary logits row by row: `head_rows` / `head_loss` (student/head.py)
    # compares layer pairs of `spec.layer_map` (emb/hidden/attn/fmt/at): progressive knowledge transfer
    # gives each student layer a phase of its own (`kdcache.pipeline.student.phases`)
    layerwise: bool = False

    def columns(self, spec: LossSpec) -> set[str]:
        """The cache columns it reads, by their decoded names (`topk_ids`, not the codec's leaves)."""
        raise NotImplementedError

    def layers(self, spec: LossSpec) -> list[tuple[str, int, int]]:
        """(kind, student layer, teacher layer) pairs it compares; kind is hidden | attention."""
        return []

    def problem(self, spec: LossSpec, student: Mapping[str, Any], cache_spec) -> str | None:
        """Why this student and this cache cannot run the term, with the remedy; None when they can.

        `student` holds the sizes the plan read from the student (hidden_size, num_heads,
        num_labels, architecture); layers and columns are checked from `layers` / `columns`.
        """
        return None

    def column_hint(self, cache_spec) -> str:
        """Added to the error when one of its columns is missing from the cache."""
        return ""

    def check_spec(self, spec: LossSpec) -> None:
        """Raise ValueError when the spec's knobs cannot work for this term."""

    def compute(self, spec: LossSpec, outputs: Any, batch: Mapping[str, torch.Tensor], mask: torch.Tensor,
                proj: ProjFor) -> torch.Tensor:
        raise NotImplementedError

    def head_rows(self, spec: LossSpec, batch: Mapping[str, torch.Tensor], mask: torch.Tensor,
                  masked: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`on_head` terms: the flat row indices into B*T whose logits it reads, and its columns
        there; `masked` = kd_positions is "masked" (a token-KD term reads the mask positions)."""
        raise NotImplementedError

    def head_loss(self, spec: LossSpec, logits: torch.Tensor, cols: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`on_head` terms: the SUM over rows of the per-row loss (logits [n, V]); summed over chunks
        and divided by the row count it equals `compute`."""
        raise NotImplementedError


TERMS: dict[str, Term] = {}


def register(cls: type[Term]) -> type[Term]:
    TERMS[cls.name] = cls()
    return cls


def _out(outputs: Any, key: str) -> Any:
    """Read ``key`` from a HF ModelOutput, a dict, or a plain object."""
    if isinstance(outputs, Mapping):
        val = outputs.get(key)
    else:
        val = getattr(outputs, key, None)
    if val is None:
        hint = ""
        if key in ("hidden_states", "attentions"):
            hint = f" (run the student with output_{key}=True; attentions need eager attention)"
        raise KeyError(f"student outputs have no {key!r}{hint}")
    return val


# --------------------------------------------------------------------------- #
# logit terms
# --------------------------------------------------------------------------- #


def _mask_slots(batch: Mapping[str, torch.Tensor], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached mask positions [B, M] (-1 = padding) and their flat indices into B*T."""
    pos = batch["mlm_positions"].long()
    return pos, torch.arange(pos.shape[0], device=pos.device)[:, None] * T + pos.clamp(min=0)


def _token_rows(batch: Mapping[str, torch.Tensor], mask: torch.Tensor, masked: bool) -> torch.Tensor:
    """Flat indices into B*T: the cached mask positions (masked) or every real token."""
    if masked:
        pos, flat = _mask_slots(batch, mask.shape[1])
        return flat[pos >= 0]
    return (mask != 0).reshape(-1).nonzero().squeeze(1)


class _TokenKD(Term):
    """Shared by the two token-KD terms: their rows and their columns there."""

    token_kd = on_head = True

    def head_rows(self, spec, batch, mask, masked):
        idx = _token_rows(batch, mask, masked)
        return idx, row_columns(batch, self.columns(spec), idx)

    def head_loss(self, spec, logits, cols):
        n = logits.shape[0]
        ones = torch.ones(1, n, dtype=torch.bool, device=logits.device)
        return self.compute(spec, {"logits": logits[None]}, {k: v[None] for k, v in cols.items()}, ones, None) * n


@register
class TopKKD(_TokenKD):
    name, about = "kd", "topk_kd_loss on the student's token logits (cached top-k)"

    def columns(self, spec):
        return {"topk_ids", "topk_logprobs"} | ({"topk_log_tail"} if spec.kd_tail == "bucket" else set())

    def column_hint(self, cache_spec):
        if cache_spec.targets == "topk":
            return ""
        return f" (the cache holds {cache_spec.targets!r} targets: use loss_weights.kd=0 loss_weights.rskd=5)"

    def compute(self, spec, outputs, batch, mask, proj):
        return topk_kd_loss(_out(outputs, "logits"), batch["topk_ids"], batch["topk_logprobs"],
                            batch.get("topk_log_tail"), mask, spec.temperature, spec.kd_tail)


@register
class SampledKD(_TokenKD):
    name, about = "rskd", "sampled_kd_loss on the student's token logits (cached RS-KD samples)"

    def columns(self, spec):
        return {"sample_ids", "sample_weights"}

    def column_hint(self, cache_spec):
        if cache_spec.targets == "sampled":
            return ""
        return f" (the cache holds {cache_spec.targets!r} targets: use loss_weights.rskd=0 loss_weights.kd=5)"

    def check_spec(self, spec):
        if spec.temperature != 1.0:
            # The cache draws RS-KD samples from the untempered teacher (T = 1); a
            # tempered student against untempered draws is not the tempered KL.
            raise ValueError(f"rskd needs temperature 1.0 (the cached draws are from the teacher at T = 1), "
                             f"got {spec.temperature}")

    def compute(self, spec, outputs, batch, mask, proj):
        return sampled_kd_loss(_out(outputs, "logits"), batch["sample_ids"], batch["sample_weights"], mask,
                               spec.temperature)


@register
class MaskedLM(Term):
    name, about = "mlm", "mlm_loss at the cached mask positions"

    def columns(self, spec):
        return {"mlm_positions", "mlm_labels"}

    on_head = True

    def compute(self, spec, outputs, batch, mask, proj):
        return mlm_loss(_out(outputs, "logits"), batch["mlm_positions"], batch["mlm_labels"])

    def head_rows(self, spec, batch, mask, masked):
        pos, flat = _mask_slots(batch, mask.shape[1])
        labels = batch["mlm_labels"].long()
        keep = (pos >= 0) & (labels != -100)
        return flat[keep], {"target": labels[keep]}

    def head_loss(self, spec, logits, cols):
        return F.cross_entropy(logits.float(), cols["target"], reduction="sum")


@register
class CausalLM(Term):
    name, about = "clm", "causal_lm_loss on input_ids"

    def columns(self, spec):
        return set()  # input_ids: every spec reads it

    on_head = True

    def compute(self, spec, outputs, batch, mask, proj):
        return causal_lm_loss(_out(outputs, "logits"), batch["input_ids"], mask)

    def head_rows(self, spec, batch, mask, masked):
        m = mask != 0
        B, T = m.shape
        valid = m[:, 1:] & m[:, :-1]  # position t predicts t + 1; both real
        flat = (torch.arange(B, device=m.device)[:, None] * T + torch.arange(T - 1, device=m.device))[valid]
        return flat, {"target": batch["input_ids"][:, 1:].long()[valid]}

    def head_loss(self, spec, logits, cols):
        return F.cross_entropy(logits.float(), cols["target"], reduction="sum")


# --------------------------------------------------------------------------- #
# hidden-state and attention terms
# --------------------------------------------------------------------------- #


@register
class Cosine(Term):
    name, outputs = "cos", ("hidden_states",)
    about = "cosine_hidden_loss on spec.cos_layer (default: last pair of the layer map)"

    def columns(self, spec):
        return {f"hidden_{spec.cos_pair()[1]}"}

    def layers(self, spec):
        return [("hidden", *spec.cos_pair())]

    def problem(self, spec, student, cache_spec):
        s_h, t_h = student["hidden_size"], cache_spec.hidden_size or None
        if s_h and t_h and s_h != t_h:
            return (f"loss 'cos' (cosine between hidden states) needs equal widths, but the student is {s_h} wide "
                    f"and the teacher {t_h}; a learned projection cannot make a cosine target meaningful. Set "
                    "loss_weights.cos=0 (or use a same-width student: `kdcache init-student` without --hidden-size)")
        return None

    def compute(self, spec, outputs, batch, mask, proj):
        s, t = spec.cos_pair()
        return cosine_hidden_loss(_out(outputs, "hidden_states")[s], batch[f"hidden_{t}"], mask)


class _HiddenMSE(Term):
    """TinyBERT's MSE between hidden states, through the projection when the widths differ."""

    outputs, projected, layerwise = ("hidden_states",), True, True

    def pairs(self, spec: LossSpec) -> list[tuple[int, int]]:
        raise NotImplementedError

    def columns(self, spec):
        return {f"hidden_{t}" for _, t in self.pairs(spec)}

    def layers(self, spec):
        return [("hidden", s, t) for s, t in self.pairs(spec)]

    def problem(self, spec, student, cache_spec):
        t_h = cache_spec.hidden_size or None
        if t_h and not student["hidden_size"]:
            return (f"losses emb/hidden compare hidden states of width {t_h}, but the student's width is unknown, "
                    "so no projection can be built: give the student a `hidden_size` attribute (student_factory) "
                    "or an HF config")
        return None

    def compute(self, spec, outputs, batch, mask, proj):
        hs = _out(outputs, "hidden_states")
        # Summed over layers, as in TinyBERT (not averaged).
        return sum(hidden_mse_loss(hs[s], batch[f"hidden_{t}"], mask, proj((s, t))) for s, t in self.pairs(spec))


@register
class Embedding(_HiddenMSE):
    name, about = "emb", "embedding_mse_loss on the layer-map pair with student index 0"

    def pairs(self, spec):
        return spec.emb_pairs()


@register
class Hidden(_HiddenMSE):
    name, about = "hidden", "hidden_mse_loss summed over layer-map pairs with student index >= 1"

    def pairs(self, spec):
        return spec.layer_pairs("hidden")


@register
class Attention(Term):
    name, outputs, layerwise = "attn", ("attentions",), True
    about = "attention_mse_loss summed over layer-map pairs with student index >= 1"

    def columns(self, spec):
        return {f"attention_{t}" for _, t in spec.layer_pairs("attn")}

    def layers(self, spec):
        return [("attention", s, t) for s, t in spec.layer_pairs("attn")]

    def problem(self, spec, student, cache_spec):
        heads = student["num_heads"]
        if heads and cache_spec.num_heads and heads != cache_spec.num_heads and not spec.average_heads:
            return (f"loss 'attn' compares attention maps head by head, but the student has {heads} heads and the "
                    f"teacher {cache_spec.num_heads}: set average_heads=true (compares head-averaged maps), or make "
                    f"the student with --num-heads {cache_spec.num_heads}")
        return None

    def compute(self, spec, outputs, batch, mask, proj):
        att = _out(outputs, "attentions")
        return sum(attention_mse_loss(att[s - 1], batch[f"attention_{t}"], mask, spec.attention_kind,
                                      spec.average_heads) for s, t in spec.layer_pairs("attn"))


class _FeatureMap(Term):
    """MobileBERT's feature-map transfer (`feature_map_losses`) on every pair of the layer map, 0
    included; `part` picks the normalised MSE (fmt), the mean term (fmt_mean) or the variance term
    (fmt_var). Summed over layers, like the TinyBERT terms."""

    outputs, layerwise = ("hidden_states",), True
    part = 0

    def columns(self, spec):
        return {f"hidden_{t}" for _, t in spec.all_pairs(self.name)}

    def layers(self, spec):
        return [("hidden", s, t) for s, t in spec.all_pairs(self.name)]

    def problem(self, spec, student, cache_spec):
        s_h, t_h = student["hidden_size"], cache_spec.hidden_size or None
        if s_h and t_h and s_h != t_h:
            return (f"loss {self.name!r} (MobileBERT feature-map transfer) compares layer l with layer l without a "
                    f"projection, but the student is {s_h} wide between blocks and the teacher {t_h}: make the "
                    "student with `kdcache init-student --architecture mobilebert` (as wide as its teacher), or "
                    f"set loss_weights.{self.name}=0")
        return None

    def compute(self, spec, outputs, batch, mask, proj):
        hs = _out(outputs, "hidden_states")
        return sum(feature_map_losses(hs[s], batch[f"hidden_{t}"], mask)[self.part]
                   for s, t in spec.all_pairs(self.name))


@register
class FeatureMap(_FeatureMap):
    name, part = "fmt", 0
    about = "MobileBERT feature-map transfer: MSE of the layer-normalised hidden states, summed over layer-map pairs"


@register
class FeatureMean(_FeatureMap):
    name, part = "fmt_mean", 1
    about = "MobileBERT feature-map statistics: (mean_t - mean_s)^2 of each token's hidden state, summed over pairs"


@register
class FeatureVariance(_FeatureMap):
    name, part = "fmt_var", 2
    about = "MobileBERT feature-map statistics: |var_t - var_s| of each token's hidden state, summed over pairs"


@register
class AttentionTransfer(Term):
    name, outputs, layerwise = "at", ("attentions",), True
    about = ("MobileBERT attention transfer: KL(teacher || student) per head over real tokens, summed over "
             "layer-map pairs with student index >= 1 (student head h vs the mean of teacher head group h); "
             "attention_kind and average_heads are the attn term's, not this one's")

    def columns(self, spec):
        return {f"attention_{t}" for _, t in spec.layer_pairs("at")}

    def layers(self, spec):
        return [("attention", s, t) for s, t in spec.layer_pairs("at")]

    def problem(self, spec, student, cache_spec):
        heads, t_heads = student["num_heads"], cache_spec.num_heads
        if heads and t_heads and t_heads % heads:
            return (f"loss 'at' compares each student head with a group of teacher heads, but the student's {heads} "
                    f"heads do not divide the teacher's {t_heads}: make the student with a head count that divides "
                    f"{t_heads} (`kdcache init-student --architecture mobilebert --num-heads N`)")
        return None

    def compute(self, spec, outputs, batch, mask, proj):
        att = _out(outputs, "attentions")
        return sum(attention_transfer_loss(att[s - 1], batch[f"attention_{t}"], mask)
                   for s, t in spec.layer_pairs("at"))


# --------------------------------------------------------------------------- #
# classifier terms
# --------------------------------------------------------------------------- #


class _Classifier(Term):
    def problem(self, spec, student, cache_spec):
        if student["num_labels"] is None:
            return (f"losses pred/ce need a classifier student ({student['architecture']} is not one): init the "
                    "student from the classifier teacher")
        return None


@register
class Prediction(_Classifier):
    name, about = "pred", "soft_cross_entropy(student logits, cached task_logits, T)"

    def columns(self, spec):
        return {"task_logits"}

    def problem(self, spec, student, cache_spec):
        why = super().problem(spec, student, cache_spec)
        if why is None and cache_spec.num_labels and int(student["num_labels"]) != cache_spec.num_labels:
            why = f"the cache's task logits have {cache_spec.num_labels} classes, the student {student['num_labels']}"
        return why

    def compute(self, spec, outputs, batch, mask, proj):
        return soft_cross_entropy(_out(outputs, "logits"), batch["task_logits"], spec.temperature)


@register
class LogitMSE(Prediction):
    name, about = "logit_mse", "logit_mse(student logits, cached task_logits): Tang et al.'s logit regression"

    def compute(self, spec, outputs, batch, mask, proj):
        return logit_mse(_out(outputs, "logits"), batch["task_logits"])


@register
class HardCE(_Classifier):
    name, about = "ce", "hard_ce(student logits, cached label)"

    def columns(self, spec):
        return {"label"}

    def compute(self, spec, outputs, batch, mask, proj):
        return hard_ce(_out(outputs, "logits"), batch["label"])


# --------------------------------------------------------------------------- #
# what a spec reads, and its weighted sum
# --------------------------------------------------------------------------- #


def required_columns(spec: LossSpec) -> set[str]:
    """Cache columns the active losses of ``spec`` read.

    ``input_ids`` is always included (the student has to run on it).
    ``attention_mask`` is not a cache column: the collator derives it from the
    padding, and every batch must carry it.
    """
    cols = {"input_ids"}
    for name in spec.active():
        cols |= TERMS[name].columns(spec)
    return cols


class CompositeLoss(nn.Module):
    """Weighted sum of the losses named in a ``LossSpec``.

    It is an ``nn.Module`` only because TinyBERT-style hidden losses between
    different widths own a learnable ``HiddenProjection``: put
    ``composite.parameters()`` in the optimiser and move it to the device with
    the student (and wrap it with the student under DDP/FSDP).

    ``student_outputs``: a mapping/object with ``logits`` and, as needed,
    ``hidden_states`` (tuple, index 0 = embeddings) and ``attentions`` (tuple,
    one per layer). ``batch``: the cache columns from ``required_columns`` plus
    ``attention_mask [B, T]``.
    """

    def __init__(
        self,
        spec: LossSpec,
        student_hidden_size: int | None = None,
        teacher_hidden_size: int | None = None,
    ):
        super().__init__()
        self.spec = spec
        self.weights = spec.active()
        self.proj: HiddenProjection | None = None
        self._proj_index: dict[tuple[int, int], int] = {}
        projected = [t for t in spec.active_terms() if t.projected]
        if (
            projected
            and student_hidden_size is not None
            and teacher_hidden_size is not None
            and student_hidden_size != teacher_hidden_size
        ):
            pairs = [p for t in projected for p in t.pairs(spec)]
            self._proj_index = {p: i for i, p in enumerate(pairs)}
            n = len(pairs) if spec.per_layer_projection else 1
            self.proj = HiddenProjection(student_hidden_size, teacher_hidden_size, num_maps=n)
        # Fail at construction, not at step 1, when the spec is incomplete.
        required_columns(spec)
        for name in self.weights:
            TERMS[name].check_spec(spec)

    def _proj_for(self, pair: tuple[int, int]):
        if self.proj is None:
            return None
        return partial(self.proj, index=self._proj_index.get(pair, 0))

    def compute(self, student_outputs: Any, batch: Mapping[str, torch.Tensor], spec: LossSpec | None = None):
        """Return ``(total, {name: unweighted detached value})``.

        ``spec``: a subset of the constructor's (fewer terms or layer pairs: a phase of the run);
        its pairs find their projections by pair, as the full spec's do.
        """
        spec = spec or self.spec
        mask = batch["attention_mask"]
        parts: dict[str, torch.Tensor] = {}
        total = None
        for name, w in spec.active().items():
            val = TERMS[name].compute(spec, student_outputs, batch, mask, self._proj_for)
            if not torch.is_tensor(val):  # sum over an empty pair list
                raise ValueError(f"loss {name!r} has no layer pairs to compare in {spec.layer_map}")
            parts[name] = val.detach()
            total = w * val if total is None else total + w * val
        if total is None:
            raise ValueError("LossSpec has no loss with a non-zero weight")
        return total, parts

    def forward(self, student_outputs: Any, batch: Mapping[str, torch.Tensor], spec: LossSpec | None = None):
        return self.compute(student_outputs, batch, spec)
