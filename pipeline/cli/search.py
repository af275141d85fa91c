"""`kdcache search`: argparse wiring, and `--eval-task` after the search (the search itself is
kdcache.pipeline.student.search; evaluation sits above the student wing)."""
from __future__ import annotations

import json
from pathlib import Path


def cmd_search(args) -> int:
    from kdcache.pipeline.common.console import run_console
    from kdcache.pipeline.common.jsonout import print_json
    from kdcache.pipeline.student.search.run import SearchInterrupted, SearchOptions, search

    if bool(args.eval_task) != bool(args.eval_teacher):
        raise ValueError("--eval-task and --eval-teacher go together: the retrained students are compared with the teacher")
    if args.eval_task and not args.final_top:
        raise ValueError("--eval-task evaluates the retrained candidates: keep --final-top above 0")

    opts = SearchOptions(cache=args.cache, out=args.out, space=args.space or "", trials=args.trials,
                         max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial,
                         scheduler=args.scheduler, search=args.search, metric=args.metric,
                         latency_target_ms=args.latency_target_ms, penalty=args.penalty,
                         dev_cache=args.dev_cache or "", holdout=args.holdout, embeddings=args.embeddings or "",
                         final_top=args.final_top, final_seeds=args.final_seeds, seed=args.seed, address=args.address)
    with run_console(args.out, say_where=print):
        try:
            summary = search(opts)
        except SearchInterrupted as e:
            print(f"kdcache search: {e}")
            return 130
        summary["eval"] = None
        if args.eval_task and summary["final"]:  # the teacher is loaded now, after every trial
            summary["eval"] = _evaluate(summary["final"], args.eval_task, args.eval_teacher, Path(summary["out"]))
            Path(summary["out"], "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.json:
        print_json(summary)
        return 0
    b = summary["best"]
    print(f"{summary['trials']} trials ({summary['stopped_early']} stopped early by {summary['scheduler']}, "
          f"{summary['errored']} failed); best: trial {b['trial_id']} {b['family']}, dev accuracy "
          f"{b['dev_accuracy']:.4f}, {b['latency_ms']:.2f} ms per batch of 32, {b['params']:,} parameters")
    for f in summary["final"]:
        print(f"  retrained {f['trial_id']} ({f['family']}): dev accuracy {f['dev_accuracy_mean']:.4f} "
              f"± {f['dev_accuracy_spread']:.4f} over {f['seeds']} seeds"
              + (f"; test accuracy {f['test_accuracy_mean']:.4f} ± {f['test_accuracy_spread']:.4f} "
                 f"({f['test_quality_retained']:.1%} of the teacher's), {f['speedup_batch32']:.1f}x its batch-32 "
                 "throughput" if "test_accuracy_mean" in f else ""))
    if summary["eval"]:
        print(f"evaluation report: {summary['eval']['report']}")
    print(f"front: {summary['front_png']}; best architecture: {b['folder']}/architecture.json "
          f"(kdcache init-student --architecture-config ...); trials: {summary['trials_jsonl']}")
    return 0


def _evaluate(final: list[dict], task: str, teacher: str, out: Path) -> dict:
    """`kdcache eval` of each retrained candidate (seed 0) beside the teacher: DIR/eval/report.md.
    The other seeds' test accuracies join each candidate's entry (mean ± spread). Here, not in the
    student wing: evaluation sits above it (the layers contract in pyproject.toml)."""
    import statistics

    from kdcache.pipeline.evaluation.evaluate import load_classifier, run_eval, task_rows
    from kdcache.pipeline.tasks.classify import accuracy

    print(f"evaluating {len(final)} retrained candidate(s) on {task} beside {teacher}")
    students = {f"{f['trial_id']} ({f['family']})": f["students"][0] for f in final}
    flat = run_eval(teacher, students, task, out / "eval", data_dir=out / "data")
    rows = task_rows(task, out / "data")
    for f, name in zip(final, students):
        accs = [flat["models"][name]["accuracy"]] + [accuracy(*load_classifier(s), rows) for s in f["students"][1:]]
        f["test_accuracy_seeds"] = accs
        f["test_accuracy_mean"] = statistics.fmean(accs)
        f["test_accuracy_spread"] = max(accs) - min(accs)
        f["test_quality_retained"] = f["test_accuracy_mean"] / flat["models"]["teacher"]["accuracy"]
        f["speedup_batch32"] = flat["models"][name]["speedup_batch32"]
    return {"report": flat["report"], "teacher_accuracy": flat["models"]["teacher"]["accuracy"],
            "models": flat["models"]}


def register(subparsers) -> None:
    s = subparsers.add_parser("search", help="KD-guided architecture search over one cache (Ray Tune; AdaBERT-style)")
    s.add_argument("--cache", required=True, help="task-logit cache (kdcache cache --mode examples, classifier teacher)")
    s.add_argument("--space", default=None, help="search space YAML (default: pipeline/student/search/default_space.yaml)")
    s.add_argument("--out", required=True, help="search folder: trials.jsonl, front.png/.md, best/, final/, tune/")
    s.add_argument("--trials", type=int, default=8, help="trials to run (default 8)")
    s.add_argument("--max-concurrent", type=int, default=0, help="trials at a time (default: CPUs / --cpus-per-trial)")
    s.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs (and torch threads) per trial (default 1)")
    s.add_argument("--scheduler", choices=("asha", "fifo"), default="asha", help="asha stops weak trials early")
    s.add_argument("--search", choices=("random", "optuna"), default="optuna", help="Optuna TPE or random search")
    s.add_argument("--metric", choices=("score", "dev_accuracy"), default="score",
                   help="what to maximise: score = dev accuracy - penalty*max(0, ln(latency/target)) (default)")
    s.add_argument("--latency-target-ms", type=float, default=0.0,
                   help="CPU latency per batch of 32 that the score aims under (default 0: no latency term)")
    s.add_argument("--penalty", type=float, default=0.05, help="the latency term's weight (default 0.05)")
    s.add_argument("--dev-cache", default=None, help="labelled held-out rows (default: a hash slice of --cache's)")
    s.add_argument("--holdout", type=float, default=0.1, help="share of --cache's labelled rows held out (default 0.1)")
    s.add_argument("--embeddings", default=None,
                   help="a student folder from `kdcache init-student --architecture cnn --teacher T` whose token table "
                        "(PCA-projected per trial) and tokenizer every trial starts from (default: random tables)")
    s.add_argument("--final-top", type=int, default=2, help="candidates retrained at the end (default 2; 0 = none)")
    s.add_argument("--final-seeds", type=int, default=3, help="seeds per retrained candidate (default 3)")
    s.add_argument("--eval-task", default=None,
                   help="after the search: `kdcache eval` of the retrained students on this task (rotten-tomatoes "
                        "or a JSONL file with text/label) -> DIR/eval/report.md; needs --eval-teacher")
    s.add_argument("--eval-teacher", default=None,
                   help="the teacher the evaluation compares with (loaded after the search only, never by a trial)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object (last line)")
    s.set_defaults(func=cmd_search)
