"""``init-student --architecture mobilebert``: a MobileBERT student (Sun et al. 2020) around the teacher we
have, built from its config and weights without running it.

MobileBERT's student has its teacher's depth, width between blocks and (where it can) head count,
so layer l of the student is compared with layer l of the teacher without a projection. Inside each
block it is narrow: a linear bottleneck in (queries and keys from a shared bottleneck projection,
values from the block's input), attention on the bottleneck width, ``ffn_stack`` small stacked
feed-forward networks, a linear bottleneck out, NoNorm (γ·h + β) instead of LayerNorm; its token
embeddings are ``embedding_size`` wide, widened by a 3-gram convolution (the embedding
transformation). transformers' `MobileBertModel` is that student, so the result is an HF checkpoint
that `AutoModel` loads.

The paper's teacher is an inverted-bottleneck BERT trained for the purpose; our teachers are plain
BERTs, so the student is fitted to them instead: ``hidden_size`` = the teacher's, ``num_hidden_layers``
= the teacher's, the bottleneck and the FFN stack set the size (the paper's 128 and 4 by default).

Heads: attention runs on the bottleneck, so the head count must divide it. Default: the teacher's
head count if it divides the bottleneck, else the largest divisor of it that does (12 teacher heads,
bottleneck 128 → 4 heads of 32, the teacher's head width). Attention transfer then compares student
head h with the mean of teacher heads h·g … h·g + g − 1, g = teacher heads / student heads
(`losses.attention_transfer_loss`; recorded as ``attention_head_groups``).

Initialisation, from the teacher's weights (read lazily, safetensors or pickle by consent):

* token table = the teacher's projected onto its top ``embedding_size`` principal directions P;
* the embedding transformation maps the middle token of the 3-gram back with Pᵀ (neighbours 0, the
  bias restores the table's mean), so the student's token embedding starts as the teacher's seen
  through P; the embedding NoNorm starts at the teacher's output scale (`_match_embedding_norm`);
* position and token-type tables are the teacher's (they are ``hidden_size`` wide in MobileBERT);
* the blocks are random (``seed``): the layer-wise transfer terms teach them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kdcache.pipeline.student.models import STUDENT_META, TeacherWeights, copy_tokenizer, pca_projection

__all__ = ["init_mobilebert_student", "default_heads"]


def default_heads(teacher_heads: int, bottleneck: int) -> int:
    """The teacher's head count if it divides the bottleneck, else its largest divisor that does."""
    return max(h for h in range(1, teacher_heads + 1) if teacher_heads % h == 0 and bottleneck % h == 0)


def _teacher_table(weights: TeacherWeights, suffix: str) -> tuple[str, torch.Tensor]:
    keys = [k for k in weights.keys() if k.endswith(suffix)]
    if not keys:
        raise ValueError(f"the teacher's weights have no *{suffix}: a MobileBERT student needs a BERT-family "
                         "teacher (word, position and token-type embedding tables)")
    key = min(keys, key=len)  # `bert.embeddings...` over any longer, nested copy
    return key, weights.get(key).float()


def _match_embedding_norm(norm, weights: TeacherWeights, rows: torch.Tensor) -> bool:
    """Start the embedding NoNorm at the teacher's output scale.

    The teacher's embedding output is LayerNorm(x) = γ·(x − μ)/σ + β, per token; NoNorm is γ'·x + β'
    with no per-token statistics. With μ and σ taken as their medians over `rows` (the student's
    embedding sums at position 1, before the norm), γ' = γ/σ and β' = β − γ·μ/σ give the teacher's scale from the first step, which
    the variance term would otherwise have to reach by growing γ' from 1 (tens of times over).
    """
    keys = {k for k in weights.keys() if k.endswith(("embeddings.LayerNorm.weight", "embeddings.LayerNorm.gamma"))}
    if not keys:
        return False
    key = min(keys, key=len)
    gamma = weights.get(key).float()
    beta = weights.get(key[: -len(key.rsplit(".", 1)[1])] + ("bias" if key.endswith("weight") else "beta")).float()
    mu = rows.mean(-1).median()
    sigma = rows.std(-1, unbiased=False).median().clamp(min=1e-6)
    norm.weight.copy_(gamma / sigma)
    norm.bias.copy_(beta - gamma * mu / sigma)
    return True


def init_mobilebert_student(
    teacher_dir: str | Path,
    out_dir: str | Path,
    bottleneck: int = 128,
    ffn_stack: int = 4,
    embedding_size: int = 128,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    seed: int = 0,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Write a MobileBERT student to ``out_dir``; return its ``kdcache_student.json`` record."""
    from transformers import AutoConfig, MobileBertConfig, MobileBertModel

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    if not (teacher_dir / "config.json").exists():
        raise FileNotFoundError(f"{teacher_dir} has no config.json")
    if out_dir.exists() and out_dir.resolve() == teacher_dir.resolve():
        raise ValueError("out_dir is the teacher's folder; writing there would overwrite the teacher")
    tcfg = AutoConfig.from_pretrained(str(teacher_dir), trust_remote_code=trust_remote_code)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if getattr(tcfg, key, None) is None:
            raise ValueError(f"the teacher's config has no {key}: a MobileBERT student needs a BERT-family teacher")
    h_t, n_t, heads_t = int(tcfg.hidden_size), int(tcfg.num_hidden_layers), int(tcfg.num_attention_heads)
    for flag, value in (("--bottleneck", bottleneck), ("--ffn-stack", ffn_stack), ("--embedding-size", embedding_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if bottleneck > h_t or embedding_size > h_t:
        raise ValueError(f"--bottleneck {bottleneck} and --embedding-size {embedding_size} must not exceed the "
                         f"teacher's hidden size {h_t} (the student is narrow inside its blocks)")
    heads = num_heads or default_heads(heads_t, bottleneck)
    if bottleneck % heads:
        raise ValueError(f"--num-heads {heads} does not divide --bottleneck {bottleneck} (attention runs on the "
                         "bottleneck)")
    if heads_t % heads:
        raise ValueError(f"--num-heads {heads} does not divide the teacher's {heads_t} heads: attention transfer "
                         f"compares each student head with a group of teacher heads; pick a divisor of {heads_t}")
    inter = intermediate_size or 4 * bottleneck
    weights = TeacherWeights(teacher_dir, allow_pickle)
    _, word = _teacher_table(weights, "word_embeddings.weight")
    _, position = _teacher_table(weights, "position_embeddings.weight")
    _, token_type = _teacher_table(weights, "token_type_embeddings.weight")

    config = MobileBertConfig(
        vocab_size=int(tcfg.vocab_size), hidden_size=h_t, num_hidden_layers=n_t, num_attention_heads=heads,
        intra_bottleneck_size=bottleneck, true_hidden_size=bottleneck, use_bottleneck=True,
        key_query_shared_bottleneck=True, use_bottleneck_attention=False, num_feedforward_networks=ffn_stack,
        intermediate_size=inter, embedding_size=embedding_size, trigram_input=True, normalization_type="no_norm",
        max_position_embeddings=int(position.shape[0]), type_vocab_size=int(token_type.shape[0]),
        pad_token_id=getattr(tcfg, "pad_token_id", 0) or 0,
        hidden_dropout_prob=getattr(tcfg, "hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=getattr(tcfg, "attention_probs_dropout_prob", 0.1),
        id2label=getattr(tcfg, "id2label", None), label2id=getattr(tcfg, "label2id", None),
        architectures=["MobileBertModel"])
    torch.manual_seed(seed)
    student = MobileBertModel(config, add_pooling_layer=False).float()
    with torch.no_grad():
        emb = student.embeddings
        proj = pca_projection(word, embedding_size)  # [h_t, embedding_size]
        emb.word_embeddings.weight.copy_(word @ proj)
        emb.position_embeddings.weight.copy_(position)
        emb.token_type_embeddings.weight.copy_(token_type)
        w = emb.embedding_transformation.weight  # [h_t, 3 * embedding_size]: (next, this, previous) token
        w.zero_()
        w[:, embedding_size:2 * embedding_size] = proj
        mean = word.mean(0)  # P spans the centred table: the bias restores its mean
        bias = mean - (mean @ proj) @ proj.T
        emb.embedding_transformation.bias.copy_(bias)
        # the student's rows (the table seen through P), not the teacher's: their spread is smaller
        _match_embedding_norm(emb.LayerNorm, weights, (word @ proj) @ proj.T + bias + position[1] + token_type[0])

    out_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(str(out_dir))
    tok_files = copy_tokenizer(teacher_dir, out_dir, drop_token_types=False)
    params = sum(p.numel() for p in student.parameters())
    teacher_params = sum(weights.get(k).numel() for k in weights.keys()
                         if not k.startswith(("cls.", "pooler.", "bert.pooler.")))
    record = {
        "format": 1, "mode": "mobilebert", "architecture": "mobilebert",
        "teacher_dir": str(teacher_dir.resolve()), "teacher_architecture": (tcfg.architectures or [None])[0],
        "teacher_num_layers": n_t, "teacher_hidden_size": h_t, "teacher_num_heads": heads_t,
        "num_layers": n_t, "hidden_size": h_t, "num_heads": heads, "bottleneck": bottleneck,
        "ffn_stack": ffn_stack, "intermediate_size": inter, "embedding_size": embedding_size,
        # student layer l ↔ teacher layer l (0 = the embedding output), no projection
        "hidden_layer_map": [[i, i] for i in range(n_t + 1)],
        "attention_head_groups": heads_t // heads,
        "head_mapping": f"student head h <-> mean of teacher heads {heads_t // heads}h .. {heads_t // heads}h + "
                        f"{heads_t // heads - 1}",
        "params": params, "teacher_encoder_params": teacher_params,
        "init_kwargs": {"add_pooling_layer": False},
        "newly_initialized": [f"<encoder blocks: random init, seed {seed}>"],
        "embedding_init": "pca (token table), copy (position, token type)",
        "weights_source": weights.source, "seed": seed, "tokenizer_files": tok_files,
    }
    (out_dir / STUDENT_META).write_text(json.dumps(record, indent=2) + "\n")
    return record
