"""`kdcache eval`: accuracy, size, speed, report.md and plots, on tiny classifiers built from configs."""
from __future__ import annotations

import json
import random

import pytest
import torch

from kdcache.pipeline.cli.main import main
from kdcache.pipeline.evaluation.evaluate import load_classifier, run_eval
from kdcache.pipeline.student.models import init_student_from_teacher
from kdcache.pipeline.common.jsonout import write_jsonl
from tests.support import WORDS, make_teacher

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    teacher = make_teacher(root / "teacher", "classifier", layers=2)
    init_student_from_teacher(teacher, root / "student", num_layers=1)  # copies the classifier head
    baseline = make_teacher(root / "baseline", "classifier", layers=1, seed=5)
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices(WORDS, k=rng.randint(3, 12))), "label": rng.randint(0, 1)}
            for _ in range(60)]
    task = root / "test.jsonl"
    write_jsonl(task, rows)
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s, "loss_pred": 0.5 / s}) + "\n"
                                               for s in range(1, 6)))
    return {"teacher": teacher, "student": str(root / "student"), "baseline": baseline, "task": str(task),
            "rows": rows, "run": str(run)}


def _accuracy(path, rows):
    model, tok = load_classifier(path)
    with torch.no_grad():
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        if model.config.type_vocab_size == 1:
            enc.pop("token_type_ids", None)
        pred = model(**enc).logits.argmax(-1)
    return float((pred == torch.tensor([r["label"] for r in rows])).float().mean())


def test_eval_measures_each_model_and_writes_the_report(models, tmp_path):
    flat = run_eval(models["teacher"], {"student": models["student"]}, models["task"], tmp_path / "r",
                    baseline=models["baseline"], runs={"pred": models["run"]}, rounds=1,
                    targets={"quality_retained": 0.95, "size_ratio": 2.0}, log=lambda *_: None)
    m = flat["models"]
    for name in ("teacher", "student", "baseline"):
        assert m[name]["accuracy"] == pytest.approx(_accuracy(models[name], models["rows"]))
        assert m[name]["latency_batch1_ms"] > 0 and m[name]["throughput_batch32"] > 0
    assert flat["teacher_params"] == sum(p.numel() for p in load_classifier(models["teacher"])[0].parameters())
    assert flat["student_params"] < flat["teacher_params"]
    assert flat["quality_retained"] == pytest.approx(m["student"]["accuracy"] / m["teacher"]["accuracy"])
    assert flat["baseline_quality_retained"] == pytest.approx(m["baseline"]["accuracy"] / m["teacher"]["accuracy"])
    assert flat["speedup_batch1"] == pytest.approx(m["teacher"]["latency_batch1_ms"] / m["student"]["latency_batch1_ms"])
    report = (tmp_path / "r" / "report.md").read_text()
    assert flat["headline"] in report and "| student |" in report and "## Targets" in report
    for png in ("size_speed_quality.png", "training_curves.png"):
        assert (tmp_path / "r" / png).read_bytes()[:8] == PNG
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["quality_retained"] == flat["quality_retained"]


def test_cli_eval_json_last_line(models, tmp_path, capsys):
    rc = main(["eval", "--teacher", models["teacher"], "--student", models["student"], "--baseline",
               models["baseline"], "--task", models["task"], "--out", str(tmp_path / "r"), "--rounds", "1",
               "--run", f"pred={models['run']}", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("teacher_params", "student_params", "speedup_batch1", "speedup_batch32", "quality_retained",
                "baseline_quality_retained"):
        assert isinstance(out[key], (int, float)), key


def test_task_file_errors_name_the_line(models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n{"text": "no label"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2 lacks"):
        run_eval(models["teacher"], {"student": models["student"]}, str(bad), tmp_path / "r", log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="not a built-in task"):
        run_eval(models["teacher"], {"student": models["student"]}, str(tmp_path / "nope.jsonl"), tmp_path / "r",
                 log=lambda *_: None)


def test_eval_of_language_models_reports_perplexity(tmp_path):
    from transformers import AutoModelForCausalLM

    from kdcache.pipeline.evaluation.lm_eval import pack_texts
    from tests.support import tiny_corpus

    teacher = make_teacher(tmp_path / "lm", "causal-lm", layers=2)
    init_student_from_teacher(teacher, tmp_path / "s", num_layers=1)
    texts = tiny_corpus(tmp_path / "heldout.jsonl", docs=30)
    flat = run_eval(teacher, {"student": str(tmp_path / "s")}, f"lm:{texts}", tmp_path / "r", rounds=1,
                    log=lambda *_: None)
    assert flat["metric"] == "perplexity"
    m = flat["models"]
    # Perplexity recomputed here: exp(mean next-token cross-entropy) over the same packed sequences.
    from transformers import AutoTokenizer

    rows = [json.loads(x)["text"] for x in open(texts)]
    seqs = torch.tensor(pack_texts(AutoTokenizer.from_pretrained(teacher), rows, 128, 64))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(teacher)(input_ids=seqs).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))
    assert m["teacher"]["perplexity"] == pytest.approx(float(ce.exp()), rel=1e-4)
    assert flat["quality_retained"] == pytest.approx(m["teacher"]["perplexity"] / m["student"]["perplexity"])
    assert "perplexity" in (tmp_path / "r" / "report.md").read_text()
