"""The vocabulary head only where a loss reads it, chunked or not (kdcache.pipeline.student.head):
the same loss and gradients as the model's own head at every position, on tiny students from config."""
from __future__ import annotations

import pytest
import torch

from kdcache.pipeline.student.head import find_head
from kdcache.pipeline.student.terms import LossSpec
from kdcache.pipeline.student.trainer.adapter import HFStudent
from kdcache.pipeline.student.trainer.step import DistillLoss

V, B, T, K, M = 61, 3, 10, 5, 3


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, max_position_embeddings=32))


def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32,
                                        tie_word_embeddings=tied))


@pytest.fixture(scope="module")
def batch():
    """Cached-looking columns for a padded batch: top-k + tail, RS-KD draws, mask positions."""
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    logp = torch.log_softmax(torch.randn(B, T, V, generator=g) * 2, -1)
    top_lp, top_ids = logp.topk(K, -1)
    tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-6))
    sample_ids = torch.randint(0, V, (B, T, 4), generator=g)
    sample_ids[0, 0, 3] = -1  # an unused slot
    weights = torch.full((B, T, 4), 0.25)
    pos = torch.tensor([[1, 4, 8], [0, 5, -1], [2, -1, -1]])
    labels = torch.randint(0, V, (B, M), generator=g)
    labels[pos < 0] = 0
    ids = torch.randint(0, V, (B, T), generator=g)
    # garbage in padded slots must not matter
    top_lp = torch.where(mask[..., None].bool(), top_lp, torch.full_like(top_lp, float("nan")))
    return {"input_ids": ids, "attention_mask": mask, "topk_ids": top_ids, "topk_logprobs": top_lp,
            "topk_log_tail": tail, "sample_ids": sample_ids, "sample_weights": weights, "mlm_positions": pos,
            "mlm_labels": labels}


def _loss_and_grads(model, spec, batch, kd_positions, head, chunk=0):
    student = HFStudent(model)
    student.capture_head = head
    loss_fn = DistillLoss(spec, None, None, kd_positions, head=head, logit_chunk=chunk)
    model.zero_grad(set_to_none=True)
    out = student(batch["input_ids"], batch["attention_mask"])
    assert (out.logits is None) == head
    total, parts = loss_fn(out, batch)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total.detach(), {k: v.detach() for k, v in parts.items()}, grads


def _assert_same(a, b, rtol=1e-5, atol=1e-7):
    (ta, pa, ga), (tb, pb, gb) = a, b
    torch.testing.assert_close(ta, tb, rtol=rtol, atol=atol)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=rtol, atol=atol)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=rtol, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


CASES = {
    "kd every token + mlm, bucket": ("bert", LossSpec({"kd": 5.0, "mlm": 2.0}, temperature=2.0), "all"),
    "kd masked + mlm, renorm": ("bert", LossSpec({"kd": 1.0, "mlm": 1.0}, temperature=1.5, kd_tail="renorm"),
                                "masked"),
    "mlm alone (CE positions)": ("bert", LossSpec({"mlm": 1.0}), "all"),
    "rskd + clm, tied": ("llama-tied", LossSpec({"rskd": 1.0, "clm": 0.5}), "all"),
    "kd + clm, untied": ("llama", LossSpec({"kd": 1.0, "clm": 1.0}, temperature=2.0), "all"),
}


def _model(kind):
    return _bert() if kind == "bert" else _llama(tied=kind == "llama-tied")


@pytest.mark.parametrize("case", list(CASES))
def test_head_only_where_read_equals_the_full_logits_path(case, batch):
    kind, spec, kd_positions = CASES[case]
    model = _model(kind)
    full = _loss_and_grads(model, spec, batch, kd_positions, head=False)
    assert full[0] > 0 and len(full[2]) > 0
    _assert_same(_loss_and_grads(model, spec, batch, kd_positions, head=True, chunk=-1), full)


@pytest.mark.parametrize("chunk", [1, 4, 7, 9])
@pytest.mark.parametrize("case", ["kd every token + mlm, bucket", "rskd + clm, tied", "kd + clm, untied"])
def test_chunked_equals_unchunked(case, chunk, batch):
    """Chunk sizes that do (1) and do not (4, 7, 9) divide the rows; padding in the batch."""
    kind, spec, kd_positions = CASES[case]
    model = _model(kind)
    one = _loss_and_grads(model, spec, batch, kd_positions, head=True, chunk=-1)
    _assert_same(_loss_and_grads(model, spec, batch, kd_positions, head=True, chunk=chunk), one)


def test_tied_embedding_gets_both_gradients(batch):
    """The tied table's gradient is the lookup's plus the head's, in the chunked path too."""
    model = _llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    spec = LossSpec({"clm": 1.0})
    _, _, grads = _loss_and_grads(model, spec, batch, "all", head=True, chunk=3)
    _, _, full = _loss_and_grads(model, spec, batch, "all", head=False)
    torch.testing.assert_close(grads["model.embed_tokens.weight"], full["model.embed_tokens.weight"],
                               rtol=1e-5, atol=1e-7)
    assert "lm_head.weight" not in grads  # one parameter, one gradient


def test_padding_and_rows_outside_the_losses_do_not_reach_the_head(batch):
    """Rows the losses do not read (padding, unmasked tokens under masked KD) get no gradient."""
    model = _bert()
    student = HFStudent(model)
    student.capture_head = True
    out = student(batch["input_ids"], batch["attention_mask"])
    out.head_input.retain_grad()
    loss_fn = DistillLoss(LossSpec({"kd": 1.0, "mlm": 1.0}), None, None, "masked", head=True, logit_chunk=2)
    loss_fn(out, batch)[0].backward()
    touched = out.head_input.grad.abs().sum(-1) > 0
    expected = torch.zeros(B, T, dtype=torch.bool)
    for b, t in (batch["mlm_positions"] >= 0).nonzero().tolist():
        expected[b, batch["mlm_positions"][b, t]] = True
    assert torch.equal(touched, expected)


def test_find_head():
    from transformers import BertConfig, BertForSequenceClassification, DistilBertConfig, DistilBertForMaskedLM

    bert = _bert()
    assert find_head(bert) is bert.cls
    llama = _llama(tied=False)
    assert find_head(llama) is llama.lm_head
    distil = DistilBertForMaskedLM(DistilBertConfig(vocab_size=V, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    assert find_head(distil) is distil.vocab_projector
    clf = BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32))
    assert find_head(clf) is None


def test_a_batch_without_rows_gives_a_zero_loss_that_backpropagates(batch):
    """MLM alone on a batch whose mask positions are all padding: 0, and backward still works."""
    empty = {**batch, "mlm_positions": torch.full_like(batch["mlm_positions"], -1)}
    total, parts, grads = _loss_and_grads(_bert(), LossSpec({"mlm": 1.0}), empty, "all", head=True)
    assert float(total) == 0.0 and float(parts["mlm"]) == 0.0
    assert all(float(g.abs().sum()) == 0.0 for g in grads.values())


def test_a_trained_student_in_eval_mode_gives_its_logits(batch):
    """The trainer switches capture on; evaluation after training (eval mode) still gets logits."""
    model = _bert()
    student = HFStudent(model)
    student.capture_head = True
    assert student(batch["input_ids"], batch["attention_mask"]).logits is None
    student.eval()
    out = student(batch["input_ids"], batch["attention_mask"])
    assert out.head_input is None and out.logits.shape == (B, T, V)
    torch.testing.assert_close(out.logits, model(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits)


@pytest.mark.parametrize("kind", ["bert", "llama-tied"])
def test_chunked_under_bf16_autocast_matches_one_chunk(kind, batch):
    """The GPU path's dtypes (bf16 autocast, float32 parameters) on CPU: chunked runs and agrees
    with one chunk to bf16 precision."""
    spec = LossSpec({"kd": 1.0, "mlm": 1.0}) if kind == "bert" else LossSpec({"kd": 1.0, "clm": 1.0})
    results = []
    for chunk in (-1, 4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_loss_and_grads(_model(kind), spec, batch, "all", head=True, chunk=chunk))
    (t1, _, g1), (t2, _, g2) = results
    torch.testing.assert_close(t1, t2, rtol=2e-2, atol=1e-3)
    for k in g1:
        assert g1[k].dtype == torch.float32 and torch.isfinite(g2[k]).all(), k
        torch.testing.assert_close(g1[k], g2[k], rtol=5e-2, atol=5e-3, msg=lambda m, k=k: f"{k}: {m}")
