"""The teacher pass end to end with tiny teachers: cached outputs equal a direct forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.pipeline.teacher_pass.run import run_cache_pass
from kdcache.pipeline.teacher_pass.config import prepare
from kdcache.pipeline.teacher_pass.config import CacheConfig
from kdcache.pipeline.teacher_pass.teacher import sample_rskd
from kdcache.storage import CacheReader
from kdcache.storage.verify import verify_cache
from tests.support import make_teacher, tiny_corpus


def _config(tmp_path, teacher, **kw) -> CacheConfig:
    corpus = tiny_corpus(tmp_path / "corpus.jsonl", docs=kw.pop("docs", 40))
    base = dict(teacher=teacher, corpus=[corpus], out=str(tmp_path / "cache"), max_length=16, batch_size=4,
                shard_tokens=16 * 6, progress=False)
    return CacheConfig(**{**base, **kw})


def _direct_forward(teacher_dir, kind, input_ids, attention_mask):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if kind == "masked-lm" else AutoModelForCausalLM
    model = auto.from_pretrained(teacher_dir, attn_implementation="eager").eval()
    with torch.inference_mode():
        return model(input_ids=torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask),
                     output_hidden_states=True, output_attentions=True)


@pytest.mark.parametrize("kind", ["masked-lm", "causal-lm"])
def test_cached_outputs_equal_a_direct_forward(tmp_path, kind):
    teacher = make_teacher(tmp_path / "teacher", kind)
    cfg = _config(tmp_path, teacher, top_k=8, hidden_layers="0,2", attention_layers="1,2")
    summary = run_cache_pass(cfg, executor="local", log=lambda *_: None)
    assert summary["shards_total"] > 1 and summary["shards_written"] == summary["shards_total"]
    assert verify_cache(cfg.out)[0] == []
    reader = CacheReader(cfg.out)
    assert reader.spec.mlm == (kind == "masked-lm")
    checked = 0
    for batch in reader.iter_numpy(batch_size=8):
        # Re-run the teacher on the cached input_ids: for an MLM these are the masked inputs, so this
        # also proves the cache holds exactly what the teacher saw.
        out = _direct_forward(teacher, kind, batch["input_ids"], batch["attention_mask"])
        logp = torch.log_softmax(out.logits.float(), -1)
        top_lp, top_ids = torch.topk(logp, 8, dim=-1)
        mask = batch["attention_mask"].astype(bool)
        got_ids = np.sort(batch["topk_ids"][mask], -1)
        np.testing.assert_array_equal(got_ids, np.sort(top_ids.numpy()[mask], -1))
        order_got = np.argsort(batch["topk_ids"][mask], -1)
        order_ref = np.argsort(top_ids.numpy()[mask], -1)
        np.testing.assert_allclose(np.take_along_axis(batch["topk_logprobs"][mask], order_got, -1),
                                   np.take_along_axis(top_lp.numpy()[mask], order_ref, -1), atol=0.05)
        tail = 1 - np.exp(top_lp.numpy()[mask]).sum(-1)
        np.testing.assert_allclose(np.exp(batch["topk_log_tail"][mask]), tail, rtol=2e-3, atol=1e-4)
        for layer in (0, 2):
            np.testing.assert_allclose(batch[f"hidden_{layer}"][mask], out.hidden_states[layer].numpy()[mask],
                                       rtol=2e-3, atol=2e-3)
        for layer in (1, 2):
            ref = out.attentions[layer - 1].numpy()
            for r, n in enumerate(batch["lengths"]):
                np.testing.assert_allclose(batch[f"attention_{layer}"][r, :, :n, :n], ref[r, :, :n, :n], atol=1e-3)
        if kind == "masked-lm":
            for r in range(len(batch["lengths"])):
                pos = batch["mlm_positions"][r][batch["mlm_positions"][r] >= 0]
                assert len(pos) >= 1 and (batch["mlm_labels"][r][: len(pos)] >= 0).all()
        checked += int(mask.sum())
    assert checked == reader.manifest.tokens


def test_same_corpus_and_options_give_identical_shards(tmp_path):
    teacher = make_teacher(tmp_path / "teacher", "masked-lm")
    a = _config(tmp_path, teacher, top_k=4, out=str(tmp_path / "a"))
    b = _config(tmp_path, teacher, top_k=4, out=str(tmp_path / "b"))
    run_cache_pass(a, executor="local", log=lambda *_: None)
    run_cache_pass(b, executor="local", log=lambda *_: None)
    ma, mb = CacheReader(a.out).manifest, CacheReader(b.out).manifest
    assert [(s.file, s.checksum, s.sample_id_first) for s in ma.shards] == \
           [(s.file, s.checksum, s.sample_id_first) for s in mb.shards]


def test_second_run_does_no_inference(tmp_path):
    teacher = make_teacher(tmp_path / "teacher", "causal-lm")
    cfg = _config(tmp_path, teacher, top_k=4)
    first = run_cache_pass(cfg, executor="local", log=lambda *_: None)
    said = []
    second = run_cache_pass(cfg, executor="local", log=said.append)
    assert first["forward_calls"] > 0 and second["forward_calls"] == 0 and second["already_complete"]
    assert "no new inference" in said[0]


def test_resume_writes_only_missing_shards(tmp_path):
    teacher = make_teacher(tmp_path / "teacher", "causal-lm")
    cfg = _config(tmp_path, teacher, top_k=4)
    full = run_cache_pass(cfg, executor="local", log=lambda *_: None)
    # Simulate a pass interrupted before shard 1 and the manifest were written.
    shards = tmp_path / "cache" / "shards"
    (shards / "shard-000001.parquet").unlink()
    (shards / "shard-000001.json").unlink()
    (tmp_path / "cache" / "manifest.json").unlink()
    resumed = run_cache_pass(cfg, executor="local", log=lambda *_: None)
    assert resumed["shards_written"] == 1 and resumed["shards_skipped"] == full["shards_total"] - 1
    assert resumed["forward_calls"] < full["forward_calls"]
    assert verify_cache(cfg.out)[0] == []


def test_encoder_and_classifier_teachers(tmp_path):
    enc = make_teacher(tmp_path / "enc", "encoder")
    cfg = _config(tmp_path, enc, hidden_layers="all", attention_layers="2", out=str(tmp_path / "c1"))
    run_cache_pass(cfg, executor="local", log=lambda *_: None)
    reader = CacheReader(cfg.out)
    assert reader.spec.targets == "none" and reader.spec.hidden_layers == (0, 1, 2)
    clf = make_teacher(tmp_path / "clf", "classifier", num_labels=3)
    cfg = _config(tmp_path, clf, mode="examples", label_field="label", out=str(tmp_path / "c2"))
    run_cache_pass(cfg, executor="local", log=lambda *_: None)
    batch = next(CacheReader(cfg.out).iter_numpy(["task_logits", "label"]))
    assert batch["task_logits"].shape[1] == 3 and set(np.unique(batch["label"])) <= {0, 1}


def test_option_errors_are_clear(tmp_path):
    teacher = make_teacher(tmp_path / "teacher", "masked-lm", layers=2)
    with pytest.raises(ValueError, match=r"hidden-layers: layer\(s\) \[5\] out of range.*0\.\.2"):
        prepare(_config(tmp_path, teacher, hidden_layers="0,5"))
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        prepare(_config(tmp_path, teacher, top_k=100_000))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((tmp_path / "teacher" / "config.json").read_text())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(PermissionError, match="only pickle weights.*--allow-pickle"):
        prepare(_config(tmp_path, str(tmp_path / "pickled")))
    (tmp_path / "pickled" / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        prepare(_config(tmp_path, str(tmp_path / "pickled")))


def test_rskd_estimator_is_unbiased():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 2
    logp = torch.log_softmax(logits, -1)
    f = torch.randn(50)  # any function of the token id
    exact = (logp.exp() * f).sum(-1)
    gen = torch.Generator().manual_seed(1)
    draws = 2000
    estimates = torch.zeros(3)
    for _ in range(draws):
        ids, w = sample_rskd(logp, 16, gen)
        assert torch.allclose(w.sum(-1), torch.ones(3))
        assert ((w > 0).sum(-1) <= 16).all()
        estimates += (w * f[ids]).sum(-1)
    estimates /= draws
    # Standard error of the mean of 2000 estimates of 16 draws each: std(f)/sqrt(32000) ~ 0.006.
    assert torch.allclose(estimates, exact, atol=0.03), (estimates, exact)


def test_codec_is_fitted_on_calibration_and_kept_on_resume(tmp_path):
    teacher = make_teacher(tmp_path / "teacher", "causal-lm")
    cfg = _config(tmp_path, teacher, top_k=8, topk_calibration_sequences=16)
    said = []
    run_cache_pass(cfg, executor="local", log=said.append)
    params = CacheReader(cfg.out).spec.codec_params
    assert params.get("vocab_order") and any("fitted the" in s for s in said)
    # Interrupt (drop a shard and the manifest), resume: the fitted parameters are adopted, not refitted.
    (tmp_path / "cache" / "shards" / "shard-000000.json").unlink()
    (tmp_path / "cache" / "manifest.json").unlink()
    said.clear()
    run_cache_pass(cfg, executor="local", log=said.append)
    assert CacheReader(cfg.out).spec.codec_params == params and not any("fitted the" in s for s in said)
    assert verify_cache(cfg.out)[0] == []
    # Without calibration the codec keeps its defaults, recorded explicitly.
    plain = _config(tmp_path, teacher, top_k=8, topk_calibration_sequences=0, out=str(tmp_path / "plain"))
    run_cache_pass(plain, executor="local", log=lambda *_: None)
    assert CacheReader(plain.out).spec.codec_params.get("vocab_order") is None
    assert "levels" in CacheReader(plain.out).spec.codec_params


def _checksums(url) -> list:
    return [(s.file, s.checksum, s.rows, s.sample_id_first) for s in CacheReader(url).manifest.shards]


def test_shards_in_flight_do_not_change_a_byte(tmp_path):
    """Several shards at once (threads sharing one teacher) write exactly the shards one at a time does."""
    teacher = make_teacher(tmp_path / "teacher", "masked-lm")
    runs = {}
    for n in (1, 3):
        cfg = _config(tmp_path, teacher, top_k=8, hidden_layers="1", out=str(tmp_path / f"in-flight-{n}"),
                      shards_in_flight=n)
        summary = run_cache_pass(cfg, executor="local", log=lambda *_: None)
        assert summary["shards_total"] >= 4 and verify_cache(cfg.out)[0] == []
        runs[n] = _checksums(cfg.out)
    assert runs[1] == runs[3]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_encoding_on_the_teacher_device_does_not_change_a_byte(tmp_path, monkeypatch, dtype):
    """Beside a GPU the runner encodes (top-k codec, dense forms) on the device and hands the writer
    encoded leaves; on a CPU the writer encodes. Both must write the same bytes: run the device path
    on the CPU and compare."""
    from kdcache.pipeline.teacher_pass.teacher import TeacherRunner

    teacher = make_teacher(tmp_path / "teacher", "causal-lm")
    runs = {}
    for on_device in (False, True):
        monkeypatch.setattr(TeacherRunner, "encode_on_cpu", on_device)
        cfg = _config(tmp_path, teacher, top_k=8, hidden_layers="0,2", attention_layers="1", dtype=dtype,
                      out=str(tmp_path / f"device-{on_device}"), topk_calibration_sequences=8)
        run_cache_pass(cfg, executor="local", log=lambda *_: None)
        assert verify_cache(cfg.out)[0] == []
        runs[on_device] = _checksums(cfg.out)
    assert runs[False] == runs[True]


def test_batches_made_in_worker_processes_do_not_change_a_byte(tmp_path, monkeypatch):
    """Beside a GPU, masked-LM batches are masked and collated in worker processes, in chunks:
    the same batches (boundaries included, with duplicated masked copies) as in the shard's thread."""
    import kdcache.pipeline.teacher_pass.shard as shard

    teacher = make_teacher(tmp_path / "teacher", "masked-lm")
    runs = {}
    for workers in (0, 2):
        monkeypatch.setattr(shard, "auto_batch_workers", lambda prep, on_gpu, n=workers: n)
        cfg = _config(tmp_path, teacher, top_k=4, dupe_factor=2, batch_size=3, shard_tokens=16 * 40,
                      out=str(tmp_path / f"workers-{workers}"), shards_in_flight=2)
        run_cache_pass(cfg, executor="local", log=lambda *_: None)
        runs[workers] = _checksums(cfg.out)
    assert runs[0] == runs[2] and len(runs[0]) > 1


def test_shards_read_in_a_worker_process_match_and_raise_its_errors(tmp_path, monkeypatch):
    """Beside a GPU (or with Ray) the corpus is read and tokenised in a worker process: the same
    shards, and a corpus error still surfaces from the pass with its message."""
    import kdcache.pipeline.teacher_pass.run as cache_pass

    teacher = make_teacher(tmp_path / "teacher", "causal-lm")
    runs = {}
    for device in ("cpu", "cuda"):  # "cuda": what the driver sees beside a GPU teacher
        monkeypatch.setattr(cache_pass, "teacher_device", lambda cfg, d=device: d)
        cfg = _config(tmp_path, teacher, top_k=4, out=str(tmp_path / f"read-{device}"))
        run_cache_pass(cfg, executor="local", log=lambda *_: None)
        runs[device] = _checksums(cfg.out)
    assert runs["cpu"] == runs["cuda"] and len(runs["cpu"]) > 1

    bad = tmp_path / "zz-latin1.txt"
    bad.write_bytes(b"fine\ncaf\xe9 au lait\n")
    monkeypatch.setattr(cache_pass, "COUNT_LIMIT_BYTES", 0)  # no counting pass: the worker meets the byte first
    cfg = _config(tmp_path, teacher, top_k=4, out=str(tmp_path / "bad"))
    cfg.corpus.append(str(bad))
    with pytest.raises(ValueError, match=r"invalid UTF-8 byte 0xe9 at byte offset 8 \(line 2\)"):
        run_cache_pass(cfg, executor="local", log=lambda *_: None)
