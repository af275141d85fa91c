"""`kdcache` command line. Each subcommand's work lives in its own module, imported lazily so that
`kdcache --help` answers at once instead of importing torch and Ray."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from kdcache.pipeline.common.jsonout import print_json
from kdcache.storage.manifest import kdcache_version



# -- inspect / verify -----------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    from kdcache.storage import CacheReader
    from kdcache.storage.stats import describe

    info = describe(CacheReader(args.cache, verify="off"))
    if args.json:
        print_json(info)
        return 0
    teacher = info["teacher"].get("name_or_path", "?")
    print(f"cache      {info['url']}  (format v{info['format_version']}, kdcache {info['kdcache_version']})")
    print(f"teacher    {teacher}  {info['teacher'].get('kind', '')}")
    tok = info["tokenizer"]
    print(f"tokenizer  vocab {tok.get('vocab_size', '?')}  {tok.get('vocab_hash', '')}")
    opts = info["options"]
    targets = {"topk": f"top-{opts['k']} ({opts['topk_codec']})", "sampled": f"RS-KD {opts['num_samples']} draws",
               "none": "none"}[opts["targets"]]
    print(f"targets    {targets}   hidden layers {opts['hidden_layers'] or '-'} ({opts['hidden_dtype']})   "
          f"attention layers {opts['attention_layers'] or '-'} ({opts['attention_dtype']})")
    print(f"size       {info['shards']} shards, {info['rows']:,} rows, {info['tokens']:,} tokens, "
          f"{info['bytes'] / 1e6:,.1f} MB ({info['bytes_per_token']:.1f} B/token)")
    print(f"\n{'column':<24}{'MB':>12}{'B/token':>12}{'B/entry':>10}")
    for name, col in info["columns"].items():
        per_entry = col.get("bytes_per_entry", col.get("bytes_per_value"))
        print(f"{name:<24}{col['bytes'] / 1e6:>12.3f}{col['bytes_per_token']:>12.2f}"
              f"{'' if per_entry is None else f'{per_entry:.3f}':>10}")
    return 0


def cmd_verify(args) -> int:
    from kdcache.storage.verify import verify_cache

    problems, totals = verify_cache(args.cache)
    for p in problems:
        print(f"FAIL {p}")
    if problems:
        print(f"{len(problems)} problem(s) in {args.cache}", file=sys.stderr)
        return 1
    print(f"ok: {totals['shards']} shards, {totals['rows']:,} rows, {totals['tokens']:,} tokens, every checksum, "
          "count, schema and sample id verified")
    return 0


def cmd_bench_storage(args) -> int:
    from kdcache.pipeline.bench.storage import run

    return run(args)


# -- cache / plan ---------------------------------------------------------------------------------
CACHE_FLAGS = [  # (flag, type, help); the YAML keys are the same names with underscores
    ("--teacher", str, "teacher folder (save_pretrained layout) or hub name"),
    ("--corpus", str, "corpus files: paths, globs or fsspec URLs (comma-separated or repeated)"),
    ("--out", str, "cache directory or URL to write"),
    ("--mode", str, "pack (fixed-length sequences, pretraining KD) | examples (one per document, task KD)"),
    ("--max-length", int, "tokens per sequence (default 128)"),
    ("--top-k", int, "top-k soft targets per token (default 64; 0 = none)"),
    ("--sample", int, "RS-KD: N draws per token from the teacher instead of top-k"),
    ("--hidden-layers", str, "hidden states to cache: e.g. 0,3,6 | all | none (0 = embedding output)"),
    ("--attention-layers", str, "attention maps to cache: e.g. 6 | all | none (1-based)"),
    ("--dtype", str, "hidden-state storage: float16 | bfloat16 | int8 (attention follows unless --attention-dtype)"),
    ("--attention-dtype", str, "attention storage: float16 | bfloat16 | uint8"),
    ("--mlm-probability", float, "masked-LM teachers: share of tokens masked (default 0.15, 80/10/10)"),
    ("--dupe-factor", int, "masked-LM teachers: masked copies per sequence (default 1)"),
    ("--seed", int, "seed for masking and RS-KD sampling (default 0)"),
    ("--batch-size", int, "sequences per teacher forward (default 32)"),
    ("--actors", int, "teacher actors (default: one per GPU, else 1)"),
    ("--gpus-per-actor", float, "GPUs per actor (default 1; fractional allowed)"),
    ("--cpus-per-actor", float, "CPUs per actor (default: beside a GPU 1; CPU actors share the cluster's CPUs, "
     "at most one node's)"),
    ("--shard-tokens", int, "tokens per shard (default: about 256 MB per shard)"),
    ("--text-field", str, "text field/column of jsonl/json/csv/parquet/datasets corpora (default text)"),
    ("--label-field", str, "label field (examples mode)"),
    ("--txt-mode", str, "line | block: one document per line or per blank-line block"),
    ("--encoding-errors", str, "strict (default: fail naming the byte offset) | skip (count and skip)"),
    ("--topk-codec", str, "top-k storage codec (default: the format's default)"),
    ("--max-sequences", int, "stop after this many sequences (0 = all)"),
    ("--address", str, "Ray cluster address (default: RAY_ADDRESS, else a local cluster)"),
    ("--max-retries", int, "resubmissions of a shard whose actor died (default 3)"),
    ("--executor", str, "ray (teacher actors, default) | local (in this process, no Ray)"),
    ("--device", str, "auto (cuda if available) | cpu | cuda | cuda:N"),
    ("--topk-calibration-sequences", int, "sequences whose teacher top-k fit the top-k codec (default 128)"),
    ("--shards-in-flight", int, "shards per teacher at once, one Parquet writer each (default: 1 on CPU; GPU: 4, more "
                                "with hidden states or attention)"),
]


def _add_cache_flags(s) -> None:
    for flag, typ, help_ in CACHE_FLAGS:
        s.add_argument(flag, type=typ, default=None, help=help_,
                       action="append" if flag == "--corpus" else "store")
    s.add_argument("--config", help="YAML file with the same keys (flags and key=value override it)")
    s.add_argument("--overwrite", action="store_true", default=None, help="replace a different cache at --out")
    s.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="run code shipped with the teacher (off by default)")
    s.add_argument("--allow-pickle", action="store_true", default=None,
                   help="accept pickle (.bin) teacher weights, loaded with weights_only=True")
    s.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    s.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of any config key")


def _cache_config(args):
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.pipeline.common.config import build_config

    flags = {f.lstrip("-").replace("-", "_"): getattr(args, f.lstrip("-").replace("-", "_")) for f, _, _ in CACHE_FLAGS}
    if flags.get("corpus"):
        flags["corpus"] = [p for item in flags["corpus"] for p in item.split(",") if p]
    for name in ("overwrite", "trust_remote_code", "allow_pickle", "progress"):
        flags[name] = getattr(args, name, None)
    return build_config(CacheConfig, args.config, flags, args.overrides)


def cmd_cache(args) -> int:
    from kdcache.pipeline.teacher_pass.run import run_cache_pass

    cfg = _cache_config(args)
    if not cfg.out:
        raise SystemExit("kdcache cache: --out is required")
    summary = run_cache_pass(cfg)
    if args.json:
        print_json(summary)
    return 0


def cmd_plan(args) -> int:
    from kdcache.pipeline.teacher_pass.config import prepare
    from kdcache.pipeline.teacher_pass.plan import format_plan, make_plan, measure_tokens_per_s

    prep = prepare(_cache_config(args))
    tps = args.tokens_per_s or (measure_tokens_per_s(prep) if args.measure else None)
    plan = make_plan(prep, tokens=args.corpus_tokens, tokens_per_s=tps)
    print(format_plan(plan))
    if args.json:
        print_json(plan)
    return 0


def cmd_bench_cache(args) -> int:
    from kdcache.pipeline.bench.cache import run

    return run(args)


def cmd_demo(args) -> int:
    if args.llm:
        from kdcache.pipeline.demos.llm import run_llm_demo as run
    else:
        from kdcache.pipeline.demos.tinybert import run_demo as run

    report = run(args.quick, args.out)
    if args.json:
        print_json(report)
    return 0


def _named_paths(items: list[str] | None, default_prefix: str) -> dict[str, str]:
    """`NAME=PATH` or `PATH` (named by position) -> {name: path}."""
    out: dict[str, str] = {}
    for i, item in enumerate(items or []):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = (default_prefix if i == 0 else f"{default_prefix}{i + 1}"), item
        out[name] = path
    return out


def cmd_eval(args) -> int:
    from kdcache.pipeline.evaluation.evaluate import run_eval

    students = _named_paths(args.student, "student")
    if not students:
        raise SystemExit("kdcache eval: give at least one --student PATH (or NAME=PATH)")
    flat = run_eval(args.teacher, students, args.task, args.out, baseline=args.baseline,
                    runs=_named_paths(args.run, "run"), data_dir=args.data_dir, rounds=args.rounds)
    print(Path(flat["report"]).read_text().split("## Plots")[0].rstrip())
    print(f"\nreport: {flat['report']}")
    if args.json:
        print_json(flat)
    return 0


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdcache", description="Run the teacher once; distil many students from its cache.")
    p.add_argument("--version", action="version", version=f"kdcache {kdcache_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("plan", help="sequences, tokens, bytes per column and teacher time, before anything runs")
    _add_cache_flags(s)
    s.add_argument("--corpus-tokens", type=int, default=None,
                   help="corpus size in tokens, when reading the corpus to count it would take too long")
    s.add_argument("--tokens-per-s", type=float, default=None, help="teacher throughput to assume")
    s.add_argument("--measure", action="store_true", help="time a few real teacher forwards on this machine")
    s.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("cache", help="run the teacher once over a corpus and write the cache (resumable)")
    _add_cache_flags(s)
    s.add_argument("--json", action="store_true", help="print the run summary as one JSON object (last line)")
    s.set_defaults(func=cmd_cache)

    from kdcache.pipeline.cli.train import register, register_bench

    register(sub)  # init-student, train

    s = sub.add_parser("inspect", help="show a cache's teacher, options, sizes and bytes per token per column")
    s.add_argument("cache", help="cache directory or URL")
    s.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("verify", help="check every checksum, count, schema and sample id (exit 1 on any problem)")
    s.add_argument("cache", help="cache directory or URL")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("demo", help="the main job end to end: real teacher, real text, offline")
    s.add_argument("--quick", action="store_true", help="the small profile (what the tests run)")
    s.add_argument("--out", default=None, help="output folder (default runs/demo or runs/demo-quick)")
    s.add_argument("--llm", action="store_true",
                   help="the LLM pretraining-distillation demo instead (SmolLM2-135M, top-k vs RS-KD targets)")
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object (last line)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("eval", help="accuracy, size and CPU speed of a teacher and students; report.md + plots")
    s.add_argument("--teacher", required=True, help="the teacher (a classifier folder for a classification task)")
    s.add_argument("--student", action="append", metavar="[NAME=]PATH", help="a student folder (repeatable)")
    s.add_argument("--baseline", default=None, help="a student of the same shape trained without distillation")
    s.add_argument("--task", default="rotten-tomatoes",
                   help="rotten-tomatoes (built-in fixed split; its test split is used) or a JSONL file with "
                        "text + label")
    s.add_argument("--out", required=True, help="report folder: report.md, eval.json, PNG plots")
    s.add_argument("--run", action="append", metavar="[NAME=]RUN_DIR",
                   help="a `kdcache train` output folder whose metrics.jsonl is plotted (repeatable)")
    s.add_argument("--data-dir", default=None, help="where built-in task splits are written (default OUT/data)")
    s.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per model")
    s.add_argument("--json", action="store_true", help="print the evaluation as one JSON object (last line)")
    s.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="benchmarks that print measured figures")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    s = bsub.add_parser("storage", help="bytes/token and MB/s per column kind and encoding, on real teacher outputs")
    s.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    s.add_argument("--tokens", type=int, default=8192, help="teacher tokens to generate (default 8192)")
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--teacher", default="auto",
                   help="auto (SmolLM2-135M if its asset is installed, else a tiny random model), smollm2, tiny")
    s.add_argument("--repeats", type=int, default=3, help="timing repetitions (median reported)")
    s.add_argument("--calibration-sequences", type=int, default=128,
                   help="sequences (not measured) whose teacher top-k fit the codec, as `kdcache cache` does")
    s.add_argument("--workdir", default=None, help="where to write temporary shards (default: a temp dir)")
    s.set_defaults(func=cmd_bench_storage)
    s = bsub.add_parser("cache", help="full teacher pass vs a bare forward loop: tokens/s of each and their ratio")
    s.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    s.add_argument("--teacher", default="bert-base",
                   help="bert-base (BERT-base-shaped MLM, random init; default), bert-tiny, or a teacher folder")
    s.add_argument("--tokens", type=int, default=16384, help="tokens per run (default 16384)")
    s.add_argument("--max-length", type=int, default=128)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--top-k", type=int, default=64)
    s.add_argument("--hidden-layers", default="none")
    s.add_argument("--attention-layers", default="none")
    s.add_argument("--executor", choices=("ray", "local"), default="ray",
                   help="ray: teacher actors (the real pass); local: the same pass in this process")
    s.add_argument("--actors", type=int, default=1)
    s.add_argument("--cpus-per-actor", type=float, default=0.0, help="default: auto (see kdcache cache)")
    s.add_argument("--shard-tokens", type=int, default=0)
    s.add_argument("--shards-in-flight", type=int, default=0, help="per teacher (default: auto, see kdcache cache)")
    s.add_argument("--device", default="auto")
    s.add_argument("--repeats", type=int, default=3, help="runs of each (median reported)")
    s.add_argument("--workdir", default=None)
    s.set_defaults(func=cmd_bench_cache)
    register_bench(bsub)
    bench.set_defaults(func=lambda a: (bench.print_help(), 2)[1])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import logging

    from kdcache.pipeline.teacher_pass.executor import ShardFailed
    from kdcache.storage.errors import CacheError

    # kdcache's own INFO lines (e.g. where the teacher actors ran) reach the terminal; libraries stay quiet.
    ours = logging.getLogger("kdcache")
    if not ours.handlers:  # main() may run several times in one process (tests)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)

    try:
        return int(args.func(args) or 0)
    except (CacheError, ShardFailed, ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"kdcache {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
