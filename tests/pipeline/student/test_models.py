"""Tests for kdcache.pipeline.student.models: tiny teachers built from configs, written to tmp dirs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kdcache.pipeline.student.models import STUDENT_META, init_student_from_teacher, load_student

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 100
BERT_KW = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=32)
LLAMA_KW = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _write_bert_tokenizer(folder):
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"tok{i}" for i in range(VOCAB - 5)]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))


def _save(model, folder, tokenizer=True):
    model.save_pretrained(str(folder))
    if tokenizer:
        _write_bert_tokenizer(folder)
    return folder


def _teacher(kind, tmp_path, **extra):
    import transformers as tf

    torch.manual_seed(123)
    if kind in ("BertForMaskedLM", "BertModel", "BertForSequenceClassification"):
        cfg = tf.BertConfig(**BERT_KW, **extra)
    elif kind == "LlamaForCausalLM":
        cfg = tf.LlamaConfig(**{**LLAMA_KW, **extra})
    elif kind == "GPT2LMHeadModel":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=32,
                            bos_token_id=1, eos_token_id=2, **extra)
    model = getattr(tf, kind)(cfg).eval()
    return model, _save(model, tmp_path / "teacher", tokenizer=kind.startswith("Bert"))


def _sd(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


def _assert_block_equal(s_sd, t_sd, s_prefix, t_prefix):
    keys = [k for k in s_sd if k.startswith(s_prefix)]
    assert keys
    for k in keys:
        torch.testing.assert_close(s_sd[k], t_sd[t_prefix + k[len(s_prefix):]], rtol=0, atol=0)


# --------------------------------------------------------------------- BERT


def test_bert_mlm_default_every_other_layer(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    teacher, tdir = _teacher("BertForMaskedLM", tmp_path)
    out = tmp_path / "student"
    rec = init_student_from_teacher(tdir, out)
    assert rec["teacher_layers"] == [0, 2] and rec["mode"] == "copy"
    assert rec["hidden_layer_map"] == [[0, 0], [1, 1], [2, 3]]
    assert json.loads((out / STUDENT_META).read_text())["teacher_layers"] == [0, 2]
    assert (out / "model.safetensors").exists() and (out / "vocab.txt").exists()

    student, info = AutoModelForMaskedLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert student.config.num_hidden_layers == 2 and student.config.type_vocab_size == 1
    s, t = _sd(student), _sd(teacher)
    for i, j in enumerate([0, 2]):
        _assert_block_equal(s, t, f"bert.encoder.layer.{i}.", f"bert.encoder.layer.{j}.")
    for k in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
              "bert.embeddings.LayerNorm.weight", "cls.predictions.transform.dense.weight",
              "cls.predictions.bias"):
        torch.testing.assert_close(s[k], t[k], rtol=0, atol=0)
    torch.testing.assert_close(s["bert.embeddings.token_type_embeddings.weight"],
                               t["bert.embeddings.token_type_embeddings.weight"][:1], rtol=0, atol=0)
    # the copied tokenizer no longer emits token_type_ids (only one segment row left)
    tok = AutoTokenizer.from_pretrained(str(out))
    enc = tok("tok1 tok2", "tok3")
    assert "token_type_ids" not in enc


def test_bert_all_layers_kept_matches_teacher(tmp_path):
    teacher, tdir = _teacher("BertForMaskedLM", tmp_path)
    init_student_from_teacher(tdir, tmp_path / "s", layers=[0, 1, 2, 3])
    student = load_student(tmp_path / "s")
    ids = torch.randint(5, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids, attention_mask=mask).logits,
                                   teacher(input_ids=ids, attention_mask=mask).logits)


def test_bert_explicit_layers_and_num_layers(tmp_path):
    teacher, tdir = _teacher("BertForMaskedLM", tmp_path)
    rec = init_student_from_teacher(tdir, tmp_path / "a", layers=[1, 3])
    s = _sd(load_student(tmp_path / "a"))
    _assert_block_equal(s, _sd(teacher), "bert.encoder.layer.1.", "bert.encoder.layer.3.")
    assert rec["hidden_layer_map"] == [[0, 0], [1, 2], [2, 4]]
    rec = init_student_from_teacher(tdir, tmp_path / "b", num_layers=3)
    assert rec["teacher_layers"] == [0, 2, 3]  # spread, first and last included


def test_bert_model_drops_pooler(tmp_path):
    from transformers import AutoModel

    teacher, tdir = _teacher("BertModel", tmp_path)
    assert teacher.pooler is not None
    rec = init_student_from_teacher(tdir, tmp_path / "s")
    assert "pooler.dense.weight" in rec["dropped_teacher_weights"]
    assert rec["init_kwargs"] == {"add_pooling_layer": False}
    student = load_student(tmp_path / "s", output_hidden_states=True)
    assert student.pooler is None and student.config.type_vocab_size == 1
    out = student(input_ids=torch.randint(5, VOCAB, (1, 6)))
    assert len(out.hidden_states) == 3
    # plain AutoModel also loads it (with a fresh pooler, as for any pooler-less checkpoint)
    assert AutoModel.from_pretrained(str(tmp_path / "s")).config.num_hidden_layers == 2


def test_bert_classifier_keeps_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    teacher, tdir = _teacher("BertForSequenceClassification", tmp_path, num_labels=3)
    init_student_from_teacher(tdir, tmp_path / "s")
    student, info = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "s"), output_loading_info=True)
    assert not info["missing_keys"]
    s, t = _sd(student), _sd(teacher)
    for k in ("classifier.weight", "classifier.bias", "bert.pooler.dense.weight"):
        torch.testing.assert_close(s[k], t[k], rtol=0, atol=0)
    assert student.config.num_labels == 3


def test_load_student_attentions_eager_no_dropout(tmp_path):
    _, tdir = _teacher("BertForMaskedLM", tmp_path)
    init_student_from_teacher(tdir, tmp_path / "s")
    student = load_student(tmp_path / "s", output_hidden_states=True, output_attentions=True)
    assert student.config._attn_implementation == "eager"
    assert student.config.attention_probs_dropout_prob == 0.0
    student.train()
    ids = torch.randint(5, VOCAB, (2, 6))
    out = student(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 6, 6)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 6))  # no dropout holes
    assert len(out.hidden_states) == 3


# --------------------------------------------------------------------- safety / errors


def test_pickle_refused_unless_allowed(tmp_path):
    teacher, _ = _teacher("BertForMaskedLM", tmp_path)
    pdir = tmp_path / "pickled"
    pdir.mkdir()
    teacher.config.save_pretrained(str(pdir))
    torch.save(teacher.state_dict(), pdir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle"):
        init_student_from_teacher(pdir, tmp_path / "s")
    rec = init_student_from_teacher(pdir, tmp_path / "s", allow_pickle=True)
    assert rec["weights_source"] == "pickle"
    _assert_block_equal(_sd(load_student(tmp_path / "s")), _sd(teacher),
                        "bert.encoder.layer.1.", "bert.encoder.layer.2.")


def test_out_of_range_layers(tmp_path):
    _, tdir = _teacher("BertForMaskedLM", tmp_path)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        init_student_from_teacher(tdir, tmp_path / "s", layers=[0, 4])
    with pytest.raises(ValueError, match=r"0\.\.3"):
        init_student_from_teacher(tdir, tmp_path / "s", layers=[-1, 2])
    with pytest.raises(ValueError, match=r"1\.\.4"):
        init_student_from_teacher(tdir, tmp_path / "s", num_layers=5)
    with pytest.raises(ValueError, match="increasing"):
        init_student_from_teacher(tdir, tmp_path / "s", layers=[2, 0])
    with pytest.raises(ValueError, match="num_layers"):
        init_student_from_teacher(tdir, tmp_path / "s", hidden_size=16, layers=[0, 2])


# --------------------------------------------------------------------- TinyBERT style


def test_narrow_student_random_init_seeded(tmp_path):
    from transformers import AutoModelForMaskedLM

    teacher, tdir = _teacher("BertForMaskedLM", tmp_path)
    rec = init_student_from_teacher(tdir, tmp_path / "a", hidden_size=16, num_heads=2, num_layers=2, seed=7)
    assert rec["mode"] == "random" and rec["teacher_layers"] is None
    assert rec["hidden_layer_map"] == [[0, 0], [1, 2], [2, 4]]
    a = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "a"))
    assert (a.config.hidden_size, a.config.num_attention_heads, a.config.intermediate_size) == (16, 2, 32)
    init_student_from_teacher(tdir, tmp_path / "b", hidden_size=16, num_heads=2, num_layers=2, seed=7)
    init_student_from_teacher(tdir, tmp_path / "c", hidden_size=16, num_heads=2, num_layers=2, seed=8)
    sa, sb, sc = (_sd(AutoModelForMaskedLM.from_pretrained(str(tmp_path / x))) for x in "abc")
    k = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert not torch.equal(sa[k], sc[k])
    assert (tmp_path / "a" / "vocab.txt").exists()


def test_narrow_llama_fixes_head_dim(tmp_path):
    _, tdir = _teacher("LlamaForCausalLM", tmp_path)
    init_student_from_teacher(tdir, tmp_path / "s", hidden_size=16, num_heads=2)
    student = load_student(tmp_path / "s")
    assert student.config.head_dim == 8 and student.config.num_key_value_heads == 2
    assert student(input_ids=torch.randint(3, VOCAB, (1, 5))).logits.shape == (1, 5, VOCAB)


# --------------------------------------------------------------------- causal LMs


@pytest.mark.parametrize("tied", [False, True])
def test_llama_copy(tmp_path, tied):
    teacher, tdir = _teacher("LlamaForCausalLM", tmp_path, tie_word_embeddings=tied)
    init_student_from_teacher(tdir, tmp_path / "all", layers=[0, 1, 2, 3])
    student = load_student(tmp_path / "all")
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)
    rec = init_student_from_teacher(tdir, tmp_path / "two", layers=[1, 3])
    assert rec["newly_initialized"] == []
    s, t = _sd(load_student(tmp_path / "two")), _sd(teacher)
    _assert_block_equal(s, t, "model.layers.0.", "model.layers.1.")
    _assert_block_equal(s, t, "model.layers.1.", "model.layers.3.")
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(s[k], t[k], rtol=0, atol=0)


def test_gpt2_copy(tmp_path):
    from transformers import AutoModelForCausalLM

    teacher, tdir = _teacher("GPT2LMHeadModel", tmp_path)
    init_student_from_teacher(tdir, tmp_path / "all", layers=[0, 1, 2, 3])
    student = AutoModelForCausalLM.from_pretrained(str(tmp_path / "all"))
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)
    init_student_from_teacher(tdir, tmp_path / "two")
    s, t = _sd(load_student(tmp_path / "two")), _sd(teacher)
    _assert_block_equal(s, t, "transformer.h.1.", "transformer.h.2.")
    for k in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"):
        torch.testing.assert_close(s[k], t[k], rtol=0, atol=0)


def test_legacy_key_names_and_missing_base_prefix(tmp_path):
    """Old BERT checkpoints: LayerNorm.gamma/beta and encoder keys without 'bert.'."""
    from safetensors.torch import load_file, save_file

    teacher, tdir = _teacher("BertForMaskedLM", tmp_path)
    sd = load_file(str(tdir / "model.safetensors"))
    old = {}
    for k, v in sd.items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        old[k[len("bert."):] if k.startswith("bert.") else k] = v
    save_file(old, str(tdir / "model.safetensors"))
    rec = init_student_from_teacher(tdir, tmp_path / "s", layers=[1, 2])
    assert rec["newly_initialized"] == []
    s, t = _sd(load_student(tmp_path / "s")), _sd(teacher)
    _assert_block_equal(s, t, "bert.encoder.layer.0.", "bert.encoder.layer.1.")
    torch.testing.assert_close(s["bert.embeddings.LayerNorm.weight"], t["bert.embeddings.LayerNorm.weight"])


def test_refuses_to_overwrite_teacher(tmp_path):
    _, tdir = _teacher("BertForMaskedLM", tmp_path)
    with pytest.raises(ValueError, match="overwrite"):
        init_student_from_teacher(tdir, tdir)


def test_record_feeds_loss_spec(tmp_path):
    from kdcache.pipeline.student.terms import LossSpec, required_columns

    _, tdir = _teacher("BertForMaskedLM", tmp_path)
    rec = init_student_from_teacher(tdir, tmp_path / "s", layers=[1, 3])
    spec = LossSpec(weights={"hidden": 1.0, "attn": 1.0}, layer_map=rec["hidden_layer_map"])
    assert required_columns(spec) == {"input_ids", "hidden_2", "hidden_4", "attention_2", "attention_4"}


def test_checkpoint_missing_block_weights_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    _, tdir = _teacher("BertForMaskedLM", tmp_path)
    sd = load_file(str(tdir / "model.safetensors"))
    del sd["bert.encoder.layer.2.output.dense.weight"]
    save_file(sd, str(tdir / "model.safetensors"))
    with pytest.raises(ValueError, match="no weights"):
        init_student_from_teacher(tdir, tmp_path / "s", layers=[0, 2])


def test_pca_embedding_init_projects_every_table_with_one_basis(tmp_path):
    from transformers import AutoModel

    teacher, tdir = _teacher("BertModel", tmp_path)
    rec = init_student_from_teacher(tdir, tmp_path / "s", hidden_size=16, num_heads=2, num_layers=2,
                                    embedding_init="pca")
    assert rec["embedding_init"] == "pca" and "word_embeddings" in rec["newly_initialized"][0]
    s = AutoModel.from_pretrained(str(tmp_path / "s")).embeddings
    t = teacher.embeddings
    tok_t, tok_s = t.word_embeddings.weight.detach(), s.word_embeddings.weight.detach()
    # One linear map P (32 -> 16) explains the token table exactly and is orthonormal ...
    proj = torch.linalg.lstsq(tok_t, tok_s).solution
    torch.testing.assert_close(tok_t @ proj, tok_s, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(proj.T @ proj, torch.eye(16), atol=1e-4, rtol=1e-4)
    # ... the same P maps the position table, and it keeps the most variance any 16 directions can.
    torch.testing.assert_close(t.position_embeddings.weight.detach() @ proj, s.position_embeddings.weight.detach(),
                               atol=1e-4, rtol=1e-4)
    centred = tok_t - tok_t.mean(0)
    kept = (centred @ proj).pow(2).sum() / centred.pow(2).sum()
    best = torch.linalg.svdvals(centred)[:16].pow(2).sum() / centred.pow(2).sum()
    assert abs(float(kept - best)) < 1e-4
    with pytest.raises(ValueError, match="embedding_init"):
        init_student_from_teacher(tdir, tmp_path / "x", hidden_size=16, num_heads=2, embedding_init="glove")


def test_classification_head_on_an_encoder_student(tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification

    from kdcache.pipeline.student.models import read_student_meta, with_classification_head

    _, tdir = _teacher("BertModel", tmp_path)
    init_student_from_teacher(tdir, tmp_path / "enc", hidden_size=16, num_heads=2, num_layers=2)
    out = with_classification_head(tmp_path / "enc", tmp_path / "clf", num_labels=3)
    clf = AutoModelForSequenceClassification.from_pretrained(str(out))
    enc = AutoModel.from_pretrained(str(tmp_path / "enc"))
    assert clf.config.num_labels == 3 and clf.classifier.out_features == 3
    for k, v in _sd(enc).items():
        if not k.startswith("pooler"):
            torch.testing.assert_close(_sd(clf.bert)[k], v, rtol=0, atol=0)
    meta = read_student_meta(out)
    assert meta["hidden_layer_map"] == read_student_meta(tmp_path / "enc")["hidden_layer_map"]
    assert "init_kwargs" not in meta  # the encoder's "no pooler" would break the classifier's constructor
    load_student(out, output_hidden_states=True, output_attentions=True)  # what kdcache train does
