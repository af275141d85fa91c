"""`kdcache demo`: TinyBERT's two stages on a real teacher and real text, all offline, then the report.

1. General distillation: the pretrained all-MiniLM-L6-v2 encoder runs once over Wikipedia lead
   extracts on a local Ray cluster; its embedding output, every hidden state and every attention map
   land in a cache; a student with half the layers and half the width (a learned projection bridges
   the widths) is trained from the cache by Ray Train (hidden states 0/2/4/6, attention 2/4/6),
   without the teacher.
2. Task-specific distillation on Rotten Tomatoes (fixed split, `kdcache.pipeline.tasks.data`): the teacher is
   fine-tuned with a classification head; it runs once more over the training split — with the
   mapped hidden/attention layers for the intermediate stage, and over the training split plus
   augmented copies for its prediction logits; the general student is trained on the intermediate
   losses, then on the logits. A baseline of the same shape is fine-tuned on the gold labels only.
   MobileBERT (`demos/mobilebert.py`): a bottleneck student with the teacher's depth and width
   between blocks learns layer l from layer l of the same Wikipedia cache (progressive and auxiliary
   knowledge transfer, same steps), then its prediction stage from the same logits cache; no-KD
   baseline beside it.
3. Low-resource students (`demos/small_students.py`, Tang et al. 2019): the task teacher scores Tang's
   augmented transfer set in one logits-only pass; BiLSTM and CNN students (3 seeds in the default
   profile) train from that cache, each beside a no-KD baseline (two ablations with `--ablations`).
   The searched student (`demos/searched.py`, AdaBERT-style): `kdcache search` over the same cache,
   Optuna and random search at equal budget; the best candidate retrained with the profile's seeds.
4. `kdcache eval`: accuracy on the held-out test split, size, CPU latency/throughput, report + plots;
   `students` in the JSON gathers every student's figures and targets.

A Ray Train worker on a CPU gets one core, so work that does not depend on the running stage fills
the other one: the task teacher's fine-tuning (3) runs as a Ray task beside the general training (2),
and the baseline (6b) beside the two task-distillation stages (5-6).

Every stage is resumable: caches skip committed shards, runs resume from their checkpoints, the
fine-tuned teacher is reused; a second run of the same command does no teacher inference.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        # general stage: sequences of 128 tokens cached / optimiser steps / rows per step
        "general": {"sequences": 256, "steps": 40, "batch_size": 16},
        # task stage: split sizes kept (0 = all), augmented copies of each training text, steps
        "task": {"train": 800, "dev": 200, "test": 400, "augment": 1, "finetune_epochs": 1, "finetune_lr": 2e-4,
                 "intermediate_steps": 25, "pred_steps": 50, "batch_size": 32},
        # BiLSTM/CNN students (demos/small_students.py): Tang copies per text, seeds, steps (the
        # ablations are `kdcache demo --ablations`)
        "small": {"n_iter": 2, "seeds": 1, "steps": 100, "batch_size": 64},
        # `kdcache search` (demos/searched.py): trials per search (Optuna and random), steps, seeds retrained
        "search": {"trials": 4, "steps": 40, "report_every": 20, "seeds": 1},
        # MobileBERT (demos/mobilebert.py): general stage (7 progressive phases), prediction stage
        "mobilebert": {"general_steps": 14, "batch_size": 16, "lr": 1e-3, "task_steps": 40, "task_batch_size": 32,
                       "task_lr": 5e-4},
        "eval_rounds": 2,
    },
    "default": {
        "general": {"sequences": 2048, "steps": 400, "batch_size": 32},
        "task": {"train": 0, "dev": 0, "test": 0, "augment": 2, "finetune_epochs": 1, "finetune_lr": 1e-4,
                 "intermediate_steps": 300, "pred_steps": 1500, "batch_size": 32},
        "small": {"n_iter": 10, "seeds": 3, "steps": 1000, "batch_size": 64},
        "search": {"trials": 8, "steps": 600, "report_every": 150, "seeds": 3},
        "mobilebert": {"general_steps": 350, "batch_size": 32, "lr": 1e-3, "task_steps": 500, "task_batch_size": 32,
                       "task_lr": 5e-4},
        "eval_rounds": 5,
    },
}
# Half the teacher's layers and width; the embedding tables start as the teacher's projected onto
# their top 192 principal directions (the blocks are random): the tables are most of the parameters.
STUDENT_SHAPE = {"num_layers": 3, "hidden_size": 192, "num_heads": 12, "intermediate_size": 768,
                 "embedding_init": "pca"}
# What the report checks on the default profile (issue 5); the quick profile reports them too.
TARGETS = {"quality_retained": 0.95, "size_ratio": 2.0, "speedup_batch1": 2.0, "speedup_batch32": 2.0,
           "above_baseline": 0.02}
MAX_LENGTH_TASK = 64  # Rotten Tomatoes snippets: median 18 words, longest 53


def _params(folder: Path) -> int:
    """Parameters stored in a model folder (read from safetensors headers, no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= int(d)
                total += n
    return total


def _cache(log, **kw) -> dict[str, Any]:
    from kdcache.pipeline.teacher_pass.run import run_cache_pass
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.storage.verify import verify_cache

    summary = run_cache_pass(CacheConfig(batch_size=32, actors=1, progress=True, **kw), log=log)
    problems, _ = verify_cache(kw["out"])
    if problems:
        raise RuntimeError(f"the demo cache {kw['out']} failed verification:\n" + "\n".join(map(str, problems)))
    return summary


def _train(log, recipe: str, **flags) -> Path:
    from kdcache.pipeline.student.trainer import train

    cfg = _train_config(recipe, dict(flags))
    if _finished(cfg):
        # A finished run: skip Ray Train's start-up (~25 s) rather than start it to find nothing to do.
        log(f"   {Path(cfg.out).name}: finished earlier ({cfg.steps} steps), reused")
        return Path(cfg.out) / "student"
    train(cfg, log=log)
    return Path(flags["out"]) / "student"


def _train_config(recipe: str, flags: dict[str, Any]):
    from kdcache.pipeline.student.config import load_train_config

    overrides = flags.pop("overrides", None)
    return load_train_config(recipe, flags={"workers": 1, "checkpoint_every": 100, **flags}, overrides=overrides)


def _finished(cfg) -> bool:
    done = Path(cfg.out) / "summary.json"
    return done.exists() and json.loads(done.read_text()).get("steps") == cfg.steps and (Path(cfg.out) / "student").is_dir()


def _train_one_in_process(recipe: str, flags: dict[str, Any]) -> str:
    from kdcache.pipeline.student.trainer import train

    cfg = _train_config(recipe, {**flags, "no_ray": True, "progress": False})
    if not _finished(cfg):
        train(cfg, log=lambda *_: None)
    return cfg.out


def _train_many(log, jobs: list[tuple[str, dict[str, Any]]]) -> list[Path]:
    """Small-student runs side by side (`_start_runs`), waited for; each resumes from its checkpoints."""
    _wait_runs(log, _start_runs(log, jobs))
    return [Path(flags["out"]) / "student" for _, flags in jobs]


def _start_runs(log, jobs: list[tuple[str, dict[str, Any]]]) -> dict[Any, str]:
    """Start runs as Ray tasks (1 CPU each), trained in the task's own process. A Ray Train worker
    group per run would add ~30 s of start-up to runs of 1-3 minutes, and a 1-CPU Ray Train worker
    leaves the other core idle; runs finished earlier are skipped. Returns {task: run name}."""
    import ray

    from kdcache.pipeline.common import allocator

    env = allocator.worker_env()  # as Ray Train's CPU workers get it (allocator.py: ~10% per step)
    remote = ray.remote(num_cpus=1, **({"runtime_env": {"env_vars": env}} if env else {}))(_train_one_in_process)
    pending, reused = {}, 0
    for recipe, flags in jobs:
        if _finished(_train_config(recipe, dict(flags))):
            reused += 1
        else:
            pending[remote.remote(recipe, flags)] = Path(flags["out"]).name
    log(f"   {len(jobs)} run(s): {reused} finished earlier, {len(pending)} to train as Ray tasks, "
        f"{int(ray.cluster_resources().get('CPU', 1))} CPUs")
    return pending


def _wait_runs(log, pending: dict[Any, str]) -> None:
    import ray

    t0, left = time.perf_counter(), list(pending)
    while left:
        done, left = ray.wait(left, num_returns=1)
        ray.get(done[0])  # a failed run raises here, with its traceback
        log(f"   {pending[done[0]]}: trained  [{time.perf_counter() - t0:.0f} s]")


def _finetune_task(teacher: str, train_rows: list[dict], dev_rows: list[dict], out: str, kw: dict[str, Any],
                   threads: int):
    """The task teacher's fine-tuning in a Ray task beside a 1-CPU Ray Train worker; returns its
    summary and the lines it would have printed. It reserves 1 CPU but runs `threads` threads: with
    the one thread Ray gives a 1-CPU task it outlasted the general training by a minute and then left
    a core idle (docs/performance.md)."""
    import torch

    from kdcache.pipeline.tasks.finetune import finetune_classifier

    torch.set_num_threads(threads)
    lines: list[str] = []
    return finetune_classifier(teacher, train_rows, dev_rows, out, log=lines.append, **kw), lines


def run_demo(quick: bool, out: str | None, log=print, ablations: bool = False) -> dict[str, Any]:
    """The demo with the terminal kept for kdcache's own lines: Ray's and the libraries' messages go
    to `<out>/kdcache.log` (common.console)."""
    from kdcache.pipeline.common.console import run_console

    root = Path(out or ("runs/demo-quick" if quick else "runs/demo")).resolve()
    with run_console(root, say_where=log):
        return _run_demo(quick, str(root), log, ablations)


def _run_demo(quick: bool, out: str | None, log=print, ablations: bool = False) -> dict[str, Any]:
    from kdcache.pipeline.data import assets
    from kdcache.pipeline.evaluation.evaluate import run_eval
    from kdcache.pipeline.common.runtime import init_ray
    from kdcache.pipeline.tasks.finetune import finetune_classifier
    from kdcache.pipeline.student.models import init_student_from_teacher, with_classification_head
    from kdcache.pipeline.tasks.data import augment, prepare_rotten_tomatoes
    from kdcache.pipeline.common.jsonout import read_jsonl, write_jsonl
    from kdcache.pipeline.demos import mobilebert, searched, small_students
    from kdcache.pipeline.evaluation.report import check_targets, write_report
    from kdcache.storage import CacheReader

    name = "quick" if quick else "default"
    profile = PROFILES[name]
    g, t, sm = profile["general"], profile["task"], {**profile["small"], "ablations": ablations}
    root = Path(out or ("runs/demo-quick" if quick else "runs/demo")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    starts: list[tuple[str, float]] = []  # (stage number, start): the JSON's `stage_seconds`

    def stage(title: str) -> None:
        starts.append((title.split()[0], time.perf_counter() - t0))
        log(f"== {title}  [{starts[-1][1]:.0f} s]")

    installed = assets.ensure_assets(["minilm", "wiki", "rotten_tomatoes"])
    if installed:
        log(f"installed offline assets: {', '.join(installed)}")
    teacher = assets.minilm_dir()
    # One local Ray cluster for every stage (each stage would otherwise start and stop its own).
    started_ray = init_ray(None)
    forward_calls = 0
    try:
        stage("1/8 general distillation, teacher pass: all-MiniLM-L6-v2 over Wikipedia lead extracts")
        cache_general = root / "cache-general"
        forward_calls += _cache(
            log, teacher=str(teacher), corpus=[str(assets.wiki_extracts_json())], text_field="extract",
            out=str(cache_general), mode="pack", max_length=128, top_k=0, hidden_layers="all",
            attention_layers="all", attention_dtype="uint8", max_sequences=g["sequences"])["forward_calls"]

        stage("2/8 general distillation from the cache (Ray Train): embedding + hidden + attention losses; "
              "stage 3 beside it")
        limits = {"train": t["train"], "dev": t["dev"], "test": t["test"]}
        splits = prepare_rotten_tomatoes(root / "data", limits)
        train_rows = read_jsonl(splits["train"])
        task_teacher = root / "teacher-rt"
        ft_kw = dict(epochs=t["finetune_epochs"], lr=t["finetune_lr"], max_length=MAX_LENGTH_TASK)
        # The 1-CPU Ray Train worker leaves a core idle: the task teacher's fine-tuning (stage 3, which
        # needs nothing from stages 1-2) runs there meanwhile.
        finetuning = None
        if not (task_teacher / "finetune.json").exists():
            import ray

            log("   stage 3 (the task teacher's fine-tuning) runs beside it, as a Ray task (1 CPU)")
            finetuning = ray.remote(num_cpus=1)(_finetune_task).remote(
                str(teacher), train_rows, read_jsonl(splits["dev"]), str(task_teacher), ft_kw,
                max(1, int(ray.cluster_resources().get("CPU", 1))))
        student_init = root / "student-init"
        if not (student_init / "config.json").exists():
            init_student_from_teacher(str(teacher), str(student_init), seed=0, **STUDENT_SHAPE)
        general = _train(log, "tinybert-general", cache=str(cache_general), student=str(student_init),
                         out=str(root / "general"), steps=g["steps"], batch_size=g["batch_size"], lr=5e-4)

        stage("3/8 task teacher: fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes (fixed split)")
        if finetuning is not None:
            import ray

            ft, lines = ray.get(finetuning)
            for line in lines:
                log(f"   {line}")
        else:
            ft = finetune_classifier(teacher, train_rows, read_jsonl(splits["dev"]), task_teacher, log=log, **ft_kw)

        stage("4/8 task teacher passes: hidden/attention on the training split, logits on it + augmented copies, "
              "logits on Tang's transfer set")
        augmented = root / "data" / f"{splits['train'].stem}-aug{t['augment']}.jsonl"
        if not augmented.exists():
            write_jsonl(augmented, augment(train_rows, t["augment"], seed=0))
        common = dict(teacher=str(task_teacher), mode="examples", max_length=MAX_LENGTH_TASK, label_field="label",
                      top_k=0)
        cache_inter = root / "cache-task-intermediate"
        forward_calls += _cache(log, corpus=[str(splits["train"])], out=str(cache_inter), hidden_layers="0,2,4,6",
                                attention_layers="2,4,6", attention_dtype="uint8", **common)["forward_calls"]
        cache_logits = root / "cache-task-logits"
        forward_calls += _cache(log, corpus=[str(augmented)], out=str(cache_logits), **common)["forward_calls"]
        transfer = root / "data" / f"{splits['train'].stem}-tang{sm['n_iter']}.jsonl"
        augmentation = small_students.transfer_set(train_rows, transfer, sm["n_iter"], seed=0)
        cache_transfer = root / "cache-task-transfer"
        forward_calls += _cache(log, corpus=[str(transfer)], out=str(cache_transfer), **common)["forward_calls"]
        cache_dev = root / "cache-task-dev"  # the search's dev accuracy: gold labels of the dev split
        forward_calls += _cache(log, corpus=[str(splits["dev"])], out=str(cache_dev), **common)["forward_calls"]

        stage("5/8 task distillation, intermediate layers (the general student + a classification head); "
              "stage 6b beside stages 5-6")
        # the baseline needs nothing from stages 5-6: it trains on the other core meanwhile
        base_init = with_classification_head(student_init, root / "baseline-init", num_labels=2)
        beside = _start_runs(log, [("tinybert-task", dict(
            cache=str(cache_inter), student=str(base_init), out=str(root / "baseline"),
            steps=t["intermediate_steps"] + t["pred_steps"], batch_size=t["batch_size"], lr=5e-4, shuffle=True,
            overrides=["loss_weights.pred=0", "loss_weights.ce=1"]))])
        task_init = with_classification_head(general, root / "student-task-init", num_labels=2)
        inter = _train(log, "tinybert-task", cache=str(cache_inter), student=str(task_init),
                       out=str(root / "task-intermediate"), steps=t["intermediate_steps"], batch_size=t["batch_size"],
                       lr=5e-4, overrides=["preset_args.stage=intermediate"])

        stage("6/8 task distillation, prediction layer (teacher logits on the augmented training set)")
        student = _train(log, "tinybert-task", cache=str(cache_logits), student=str(inter),
                         out=str(root / "task-pred"), steps=t["pred_steps"], batch_size=t["batch_size"], lr=5e-4,
                         shuffle=True)

        stage("6b/8 baseline: the same shape, same init, fine-tuned on the gold labels without distillation")
        _wait_runs(log, beside)
        baseline = root / "baseline" / "student"

        stage("6c/8 MobileBERT: layer-wise transfer from the general cache, progressive vs auxiliary KT; the "
              "prediction stage from the logits cache; a no-KD baseline")
        mobile = mobilebert.train_mobilebert(root, teacher, cache_general, cache_logits, cache_inter,
                                             profile["mobilebert"], _start_runs, _wait_runs, log)

        stage("7/8 low-resource students: BiLSTM and CNN from the transfer-set cache, each with a no-KD baseline")
        small = small_students.train_small_students(root, task_teacher, cache_transfer, cache_inter, sm, _train_many,
                                                     log)

        stage("7b/8 architecture search over the same cache (kdcache search): Optuna vs random, equal budget")
        searches = searched.run_searches(root, cache_transfer, cache_dev, task_teacher, profile["search"], log)
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    stage("8/8 evaluation on the held-out test split (kdcache eval)")
    runs = {"general": root / "general", "task intermediate": root / "task-intermediate",
            "task pred": root / "task-pred", "baseline (no KD)": root / "baseline"}
    # The quick profile evaluates on the first examples of the same fixed test split.
    task = "rotten-tomatoes" if not limits["test"] else str(splits["test"])
    timed = {name: str(small[name][0]) for arch in small_students.SHAPES for name in (arch, f"{arch} baseline (no KD)")}
    timed["searched"] = searches["optuna"]["summary"]["final"][0]["students"][0]
    timed.update({name: str(mobile[name]) for name in (mobilebert.ROWS["progressive"], mobilebert.ROWS["baseline"])})
    flat = run_eval(str(task_teacher), {"student": str(student), **timed}, task, root / "report",
                    baseline=str(baseline), runs={k: str(v) for k, v in runs.items()}, data_dir=root / "data",
                    targets=TARGETS, rounds=profile["eval_rounds"], log=log)
    from kdcache.pipeline.evaluation.evaluate import task_rows

    rows = task_rows(task, root / "data")
    students, section = small_students.summarize(flat["models"], small, rows, augmentation)
    students["searched"], search_section = searched.summarize(
        flat["models"], searches, {arch: small[arch] for arch in small_students.SHAPES}, rows, root / "report")
    students["mobilebert"], mobile_section = mobilebert.summarize(flat["models"], mobile, rows, root)
    notice = "" if not quick else (
        "**Quick profile: a smoke test.** Its runs are a few dozen steps, too short to compare quality: students "
        "and their no-KD baselines may tie or trail, and the targets below are reported, not expected to be met. "
        "`kdcache demo` (the default profile) gives the figures.")
    write_report(root / "report", flat, {k: str(v) for k, v in runs.items()}, targets=TARGETS,
                 extra="\n\n".join((mobile_section, section, search_section)), notice=notice)
    students = {"tinybert": {"params": flat["student_params"], "speedup_batch1": flat["speedup_batch1"],
                             "speedup_batch32": flat["speedup_batch32"], "quality_retained": flat["quality_retained"],
                             "baseline_quality_retained": flat["baseline_quality_retained"],
                             "targets_met": {name: ok for name, ok, _ in check_targets(flat, TARGETS)}},
                **students}
    general_reader = CacheReader(str(cache_general), verify="off")
    report = {
        **{k: v for k, v in flat.items() if k != "models"},
        "profile": name, "smoke_test": quick, "out": str(root), "teacher": "all-MiniLM-L6-v2 (fine-tuned on Rotten Tomatoes)",
        "teacher_dev_accuracy": ft["dev_accuracy"],
        "general_student_params": _params(general),
        "cache_general_tokens": general_reader.manifest.tokens, "cache_general_bytes": general_reader.manifest.bytes,
        "teacher_pass_forward_calls": forward_calls,
        "augmentation": augmentation,
        "students": students,
        "models": flat["models"],
        "seconds": time.perf_counter() - t0,
    }
    ends = [t for _, t in starts[1:]] + [report["seconds"]]
    report["stage_seconds"] = {name: round(end - start, 1) for (name, start), end in zip(starts, ends)}
    log("")
    log(Path(flat["report"]).read_text().split("## Plots")[0].split("![search front]")[0].rstrip())
    log(f"\nreport: {flat['report']}")
    (root / "demo.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
