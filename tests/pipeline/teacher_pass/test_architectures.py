"""Teachers as users bring them: the model families of the hub, tiny and built from config (no download).

For each family and each kind it supports, the pass runs with and without attention maps (without them
transformers picks the fused kernel where the family has one), and the cache equals a direct eager forward.
Then the folders that go wrong in practice: a sentence-transformers export whose config names a masked-LM
head its weights lack, a partly missing head, a missing pooler.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdcache.pipeline.common.hf import auto_class
from kdcache.pipeline.teacher_pass.config import CacheConfig, prepare
from kdcache.pipeline.teacher_pass.run import run_cache_pass
from kdcache.pipeline.teacher_pass.teacher import TeacherHeadMissing
from kdcache.storage import CacheReader
from kdcache.storage.verify import verify_cache
from tests.support import byte_level_tokenizer, tiny_corpus, word_tokenizer

H, LAYERS, HEADS, FFN, POSITIONS = 32, 2, 4, 64, 66  # RoBERTa-style position ids start after the pad id


def _families():
    import transformers as T

    enc = dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
               max_position_embeddings=POSITIONS)
    dec = dict(enc, num_key_value_heads=2)
    return {  # name: (config class, config kwargs, model class, tokenizer)
        "bert": (T.BertConfig, enc, T.BertForMaskedLM, "word"),
        "roberta": (T.RobertaConfig, enc, T.RobertaForMaskedLM, "word"),
        "distilbert": (T.DistilBertConfig, dict(dim=H, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
                                                max_position_embeddings=POSITIONS), T.DistilBertForMaskedLM, "word"),
        "albert": (T.AlbertConfig, dict(enc, embedding_size=16), T.AlbertForMaskedLM, "word"),
        "electra": (T.ElectraConfig, dict(enc, embedding_size=16), T.ElectraForMaskedLM, "word"),
        "deberta-v2": (T.DebertaV2Config, enc, T.DebertaV2ForMaskedLM, "word"),
        "mpnet": (T.MPNetConfig, enc, T.MPNetForMaskedLM, "word"),
        "xlm-roberta": (T.XLMRobertaConfig, enc, T.XLMRobertaForMaskedLM, "word"),
        "gpt2": (T.GPT2Config, dict(n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS),
                 T.GPT2LMHeadModel, "byte"),
        "llama": (T.LlamaConfig, dec, T.LlamaForCausalLM, "word"),
        "qwen2": (T.Qwen2Config, dec, T.Qwen2ForCausalLM, "byte"),
        "mistral": (T.MistralConfig, dec, T.MistralForCausalLM, "word"),
        "gemma": (T.GemmaConfig, dict(dec, head_dim=8), T.GemmaForCausalLM, "word"),
        "bert-classifier": (T.BertConfig, dict(enc, num_labels=3), T.BertForSequenceClassification, "word"),
    }


FAMILIES = list(_families())
EXPECTED_KIND = {"gpt2": "causal-lm", "llama": "causal-lm", "qwen2": "causal-lm", "mistral": "causal-lm",
                 "gemma": "causal-lm", "bert-classifier": "classifier"}


def _save(folder, name: str, model_class=None, state_dict_filter=None, architectures=None) -> str:
    config_class, kwargs, default_class, tok_kind = _families()[name]
    tok = word_tokenizer() if tok_kind == "word" else byte_level_tokenizer()
    config = config_class(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, **kwargs)
    torch.manual_seed(0)
    model = (model_class or default_class)(config)
    model.save_pretrained(folder)
    if state_dict_filter is not None:  # tensors lost on the way (a hand-made export)
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        save_file({k: v for k, v in state.items() if state_dict_filter(k)}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    if architectures is not None:  # save_pretrained writes the saved class: a folder as users get it names another
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "architectures": architectures}))
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return tiny_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", docs=12)


def _cfg(teacher: str, corpus: str, out, **kw) -> CacheConfig:
    base = dict(teacher=teacher, corpus=[corpus], out=str(out), max_length=16, batch_size=4, top_k=8,
                hidden_layers="all", progress=False, topk_calibration_sequences=4)
    return CacheConfig(**{**base, **kw})


def _direct(teacher: str, kind: str, batch):
    model = auto_class(kind).from_pretrained(teacher, attn_implementation="eager").eval()
    with torch.inference_mode():
        return model(input_ids=torch.as_tensor(batch["input_ids"]),
                     attention_mask=torch.as_tensor(batch["attention_mask"]),
                     output_hidden_states=True, output_attentions=True)


@pytest.mark.parametrize("attention", ["none", "all"])
@pytest.mark.parametrize("name", FAMILIES)
def test_cache_equals_a_direct_forward(tmp_path, corpus, name, attention):
    teacher = _save(tmp_path / "teacher", name)
    classifier = name == "bert-classifier"
    cfg = _cfg(teacher, corpus, tmp_path / "cache", attention_layers=attention,
               **(dict(mode="examples", label_field="label", top_k=0) if classifier else {}))
    kind = EXPECTED_KIND.get(name, "masked-lm")
    assert prepare(cfg).kind == kind
    run_cache_pass(cfg, executor="local", log=lambda *_: None)
    assert verify_cache(cfg.out)[0] == []
    reader = CacheReader(cfg.out)
    assert reader.spec.mlm == (kind == "masked-lm")
    for batch in reader.iter_numpy(batch_size=16):
        out = _direct(teacher, kind, batch)  # on the cached inputs: masked ones for a masked LM
        mask = batch["attention_mask"].astype(bool)
        if classifier:
            np.testing.assert_allclose(batch["task_logits"], out.logits.numpy(), rtol=1e-4, atol=1e-5)
        else:
            top = torch.topk(torch.log_softmax(out.logits.float(), -1), 8, dim=-1).indices.numpy()
            np.testing.assert_array_equal(np.sort(batch["topk_ids"][mask], -1), np.sort(top[mask], -1))
        for layer in range(LAYERS + 1):  # float16 storage: rounding ~5e-4 relative
            np.testing.assert_allclose(batch[f"hidden_{layer}"][mask], out.hidden_states[layer].numpy()[mask],
                                       rtol=2e-3, atol=2e-3, err_msg=f"hidden_{layer}")
        for layer in reader.spec.attention_layers:
            ref = out.attentions[layer - 1].numpy()
            for r, n in enumerate(batch["lengths"]):
                np.testing.assert_allclose(batch[f"attention_{layer}"][r, :, :n, :n], ref[r, :, :n, :n], atol=1e-3)
    assert reader.spec.attention_layers == (() if attention == "none" else tuple(range(1, LAYERS + 1)))


# --------------------------------------------------------------------------------------------- #
# folders whose config and weights disagree
# --------------------------------------------------------------------------------------------- #


@pytest.fixture
def st_mpnet(tmp_path) -> str:
    """A sentence-transformers-style folder: config names MPNetForMaskedLM, weights hold the encoder and a
    pooler (MPNetModel's), no LM head."""
    import transformers as T

    return _save(tmp_path / "st-mpnet", "mpnet", model_class=T.MPNetModel, architectures=["MPNetForMaskedLM"])


def test_headless_folder_with_defaults_is_refused_in_one_line(tmp_path, corpus, st_mpnet, capsys):
    from kdcache.pipeline.cli.main import main

    rc = main(["cache", "--teacher", st_mpnet, "--corpus", corpus, "--out", str(tmp_path / "c"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("kdcache cache: error: nothing to cache") and "as an encoder" in err[0]
    assert "--hidden-layers" in err[0] and "Traceback" not in err[0]


def test_headless_folder_runs_as_an_encoder_with_the_fused_kernels_fallback_logged(tmp_path, corpus, st_mpnet):
    cfg = _cfg(st_mpnet, corpus, tmp_path / "c", teacher_kind="encoder", top_k=0, hidden_layers="2")
    run_cache_pass(cfg, executor="local", log=lambda *_: None)
    assert CacheReader(cfg.out).spec.hidden_layers == (2,)
    log = (tmp_path / "c" / "logs" / "kdcache.log").read_text()
    assert log.count("has no fused attention kernel (sdpa)") == 1  # MPNet has none: eager, said once


def test_headless_folder_is_never_cached_as_a_masked_lm(tmp_path, corpus, st_mpnet):
    # Asked for explicitly: refused before any teacher runs, naming the missing tensors and the way out.
    with pytest.raises(TeacherHeadMissing, match=r"masked-lm head .* soft targets .*lm_head\..*teacher_kind=encoder"):
        prepare(_cfg(st_mpnet, corpus, tmp_path / "c", teacher_kind="masked-lm", attention_layers="all"))
    # auto: an encoder, said so; no targets, no masking; hidden states and attention equal the encoder's.
    cfg = _cfg(st_mpnet, corpus, tmp_path / "c", attention_layers="all")
    said: list[str] = []
    run_cache_pass(cfg, executor="local", log=said.append)
    assert any("names MPNetForMaskedLM but its weights have no masked-lm head" in s for s in said)
    reader = CacheReader(cfg.out)
    assert reader.spec.targets == "none" and not reader.spec.mlm and reader.manifest.header.teacher["kind"] == "encoder"
    batch = next(reader.iter_numpy(batch_size=16))
    out = _direct(st_mpnet, "encoder", batch)
    mask = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(batch["hidden_2"][mask], out.hidden_states[2].numpy()[mask], rtol=2e-3, atol=2e-3)

    # format.md §7's duckdb query returns values, equal to the decoded cache.
    import duckdb

    first = reader.files()[0]
    ((n, width, value, sid),) = duckdb.sql(
        f"select len(hidden_2), len(hidden_2[1]), hidden_2[1][1], sample_id from read_parquet('{first}') "
        "order by sample_id limit 1").fetchall()
    row = next(reader.iter_numpy(batch_size=1))
    assert sid == row["sample_id"][0] and (n, width) == (row["lengths"][0], H)
    assert value == pytest.approx(float(row["hidden_2"][0, 0, 0]), rel=1e-6)


def test_partly_missing_head_is_refused_before_any_inference(tmp_path, corpus):
    teacher = _save(tmp_path / "t", "bert", state_dict_filter=lambda k: k != "cls.predictions.transform.dense.weight")
    cfg = _cfg(teacher, corpus, tmp_path / "c")
    assert prepare(cfg).kind == "masked-lm"  # the weights' headers cannot tell a renamed key from a lost one
    with pytest.raises(TeacherHeadMissing, match=r"cls\.predictions\.transform\.dense\.weight would be randomly"):
        run_cache_pass(cfg, executor="local", log=lambda *_: None)
    assert not list((tmp_path / "c" / "shards").glob("*.parquet")) if (tmp_path / "c" / "shards").exists() else True
    # Not using the head (no soft targets), the same folder caches its encoder's hidden states.
    ok = _cfg(teacher, corpus, tmp_path / "c2", top_k=0)
    run_cache_pass(ok, executor="local", log=lambda *_: None)
    assert CacheReader(ok.out).spec.targets == "none"


def test_missing_pooler_matters_only_to_a_classifier(tmp_path, corpus):
    teacher = _save(tmp_path / "t", "bert-classifier", state_dict_filter=lambda k: ".pooler." not in f".{k}")
    examples = dict(mode="examples", label_field="label", top_k=0)
    with pytest.raises(TeacherHeadMissing, match=r"bert\.pooler\.dense\.(bias|weight)"):
        run_cache_pass(_cfg(teacher, corpus, tmp_path / "c", **examples), executor="local", log=lambda *_: None)
    enc = _cfg(teacher, corpus, tmp_path / "c2", teacher_kind="encoder", **examples)
    run_cache_pass(enc, executor="local", log=lambda *_: None)
    assert CacheReader(enc.out).spec.num_labels == 0


@pytest.mark.ray
def test_a_refusal_inside_a_teacher_actor_is_the_same_one_line(tmp_path, corpus):
    teacher = _save(tmp_path / "t", "bert", state_dict_filter=lambda k: k != "cls.predictions.decoder.bias"
                    and k != "cls.predictions.bias")
    cfg = _cfg(teacher, corpus, tmp_path / "c", hidden_layers="none")
    with pytest.raises(TeacherHeadMissing, match=r"cls\.predictions\.bias.* would be randomly initialised"):
        run_cache_pass(cfg, executor="ray", log=lambda *_: None)
    log = (tmp_path / "c" / "logs" / "kdcache.log").read_text()
    assert "Traceback" in log and "TeacherHeadMissing" in log  # the stack is kept, in the log file
