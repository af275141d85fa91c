"""Loss presets: the published recipes as `LossSpec`s (weights, temperature, layer maps).

A recipe YAML (`pipeline/student/recipes/`) names one of `PRESETS`; the trainer applies the config's
overrides on top.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from kdcache.pipeline.student.losses import uniform_layer_map
from kdcache.pipeline.student.terms import LossSpec

__all__ = ["PRESETS", "preset", "distilbert", "tinybert_general", "tinybert_task", "mobilebert", "lm", "tang"]


def distilbert(n_student: int = 6, n_teacher: int = 12, kd_tail: str = "bucket") -> LossSpec:
    """DistilBERT (Sanh et al. 2019; HF research_projects/distillation train.py).

    T = 2, α_ce (KD) = 5.0, α_mlm = 2.0, α_cos = 1.0, cosine on the last hidden
    states. Their KD is a full-vocabulary KL; from a top-k cache we default to
    the tail bucket (closest to full KL; exact at T = 1).
    """
    return LossSpec(
        weights={"kd": 5.0, "mlm": 2.0, "cos": 1.0},
        temperature=2.0,
        kd_tail=kd_tail,
        cos_layer=(n_student, n_teacher),
    )


def tinybert_general(n_student: int = 4, n_teacher: int = 12, attention_kind: str = "probs") -> LossSpec:
    """TinyBERT general distillation: embedding + hidden + attention, uniform map."""
    return LossSpec(
        weights={"emb": 1.0, "hidden": 1.0, "attn": 1.0},
        temperature=1.0,
        layer_map=uniform_layer_map(n_student, n_teacher),
        attention_kind=attention_kind,
    )


def tinybert_task(
    n_student: int = 4, n_teacher: int = 12, stage: str = "pred", temperature: float = 1.0
) -> LossSpec:
    """TinyBERT task-specific distillation, two separate runs.

    ``stage="intermediate"`` (run first, optional): emb + hidden + attn on the
    task data; ``stage="pred"``: prediction-layer soft CE against the cached
    ``task_logits`` at T = 1.
    """
    if stage == "pred":
        return LossSpec(weights={"pred": 1.0}, temperature=temperature)
    if stage == "intermediate":
        return replace(tinybert_general(n_student, n_teacher), temperature=temperature)
    raise ValueError(f"stage must be 'pred' or 'intermediate', got {stage!r}")


def mobilebert(n_student: int = 24, n_teacher: int = 24, stage: str = "layerwise", temperature: float = 1.0,
               alpha: float = 0.5) -> LossSpec:
    """MobileBERT (Sun et al. 2020): layer-wise transfer, then the prediction stage.

    ``stage="layerwise"``: feature-map transfer (fmt + its mean and variance terms) on every hidden
    state, attention transfer (at) on every layer; student layer l ↔ teacher layer l (same depth;
    a shallower student gets the uniform map). ``stage="pred"``: the task stage, α·CE on the gold
    label + (1 − α)·soft CE on the cached task logits (the paper's α = 0.5); ``stage="mlm"``: the
    pre-training-distillation stage of a masked-LM teacher, α·MLM + (1 − α)·KD on the cached top-k.
    How the layer-wise terms are scheduled (progressive, joint, auxiliary) is the run's
    `knowledge_transfer` (`kdcache.pipeline.student.phases`).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if stage == "layerwise":
        layers = ([(i, i) for i in range(n_student + 1)] if n_student == n_teacher
                  else uniform_layer_map(n_student, n_teacher))
        return LossSpec(weights={"fmt": 1.0, "fmt_mean": 1.0, "fmt_var": 1.0, "at": 1.0}, temperature=temperature,
                        layer_map=layers)
    if stage == "pred":
        return LossSpec(weights={"pred": 1.0 - alpha, "ce": alpha}, temperature=temperature)
    if stage == "mlm":
        return LossSpec(weights={"kd": 1.0 - alpha, "mlm": alpha}, temperature=temperature)
    raise ValueError(f"stage must be 'layerwise', 'pred' or 'mlm', got {stage!r}")


def lm(
    n_student: int,
    n_teacher: int,
    kd: str = "topk",
    temperature: float | None = None,
    kd_tail: str = "bucket",
) -> LossSpec:
    """Causal-LM distillation, DistilGPT2-style: KD 5.0 + causal LM 2.0 + cosine 1.0.

    ``kd="topk"`` reads the top-k cache (default T = 2, as DistilBERT/DistilGPT2);
    ``kd="sampled"`` the RS-KD cache, whose draws are from the teacher at T = 1,
    so T defaults to (and must stay) 1. The
    cosine term needs equal widths (a layer-copied student); drop it with
    ``spec.weights["cos"] = 0`` for a narrower student.
    """
    if kd not in ("topk", "sampled"):
        raise ValueError(f"kd must be 'topk' or 'sampled', got {kd!r}")
    name = "kd" if kd == "topk" else "rskd"
    if temperature is None:
        temperature = 2.0 if kd == "topk" else 1.0
    return LossSpec(
        weights={name: 5.0, "clm": 2.0, "cos": 1.0},
        temperature=temperature,
        kd_tail=kd_tail,
        cos_layer=(n_student, n_teacher),
    )


def tang(alpha: float = 0.0, distill: str = "mse", temperature: float = 1.0) -> LossSpec:
    """Tang et al. 2019 (BiLSTM/CNN students): α·CE on the gold label + (1 − α)·distillation.

    ``distill="mse"``: MSE between student and teacher logits (the paper's choice); ``"kl"``: soft
    cross-entropy at ``temperature`` (KL up to a constant). Rows without a gold label (augmented
    copies, label −100) add nothing to the CE term, so they train on the teacher's logits alone.
    """
    if distill not in ("mse", "kl"):
        raise ValueError(f"distill must be 'mse' or 'kl', got {distill!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return LossSpec(weights={"ce": alpha, "logit_mse" if distill == "mse" else "pred": 1.0 - alpha},
                    temperature=temperature)


PRESETS: dict[str, Callable[..., LossSpec]] = {
    "distilbert": distilbert,
    "tinybert-general": tinybert_general,
    "tinybert-task": tinybert_task,
    "mobilebert": mobilebert,
    "lm": lm,
    "tang": tang,
}


def preset(name: str, **kwargs: Any) -> LossSpec:
    """``preset("tinybert-general", n_student=4, n_teacher=12)`` → LossSpec."""
    try:
        fn = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
    return fn(**kwargs)
