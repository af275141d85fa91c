"""`kdcache init-student`, `kdcache train` and `kdcache bench train`: argparse wiring only.

The work lives in `kdcache.pipeline.student.models`, `kdcache.pipeline.student.trainer` and
`kdcache.pipeline.bench.train`, imported when a command runs so that `kdcache --help` stays instant;
the train flags come from `TrainConfig`'s fields.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from kdcache.pipeline.cli.flags import add_config_flags, flags_from_args


def _add_train_args(s: argparse.ArgumentParser) -> None:
    from kdcache.pipeline.student.config import TrainConfig

    add_config_flags(s, TrainConfig)
    s.add_argument("--config", default=None, help="YAML with TrainConfig keys (over the recipe, under flags)")
    s.add_argument("--validate", action="store_true",
                   help="check config, cache and student against each other, then exit without training")
    s.add_argument("--json", action="store_true", help="print the run summary as one JSON object (last line)")
    s.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override any config key, e.g. loss_weights.cos=0 kd_positions=masked")


def train_config_from_args(args):
    from kdcache.pipeline.student.config import TrainConfig, load_train_config

    return load_train_config(args.recipe, args.config, flags_from_args(args, TrainConfig), args.overrides)


def cmd_train(args) -> int:
    from kdcache.pipeline.common.jsonout import print_json
    from kdcache.pipeline.student.trainer import train, validate
    from kdcache.pipeline.student.trainer.plan import describe_data

    cfg = train_config_from_args(args)
    if args.validate:
        report = validate(cfg)
        if args.json:
            print_json(report)
        else:
            print(f"ok: {report['steps']} steps x {cfg.batch_size} rows x {cfg.workers} worker(s); losses "
                  f"{report['loss_weights']} (T={report['temperature']}); reads {', '.join(report['columns'])}; "
                  f"rows per rank {report['rows_per_rank']}" + ("; hidden projection" if report["projection"] else ""))
            print(describe_data(report["data"]))
        return 0
    try:
        summary = train(cfg)
    except Exception as exc:  # Ray Train wraps worker errors; show the cause, not the controller's stack
        if type(exc).__name__ in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            print(f"kdcache train: training failed: {exc}\nre-run the same command to resume from the last "
                  "checkpoint", file=sys.stderr)
            return 1
        raise
    if args.json:
        print_json(summary)
    else:
        print(f"trained {summary.get('steps')} steps (resumed from {summary.get('resumed_from_step')}); final loss "
              f"{summary.get('final_loss')}; student in {summary.get('student_out')}")
    return 0


def _ints(flag: str, text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def _init_small_student(args) -> int:
    from kdcache.pipeline.common.jsonout import print_json
    from kdcache.pipeline.student.small import init_small_student

    transformer_only = [f for f, v in (("--layers", args.layers), ("--num-layers", args.num_layers),
                                       ("--hidden-size", args.hidden_size), ("--num-heads", args.num_heads),
                                       ("--intermediate-size", args.intermediate_size)) if v]
    if transformer_only:
        raise ValueError(f"{', '.join(transformer_only)}: transformer students only; a {args.architecture} student "
                         "takes --hidden/--dense (bilstm), --filters/--kernel-sizes (cnn), --embedding-size")
    record = init_small_student(
        args.teacher, args.out, args.architecture, num_labels=args.num_labels, embedding_size=args.embedding_size,
        embedding_init="random" if args.embedding_init == "random" else "teacher", seed=args.seed,
        allow_pickle=args.allow_pickle, hidden=args.hidden, dense=args.dense, pooling=args.pooling,
        pair=args.pair or None, filters=args.filters, kernel_sizes=_ints("--kernel-sizes", args.kernel_sizes),
        dropout=args.dropout)
    if args.json:
        print_json(record)
    else:
        print(f"{args.architecture} student in {args.out}: {record['params']:,} parameters "
              f"({record['params_without_embeddings']:,} without the embedding table); embeddings "
              f"{record['embedding_init']}")
    return 0


def _init_from_architecture(args) -> int:
    import json
    from pathlib import Path

    from kdcache.pipeline.common.jsonout import print_json
    from kdcache.pipeline.student.small import SMALL_STUDENTS, init_small_student

    path = Path(args.architecture_config)
    try:
        arch = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--architecture-config {path}: {exc}") from None
    name = arch.pop("architecture", None) if isinstance(arch, dict) else None
    if name not in SMALL_STUDENTS:
        raise ValueError(f"--architecture-config {path}: 'architecture' must be one of {', '.join(SMALL_STUDENTS)}, "
                         f"got {name!r}")
    for k in ("vocab_size", "pad_token_id", "num_labels"):  # the teacher decides these
        arch.pop(k, None)
    embedding_size = arch.pop("embedding_size", None)
    record = init_small_student(args.teacher, args.out, name, num_labels=args.num_labels,
                                embedding_size=embedding_size, seed=args.seed, allow_pickle=args.allow_pickle,
                                embedding_init="random" if args.embedding_init == "random" else "teacher", **arch)
    if args.json:
        print_json(record)
    else:
        print(f"{name} student in {args.out} from {path}: {record['params']:,} parameters; embeddings "
              f"{record['embedding_init']}")
    return 0


def _init_mobilebert(args) -> int:
    from kdcache.pipeline.common.jsonout import print_json
    from kdcache.pipeline.student.mobilebert import init_mobilebert_student

    wrong = [f for f, v in (("--layers", args.layers), ("--num-layers", args.num_layers),
                            ("--hidden-size", args.hidden_size), ("--embedding-init", args.embedding_init),
                            ("--num-labels", args.num_labels),
                            *_small_flags(args)) if v]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: not for a MobileBERT student, which keeps the teacher's depth and "
                         "width between blocks; it takes --bottleneck, --ffn-stack, --embedding-size, "
                         "--intermediate-size, --num-heads")
    given = {k: v for k, v in (("bottleneck", args.bottleneck), ("ffn_stack", args.ffn_stack),
                               ("embedding_size", args.embedding_size)) if v is not None}  # else its defaults
    record = init_mobilebert_student(args.teacher, args.out, intermediate_size=args.intermediate_size,
                                     num_heads=args.num_heads, seed=args.seed, allow_pickle=args.allow_pickle,
                                     trust_remote_code=args.trust_remote_code, **given)
    if args.json:
        print_json(record)
    else:
        print(f"mobilebert student in {args.out}: {record['num_layers']} layers x {record['hidden_size']} between "
              f"blocks, bottleneck {record['bottleneck']}, {record['ffn_stack']} stacked FFNs of "
              f"{record['intermediate_size']}, {record['num_heads']} heads; {record['params']:,} parameters "
              f"(teacher encoder {record['teacher_encoder_params']:,})")
    return 0


def _small_flags(args) -> tuple[tuple[str, Any], ...]:
    return (("--hidden", args.hidden), ("--dense", args.dense), ("--filters", args.filters),
            ("--kernel-sizes", args.kernel_sizes), ("--pooling", args.pooling), ("--pair", args.pair))


def cmd_init_student(args) -> int:
    from kdcache.pipeline.common.jsonout import print_json
    from kdcache.pipeline.student.models import init_student_from_teacher

    if args.architecture_config:
        return _init_from_architecture(args)
    if args.architecture == "mobilebert":
        return _init_mobilebert(args)
    if args.bottleneck is not None or args.ffn_stack is not None:
        raise ValueError("--bottleneck, --ffn-stack: MobileBERT students only (add --architecture mobilebert)")
    if args.architecture != "transformer":
        return _init_small_student(args)
    small_only = [f for f, v in (*_small_flags(args), ("--embedding-size", args.embedding_size)) if v]
    if small_only:
        also = "; --embedding-size also mobilebert" if args.embedding_size else ""
        raise ValueError(f"{', '.join(small_only)}: BiLSTM/CNN students only (add --architecture bilstm or cnn{also})")
    layers = _ints("--layers", args.layers)
    record = init_student_from_teacher(args.teacher, args.out, layers=layers, num_layers=args.num_layers,
                                       hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                                       num_heads=args.num_heads, trust_remote_code=args.trust_remote_code,
                                       allow_pickle=args.allow_pickle, seed=args.seed,
                                       embedding_init="pca" if args.embedding_init in ("pca", "teacher") else "random")
    if args.json:
        print_json(record)
    else:
        how = (f"blocks {record['teacher_layers']} copied" if record["mode"] == "copy"
               else f"random init (seed {record['seed']})")
        print(f"student in {args.out}: {record['num_layers']} layers x {record['hidden_size']}, {how}; "
              f"layer map {record['hidden_layer_map']}")
    return 0


def cmd_bench_train(args) -> int:
    from kdcache.pipeline.bench.train import run

    return run(args)


def register(subparsers) -> None:
    """Add `init-student` and `train` to the `kdcache` subcommands."""
    s = subparsers.add_parser("init-student", help="make a student from a teacher's weights (never runs the teacher)")
    s.add_argument("--teacher", required=True, help="teacher folder (save_pretrained layout)")
    s.add_argument("--out", required=True, help="student folder to write")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--layers", default=None, help="teacher blocks to copy, 0-based, e.g. 0,2,4,7,9,11")
    g.add_argument("--num-layers", type=int, default=None, help="student depth (blocks spread evenly)")
    s.add_argument("--hidden-size", type=int, default=None, help="narrower student: random init (TinyBERT style)")
    s.add_argument("--intermediate-size", type=int, default=None, help="FFN width (default keeps the ratio)")
    s.add_argument("--num-heads", type=int, default=None, help="attention heads")
    s.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the teacher")
    s.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle (.bin) teacher weights, loaded with weights_only=True")
    s.add_argument("--seed", type=int, default=0, help="seed for randomly initialised weights")
    s.add_argument("--architecture", choices=("transformer", "mobilebert", "bilstm", "cnn", "cellcnn", "tinytransformer"),
                   default="transformer",
                   help="transformer: the teacher's own family (blocks copied or random); mobilebert: a bottleneck "
                        "student with the teacher's depth and width between blocks (Sun et al.); bilstm (Tang et al.), "
                        "cnn (Kim), cellcnn (a searched AdaBERT-style cell) or tinytransformer (the search's "
                        "transformer family): small classifiers on the teacher's "
                        "tokenizer")
    s.add_argument("--architecture-config", default=None,
                   help="a small student's architecture JSON (e.g. `kdcache search`'s DIR/best/architecture.json): "
                        "build that student on this teacher's tokenizer and token table")
    s.add_argument("--embedding-init", choices=("random", "pca", "teacher"), default=None,
                   help="embedding table: random, or the teacher's (projected onto its top principal directions "
                        "where the student is narrower; pca and teacher mean the same). Default: random for a "
                        "narrower transformer, teacher for bilstm/cnn")
    m = s.add_argument_group("mobilebert students")
    m.add_argument("--bottleneck", type=int, default=None,
                   help="width inside each block: attention and the stacked FFNs run on it (default 128)")
    m.add_argument("--ffn-stack", type=int, default=None, help="stacked feed-forward networks per block (default 4)")
    b = s.add_argument_group("bilstm / cnn students")
    b.add_argument("--embedding-size", type=int, default=None,
                   help="token embedding width (default: the teacher's; mobilebert: 128, widened by a 3-gram "
                        "convolution)")
    b.add_argument("--num-labels", type=int, default=None, help="classes (default: the teacher's id2label, else 2)")
    b.add_argument("--hidden", type=int, default=None, help="bilstm: LSTM width per direction (default 300)")
    b.add_argument("--dense", type=int, default=None, help="bilstm: ReLU layer width (default 400)")
    b.add_argument("--pooling", choices=("final", "max"), default=None,
                   help="bilstm: concatenated final states (default) or max over time")
    b.add_argument("--pair", action="store_true",
                   help="bilstm: sentence-pair variant [h1, h2, h1*h2, |h1-h2|], split at the first [SEP]")
    b.add_argument("--filters", type=int, default=None, help="cnn: filters per kernel width (default 100)")
    b.add_argument("--kernel-sizes", default=None, help="cnn: comma-separated kernel widths (default 3,4,5)")
    b.add_argument("--dropout", type=float, default=None, help="bilstm/cnn: dropout (default 0.1 / 0.5)")
    s.add_argument("--json", action="store_true", help="print the student record as one JSON object (last line)")
    s.set_defaults(func=cmd_init_student)

    s = subparsers.add_parser("train", help="train a student from a cache with Ray Train (the teacher is not loaded)",
                              description="Settings: recipe < --config YAML < flags < key=value; a default shown "
                                          "below applies where none of them sets the key.")
    _add_train_args(s)
    s.set_defaults(func=cmd_train)


def register_bench(bench_subparsers) -> None:
    """Add `bench train` and `bench quality` to the `kdcache bench` subcommands."""
    from kdcache.pipeline.bench.train import add_arguments

    s = bench_subparsers.add_parser("train", help="cache-path overhead, cached vs online KD, reader vs trainer "
                                                  "throughput, streaming memory, Ray Train start-up")
    add_arguments(s)
    s.set_defaults(func=cmd_bench_train)

    from kdcache.pipeline.bench import quality

    s = bench_subparsers.add_parser("quality", help="eval KL to the teacher: a student trained from the cache vs "
                                                    "the same student trained with online KD")
    quality.add_arguments(s)
    s.set_defaults(func=quality.run)
