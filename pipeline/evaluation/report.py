"""`report.md` and its PNG plots, from the numbers `kdcache eval` measured and the runs' metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(runs: dict[str, str | Path], path: Path) -> list[str]:
    """One panel per run, every `loss*` series against the step; returns the runs plotted."""
    series = {name: read_metrics(run) for name, run in runs.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return []
    plt = _plt()
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], series.items()):
        keys = sorted({k for r in rows for k in r if k.startswith("loss")})
        for key in keys:
            steps = [r["step"] for r in rows if key in r]
            vals = [r[key] for r in rows if key in r]
            window = max(1, len(vals) // 50)  # a running mean: per-step losses of small batches are noisy
            smooth = [sum(vals[max(0, i - window + 1):i + 1]) / len(vals[max(0, i - window + 1):i + 1])
                      for i in range(len(vals))]
            ax.plot(steps, smooth, label=key, lw=1.2 if key == "loss" else 0.9)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return list(series)


def plot_bars(models: dict[str, dict[str, Any]], path: Path, metric: str = "accuracy") -> None:
    """Size, speed and quality of every model relative to the teacher (teacher = 1)."""
    plt = _plt()
    panels = [("size (params, ÷ teacher)", lambda m: 1 / m["size_ratio"]),
              ("speed-up, batch 1", lambda m: m["speedup_batch1"]),
              ("speed-up, batch 32", lambda m: m["speedup_batch32"]),
              ("quality kept (÷ teacher)" if metric == "accuracy" else "teacher ppl ÷ ppl",
               lambda m: m["quality_retained"])]
    names = list(models)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.2))
    colours = ["#555555", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
    for ax, (title, fn) in zip(axes, panels):
        vals = [fn(models[n]) for n in names]
        ax.bar(names, vals, color=colours[: len(names)])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0, color="black", lw=0.6, ls="--")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shape(m: dict[str, Any]) -> str:
    arch = m.get("architecture", "transformer")
    if arch == "bilstm":
        return f"BiLSTM 2 × {m['hidden_size']}"
    if arch == "cnn":
        return f"CNN, {m['hidden_size']} filters"
    if arch == "cellcnn":
        return f"cell CNN {m['layers']} × {m['hidden_size']}"
    if arch == "mobilebert":
        return f"MobileBERT {m['layers']} × {m['hidden_size']} (bottleneck {m['bottleneck']})"
    if arch == "tinytransformer":
        return f"tiny transformer {m['layers']} × {m['hidden_size']}"
    return f"{m['layers']} × {m['hidden_size']}"


def _millions(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f}M"


def _table(models: dict[str, dict[str, Any]], metric: str) -> str:
    lines = [f"| model | shape | params | without embeddings | weights on disk | {metric} | kept | latency b1 (ms) | "
             "throughput b32 (inputs/s) | smaller | faster b1 | faster b32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        lines.append(f"| {name} | {_shape(m)} | {m['params'] / 1e6:.2f}M | {_millions(m.get('params_without_embeddings'))} | "
                     f"{m['disk_bytes'] / 1e6:.1f} MB | {m[metric]:.4f} | {m['quality_retained']:.1%} | "
                     f"{m['latency_batch1_ms']:.1f} | {m['throughput_batch32']:.0f} | {m['size_ratio']:.2f}× | "
                     f"{m['speedup_batch1']:.2f}× | {m['speedup_batch32']:.2f}× |")
    return "\n".join(lines)


def check_targets(flat: dict[str, Any], targets: dict[str, float]) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for every target given, e.g. {"quality_retained": 0.95, "size_ratio": 2}."""
    rows = []
    for key, goal in targets.items():
        value = flat.get(key)
        if key == "above_baseline":
            value = flat["quality_retained"] - (flat.get("baseline_quality_retained") or 0)
            rows.append((f"student above the no-KD baseline by ≥ {goal:.0%} of the teacher's accuracy",
                         value >= goal, f"{value:+.1%}"))
            continue
        rows.append((f"{key} ≥ {goal}", value is not None and value >= goal,
                     "n/a" if value is None else f"{value:.3f}"))
    return rows


def write_report(out: Path, flat: dict[str, Any], runs: dict[str, str], targets: dict | None = None,
                 extra: str = "", notice: str = "") -> Path:
    models = flat["models"]
    plot_bars(models, out / "size_speed_quality.png", flat.get("metric", "accuracy"))
    plotted = plot_curves(runs, out / "training_curves.png")
    parts = ["# kdcache evaluation report", "", *([notice, ""] if notice else []),
             f"Task: `{flat['task']}`, {flat['test_examples']:,} held-out test examples (texts).", "",
             f"**{flat['headline']}**", "", _table(models, flat.get("metric", "accuracy")), "",
             "Latency: median at batch 1; throughput: 32 inputs per call; all models measured in "
             "alternating rounds in one process on this machine's CPU. `kept` = "
             + ("accuracy ÷ the teacher's." if flat.get("metric", "accuracy") == "accuracy"
                else "the teacher's perplexity ÷ the model's."), ""]
    if targets:
        parts += ["## Targets", "", "| target | met | measured |", "|---|---|---|"]
        parts += [f"| {t} | {'yes' if ok else '**no**'} | {v} |" for t, ok, v in check_targets(flat, targets)]
        parts.append("")
    if extra:  # before the plots: the terminal shows the report up to "## Plots"
        parts += [extra, ""]
    parts += ["## Plots", "", "![size, speed and quality](size_speed_quality.png)", ""]
    if plotted:
        parts += [f"Training curves ({', '.join(plotted)}):", "", "![training curves](training_curves.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
