"""`kdcache eval`: quality, size and speed of a teacher and its students, measured in one run.

Classification tasks (`--task rotten-tomatoes` or a JSONL file with text + label): accuracy on the
held-out test split; `quality_retained` = student accuracy ÷ teacher accuracy. Language models
(`--task lm:FILE`, held-out text as .txt lines or .jsonl `text`): perplexity on packed sequences;
`quality_retained` = teacher perplexity ÷ student perplexity (lower is better, so 1.0 = as good).
Size: parameters and bytes of the weight files. Speed on this machine's CPU, teacher and students
measured in alternating rounds (so drift in the machine's load hits all of them alike): latency at
batch 1 and throughput at batch 32.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kdcache.pipeline.evaluation.lm_eval import count_params
from kdcache.pipeline.tasks.classify import accuracy, encode_texts

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def load_classifier(path: str | Path, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer) for an HF sequence classifier or a kdcache BiLSTM/CNN student."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdcache.pipeline.student.small import is_small_student, load_small_student

    path = str(path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if is_small_student(path):
        return load_small_student(path), tok
    model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True,
                                                               trust_remote_code=trust_remote_code)
    return model.eval(), tok


def model_shape(model) -> dict[str, Any]:
    """What the report's shape column and the JSON describe: family, depth, width, and the parameters
    outside the token embedding table (most of a small student's parameters are that table)."""
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else getattr(model, "embed", None)
    emb = table.weight.numel() if isinstance(table, torch.nn.Embedding) else 0
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "model_type", None) == "mobilebert":
        shape = {"architecture": "mobilebert", "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                 "bottleneck": config.intra_bottleneck_size}
    elif config is not None and hasattr(config, "num_hidden_layers"):
        shape = {"architecture": "transformer", "layers": config.num_hidden_layers, "hidden_size": config.hidden_size}
    elif hasattr(model, "lstm"):
        shape = {"architecture": "bilstm", "layers": 1, "hidden_size": model.lstm.hidden_size}
    elif hasattr(model, "cells"):
        shape = {"architecture": "cellcnn", "layers": len(model.cells), "hidden_size": model.stem.out_channels}
    elif isinstance(getattr(model, "encoder", None), torch.nn.TransformerEncoder):
        shape = {"architecture": "tinytransformer", "layers": len(model.encoder.layers),
                 "hidden_size": model.out.in_features}
    elif hasattr(model, "convs"):
        shape = {"architecture": "cnn", "layers": 1, "hidden_size": sum(c.out_channels for c in model.convs)}
    else:
        shape = {"architecture": type(model).__name__, "layers": None, "hidden_size": None}
    return {**shape, "params_without_embeddings": count_params(model) - emb}


def disk_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.name.endswith(WEIGHT_SUFFIXES))


@torch.inference_mode()
def speed(models: dict[str, tuple[Any, Any]], texts: list[str], rounds: int = 5, batch1_texts: int = 40,
          batch_size: int = 32, max_length: int = 64) -> dict[str, dict[str, float]]:
    """Per model: `latency_batch1_ms` (median) and `throughput_batch32` (texts/s, median of rounds)."""
    singles = texts[:batch1_texts]
    batch = texts[:batch_size]
    lat: dict[str, list[float]] = {name: [] for name in models}
    thr: dict[str, list[float]] = {name: [] for name in models}
    encoded = {name: ([encode_texts(tok, model, [t], max_length) for t in singles],
                      encode_texts(tok, model, batch, max_length)) for name, (model, tok) in models.items()}
    for name, (model, _) in models.items():  # warm-up: first calls allocate and pick kernels
        model(**encoded[name][1])
    for _ in range(rounds):
        for name, (model, _) in models.items():
            ones, many = encoded[name]
            for enc in ones:
                t = time.perf_counter()
                model(**enc)
                lat[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            model(**many)
            thr[name].append(len(batch) / (time.perf_counter() - t))
    return {name: {"latency_batch1_ms": 1000 * statistics.median(lat[name]),
                   "throughput_batch32": statistics.median(thr[name])} for name in models}


def task_rows(task: str, data_dir: Path, split: str = "test") -> list[dict]:
    from kdcache.pipeline.tasks.data import TASKS, prepare_rotten_tomatoes
    from kdcache.pipeline.common.jsonout import read_jsonl

    if task == "rotten-tomatoes":
        return read_jsonl(prepare_rotten_tomatoes(data_dir)[split])
    path = Path(task)
    if not path.exists():
        raise FileNotFoundError(f"--task {task!r}: not a built-in task ({', '.join(TASKS)}) and no such file; "
                                "give a JSONL file with 'text' and 'label' fields")
    rows = read_jsonl(path)
    bad = next((i for i, r in enumerate(rows, 1) if "text" not in r or "label" not in r), None)
    if bad:
        raise ValueError(f"{path}: line {bad} lacks a 'text' or 'label' field")
    return rows


def evaluate_classifiers(teacher: str, students: dict[str, str], rows: list[dict], *,
                         baseline: str | None = None, rounds: int = 5, log=print) -> dict[str, Any]:
    """Accuracy, size and speed of the teacher, each student and the optional no-KD baseline."""
    paths = {"teacher": teacher, **students}
    if baseline:
        paths["baseline"] = baseline
    models = {name: load_classifier(p) for name, p in paths.items()}
    log(f"evaluating {', '.join(models)} on {len(rows):,} test examples")
    results: dict[str, dict[str, Any]] = {}
    for name, (model, tok) in models.items():
        results[name] = {"path": str(paths[name]), "params": count_params(model), "disk_bytes": disk_bytes(paths[name]),
                         "accuracy": accuracy(model, tok, rows), **model_shape(model)}
    for name, s in speed(models, [r["text"] for r in rows], rounds=rounds).items():
        results[name].update(s)
    return _relative_to_teacher(results, lambda r, t: r["accuracy"] / t["accuracy"])


def _relative_to_teacher(results: dict[str, dict[str, Any]], quality) -> dict[str, dict[str, Any]]:
    """Adds quality kept, size ratio and speed-ups (teacher ÷ model, or model ÷ teacher for throughput)."""
    t = results["teacher"]
    for r in results.values():
        r["quality_retained"] = quality(r, t)
        r["size_ratio"] = t["params"] / r["params"]
        r["speedup_batch1"] = t["latency_batch1_ms"] / r["latency_batch1_ms"]
        r["speedup_batch32"] = r["throughput_batch32"] / t["throughput_batch32"]
    return results


def lm_texts(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"--task lm:{path}: no such file; give held-out text as .txt (one document "
                                "per line) or .jsonl with a 'text' field")
    if path.suffix == ".jsonl":
        from kdcache.pipeline.common.jsonout import read_jsonl

        return [r["text"] for r in read_jsonl(path) if r.get("text")]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def evaluate_lms(teacher: str, students: dict[str, str], texts: list[str], *, baseline: str | None = None,
                 seq_len: int = 128, max_sequences: int = 64, rounds: int = 3, log=print) -> dict[str, Any]:
    """Perplexity, size and speed of a causal-LM teacher and its students (one shared tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcache.pipeline.evaluation.lm_eval import compare_latency, pack_texts, perplexity

    paths = {"teacher": teacher, **students, **({"baseline": baseline} if baseline else {})}
    models = {name: AutoModelForCausalLM.from_pretrained(p, use_safetensors=True).eval() for name, p in paths.items()}
    seqs = pack_texts(AutoTokenizer.from_pretrained(teacher), texts, seq_len, max_sequences)
    log(f"evaluating {', '.join(models)} on {len(seqs)} held-out sequences of {seq_len} tokens")
    results = {name: {"path": str(paths[name]), "params": count_params(m), "disk_bytes": disk_bytes(paths[name]),
                      "perplexity": perplexity(m, seqs), "layers": m.config.num_hidden_layers,
                      "hidden_size": m.config.hidden_size} for name, m in models.items()}
    one = compare_latency(models, 1, seq_len, rounds)
    many = compare_latency(models, 32, seq_len, rounds)
    for name, r in results.items():
        r["latency_batch1_ms"] = 1000 * one[name]["median_s"]
        r["throughput_batch32"] = many[name]["sequences_per_s"]
    return _relative_to_teacher(results, lambda r, t: t["perplexity"] / r["perplexity"])


def summary(results: dict[str, dict[str, Any]], student: str) -> dict[str, Any]:
    """The flat JSON keys scripts rely on, for the named student."""
    s, t = results[student], results["teacher"]
    metric = "perplexity" if "perplexity" in t else "accuracy"
    out = {"metric": metric, "teacher_params": t["params"], "student_params": s["params"],
           "teacher_metric": t[metric], "student_metric": s[metric],
           "size_ratio": s["size_ratio"], "speedup_batch1": s["speedup_batch1"],
           "speedup_batch32": s["speedup_batch32"], "quality_retained": s["quality_retained"],
           "baseline_quality_retained": results["baseline"]["quality_retained"] if "baseline" in results else None}
    return out


def headline(results: dict[str, dict[str, Any]], student: str, teacher_name: str = "the teacher") -> str:
    s = results[student]
    smaller = 1 - 1 / s["size_ratio"]
    what = "accuracy" if "accuracy" in s else "quality (teacher perplexity ÷ student perplexity)"
    line = (f"student is {smaller:.0%} smaller and {s['speedup_batch1']:.1f}x faster (batch 1; "
            f"{s['speedup_batch32']:.1f}x at batch 32) than {teacher_name} and keeps "
            f"{s['quality_retained']:.1%} of its {what}")
    if "baseline" in results:
        line += f" (baseline without distillation: {results['baseline']['quality_retained']:.1%})"
    return line


def run_eval(teacher: str, students: dict[str, str], task: str, out: str | Path, *, baseline: str | None = None,
             runs: dict[str, str] | None = None, data_dir: str | Path | None = None, targets: dict | None = None,
             rounds: int = 5, log=print) -> dict[str, Any]:
    """Evaluate, write `<out>/report.md`, `<out>/eval.json` and the plots; return the flat summary."""
    from kdcache.pipeline.evaluation.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if task.startswith("lm:"):
        texts = lm_texts(Path(task[3:]))
        results = evaluate_lms(teacher, students, texts, baseline=baseline, rounds=rounds, log=log)
        examples = len(texts)
    else:
        rows = task_rows(task, Path(data_dir or out / "data"))
        results = evaluate_classifiers(teacher, students, rows, baseline=baseline, rounds=rounds, log=log)
        examples = len(rows)
    main = next(iter(students))
    flat = summary(results, main)
    flat.update({"task": task, "test_examples": examples, "headline": headline(results, main),
                 "models": results, "report": str(out / "report.md")})
    write_report(out, flat, runs or {}, targets=targets)
    (out / "eval.json").write_text(json.dumps(flat, indent=1) + "\n")
    return flat
