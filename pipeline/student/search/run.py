"""`kdcache search`: Ray Tune over the space, every trial training from the same cache; then the
trials table, the accuracy/latency front, the best architecture and the final retraining with several
seeds. Re-running the same command continues an interrupted search (`Tuner.restore`): finished trials
are kept, unfinished ones resume from their last checkpoint."""
from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kdcache.pipeline.student.search.space import architecture, load_space, training, tune_space
from kdcache.pipeline.student.search.trial import SearchSetup, fit_candidate, setup_dict, tune_trial

EXPERIMENT = "tune"  # DIR/tune/: Ray Tune's experiment (its state is what a re-run restores)


class SearchInterrupted(RuntimeError):
    """Stopped by a signal; Ray Tune's experiment state is saved and a re-run continues it."""


@dataclass
class SearchOptions:
    cache: str
    out: str
    space: str = ""
    trials: int = 8
    max_concurrent: int = 0  # 0 = the cluster's CPUs / cpus_per_trial, at least 1
    cpus_per_trial: float = 1.0
    scheduler: str = "asha"  # asha | fifo
    search: str = "optuna"  # optuna | random
    metric: str = "score"  # score | dev_accuracy
    latency_target_ms: float = 0.0
    penalty: float = 0.05
    dev_cache: str = ""
    holdout: float = 0.1
    embeddings: str = ""
    final_top: int = 2
    final_seeds: int = 3
    seed: int = 0
    address: str | None = None


def _searcher(opts: SearchOptions):
    if opts.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=opts.seed)
    if opts.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        # optuna prints "A new study created" through its own stderr handler: into the log file instead
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=opts.seed, n_startup_trials=max(2, opts.trials // 3)))
    raise ValueError(f"--search {opts.search!r}: random | optuna")


def _scheduler(opts: SearchOptions, space: dict[str, Any]):
    if opts.scheduler == "fifo":
        return None
    if opts.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        rungs = max(1, -(-int(space["train"]["steps"]) // int(space["train"]["report_every"])))
        return ASHAScheduler(time_attr="training_iteration", max_t=rungs, grace_period=1, reduction_factor=2)
    raise ValueError(f"--scheduler {opts.scheduler!r}: asha | fifo")


def search(opts: SearchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) the search; write DIR/trials.jsonl, front.md/.png, best/, final/; return the summary."""
    import ray
    from ray import tune

    from kdcache.pipeline.common.console import prints_to_log
    from kdcache.pipeline.common.runtime import init_ray

    if opts.metric not in ("score", "dev_accuracy"):
        raise ValueError(f"--metric {opts.metric!r}: score (accuracy with the latency penalty) | dev_accuracy")
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    space = load_space(opts.space or None)
    (out / "space.yaml").write_text(json.dumps(space, indent=1) + "\n")
    setup = SearchSetup(cache=str(Path(opts.cache).resolve()), space=space, out=str(out),
                        dev_cache=str(Path(opts.dev_cache).resolve()) if opts.dev_cache else "",
                        holdout=opts.holdout, embeddings=str(Path(opts.embeddings).resolve()) if opts.embeddings else "",
                        latency_target_ms=opts.latency_target_ms, penalty=opts.penalty, seed=opts.seed,
                        threads=max(1, int(opts.cpus_per_trial)))
    _check_inputs(setup)
    started = init_ray(opts.address)
    try:
        trainable = tune.with_resources(tune.with_parameters(tune_trial, setup=setup_dict(setup)),
                                        {"cpu": opts.cpus_per_trial})
        path = out / EXPERIMENT
        if tune.Tuner.can_restore(str(path)):
            log(f"continuing the search in {path} (finished trials are kept)")
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            concurrent = opts.max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1) // opts.cpus_per_trial))
            log(f"search: {opts.trials} trials, {opts.search} search, {opts.scheduler} scheduler, "
                f"{concurrent} at a time, objective {opts.metric}")
            tuner = tune.Tuner(
                trainable, param_space=tune_space(space),
                tune_config=tune.TuneConfig(metric=opts.metric, mode="max", search_alg=_searcher(opts),
                                            scheduler=_scheduler(opts, space), num_samples=opts.trials,
                                            max_concurrent_trials=concurrent,
                                            # a finished trial's worker takes the next trial: its imports
                                            # (~10 s: torch, the optimiser's dynamo import), the token table
                                            # and the dev rows are already in memory
                                            reuse_actors=True),
                run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=0,
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                          failure_config=tune.FailureConfig(max_failures=1)))
        with prints_to_log("ray.tune"):
            grid = tuner.fit()
        # Ctrl+C: Tune saves its state and returns with trials still pending or running (it does not
        # raise), so the front and the retraining would be built from a half-run search
        unfinished = len(grid) - grid.num_terminated - grid.num_errors
        if unfinished or len(grid) < opts.trials:
            raise SearchInterrupted(f"search interrupted ({unfinished + opts.trials - len(grid)} of {opts.trials} "
                                    f"trials to go); run the same command again to continue: finished trials "
                                    f"are kept (state: {path})")
        trials = _write_trials(grid, space, out)
        done = [t for t in trials if t.get("dev_accuracy") is not None]
        if not done:
            raise RuntimeError(f"no trial reported a result; see {out / EXPERIMENT} and {out / 'kdcache.log'}")
        front = pareto_front(done)
        _write_front(done, front, out)
        ranked = sorted(done, key=lambda t: t[opts.metric], reverse=True)
        best = _export_best(ranked[0], out)
        final = _final_retraining(ranked[:opts.final_top], setup, opts, out, log) if opts.final_top else []
    finally:
        if started:
            ray.shutdown()
    summary = {"out": str(out), "trials": len(trials), "completed": sum(t["status"] == "TERMINATED" for t in trials),
               "stopped_early": sum(bool(t.get("stopped_early")) for t in trials),
               "errored": sum(t["status"] == "ERROR" for t in trials), "search": opts.search,
               "scheduler": opts.scheduler, "metric": opts.metric, "best": best,
               "front": [{k: t[k] for k in ("trial_id", "family", "dev_accuracy", "latency_ms")} for t in front],
               "final": final, "trials_jsonl": str(out / "trials.jsonl"),
               "front_png": str(out / "front.png")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _check_inputs(setup: SearchSetup) -> None:
    """Fail in the driver, with the flag to change, before any trial starts."""
    from kdcache.storage import CacheReader

    spec = CacheReader(setup.cache, verify="off").spec
    if not spec.num_labels:
        raise ValueError(f"--cache {setup.cache} holds no task logits: search a cache made with a classifier "
                         "teacher (kdcache cache --mode examples --label-field FIELD)")
    if not setup.dev_cache and not spec.has_labels:
        raise ValueError(f"--cache {setup.cache} has no gold labels to hold out a dev slice from: pass --dev-cache")
    if setup.embeddings and not (Path(setup.embeddings) / "config.json").is_file():
        raise ValueError(f"--embeddings {setup.embeddings}: no student there; make one with "
                         "`kdcache init-student --architecture cnn --teacher T --out FOLDER`")


def _write_trials(grid, space: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """DIR/trials.jsonl: every trial's architecture, training settings, status and last figures."""
    rows = []
    steps = int(space["train"]["steps"])
    for r in grid:
        cfg = dict(r.config or {})
        m = r.metrics or {}
        row = {"trial_id": m.get("trial_id") or (r.path and Path(r.path).name), "status": "ERROR" if r.error else
               "TERMINATED", "family": cfg.get("family"), "architecture": architecture(cfg, space) if cfg else None,
               "training": training(cfg, space) if cfg else None,
               "checkpoint": r.checkpoint.path if r.checkpoint else None,
               **{k: m.get(k) for k in ("step", "dev_accuracy", "score", "latency_ms", "latency_spread_ms", "params",
                                        "params_without_embeddings", "loss", "training_iteration")}}
        row["stopped_early"] = row["step"] is not None and row["step"] < steps and not r.error
        rows.append(row)
    rows.sort(key=lambda t: str(t["trial_id"]))
    tmp = out / "trials.jsonl.tmp"
    tmp.write_text("".join(json.dumps(t, default=str) + "\n" for t in rows))
    tmp.replace(out / "trials.jsonl")
    return rows


def pareto_front(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials no other trial beats on both dev accuracy (higher) and latency (lower), fastest first."""
    front, best_acc = [], -1.0
    for t in sorted(trials, key=lambda t: (t["latency_ms"], -t["dev_accuracy"])):
        if t["dev_accuracy"] > best_acc:
            front.append(t)
            best_acc = t["dev_accuracy"]
    return front


def hypervolume(front: list[dict[str, Any]], max_latency_ms: float) -> float:
    """Area dominated by the front in (accuracy, latency) up to `max_latency_ms` (higher is better):
    compares two searches at equal budget."""
    # staircase: for each latency cut-off the best accuracy reachable at or below it
    area, pts = 0.0, sorted((t["latency_ms"], t["dev_accuracy"]) for t in front if t["latency_ms"] <= max_latency_ms)
    for i, (lat, acc) in enumerate(pts):
        nxt = pts[i + 1][0] if i + 1 < len(pts) else max_latency_ms
        area += (nxt - lat) * max(a for _, a in pts[:i + 1])
    return area


def _write_front(trials: list[dict[str, Any]], front: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| trial | family | dev accuracy | latency b32 (ms) | params |", "|---|---|---|---|---|"]
    lines += [f"| {t['trial_id']} | {t['family']} | {t['dev_accuracy']:.4f} | {t['latency_ms']:.2f} ± "
              f"{t['latency_spread_ms']:.2f} | {t['params']:,} |" for t in front]
    (out / "front.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for fam in sorted({t["family"] for t in trials}):
        pts = [t for t in trials if t["family"] == fam]
        ax.scatter([t["latency_ms"] for t in pts], [t["dev_accuracy"] for t in pts], label=fam, alpha=0.7)
    ax.step([t["latency_ms"] for t in front], [t["dev_accuracy"] for t in front], where="post", color="k", lw=1,
            label="front")
    ax.set_xscale("log")
    ax.set_xlabel("CPU latency, batch 32 (ms)")
    ax.set_ylabel("dev accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "front.png", dpi=120)
    plt.close(fig)


def _export_best(best: dict[str, Any], out: Path) -> dict[str, Any]:
    """DIR/best/: the best trial's trained student (loadable as is) and architecture.json, which
    `kdcache init-student --architecture-config` rebuilds from a teacher."""
    dest = out / "best"
    tmp = out / ".best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if best.get("checkpoint") and (Path(best["checkpoint"]) / "student").is_dir():
        shutil.copytree(Path(best["checkpoint"]) / "student", tmp)
    else:
        tmp.mkdir(parents=True)
    (tmp / "architecture.json").write_text(json.dumps(best["architecture"], indent=1) + "\n")
    (tmp / "search_trial.json").write_text(json.dumps(best, indent=1, default=str) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    return {k: best[k] for k in ("trial_id", "family", "architecture", "training", "dev_accuracy", "latency_ms",
                                 "score", "params")} | {"folder": str(dest)}


def _final_retraining(top: list[dict[str, Any]], setup: SearchSetup, opts: SearchOptions, out: Path,
                      log) -> list[dict[str, Any]]:
    """Each top candidate retrained with `final_seeds` seeds (Ray tasks, spread over the cluster);
    DIR/final/<trial>-seed<k>/student; dev accuracy mean and spread (max − min)."""
    import ray

    @ray.remote(num_cpus=opts.cpus_per_trial)
    def retrain(arch, train, seed, folder):
        return fit_candidate(arch, train, setup, seed, Path(folder))

    results = []
    jobs = []
    for t in top:
        for seed in range(opts.final_seeds):
            folder = out / "final" / f"{t['trial_id']}-seed{seed}"
            done = folder / "metrics.json"
            if done.exists():  # a re-run keeps finished retrainings
                jobs.append((t, seed, json.loads(done.read_text())))
            elif seed == setup.seed and _ran_every_step(t, setup):
                # the trial itself trained this candidate with this seed for every step: a retraining
                # would repeat it (the run is seeded end to end), so its last checkpoint is that seed
                jobs.append((t, seed, _adopt_trial(t, seed, folder)))
            else:
                jobs.append((t, seed, retrain.remote(t["architecture"], t["training"], seed, str(folder))))
    log(f"final retraining: {len(top)} candidate(s) x {opts.final_seeds} seeds")
    for t in top:
        accs = []
        for tt, seed, job in jobs:
            if tt is not t:
                continue
            m = job if isinstance(job, dict) else ray.get(job)
            folder = out / "final" / f"{t['trial_id']}-seed{seed}"
            (folder / "metrics.json").write_text(json.dumps(m, indent=1) + "\n")
            accs.append(m["dev_accuracy"])
        results.append({"trial_id": t["trial_id"], "family": t["family"], "architecture": t["architecture"],
                        "seeds": len(accs), "dev_accuracy_seeds": accs, "dev_accuracy_mean": statistics.fmean(accs),
                        "dev_accuracy_spread": max(accs) - min(accs), "latency_ms": t["latency_ms"],
                        "students": [str(out / "final" / f"{t['trial_id']}-seed{s}" / "student")
                                     for s in range(len(accs))]})
    return results


def _ran_every_step(trial: dict[str, Any], setup: SearchSetup) -> bool:
    # `stopped_early` is `step < steps` (_write_trials): the step count alone says it
    ckpt = trial.get("checkpoint")
    return (trial.get("step") == int(setup.space["train"]["steps"]) and bool(ckpt)
            and (Path(ckpt) / "student").is_dir())


def _adopt_trial(trial: dict[str, Any], seed: int, folder: Path) -> dict[str, Any]:
    """The trial's final student as the retraining of its own seed (copied, then renamed into place)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(Path(trial["checkpoint"]) / "student", tmp / "student")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    keys = ("step", "loss", "dev_accuracy", "score", "latency_ms", "latency_spread_ms", "params",
            "params_without_embeddings")
    return {k: trial.get(k) for k in keys} | {"seed": seed, "from_trial": trial["trial_id"]}
