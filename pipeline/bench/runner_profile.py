"""Where a teacher batch's time goes: the forward, then each piece of device work the runner adds.

    python -m kdcache.pipeline.bench.runner_profile [--device cuda] [--batch-size 128] [--hidden-layers 0,6,12] [--json]

`kdcache bench cache` gives three rates (bare loop, runner, full pass); this splits the gap between
the first two. Each step runs on its own with the device synchronised around it, on the output of
the step before, over the same batches: forward (as the runner calls it), top-k log-probs (the
float32 normaliser + top-k), the top-k columns (tail mass, and the codec where the runner encodes on
the device), the dense columns, and the copy of everything to host memory. Medians per batch.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def _timer(device) -> Callable[[Callable[[], Any]], tuple[Any, float]]:
    import torch

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0
    return timed


def profile(prep, batches: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds per batch of each runner step."""
    import torch

    from kdcache.pipeline.teacher_pass.config import output_spec
    from kdcache.pipeline.teacher_pass.teacher import TeacherRunner, load_teacher

    spec, opts = prep.spec, prep.teacher_options()
    model, _, kind = load_teacher(opts, need_attentions=bool(spec.attention_layers), uses_head=prep.uses_head)
    if next(model.parameters()).device.type == "cpu":  # as the cache pass runs a CPU teacher
        from kdcache.pipeline.common.allocator import tune_this_process

        tune_this_process()
    runner = TeacherRunner(model, kind, output_spec(prep), opts)
    codec = spec.codec if runner.encode_on_device else None
    timed = _timer(runner.device)
    steps: dict[str, list[float]] = {}
    for n, batch in enumerate([batches[0]] + batches):  # the first pass warms kernels and allocators
        ids = torch.as_tensor(batch["input_ids"], dtype=torch.long).to(runner.device)
        mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long).to(runner.device)
        with torch.inference_mode(), torch.autocast(runner.device.type, dtype=runner.amp,
                                                    enabled=runner.amp is not None):
            result, t_fwd = timed(lambda: model(input_ids=ids, attention_mask=mask,
                                                output_hidden_states=bool(spec.hidden_layers),
                                                output_attentions=bool(spec.attention_layers)))
        with torch.inference_mode():
            (top_ids, top_lp), t_topk = timed(lambda: runner.topk_logprobs(result.logits))
            out, t_cols = timed(lambda: runner.topk_columns(top_ids, top_lp, codec))
            cols, t_dense = timed(lambda: runner.dense_outputs(result, encode=codec is not None))
            _, t_copy = timed(lambda: runner._start_copy({**out, **cols})())
        if n:
            for name, t in (("forward", t_fwd), ("topk_logprobs", t_topk), ("topk_columns", t_cols),
                            ("dense_columns", t_dense), ("copy_to_host", t_copy)):
                steps.setdefault(name, []).append(t)
    return {name: statistics.median(ts) for name, ts in steps.items()}


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from kdcache.pipeline.bench.cache import _bert_base_teacher, _corpus
    from kdcache.pipeline.data.assets import CACHE_HOME
    from kdcache.pipeline.teacher_pass.inputs import shard_batches
    from kdcache.pipeline.teacher_pass.inputs import iter_shard_inputs
    from kdcache.pipeline.teacher_pass.config import prepare
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.pipeline.common.jsonout import print_json
    from kdcache.pipeline.data.masking import TokenizerInfo

    p = argparse.ArgumentParser(prog="python -m kdcache.pipeline.bench.runner_profile", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="bert-base", choices=("bert-base", "bert-tiny"),
                   help="BERT-base-shaped masked LM (random init; default) or a 2 x 128 one")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--hidden-layers", default="none")
    p.add_argument("--attention-layers", default="none")
    p.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    args = p.parse_args(argv)
    layers, hidden = (12, 768) if args.teacher == "bert-base" else (2, 128)
    teacher = _bert_base_teacher(CACHE_HOME / f"bench-{args.teacher}", layers, hidden)
    with tempfile.TemporaryDirectory(prefix="kdcache-runner-profile-") as work:
        n_seq = args.batch_size * args.batches
        cfg = CacheConfig(teacher=teacher, corpus=[_corpus(Path(work), n_seq, words=n_seq * args.max_length)],
                          out=str(Path(work) / "cache"), max_length=args.max_length, batch_size=args.batch_size,
                          top_k=args.top_k, hidden_layers=args.hidden_layers, attention_layers=args.attention_layers,
                          max_sequences=n_seq, device=args.device, progress=False)
        prep = prepare(cfg)
        tok_info = TokenizerInfo.from_tokenizer(AutoTokenizer.from_pretrained(teacher))
        batches = [b for _, seqs in iter_shard_inputs(prep) for b in shard_batches(prep, tok_info, seqs)]
        steps = profile(prep, batches)
    tokens = sum(int(b["lengths"].sum()) for b in batches) / len(batches)
    fwd = steps["forward"]
    print(f"teacher {args.teacher} ({layers} x {hidden} masked LM), {tokens:.0f} tokens per batch, device {args.device}")
    for name, t in steps.items():
        print(f"{name:15s} {t * 1e3:9.2f} ms   {t / fwd:7.1%} of the forward")
    added = sum(t for name, t in steps.items() if name != "forward")
    print(f"runner / bare forward (expected): {fwd / (fwd + added):.3f}")
    if args.json:
        print_json({"teacher": args.teacher, "tokens_per_batch": tokens, "device": args.device, "seconds": steps,
                    "expected_runner_ratio": fwd / (fwd + added)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
