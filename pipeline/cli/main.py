"""`kdcache` command line. Each subcommand's work lives in its own module, imported lazily so that
`kdcache --help` answers at once instead of importing torch and Ray."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdcache.pipeline.cli.flags import HelpFormatter, add_config_flags, flags_from_args
from kdcache.pipeline.common.jsonout import print_json


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
def _add_cache_flags(s) -> None:
    from kdcache.pipeline.teacher_pass.config import CacheConfig

    add_config_flags(s, CacheConfig)  # the YAML keys are the same names with underscores
    s.add_argument("--config", help="YAML file with the same keys (flags and key=value override it)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of any config key")


def _cache_config(args):
    """YAML < flags < key=value. Only settings given anywhere count: a flag left out keeps the YAML's value."""
    from kdcache.pipeline.common.config import given_values, make_config
    from kdcache.pipeline.teacher_pass.config import CacheConfig

    given = given_values(CacheConfig, args.config, flags_from_args(args, CacheConfig), args.overrides)
    if given.get("top_k") and given.get("sample", 0) > 0:
        raise ValueError("give either --top-k or --sample, not both")
    return make_config(CacheConfig, given)


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
    for note in prep.notes:
        print(note)
    tps = args.tokens_per_s or (measure_tokens_per_s(prep) if args.measure else None)
    plan = make_plan(prep, tokens=args.corpus_tokens, tokens_per_s=tps, train_workers=args.train_workers,
                     train_batch_size=args.train_batch_size)
    print(format_plan(plan))
    if args.json:
        print_json(plan)
    return 0


def cmd_bench_cache(args) -> int:
    from kdcache.pipeline.bench.cache import run

    return run(args)


def cmd_demo(args) -> int:
    if args.llm:
        from kdcache.pipeline.demos.llm import run_llm_demo

        report = run_llm_demo(args.quick, args.out)
    else:
        from kdcache.pipeline.demos.tinybert import run_demo

        report = run_demo(args.quick, args.out, ablations=args.ablations)
    if args.json:
        print_json(report)
    return 0


def cmd_augment(args) -> int:
    from kdcache.pipeline.common.jsonout import read_jsonl
    from kdcache.pipeline.tasks.augment import write_transfer_set

    mask = args.mask_token
    if mask is None and args.teacher:
        from transformers import AutoTokenizer

        mask = AutoTokenizer.from_pretrained(args.teacher).mask_token
    stats = write_transfer_set(read_jsonl(args.input), Path(args.out), shuffle=not args.no_shuffle,
                               n_iter=args.n_iter, p_mask=args.p_mask, p_pos=args.p_pos, p_ng=args.p_ng,
                               max_ngram=args.max_ngram, seed=args.seed, mask_token=mask or "[MASK]",
                               text_field=args.text_field, label_field=args.label_field, replacer=args.replacer)
    print(f"transfer set {args.out}: {stats['originals']:,} originals + {stats['augmented']:,} augmented copies "
          f"({stats['duplicates_dropped']:,} duplicates dropped; same-tag replacement: {stats['replacer']}); "
          f"cache it with: kdcache cache --mode examples --label-field {args.label_field} --corpus {args.out} ...")
    if args.json:
        print_json(stats)
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
class _Parser(argparse.ArgumentParser):
    """Every (sub)command's help shows the defaults (subparsers are made of the parser's own class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


class _Version(argparse.Action):
    """--version, looked up only when asked: the lookup's module imports pyarrow, too slow for --help."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="show program's version number and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from kdcache.storage.manifest import kdcache_version

        print(f"kdcache {kdcache_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kdcache", description="Run the teacher once; distil many students from its cache.")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("plan", help="sequences, tokens, bytes per column and teacher time, before anything runs")
    _add_cache_flags(s)
    s.add_argument("--corpus-tokens", type=int, default=None,
                   help="corpus size in tokens, when reading the corpus to count it would take too long")
    s.add_argument("--tokens-per-s", type=float, default=None, help="teacher throughput to assume")
    s.add_argument("--measure", action="store_true", help="time a few real teacher forwards on this machine")
    s.add_argument("--train-workers", type=int, default=0,
                   help="also show how `kdcache train --workers N` would split the cache (rows, batches per worker)")
    s.add_argument("--train-batch-size", type=int, default=32, help="with --train-workers: rows per worker per step")
    s.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("cache", help="run the teacher once over a corpus and write the cache (resumable)")
    _add_cache_flags(s)
    s.add_argument("--json", action="store_true", help="print the run summary as one JSON object (last line)")
    s.set_defaults(func=cmd_cache)

    from kdcache.pipeline.cli.search import register as register_search
    from kdcache.pipeline.cli.train import register, register_bench

    register(sub)  # init-student, train
    register_search(sub)

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
    s.add_argument("--ablations", action="store_true",
                   help="also train the low-resource students' ablations (no augmentation; random embeddings): "
                        "4 more runs")
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

    s = sub.add_parser("augment", help="Tang et al.'s transfer set: a labelled JSONL plus masked / replaced / "
                                       "n-gram copies of each text (augmented rows get label -100)")
    s.add_argument("--input", required=True, help="JSONL with a text and a label field (the training split)")
    s.add_argument("--out", required=True, help="JSONL to write (stats beside it: OUT stem + .stats.json)")
    s.add_argument("--n-iter", type=int, default=20, help="augmented copies tried per text (duplicates dropped)")
    s.add_argument("--p-mask", type=float, default=0.1, help="per word: replace by the mask token")
    s.add_argument("--p-pos", type=float, default=0.1, help="per word: replace by a same-tag word (see --replacer)")
    s.add_argument("--p-ng", type=float, default=0.25, help="per copy: keep only a random n-gram")
    s.add_argument("--max-ngram", type=int, default=5, help="n-grams of 1..N words")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--teacher", default=None, help="take the mask token from this teacher's tokenizer")
    s.add_argument("--mask-token", default=None, help="the mask token (default: the teacher's, else [MASK])")
    s.add_argument("--text-field", default="text")
    s.add_argument("--label-field", default="label")
    s.add_argument("--replacer", choices=("auto", "frequency-band", "none"), default="auto",
                   help="same-tag replacement: no tagger installs offline, so auto = frequency-band (a word "
                        "from the same band of corpus frequency)")
    s.add_argument("--no-shuffle", action="store_true", help="keep originals first, copies after (default: "
                                                             "seeded shuffle, so shards mix them)")
    s.add_argument("--json", action="store_true", help="print the stats as one JSON object (last line)")
    s.set_defaults(func=cmd_augment)

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
