"""`kdcache demo --llm` in its quick profile: SmolLM2-135M over Wikipedia extracts, two caches
(top-k and RS-KD), two Ray Train runs, held-out perplexity and speed; then again, reusing it all."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _run(out: Path) -> tuple[dict, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kdcache.pipeline.demos.llm", "--quick", "--out", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


@pytest.mark.slow
@pytest.mark.ray
def test_llm_demo_quick_distils_both_caches_and_reuses_its_work(tmp_path):
    from transformers import AutoModelForCausalLM

    from kdcache.pipeline.demos.llm import PROFILES

    out = tmp_path / "demo-llm"
    report, _ = _run(out)
    quick = PROFILES["quick"]

    # The report on disk is the one returned, and JSON all the way down.
    assert json.loads((out / "llm.json").read_text()) == report

    # Both teacher passes ran the teacher and cached what the profile asked for.
    for kind in ("topk", "rskd"):
        assert report["teacher_pass_forward_calls"][kind] > 0
        assert report["caches"][kind]["tokens"] == quick["train_sequences"] * quick["seq_len"]
    assert report["caches"]["topk"]["k"] == quick["top_k"]
    assert report["caches"]["rskd"]["samples"] == quick["samples"]
    assert 1 <= report["rskd_unique_draws_per_token"] <= quick["samples"]
    # RS-KD's soft targets take no more bytes per token than top-k's (measured from the shards).
    assert 0 < report["rskd_kd_bytes_per_token"] <= report["topk_kd_bytes_per_token"]
    assert report["rskd_bytes_le_topk"] is True

    # Held-out extracts are disjoint from the training corpus.
    train_keys = {json.loads(line)["key"] for line in (out / "corpus" / "train.jsonl").read_text().splitlines()}
    held_keys = {json.loads(line)["key"] for line in (out / "corpus" / "heldout.jsonl").read_text().splitlines()}
    assert held_keys and train_keys and not (held_keys & train_keys)

    # The student is smaller and faster, and both trained students load as plain causal LMs.
    assert report["teacher_params"] > 2 * report["student_params"]
    assert report["speedup_batch1"] > 1 and report["speedup_batch32"] > 1
    for kind in ("topk", "rskd"):
        run = report["train_runs"][kind]
        model = AutoModelForCausalLM.from_pretrained(run["student"])
        assert model.config.num_hidden_layers == report["student_layers"] < report["teacher_layers"]
        metrics = [json.loads(line) for line in Path(run["metrics"]).read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, quick["steps"] + 1))
        assert metrics[-1]["loss"] < metrics[0]["loss"]

    # Distillation helped on held-out text: both trained students beat the initialised one, and
    # the teacher beats them all; the gaps are what the report says they are.
    init = report["student_init_ppl"]
    assert report["student_topk_ppl"] < init and report["student_rskd_ppl"] < init
    assert report["teacher_ppl"] < min(report["student_topk_ppl"], report["student_rskd_ppl"])
    assert report["gap_topk"] == pytest.approx(report["student_topk_ppl"] - report["teacher_ppl"])
    assert report["gap_rskd"] == pytest.approx(report["student_rskd_ppl"] - report["teacher_ppl"])
    assert report["rskd_target_met"] == (report["rskd_bytes_le_topk"] and report["gap_rskd"] <= report["gap_topk"])

    # Again into the same folder: no teacher inference, no training, the same figures.
    again, proc = _run(out)
    assert again["teacher_pass_forward_calls"] == {"topk": 0, "rskd": 0}
    assert "no new inference" in proc.stderr and "already holds the finished run" in proc.stderr
    for key in ("teacher_ppl", "student_init_ppl", "student_topk_ppl", "student_rskd_ppl",
                "topk_kd_bytes_per_token", "rskd_kd_bytes_per_token", "speedup_batch1"):
        assert again[key] == report[key], key


# ------------------------------------------------------------------ fast: the pieces, on a tiny model


def _tiny_lm(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.support import make_teacher

    folder = make_teacher(tmp_path / "tiny", kind="causal-lm", layers=2, hidden=32, heads=4)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_perplexity_is_exp_of_mean_next_token_nll_and_ignores_padding(tmp_path):
    import math

    import torch

    from kdcache.pipeline.evaluation.lm_eval import nll, pack_texts, perplexity

    model, tok = _tiny_lm(tmp_path)
    texts = ["the cat sat on the mat and the dog ran after it", "a bird flew over the house in the morning"] * 8
    seqs = pack_texts(tok, texts, seq_len=16, max_sequences=5)
    assert len(seqs) == 5 and all(len(s) == 16 for s in seqs)

    # By hand: every position t predicts token t + 1.
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(seqs)).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(seqs)[:, 1:].reshape(-1))
    assert perplexity(model, seqs, batch_size=2) == pytest.approx(math.exp(float(ce)), rel=1e-4)

    # A shorter sequence batched with full ones is padded; the padding is neither predicted nor counted.
    short = seqs[0][:9]
    alone = nll(model, [short], batch_size=1)
    mixed = nll(model, [short, seqs[1]], batch_size=2)
    assert alone["tokens"] == 8 and mixed["tokens"] == 8 + 15
    assert mixed["nll_sum"] == pytest.approx(alone["nll_sum"] + nll(model, [seqs[1]])["nll_sum"], rel=1e-4)

    with pytest.raises(ValueError, match="no full sequence"):
        pack_texts(tok, ["too short"], seq_len=64)


def test_latency_and_parameter_counts(tmp_path):
    from kdcache.pipeline.evaluation.lm_eval import compare_latency, count_params

    model, _ = _tiny_lm(tmp_path)
    one = compare_latency({"m": model}, batch_size=2, seq_len=8, repeats=3)["m"]
    assert one["repeats"] == 3 and len(one["times_s"]) == 3 and one["min_s"] <= one["median_s"]
    assert one["tokens_per_s"] == pytest.approx(16 / one["median_s"])
    both = compare_latency({"a": model, "b": model}, batch_size=1, seq_len=4, repeats=2)
    assert set(both) == {"a", "b"} and all(r["repeats"] == 2 for r in both.values())
    # Tied input/output embeddings count once.
    distinct = {id(p): p.numel() for p in model.parameters()}
    assert count_params(model) == sum(distinct.values())


def test_heldout_split_is_deterministic_and_disjoint(tmp_path):
    from kdcache.pipeline.demos.llm import HELDOUT_EVERY, split_extracts

    data = {f"Article {i}": {"title": f"Article {i}", "extract": f"text number {i}"} for i in range(400)}
    data["Empty"] = {"title": "Empty", "extract": "  "}
    path = tmp_path / "extracts.json"
    path.write_text(json.dumps(data))
    train, held = split_extracts(path)
    keys_train, keys_held = [d["key"] for d in train], [d["key"] for d in held]
    assert not set(keys_train) & set(keys_held) and len(train) + len(held) == 400  # the empty one is dropped
    assert 0 < len(held) < 400 / HELDOUT_EVERY * 2
    # Shuffling the file changes nothing: the split and the order depend on the keys only.
    path.write_text(json.dumps(dict(reversed(list(data.items())))))
    assert split_extracts(path) == (train, held)
