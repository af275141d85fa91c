"""Bytes per top-k entry and KL error of each TopKCodec, on real teacher outputs.

    .venv/bin/python -m experiments.topk_codec [--sequences 224] [--calibration 224]

(about 3 min on 2 CPU cores the first time, ~1 min from the cached top-k: the
clustered fits take a few seconds each.)

SmolLM2-135M-Instruct (vocab 49,152) reads the first Wikipedia extracts,
concatenated (EOS between them) and cut into sequences of 128 tokens; its top-k
ids and log-probs are cached in an .npz under /tmp so reruns skip the model.
The sequences after the measured ones are the calibration pool, so every fitted
vocabulary order is measured on text it was not fitted to. Calibration sources
compared (``PowQ8Codec.fit``):
  * ``fit-topk-N``: the teacher's top-k ids on the first N calibration
    sequences, ranked by count only (``clusters=0``) or also clustered by
    co-occurrence (``+clu``, the default of ``fit``);
  * ``fit-unigram-T``: no teacher, counts of the input ids of T tokens of
    calibration text (re-tokenised with the SmolLM2 tokenizer; ``rest`` = the
    whole corpus after the measured tokens);
  * no fit: the tokenizer's id order.
Each codec then writes one Parquet file the way a kdcache shard stores top-k
targets: one row per sequence, one ``list<fixed_size_list<elem, k>>`` column per
codec leaf (``list<elem>`` for per-token scalars), zstd level 3, dictionary off,
BYTE_STREAM_SPLIT on the leaves the codec names. It prints the file's bytes per
(id, log-prob) entry and the mean KL(exact top-k || stored top-k) per token.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.storage.codecs import CODECS, DEFAULT_TOPK_CODEC, TopKCodec, get_topk_codec, topk_kl_error

SEQ_LEN = 128
VOCAB = 49_152  # SmolLM2's vocabulary


def teacher_topk(n_seq: int, k: int, cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int64, logprobs float32) of shape (n_seq, SEQ_LEN, k), and the
    probability mass outside the top k per sequence; computed once, then read
    from ``cache``."""
    if cache.exists():
        z = np.load(cache)
        return z["ids"], z["logprobs"], z["tail_mass"]

    import torch

    from kdcache.pipeline.data.assets import ensure_assets, load_smollm2, wiki_extracts_json

    ensure_assets(["smollm2", "wiki"])
    model, tok = load_smollm2(Path(tempfile.gettempdir()) / "kdcache-smollm2-plain")
    extracts = json.loads(wiki_extracts_json().read_text())

    # Concatenate whole extracts until there are enough tokens: no padding, and
    # every position is ordinary running text.
    stream: list[int] = []
    for entry in extracts.values():
        stream += tok(entry["extract"])["input_ids"] + [tok.eos_token_id]
        if len(stream) >= n_seq * SEQ_LEN:
            break
    tokens = torch.tensor(stream[: n_seq * SEQ_LEN]).view(n_seq, SEQ_LEN)

    ids, logprobs, tail = [], [], []
    with torch.inference_mode():
        for batch in tokens.split(8):
            logp = torch.log_softmax(model(batch).logits.float(), dim=-1)
            top = logp.topk(k, dim=-1)
            ids.append(top.indices)
            logprobs.append(top.values)
            tail.append(1 - top.values.exp().sum(-1).mean(-1))
    ids = torch.cat(ids).numpy().astype(np.int64)
    logprobs = torch.cat(logprobs).numpy().astype(np.float32)
    tail_mass = torch.cat(tail).numpy()
    np.savez(cache, ids=ids, logprobs=logprobs, tail_mass=tail_mass)
    return ids, logprobs, tail_mass


def corpus_tokens(cache: Path) -> np.ndarray:
    """The token stream ``teacher_topk`` reads (every extract, EOS between them),
    re-tokenised with the SmolLM2 tokenizer; cached in ``cache``."""
    if cache.exists():
        return np.load(cache)["stream"]
    from transformers import AutoTokenizer

    from kdcache.pipeline.data.assets import ensure_assets, load_smollm2, wiki_extracts_json

    ensure_assets(["smollm2", "wiki"])
    plain = Path(tempfile.gettempdir()) / "kdcache-smollm2-plain"
    if not (plain / "config.json").exists():
        load_smollm2(plain)
    tok = AutoTokenizer.from_pretrained(plain)
    stream: list[int] = []
    for entry in json.loads(wiki_extracts_json().read_text()).values():
        stream += tok(entry["extract"])["input_ids"] + [tok.eos_token_id]
    out = np.asarray(stream, dtype=np.int32)
    np.savez(cache, stream=out)
    return out


def write_parquet(codec: TopKCodec, ids: np.ndarray, logprobs: np.ndarray, path: Path,
                  vocab_size: int, zstd_level: int = 3) -> None:
    """One row per sequence, as a kdcache shard lays out its top-k columns."""
    n_seq, seq_len, k = ids.shape
    encoded = codec.encode(ids.reshape(-1, k), logprobs.reshape(-1, k), vocab_size=vocab_size)
    types = codec.element_types(k, vocab_size)
    offsets = pa.array(np.arange(0, n_seq * seq_len + 1, seq_len, dtype=np.int32))
    columns, bss = {}, {}
    for suffix, arr in encoded.items():
        flat = pa.array(arr.reshape(-1), type=types[suffix])
        leaf = f"topk_{suffix}.list.element"
        if arr.ndim == 2:  # per entry: a fixed_size_list of k per token
            flat = pa.FixedSizeListArray.from_arrays(flat, k)
            leaf += ".list.element"
        columns[f"topk_{suffix}"] = pa.ListArray.from_arrays(offsets, flat)
        if suffix in codec.bss_leaves():
            bss[leaf] = "BYTE_STREAM_SPLIT"
    pq.write_table(
        pa.table(columns), path, compression="zstd", compression_level=zstd_level,
        use_dictionary=False, column_encoding=bss or None,
    )


def read_parquet(path: Path, k: int) -> dict[str, np.ndarray]:
    """Back to numpy with nothing but pyarrow: proves the leaves need no kdcache."""
    table = pq.read_table(path)
    out = {}
    for name in table.column_names:
        values = table.column(name).combine_chunks().flatten()  # one entry per token
        if pa.types.is_fixed_size_list(values.type):
            out[name.removeprefix("topk_")] = values.flatten().to_numpy().reshape(-1, k)
        else:
            out[name.removeprefix("topk_")] = values.to_numpy()
    return out


def leaf_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes of each column, from the footer."""
    meta = pq.read_metadata(path)
    out: dict[str, int] = {}
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            name = col.path_in_schema.split(".")[0].removeprefix("topk_")
            out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def measure(codec: TopKCodec, ids: np.ndarray, logprobs: np.ndarray,
            zstd_level: int = 3) -> tuple[float, float, bool, str]:
    """(bytes per entry, KL nats/token, ids exact, bytes per entry by leaf)."""
    k = ids.shape[-1]
    n_entries = ids.size
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "topk.parquet"
        write_parquet(codec, ids, logprobs, path, vocab_size=VOCAB, zstd_level=zstd_level)
        size = os.path.getsize(path)
        leaves = " ".join(f"{n}={b / n_entries:.3f}" for n, b in leaf_bytes(path).items())
        ids2, logprobs2 = codec.decode(read_parquet(path, k), k)
    flat_ids, flat_lp = ids.reshape(-1, k), logprobs.reshape(-1, k)
    # Entries come back in the codec's own order: compare per-token id sets.
    exact = bool(np.array_equal(np.sort(flat_ids, axis=1), np.sort(ids2, axis=1)))
    kl = topk_kl_error(flat_ids, flat_lp, ids2, logprobs2) if exact else float("nan")
    return size / n_entries, kl, exact, leaves


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=224, help="measured sequences of 128 tokens")
    ap.add_argument("--calibration", type=int, default=224, help="further sequences for fit()")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--zstd-level", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=None, help="npz of teacher top-k (default: /tmp)")
    ap.add_argument("--quick", action="store_true", help="codecs and the recommended fit only")
    args = ap.parse_args(argv)

    n_all = args.sequences + args.calibration
    cache = args.cache or Path(tempfile.gettempdir()) / (
        f"kdcache-smollm2-wiki-top{args.k}-{n_all}x{SEQ_LEN}.npz")
    all_ids, all_lp, tail = teacher_topk(n_all, args.k, cache)
    ids, logprobs = all_ids[: args.sequences], all_lp[: args.sequences]
    pool = all_ids[args.sequences:]
    print(f"SmolLM2-135M top-{args.k}: {ids.shape[0] * ids.shape[1]} tokens measured, "
          f"{pool.shape[0] * pool.shape[1]} in the calibration pool; mean tail mass "
          f"{np.atleast_1d(tail)[: args.sequences].mean():.3f}; zstd {args.zstd_level}  ({cache})")

    default = get_topk_codec(DEFAULT_TOPK_CODEC)
    codecs = [(name, get_topk_codec(name)) for name in CODECS]
    codecs.append((f"{DEFAULT_TOPK_CODEC} levels=240", get_topk_codec(DEFAULT_TOPK_CODEC, {"levels": 240})))
    sizes = [n for n in (8, 32, 128) if n <= len(pool)]
    if args.quick:
        sizes = sizes[-1:]
    for n in sizes:
        calib = pool[:n].reshape(-1, args.k)
        if not args.quick:
            codecs.append((f"fit-topk-{n}", default.fit(calib, clusters=0)))
        codecs.append((f"fit-topk-{n}+clu", default.fit(calib)))
    if not args.quick:
        stream = corpus_tokens(Path(tempfile.gettempdir()) / "kdcache-smollm2-wiki-tokens.npz")
        start = ids.shape[0] * ids.shape[1]  # the stream's first tokens are the measured ones
        for n in [*sizes, None]:
            text = stream[start:] if n is None else stream[start: start + n * SEQ_LEN]
            codecs.append((f"fit-unigram-{'rest' if n is None else n * SEQ_LEN}", default.fit(text[:, None])))
    print(f"{'codec':<22}{'B/entry':>9}{'KL nats/token':>15}{'ids exact':>11}   B/entry by leaf")
    for name, codec in codecs:
        per_entry, kl, exact, leaves = measure(codec, ids, logprobs, args.zstd_level)
        mark = " (default)" if name == DEFAULT_TOPK_CODEC else ""
        print(f"{name:<22}{per_entry:>9.3f}{kl:>15.2e}{str(exact):>11}   {leaves}{mark}")


if __name__ == "__main__":
    main()
