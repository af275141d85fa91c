"""`kdcache bench storage`: bytes per token and MB/s per column kind and encoding, on real teacher outputs.

Every figure comes from shards written by the production writer and read back by the production
reader; sizes are the Parquet column-chunk sizes of the written files. MB/s are on-disk megabytes
(10^6 bytes) per wall-clock second, median of --repeats runs, measured in this one process.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.storage import CacheReader, CacheSpec, CacheWriter, Header, WriteOptions
from kdcache.storage.codecs import DEFAULT_TOPK_CODEC, get_topk_codec, topk_kl_error
from kdcache.storage.stats import column_bytes

from kdcache.pipeline.bench.common import bench_teacher, median_time

K = 64


def _teacher_outputs(args) -> tuple[list[dict], dict[str, Any], str]:
    """Padded batches with float32 hidden states/attention and exact top-64, plus layer info.

    Like the teacher pass, the top-k codec is fitted on the teacher's top-k of the next
    `--calibration-sequences` sequences, which are never measured.
    """
    from kdcache.pipeline.teacher_pass.teacher import OutputSpec, TeacherOptions, TeacherRunner

    n_seq = max(1, args.tokens // args.seq_len)
    calib = args.calibration_sequences
    model, batches, desc = bench_teacher(args.teacher, True, n_seq + calib, args.seq_len, 8)
    n_layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    info = {"hidden_layers": (0, n_layers // 2, n_layers), "attention_layers": (1, n_layers // 2, n_layers),
            "hidden_size": model.config.hidden_size, "num_heads": heads, "vocab_size": model.config.vocab_size}
    # "bfloat16" here only means "hand me float32 on the host": each storage form is made from it below.
    out = OutputSpec(targets="topk", k=K, hidden_layers=info["hidden_layers"], hidden_dtype="bfloat16",
                     attention_layers=info["attention_layers"], attention_dtype="bfloat16")
    opts = TeacherOptions(name_or_path="bench", device="cpu")
    runner = TeacherRunner(model, "causal-lm", out, opts)
    targets_only = TeacherRunner(model, "causal-lm", OutputSpec(targets="topk", k=K), opts)
    measured, calibration, seen = [], [], 0
    for batch in batches:
        if seen < n_seq:
            measured.append({**batch, **runner(batch)})
        else:
            calibration.append(targets_only(batch)["topk_ids"].reshape(-1, K))
        seen += len(batch["lengths"])
    info["calibration_ids"] = np.concatenate(calibration) if calibration else None
    return measured, info, desc


def _strip(batch: dict, spec: CacheSpec) -> dict:
    """Only what `spec` stores (so each experiment writes the columns it measures)."""
    keep = {"sample_id", "source", "lengths", "input_ids", "attention_mask", "label"}
    if spec.targets == "topk":
        keep |= {"topk_ids", "topk_logprobs", "topk_log_tail"}
    keep |= {f"hidden_{l}" for l in spec.hidden_layers} | {f"attention_{l}" for l in spec.attention_layers}
    return {k: v for k, v in batch.items() if k in keep}


def _write(root: Path, name: str, spec: CacheSpec, batches: list[dict], options: WriteOptions) -> tuple[str, float]:
    url = str(root / name)

    def write():
        shutil.rmtree(url, ignore_errors=True)
        writer = CacheWriter(url, Header(spec=spec, teacher={"bench": name}), options=options)
        with writer.shard_writer(0) as w:
            for b in batches:
                w.write(_strip(b, spec))
        writer.commit(expected_shards=1)

    seconds, _ = median_time(write, 1 if name.startswith("warm") else 2)
    return url, seconds


def _read(url: str, columns, repeats: int, verify: str = "full") -> float:
    def read():
        for _ in CacheReader(url, verify=verify).iter_numpy(columns, batch_size=64):
            pass

    read()  # warm the page cache: the figure is decode speed, not the disk's
    return median_time(read, repeats)[0]


def _measure(root, name, spec, batches, options, columns, repeats):
    url, write_s = _write(root, name, spec, batches, options)
    sizes = column_bytes(CacheReader(url, verify="off"))
    col_bytes = sum(sizes[c] for c in columns)
    read_s = _read(url, columns, repeats)
    return url, col_bytes, {"write_mb_s": col_bytes / 1e6 / write_s, "read_mb_s": col_bytes / 1e6 / read_s}


def bench_topk(root, batches, info, repeats) -> list[dict]:
    tokens = sum(int(b["lengths"].sum()) for b in batches)
    rows = []
    default = get_topk_codec(DEFAULT_TOPK_CODEC)
    plain = default.params()
    fitted = default.fit(info["calibration_ids"]).params() if info["calibration_ids"] is not None else plain
    # (codec, params, zstd level, byte-stream-split); the last row is what `kdcache cache` writes by default.
    variants = [("exact", {}, 3, True), ("f16-sorted", {}, 3, True), ("q8-linear", {}, 3, True),
                (DEFAULT_TOPK_CODEC, plain, 3, False), (DEFAULT_TOPK_CODEC, plain, 3, True),
                (DEFAULT_TOPK_CODEC, fitted, 1, True), (DEFAULT_TOPK_CODEC, fitted, 3, True),
                (DEFAULT_TOPK_CODEC, fitted, WriteOptions().topk_zstd_level, True)]
    exact_ids = np.concatenate([b["topk_ids"].reshape(-1, K) for b in batches])
    exact_lp = np.concatenate([b["topk_logprobs"].reshape(-1, K) for b in batches])
    for i, (codec, params, level, bss) in enumerate(variants):
        spec = CacheSpec(vocab_size=info["vocab_size"], max_length=batches[0]["input_ids"].shape[1], k=K,
                         topk_codec=codec, codec_params=params)
        cols = list(spec.topk_columns.values())
        url, nbytes, speed = _measure(root, f"topk{i}", spec, batches, WriteOptions(
            zstd_level=level, topk_zstd_level=level, byte_stream_split=bss), cols, repeats)
        got_ids, got_lp = [], []
        for b in CacheReader(url).iter_numpy(["topk"], batch_size=1024):
            mask = b["attention_mask"].astype(bool)
            got_ids.append(b["topk_ids"][mask])
            got_lp.append(b["topk_logprobs"][mask])
        kl = topk_kl_error(exact_ids, exact_lp, np.concatenate(got_ids), np.concatenate(got_lp))
        tail_bytes = column_bytes(CacheReader(url, verify="off"))["topk_log_tail"]
        rows.append({"kind": "topk", "codec": codec, "fitted": bool(params.get("vocab_order")), "zstd_level": level,
                     "byte_stream_split": bss, "bytes_per_entry": nbytes / (tokens * K),
                     "bytes_per_token": (nbytes + tail_bytes) / tokens, "kl_nats_per_token": kl, **speed})
    return rows


def bench_dense(root, batches, info, repeats, kind: str) -> list[dict]:
    tokens = sum(int(b["lengths"].sum()) for b in batches)
    forms = ("float16", "bfloat16", "int8") if kind == "hidden" else ("float16", "bfloat16", "uint8")
    layers = info["hidden_layers"] if kind == "hidden" else info["attention_layers"]
    rows = []
    for form in forms:
        for bss in (False, True):
            spec_kw = (dict(hidden_layers=layers, hidden_size=info["hidden_size"], hidden_dtype=form) if kind == "hidden"
                       else dict(attention_layers=layers, num_heads=info["num_heads"], attention_dtype=form))
            spec = CacheSpec(vocab_size=info["vocab_size"], max_length=batches[0]["input_ids"].shape[1],
                             targets="none", **spec_kw)
            cols = [c for c in spec_kw and _dense_columns(spec, kind)]
            url, nbytes, speed = _measure(root, f"{kind}-{form}-{bss}", spec, batches,
                                          WriteOptions(byte_stream_split=bss), cols, repeats)
            if kind == "hidden":
                values = tokens * info["hidden_size"] * len(layers)
            else:
                values = sum(int((b["lengths"] ** 2).sum()) for b in batches) * info["num_heads"] * len(layers)
            err = _dense_error(url, batches, kind, layers)
            rows.append({"kind": kind, "form": form, "byte_stream_split": bss, "bytes_per_value": nbytes / values,
                         "bytes_per_token": nbytes / tokens, **err, **speed})
    return rows


def _dense_columns(spec: CacheSpec, kind: str) -> list[str]:
    if kind == "hidden":
        cols = [spec.hidden_column(l) for l in spec.hidden_layers]
        return cols + ([f"{c}_scale" for c in cols] if spec.hidden_dtype == "int8" else [])
    return [spec.attention_column(l) for l in spec.attention_layers]


def _dense_error(url, batches, kind, layers) -> dict[str, float]:
    """Max and mean absolute error (hidden: relative to each token's absmax) over every stored value."""
    worst, total, count = 0.0, 0.0, 0
    originals = {int(s): (b, r) for b in batches for r, s in enumerate(b["sample_id"])}
    for got in CacheReader(url).iter_numpy(batch_size=64):
        for r, sid in enumerate(got["sample_id"]):
            src, row = originals[int(sid)]
            n = int(src["lengths"][row])
            for layer in layers:
                col = f"{kind}_{layer}"
                if kind == "hidden":
                    ref = src[col][row, :n]
                    diff = np.abs(got[col][r, :n] - ref) / np.abs(ref).max(-1, keepdims=True).clip(1e-12)
                else:
                    diff = np.abs(got[col][r, :, :n, :n] - src[col][row, :, :n, :n])
                worst = max(worst, float(diff.max()))
                total += float(diff.sum())
                count += diff.size
    key = "rel_err" if kind == "hidden" else "abs_err"
    return {f"max_{key}": worst, f"mean_{key}": total / max(count, 1)}


def bench_projection(root, batches, info, repeats) -> dict[str, float]:
    """Targets-only read vs every column, on one shard holding targets, hidden states and attention."""
    spec = CacheSpec(vocab_size=info["vocab_size"], max_length=batches[0]["input_ids"].shape[1], k=K,
                     hidden_layers=info["hidden_layers"], hidden_size=info["hidden_size"],
                     attention_layers=info["attention_layers"], num_heads=info["num_heads"])
    url, _ = _write(root, "all-columns", spec, batches, WriteOptions())
    out = {}
    for verify in ("full", "off"):
        t_targets = _read(url, ["topk"], repeats, verify)
        t_all = _read(url, None, repeats, verify)
        out[f"projection_speedup_verify_{verify}"] = t_all / t_targets
        out[f"targets_read_s_verify_{verify}"] = t_targets
        out[f"all_read_s_verify_{verify}"] = t_all
    out["shard_mb"] = CacheReader(url).manifest.bytes / 1e6
    return out


def _print_table(rows: list[dict], keys: list[str]) -> None:
    print("  ".join(f"{k:>16}" for k in keys))
    for r in rows:
        print("  ".join(f"{_fmt(r.get(k)):>16}" for k in keys))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}"
    return str(v)


def run(args) -> int:
    from kdcache.pipeline.common.jsonout import print_json

    t0 = time.perf_counter()
    batches, info, desc = _teacher_outputs(args)
    tokens = sum(int(b["lengths"].sum()) for b in batches)
    print(f"teacher: {desc}\ndata: {tokens:,} tokens in {sum(len(b['lengths']) for b in batches)} sequences of "
          f"{args.seq_len}; hidden layers {info['hidden_layers']} of width {info['hidden_size']}, attention layers "
          f"{info['attention_layers']} x {info['num_heads']} heads; teacher outputs in {time.perf_counter() - t0:.0f} s")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="kdcache-bench-storage-"))
    try:
        topk = bench_topk(root, batches, info, args.repeats)
        print(f"\n== top-{K} sparse targets (bytes per (id, log-prob) entry; KL added by the encoding) ==")
        _print_table(topk, ["codec", "fitted", "zstd_level", "byte_stream_split", "bytes_per_entry",
                            "kl_nats_per_token", "write_mb_s", "read_mb_s"])
        hidden = bench_dense(root, batches, info, args.repeats, "hidden")
        print("\n== hidden states (error relative to each token's absmax) ==")
        _print_table(hidden, ["form", "byte_stream_split", "bytes_per_value", "max_rel_err", "mean_rel_err",
                              "write_mb_s", "read_mb_s"])
        attention = bench_dense(root, batches, info, args.repeats, "attention")
        print("\n== attention probabilities ==")
        _print_table(attention, ["form", "byte_stream_split", "bytes_per_value", "max_abs_err", "mean_abs_err",
                                 "write_mb_s", "read_mb_s"])
        proj = bench_projection(root, batches, info, args.repeats)
        print(f"\n== projection: targets-only vs every column ({proj['shard_mb']:.1f} MB shard) ==")
        for verify in ("full", "off"):
            print(f"verify={verify:<4}  targets {proj[f'targets_read_s_verify_{verify}']:.3f} s   all columns "
                  f"{proj[f'all_read_s_verify_{verify}']:.3f} s   speedup {proj[f'projection_speedup_verify_{verify}']:.1f}x")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    default = topk[-1]  # fitted codec at the writer's default top-k zstd level: what `kdcache cache` writes
    unfitted = next(r for r in topk if r["codec"] == DEFAULT_TOPK_CODEC and not r["fitted"] and r["byte_stream_split"])
    h16 = next(r for r in hidden if r["form"] == "float16" and r["byte_stream_split"])
    a16 = next(r for r in attention if r["form"] == "float16" and r["byte_stream_split"])
    a8 = next(r for r in attention if r["form"] == "uint8" and r["byte_stream_split"])
    result = {
        "teacher": desc, "tokens": tokens, "k": K, "topk_codec": DEFAULT_TOPK_CODEC,
        "topk_bytes_per_entry": default["bytes_per_entry"], "topk_kl_error": default["kl_nats_per_token"],
        "topk_fitted": default["fitted"], "topk_zstd_level": default["zstd_level"],
        "topk_unfitted_bytes_per_entry": unfitted["bytes_per_entry"],
        "topk_bytes_per_token": default["bytes_per_token"],
        "hidden_bytes_per_value": h16["bytes_per_value"],
        "hidden_bf16_bytes_per_value": next(r for r in hidden if r["form"] == "bfloat16" and r["byte_stream_split"])["bytes_per_value"],
        "hidden_int8_bytes_per_value": next(r for r in hidden if r["form"] == "int8" and r["byte_stream_split"])["bytes_per_value"],
        "attention_bytes_per_value": a16["bytes_per_value"], "attention_uint8_bytes_per_value": a8["bytes_per_value"],
        "attention_uint8_max_abs_err": a8["max_abs_err"],
        "read_mb_s": default["read_mb_s"], "write_mb_s": default["write_mb_s"],
        "projection_speedup": proj["projection_speedup_verify_full"],
        "projection_speedup_verify_off": proj["projection_speedup_verify_off"],
        "seconds": time.perf_counter() - t0,
    }
    if args.json:
        print_json(result)
    return 0
