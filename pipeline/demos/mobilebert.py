"""The demo's MobileBERT rows (Sun et al. 2020): a bottleneck student from the same two teacher passes.

The general stage reads the Wikipedia cache (every hidden state and every attention map of
all-MiniLM-L6-v2): layer-wise feature-map and attention transfer, student layer l ↔ teacher layer l,
once with **progressive** knowledge transfer (one phase per layer, the layers below frozen) and once
with **auxiliary** KT (every layer's terms summed, all trainable: with an encoder-only teacher there is
no prediction head to distil, so joint KT is the same run) on the same cache and steps. Each then
gets MobileBERT's prediction stage on the Rotten Tomatoes logits cache (α·CE + (1 − α)·soft CE, the
same steps). The no-KD baseline is the same student, fine-tuned on the gold labels for those steps.
No teacher is loaded here: every run reads a cache.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

# The teacher's depth (6) and width between blocks (384); inside each block a 128 bottleneck with 4
# heads of 32 (the teacher's head width; each compared with the mean of 3 teacher heads), 2 stacked
# FFNs of 512: 7.5M parameters against the teacher's 22.7M (the paper's 4 FFNs give 9.1M, 2.5×).
SHAPE = {"bottleneck": 128, "ffn_stack": 2, "embedding_size": 128}
TARGETS = {"size_ratio": 2.5, "speedup_batch32": 2.0, "quality_retained": 0.95}
ROWS = {"progressive": "mobilebert", "auxiliary": "mobilebert auxiliary KT", "baseline": "mobilebert baseline (no KD)"}


def train_mobilebert(root: Path, teacher: Path, cache_general: Path, cache_logits: Path, cache_labels: Path,
                     p: dict[str, Any], start_runs: Callable[..., dict], wait_runs: Callable[..., None],
                     log) -> dict[str, Path]:
    """Every MobileBERT run of the demo, as the demo's 1-CPU Ray tasks (`start_runs` / `wait_runs`):
    the two general runs and the baseline first (the baseline takes the core that the faster
    progressive run frees), then the two prediction stages. Returns {row name: trained student folder}."""
    from kdcache.pipeline.student.mobilebert import init_mobilebert_student
    from kdcache.pipeline.student.models import with_classification_head

    top = root / "mobilebert"
    init = top / "init"
    if not (init / "config.json").exists():
        init_mobilebert_student(teacher, init, seed=0, **SHAPE)
    kts = ("progressive", "auxiliary")
    task = {"steps": p["task_steps"], "batch_size": p["task_batch_size"], "lr": p["task_lr"], "shuffle": True}
    general = [("mobilebert", {"cache": str(cache_general), "student": str(init), "out": str(top / f"general-{kt}"),
                               "steps": p["general_steps"], "batch_size": p["batch_size"], "lr": p["lr"],
                               "overrides": [f"knowledge_transfer={kt}"]}) for kt in kts]
    baseline = ("mobilebert-task", {**task, "cache": str(cache_labels), "out": str(top / "baseline"),
                                    "student": str(with_classification_head(init, top / "baseline-init", 2)),
                                    "overrides": ["preset_args.alpha=1.0"]})  # gold labels only
    wait_runs(log, start_runs(log, [*general, baseline]))
    jobs = [("mobilebert-task", {**task, "cache": str(cache_logits), "out": str(top / f"task-{kt}"),
                                 "student": str(with_classification_head(Path(flags["out"]) / "student",
                                                                         top / f"task-init-{kt}", num_labels=2))})
            for kt, (_, flags) in zip(kts, general)]
    wait_runs(log, start_runs(log, jobs))
    return {ROWS["progressive"]: top / "task-progressive" / "student",
            ROWS["auxiliary"]: top / "task-auxiliary" / "student", ROWS["baseline"]: top / "baseline" / "student"}


def _phases(run: Path) -> list[tuple[str, float, float]]:
    """(phase, first loss, last loss) of a progressive run's metrics."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "phase" in m:
            first.setdefault(m["phase"], m["loss"])
            last[m["phase"]] = m["loss"]
    return [(name, first[name], last[name]) for name in first]


def summarize(models: dict[str, dict[str, Any]], runs: dict[str, Path], rows: list[dict],
              root: Path) -> tuple[dict[str, Any], str]:
    """The `students.mobilebert` entry and the report's section. `models`: `kdcache eval`'s results
    (the progressive student and the baseline, timed with the teacher); the auxiliary-KT student,
    the same architecture, is only scored for accuracy on the same test rows."""
    from kdcache.pipeline.evaluation.evaluate import load_classifier
    from kdcache.pipeline.tasks.classify import accuracy

    m, base = models[ROWS["progressive"]], models[ROWS["baseline"]]
    teacher_acc = models["teacher"]["accuracy"]
    aux_acc = accuracy(*load_classifier(runs[ROWS["auxiliary"]]), rows)
    met = {"size_ratio": m["size_ratio"] >= TARGETS["size_ratio"],
           "speedup_batch32": m["speedup_batch32"] >= TARGETS["speedup_batch32"],
           "quality_retained": m["quality_retained"] >= TARGETS["quality_retained"],
           "above_baseline": m["accuracy"] > base["accuracy"],
           "progressive_at_least_auxiliary": m["accuracy"] >= aux_acc}
    student = {"params": m["params"], "size_ratio": m["size_ratio"], "speedup_batch1": m["speedup_batch1"],
               "speedup_batch32": m["speedup_batch32"], "quality_retained": m["quality_retained"],
               "baseline_quality_retained": base["quality_retained"], "accuracy": m["accuracy"],
               "baseline_accuracy": base["accuracy"], "auxiliary_kt_accuracy": aux_acc,
               "auxiliary_kt_quality_retained": aux_acc / teacher_acc, "shape": SHAPE, "targets_met": met}
    phases = _phases(root / "mobilebert" / "general-progressive")
    lines = ["## MobileBERT (Sun et al. 2020)", "",
             f"Student: the teacher's {m['layers']} layers and {m['hidden_size']} width between blocks, bottleneck "
             f"{SHAPE['bottleneck']} (4 heads, each against the mean of 3 teacher heads), {SHAPE['ffn_stack']} stacked "
             f"FFNs, {SHAPE['embedding_size']}-wide token table (the teacher's, PCA-projected) with a 3-gram "
             "embedding transformation. General stage from the Wikipedia cache (every hidden state and attention "
             "map); prediction stage from the Rotten Tomatoes logits cache; the baseline trains the same student "
             "on the gold labels for the prediction stage's steps.", "",
             "| run | accuracy | kept | faster b32 | smaller |", "|---|---|---|---|---|",
             f"| progressive KT (the student) | {m['accuracy']:.4f} | {m['quality_retained']:.1%} | "
             f"{m['speedup_batch32']:.2f}× | {m['size_ratio']:.2f}× |",
             f"| auxiliary KT (same cache, same steps) | {aux_acc:.4f} | {aux_acc / teacher_acc:.1%} | same | same |",
             f"| no-KD baseline | {base['accuracy']:.4f} | {base['quality_retained']:.1%} | "
             f"{base['speedup_batch32']:.2f}× | {base['size_ratio']:.2f}× |", "",
             "Targets: " + ", ".join(f"{k} {'met' if v else '**missed**'}" for k, v in met.items())
             + f" (≥ {TARGETS['size_ratio']}× fewer parameters, ≥ {TARGETS['speedup_batch32']}× the teacher's batch-32 "
             f"throughput, kept ≥ {TARGETS['quality_retained']:.0%}, above the no-KD baseline, progressive ≥ "
             "auxiliary)."]
    if phases:
        lines += ["", "Progressive phases of the general stage (loss at the phase's first → last step): "
                  + "; ".join(f"{name} {a:.3f} → {b:.3f}" for name, a, b in phases) + "."]
    return student, "\n".join(lines)
