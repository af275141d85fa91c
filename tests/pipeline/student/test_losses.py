"""Tests for kdcache.pipeline.student.losses, .terms and .presets: pure tensor maths, tiny shapes, CPU only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.pipeline.student import losses as L
from kdcache.pipeline.student import presets, terms

B, T, V = 2, 5, 11


def _mask():
    # second sequence has 2 padded positions
    return torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def _teacher_topk(teacher_logits, k):
    logp = F.log_softmax(teacher_logits.double(), -1)
    vals, ids = logp.topk(k, dim=-1)
    head = torch.logsumexp(vals, -1)
    log_tail = torch.log1p(-head.exp()) if k < teacher_logits.size(-1) else torch.full_like(head, -math.inf)
    return ids, vals.float(), log_tail.float()


def _full_kl(student_logits, teacher_logits, mask, temp):
    p = F.log_softmax(teacher_logits.double() / temp, -1)
    q = F.log_softmax(student_logits.double() / temp, -1)
    kl = (p.exp() * (p - q)).sum(-1)
    m = mask.bool()
    return (kl[m].sum() / m.sum()) * temp**2


# ----------------------------------------------------------------- top-k KD


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_topk_kd_zero_when_equal_full_vocab(tail, temp):
    torch.manual_seed(0)
    z = torch.randn(B, T, V)
    ids, lp, lt = _teacher_topk(z, V)
    loss = L.topk_kd_loss(z, ids, lp, lt, _mask(), temp, tail)
    assert loss.abs().item() < 1e-5


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_topk_kd_matches_full_kl_when_k_equals_v(tail, temp):
    torch.manual_seed(1)
    zt = torch.randn(B, T, V) * 2
    zs = torch.randn(B, T, V, requires_grad=True)
    ids, lp, lt = _teacher_topk(zt, V)
    loss = L.topk_kd_loss(zs, ids, lp, lt, _mask(), temp, tail)
    ref = _full_kl(zs, zt, _mask(), temp)
    assert loss.item() > 0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    (g,) = torch.autograd.grad(loss, zs)
    (g_ref,) = torch.autograd.grad(ref, zs)
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-6)


def test_topk_kd_t2_scaling():
    torch.manual_seed(2)
    zt, zs = torch.randn(B, T, V), torch.randn(B, T, V)
    ids, lp, lt = _teacher_topk(zt, V)
    for temp in (1.0, 2.0, 3.0):
        loss = L.topk_kd_loss(zs, ids, lp, lt, _mask(), temp, "renorm")
        unscaled = _full_kl(zs, zt, _mask(), temp) / temp**2
        assert loss.item() == pytest.approx(temp**2 * unscaled.item(), rel=1e-4)


def test_topk_kd_gradient_finite_difference():
    torch.manual_seed(3)
    zt = torch.randn(B, T, V)
    zs = torch.randn(B, T, V)
    ids, lp, lt = _teacher_topk(zt, 4)
    mask = _mask()
    for tail in ("renorm", "bucket"):
        x = zs.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(L.topk_kd_loss(x, ids, lp, lt, mask, 2.0, tail), x)
        eps = 1e-2
        for idx in [(0, 0, 0), (0, 2, int(ids[0, 2, 0])), (1, 1, 5), (1, 2, int(ids[1, 2, 3]))]:
            zp, zm = zs.clone(), zs.clone()
            zp[idx] += eps
            zm[idx] -= eps
            fd = (
                L.topk_kd_loss(zp, ids, lp, lt, mask, 2.0, tail) - L.topk_kd_loss(zm, ids, lp, lt, mask, 2.0, tail)
            ) / (2 * eps)
            assert g[idx].item() == pytest.approx(fd.item(), abs=2e-3), (tail, idx)


def test_renorm_vs_bucket_with_truncation():
    torch.manual_seed(4)
    zt = torch.randn(B, T, V) * 2
    ids, lp, lt = _teacher_topk(zt, 3)
    mask = _mask()
    # Student == teacher: the bucket view is exact at T = 1 (tails agree) ...
    assert L.topk_kd_loss(zt, ids, lp, lt, mask, 1.0, "bucket").item() < 1e-5
    # ... but renorm still wants the student to move its tail mass into the top-k.
    assert L.topk_kd_loss(zt, ids, lp, lt, mask, 1.0, "renorm").item() > 1e-2
    # Bucket is a coarse-graining of the full KL: never larger at T = 1.
    zs = torch.randn(B, T, V)
    bucket = L.topk_kd_loss(zs, ids, lp, lt, mask, 1.0, "bucket")
    assert 0 < bucket.item() <= _full_kl(zs, zt, mask, 1.0).item() + 1e-6
    # Renorm is minimised (0) by the student that is the renormalised top-k teacher.
    zr = torch.full((B, T, V), -1e4)
    zr.scatter_(-1, ids, lp)
    assert L.topk_kd_loss(zr, ids, lp, lt, mask, 1.0, "renorm").item() < 1e-5
    # At T != 1 the bucket approximation is finite and positive for a different student.
    assert L.topk_kd_loss(zs, ids, lp, lt, mask, 2.0, "bucket").item() > 0


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_topk_kd_padding_is_ignored(tail):
    torch.manual_seed(5)
    zt, zs = torch.randn(B, T, V), torch.randn(B, T, V)
    ids, lp, lt = _teacher_topk(zt, 4)
    mask = _mask()
    x = zs.clone().requires_grad_(True)
    base = L.topk_kd_loss(x, ids, lp, lt, mask, 2.0, tail)
    (g,) = torch.autograd.grad(base, x)
    pad = ~mask.bool()
    zs2, ids2, lp2, lt2 = zs.clone(), ids.clone(), lp.clone(), lt.clone()
    zs2[pad] = 1e3
    ids2[pad] = -1
    lp2[pad] = float("nan")
    lt2[pad] = float("inf")
    x2 = zs2.clone().requires_grad_(True)
    other = L.topk_kd_loss(x2, ids2, lp2, lt2, mask, 2.0, tail)
    (g2,) = torch.autograd.grad(other, x2)
    assert other.item() == pytest.approx(base.item(), rel=1e-6)
    assert torch.isfinite(g2).all()
    assert g2[pad].abs().max().item() == 0.0
    torch.testing.assert_close(g2[~pad], g[~pad])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_under_low_precision_autocast(dtype):
    torch.manual_seed(6)
    zt, zs = torch.randn(B, T, V) * 3, torch.randn(B, T, V) * 3
    ids, lp, lt = _teacher_topk(zt, 4)
    sid = torch.randint(0, V, (B, T, 3))
    sw = torch.full((B, T, 3), 1 / 3)
    h = torch.randn(B, T, 8)
    fns = {
        "kd": lambda z: L.topk_kd_loss(z, ids, lp, lt, _mask(), 2.0, "bucket"),
        "rskd": lambda z: L.sampled_kd_loss(z, sid, sw, _mask()),
        "clm": lambda z: L.causal_lm_loss(z, sid[..., 0], _mask()),
        "mse": lambda z: L.hidden_mse_loss(z[..., :8], h, _mask()),
    }
    for name, fn in fns.items():
        ref = fn(zs)
        low = zs.to(dtype)
        with torch.autocast("cpu", dtype=dtype):
            lo = fn(low)
        assert lo.dtype == torch.float32, name
        # only the input rounding differs: all arithmetic is float32
        assert lo.item() == pytest.approx(fn(low.float()).item(), rel=1e-5), name
        assert lo.item() == pytest.approx(ref.item(), rel=5e-2), name


def test_topk_kd_bad_args():
    z = torch.randn(1, 2, V)
    ids, lp, lt = _teacher_topk(z, 3)
    with pytest.raises(ValueError):
        L.topk_kd_loss(z, ids, lp, lt, torch.ones(1, 2), 1.0, "nope")
    with pytest.raises(ValueError):
        L.topk_kd_loss(z, ids, lp, None, torch.ones(1, 2), 1.0, "bucket")


# ----------------------------------------------------------------- RS-KD


def test_sampled_kd_gradient_unbiased():
    """Mean over RS-KD draws of ∇L ≈ exact ∇CE(p, q) (= ∇KL)."""
    torch.manual_seed(7)
    Vs, n, draws = 8, 4, 4000
    zt = torch.randn(Vs) * 1.5
    p = F.softmax(zt, -1)
    z = torch.randn(Vs, requires_grad=True)
    # Each "token" of a [draws, 1] batch is one independent RS-KD draw of n ids from p,
    # sharing the same student logits, so the batch-mean gradient is the draw-mean.
    ids = torch.multinomial(p.expand(draws, Vs), n, replacement=True).view(draws, 1, n)
    w = torch.full((draws, 1, n), 1.0 / n)
    logits = z.view(1, 1, Vs).expand(draws, 1, Vs)
    loss = L.sampled_kd_loss(logits, ids, w, torch.ones(draws, 1))
    (g,) = torch.autograd.grad(loss, z)
    exact = F.softmax(z.detach(), -1) - p  # ∇_z CE(p, softmax(z))
    # per-draw gradient std is <= ~1/sqrt(n); 4000 draws -> ~0.008; allow 5 sigma
    assert (g - exact).abs().max().item() < 0.04
    # and a single draw is clearly not the exact gradient (so the test has teeth)
    (g1,) = torch.autograd.grad(L.sampled_kd_loss(logits[:1], ids[:1], w[:1], torch.ones(1, 1)), z)
    assert (g1 - exact).abs().max().item() > 0.04


def test_sampled_kd_padding_and_weights():
    torch.manual_seed(8)
    z = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T, 4))
    w = torch.full((B, T, 4), 0.25)
    mask = _mask()
    base = L.sampled_kd_loss(z, ids, w, mask)
    # reference: explicit CE
    lq = F.log_softmax(z, -1).gather(-1, ids)
    ref = -(w * lq).sum(-1)[mask.bool()].mean()
    assert base.item() == pytest.approx(ref.item(), rel=1e-5)
    # padded tokens and pad slots (id -1 or weight 0) change nothing
    ids2, w2 = ids.clone(), w.clone()
    ids2[~mask.bool()] = -1
    w2[~mask.bool()] = float("nan")
    ids3 = torch.cat([ids2, torch.full((B, T, 2), -1)], -1)
    w3 = torch.cat([w2, torch.full((B, T, 2), 7.0)], -1)
    assert L.sampled_kd_loss(z, ids3, w3, mask).item() == pytest.approx(base.item(), rel=1e-6)
    ids4 = torch.cat([ids, torch.randint(0, V, (B, T, 1))], -1)
    w4 = torch.cat([w, torch.zeros(B, T, 1)], -1)
    assert L.sampled_kd_loss(z, ids4, w4, mask).item() == pytest.approx(base.item(), rel=1e-6)


# ----------------------------------------------------------------- hard labels


def test_mlm_loss_matches_reference():
    torch.manual_seed(9)
    z = torch.randn(B, T, V)
    pos = torch.tensor([[0, 3, -1], [1, -1, -1]])
    lab = torch.tensor([[4, 7, 0], [2, 0, 0]])
    ref = F.cross_entropy(torch.stack([z[0, 0], z[0, 3], z[1, 1]]), torch.tensor([4, 7, 2]))
    assert L.mlm_loss(z, pos, lab).item() == pytest.approx(ref.item(), rel=1e-5)
    lab2 = lab.clone()
    lab2[0, 1] = -100  # ignore_index also skips
    ref2 = F.cross_entropy(torch.stack([z[0, 0], z[1, 1]]), torch.tensor([4, 2]))
    assert L.mlm_loss(z, pos, lab2).item() == pytest.approx(ref2.item(), rel=1e-5)


def test_causal_lm_loss_matches_reference_and_padding():
    torch.manual_seed(10)
    z = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    mask = _mask()
    ref_terms = [
        F.cross_entropy(z[0, :-1], ids[0, 1:], reduction="sum"),
        F.cross_entropy(z[1, :2], ids[1, 1:3], reduction="sum"),
    ]
    ref = sum(ref_terms) / (4 + 2)
    assert L.causal_lm_loss(z, ids, mask).item() == pytest.approx(ref.item(), rel=1e-5)
    # left padding: the pad slot does not predict the first real token
    lmask = torch.tensor([[0, 0, 1, 1, 1]])
    ref_l = F.cross_entropy(z[0, 2:4], ids[0, 3:5])
    assert L.causal_lm_loss(z[:1], ids[:1], lmask).item() == pytest.approx(ref_l.item(), rel=1e-5)


def test_soft_ce_and_hard_ce():
    torch.manual_seed(11)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    ref = -(F.softmax(t, -1) * F.log_softmax(s, -1)).sum(-1).mean()
    assert L.soft_cross_entropy(s, t, 1.0).item() == pytest.approx(ref.item(), rel=1e-6)
    # minimised at s == t: gradient zero there
    x = t.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(L.soft_cross_entropy(x, t, 2.0), x)
    assert g.abs().max().item() < 1e-6
    y = torch.tensor([0, 2, 1, -100])
    assert L.hard_ce(s, y).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert L.hard_ce(s, torch.full((4,), -100)).item() == 0.0


# ----------------------------------------------------------------- intermediate layers


def test_cosine_and_mse_zero_on_identical_and_masked():
    torch.manual_seed(12)
    h = torch.randn(B, T, 8)
    mask = _mask()
    assert L.cosine_hidden_loss(h, h.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    assert L.hidden_mse_loss(h, h.clone(), mask).item() == 0.0
    assert L.embedding_mse_loss(h, h.clone(), mask).item() == 0.0
    t = h.clone()
    t[~mask.bool()] = float("nan")  # garbage in padded teacher slots
    hs = h.clone()
    hs[~mask.bool()] = 5.0
    assert L.cosine_hidden_loss(hs, t, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert L.hidden_mse_loss(hs, t, mask).item() == 0.0
    assert L.cosine_hidden_loss(-h, h, mask).item() == pytest.approx(2.0, abs=1e-5)
    ref = ((h - 2 * h) ** 2).mean(-1)[mask.bool()].mean()
    assert L.hidden_mse_loss(h, 2 * h, mask).item() == pytest.approx(ref.item(), rel=1e-5)


def test_width_mismatch_and_projection():
    torch.manual_seed(13)
    s, t = torch.randn(B, T, 6), torch.randn(B, T, 8)
    mask = _mask()
    with pytest.raises(ValueError, match="projection"):
        L.cosine_hidden_loss(s, t, mask)
    with pytest.raises(ValueError, match="projection"):
        L.hidden_mse_loss(s, t, mask)
    proj = L.HiddenProjection(6, 8)
    loss = L.hidden_mse_loss(s, t, mask, proj)
    loss.backward()
    assert proj.maps[0].weight.grad is not None
    per = L.HiddenProjection(6, 8, num_maps=3)
    assert per(s, index=2).shape == (B, T, 8)
    assert not torch.equal(per(s, index=0), per(s, index=1))


def _attn(heads, seed):
    g = torch.Generator().manual_seed(seed)
    return F.softmax(torch.randn(B, heads, T, T, generator=g), -1)


@pytest.mark.parametrize("kind", ["probs", "kl"])
def test_attention_loss(kind):
    a = _attn(4, 0)
    mask = _mask()
    assert L.attention_mse_loss(a, a.clone(), mask, kind).item() == pytest.approx(0.0, abs=1e-6)
    b = _attn(4, 1)
    base = L.attention_mse_loss(a, b, mask, kind)
    assert base.item() > 0
    # padded queries and keys of sequence 1 are excluded
    a2, b2 = a.clone(), b.clone()
    a2[1, :, 3:, :] = 0.7
    a2[1, :, :, 3:] = 0.3
    b2[1, :, 3:, :] = float("nan")
    b2[1, :, :, 3:] = float("nan")
    assert L.attention_mse_loss(a2, b2, mask, kind).item() == pytest.approx(base.item(), rel=1e-6)
    with pytest.raises(ValueError, match="heads"):
        L.attention_mse_loss(_attn(2, 0), b, mask, kind)
    avg = L.attention_mse_loss(_attn(2, 0), b, mask, kind, average_heads=True)
    assert torch.isfinite(avg)
    if kind == "probs":
        m = mask.bool()
        pair = (m[:, None, :, None] & m[:, None, None, :]).expand_as(a)
        ref = ((a - b) ** 2)[pair].mean()
        assert base.item() == pytest.approx(ref.item(), rel=1e-5)


# ----------------------------------------------------------------- layer maps


def test_uniform_layer_map():
    assert L.uniform_layer_map(2, 4) == [(0, 0), (1, 2), (2, 4)]
    assert L.uniform_layer_map(3, 6) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    assert L.uniform_layer_map(4, 12) == [(0, 0), (1, 3), (2, 6), (3, 9), (4, 12)]
    with pytest.raises(ValueError):
        L.uniform_layer_map(5, 4)
    with pytest.raises(ValueError):
        L.uniform_layer_map(0, 4)


def test_parse_layer_map():
    assert L.parse_layer_map("0:0,1:2,2:4") == [(0, 0), (1, 2), (2, 4)]
    assert L.parse_layer_map(" 0:0, 2:12 ", n_student=2, n_teacher=12) == [(0, 0), (2, 12)]
    for bad in ("0-0", "a:b", "", "0:0,0:1", "-1:0"):
        with pytest.raises(ValueError):
            L.parse_layer_map(bad)
    with pytest.raises(ValueError, match="out of range"):
        L.parse_layer_map("0:0,3:4", n_student=2, n_teacher=4)
    with pytest.raises(ValueError, match="out of range"):
        L.parse_layer_map("1:5", n_student=2, n_teacher=4)


# ----------------------------------------------------------------- composite


def test_required_columns_presets():
    assert terms.required_columns(presets.preset("distilbert")) == {
        "input_ids", "topk_ids", "topk_logprobs", "topk_log_tail", "mlm_positions", "mlm_labels", "hidden_12",
    }
    assert terms.required_columns(presets.distilbert(kd_tail="renorm")) == {
        "input_ids", "topk_ids", "topk_logprobs", "mlm_positions", "mlm_labels", "hidden_12",
    }
    assert terms.required_columns(presets.preset("tinybert-general", n_student=2, n_teacher=4)) == {
        "input_ids", "hidden_0", "hidden_2", "hidden_4", "attention_2", "attention_4",
    }
    assert terms.required_columns(presets.preset("tinybert-task")) == {"input_ids", "task_logits"}
    assert "attention_12" in terms.required_columns(presets.tinybert_task(4, 12, stage="intermediate"))
    assert terms.required_columns(presets.preset("lm", n_student=2, n_teacher=4)) == {
        "input_ids", "topk_ids", "topk_logprobs", "topk_log_tail", "hidden_4",
    }
    assert terms.required_columns(presets.lm(2, 4, kd="sampled")) == {
        "input_ids", "sample_ids", "sample_weights", "hidden_4",
    }
    spec = presets.distilbert()
    spec.weights["cos"] = 0.0  # disabled losses need no columns
    assert "hidden_12" not in terms.required_columns(spec)
    with pytest.raises(ValueError):
        terms.LossSpec(weights={"bogus": 1.0})
    with pytest.raises(ValueError, match="layer_map"):
        terms.required_columns(terms.LossSpec(weights={"hidden": 1.0}))
    with pytest.raises(ValueError):
        presets.preset("nope")
    assert presets.lm(2, 4, kd="sampled").temperature == 1.0 and presets.lm(2, 4).temperature == 2.0
    with pytest.raises(ValueError, match="temperature 1.0"):
        terms.CompositeLoss(presets.lm(2, 4, kd="sampled", temperature=2.0))


def _bert_outputs(hidden=16, layers=2, heads=2, seed=0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=V, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=32, max_position_embeddings=16, attn_implementation="eager",
    )
    model = BertForMaskedLM(cfg).eval()
    ids = torch.randint(0, V, (B, T))
    out = model(input_ids=ids, attention_mask=_mask(), output_hidden_states=True, output_attentions=True)
    return model, ids, out


def test_composite_weights_and_parts():
    _, ids, out = _bert_outputs()
    torch.manual_seed(14)
    mask = _mask()
    tl, _, _ = _bert_outputs(seed=1)
    t_out = tl(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    topk_ids, lp, lt = _teacher_topk(t_out.logits.detach(), 4)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "topk_ids": topk_ids,
        "topk_logprobs": lp,
        "topk_log_tail": lt,
        "mlm_positions": torch.tensor([[1, 3], [0, -1]]),
        "mlm_labels": torch.tensor([[2, 5], [1, 0]]),
        "hidden_2": t_out.hidden_states[2].detach(),
        "hidden_0": t_out.hidden_states[0].detach(),
        "hidden_1": t_out.hidden_states[1].detach(),
        "attention_1": t_out.attentions[0].detach(),
        "attention_2": t_out.attentions[1].detach(),
    }
    spec = presets.distilbert(n_student=2, n_teacher=2)
    comp = terms.CompositeLoss(spec)
    total, parts = comp(out, batch)
    assert set(parts) == {"kd", "mlm", "cos"}
    expect = 5.0 * parts["kd"] + 2.0 * parts["mlm"] + 1.0 * parts["cos"]
    assert total.item() == pytest.approx(expect.item(), rel=1e-6)
    assert parts["kd"].item() == pytest.approx(
        L.topk_kd_loss(out.logits, topk_ids, lp, lt, mask, 2.0, "bucket").item(), rel=1e-6
    )
    assert not parts["kd"].requires_grad and total.requires_grad

    gen = terms.CompositeLoss(presets.tinybert_general(2, 2))
    total_g, parts_g = gen.compute(out, batch)
    assert set(parts_g) == {"emb", "hidden", "attn"}
    assert total_g.item() == pytest.approx(sum(v.item() for v in parts_g.values()), rel=1e-6)
    # a student that is the teacher scores zero on every intermediate loss
    _, parts_self = gen.compute(t_out, batch)
    assert all(v.item() < 1e-8 for v in parts_self.values())


def test_composite_projection_for_narrow_student():
    _, ids, out = _bert_outputs(hidden=8, layers=2, heads=2)
    tl, _, _ = _bert_outputs(hidden=16, layers=4, heads=2, seed=1)
    t_out = tl(input_ids=ids, attention_mask=_mask(), output_hidden_states=True, output_attentions=True)
    spec = presets.tinybert_general(2, 4)
    batch = {"input_ids": ids, "attention_mask": _mask()}
    for c in terms.required_columns(spec) - {"input_ids"}:
        kind, l = c.rsplit("_", 1)
        src = t_out.hidden_states if kind == "hidden" else t_out.attentions
        batch[c] = src[int(l) - (kind == "attention")].detach()
    comp = terms.CompositeLoss(spec, student_hidden_size=8, teacher_hidden_size=16)
    assert comp.proj is not None and len(list(comp.parameters())) == 2
    total, _ = comp(out, batch)
    total.backward()
    assert comp.proj.maps[0].weight.grad is not None
    per = terms.CompositeLoss(
        terms.LossSpec(weights={"emb": 1, "hidden": 1}, layer_map=spec.layer_map, per_layer_projection=True), 8, 16
    )
    assert len(per.proj.maps) == 3
    with pytest.raises(ValueError, match="projection"):
        terms.CompositeLoss(presets.tinybert_general(2, 4)).compute(out, batch)


def test_composite_task_and_plain_dict_outputs():
    # A non-transformer student: any mapping with the right tensors works.
    torch.manual_seed(15)
    logits = torch.randn(4, 3, requires_grad=True)
    batch = {"attention_mask": torch.ones(4, 1), "task_logits": torch.randn(4, 3), "label": torch.tensor([0, 1, 2, 1])}
    comp = terms.CompositeLoss(terms.LossSpec(weights={"pred": 0.5, "ce": 0.25}))
    total, parts = comp({"logits": logits}, batch)
    assert total.item() == pytest.approx(0.5 * parts["pred"].item() + 0.25 * parts["ce"].item(), rel=1e-6)
    with pytest.raises(KeyError, match="hidden_states"):
        terms.CompositeLoss(terms.LossSpec(weights={"cos": 1.0}, cos_layer=(1, 1))).compute(
            {"logits": logits}, {"attention_mask": torch.ones(4, 1), "hidden_1": torch.randn(4, 1, 2)}
        )


# ----------------------------------------------------------------- the term registry


def test_every_term_is_declared_in_the_registry():
    assert set(terms.TERMS) == {"kd", "rskd", "mlm", "clm", "cos", "emb", "hidden", "attn", "pred", "ce", "logit_mse", "fmt",
                                  "fmt_mean", "fmt_var", "at"}
    for name, term in terms.TERMS.items():
        assert term.name == name and term.about
        assert set(term.outputs) <= {"logits", "hidden_states", "attentions"}
    assert [n for n, t in terms.TERMS.items() if t.token_kd] == ["kd", "rskd"]
    assert [n for n, t in terms.TERMS.items() if t.projected] == ["emb", "hidden"]
    spec = presets.tinybert_general(2, 4)
    assert terms.TERMS["attn"].layers(spec) == [("attention", 1, 2), ("attention", 2, 4)]
    assert terms.TERMS["emb"].layers(spec) == [("hidden", 0, 0)]


def test_a_new_term_is_one_registered_class():
    """Registered once, a term is known to LossSpec, required_columns and CompositeLoss."""

    @terms.register
    class LogitNorm(terms.Term):
        name, about = "logit_norm", "mean squared student logit, against a cached scale"

        def columns(self, spec):
            return {"logit_scale"}

        def compute(self, spec, outputs, batch, mask, proj):
            return (outputs["logits"].float().pow(2).mean(-1) * batch["logit_scale"]).mean()

    try:
        spec = terms.LossSpec(weights={"logit_norm": 2.0, "ce": 1.0})
        assert terms.required_columns(spec) == {"input_ids", "logit_scale", "label"}
        logits = torch.randn(4, 3)
        batch = {"attention_mask": torch.ones(4, 1), "logit_scale": torch.ones(4), "label": torch.tensor([0, 1, 2, 1])}
        total, parts = terms.CompositeLoss(spec)({"logits": logits}, batch)
        assert list(parts) == ["logit_norm", "ce"]
        assert parts["logit_norm"].item() == pytest.approx(logits.pow(2).mean().item(), rel=1e-6)
        assert total.item() == pytest.approx(2 * parts["logit_norm"].item() + parts["ce"].item(), rel=1e-6)
    finally:
        del terms.TERMS["logit_norm"]
    with pytest.raises(ValueError, match="unknown loss names"):
        terms.LossSpec(weights={"logit_norm": 1.0})
