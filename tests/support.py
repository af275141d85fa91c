"""Test support: synthetic teacher batches shaped like the real thing, and small caches on disk."""
from __future__ import annotations

import numpy as np

from kdcache.storage import CacheSpec, CacheWriter, Header


def synthetic_batch(spec: CacheSpec, sample_ids: np.ndarray, rng: np.random.Generator, width: int | None = None):
    """A padded batch as the teacher actors produce it, with random but valid values."""
    B = len(sample_ids)
    T = width or spec.max_length
    lengths = rng.integers(max(1, T // 2), T + 1, size=B)
    batch = {
        "sample_id": np.asarray(sample_ids, dtype=np.int64),
        "source": [f"corpus.txt:{i}@0" for i in sample_ids],
        "lengths": lengths,
        "input_ids": rng.integers(0, spec.vocab_size, size=(B, T)),
    }
    if spec.mlm:
        M = max(1, T // 6)
        pos = np.stack([np.sort(rng.choice(T, size=M, replace=False)) for _ in range(B)])
        pos[pos >= lengths[:, None]] = -1
        pos[:, 0] = 0  # every row masks at least one position
        batch["mlm_positions"] = pos
        batch["mlm_labels"] = rng.integers(0, spec.vocab_size, size=(B, M))
    if spec.targets == "topk":
        logits = rng.standard_normal((B, T, spec.vocab_size)).astype(np.float32) * 3
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ids = np.argsort(-logp, axis=-1)[..., : spec.k]
        lp = np.take_along_axis(logp, ids, -1)
        batch["topk_ids"], batch["topk_logprobs"] = ids, lp
        batch["topk_log_tail"] = np.log1p(-np.exp(lp).sum(-1).clip(max=1 - 1e-6))
    elif spec.targets == "sampled":
        n = spec.num_samples
        ids = rng.integers(0, spec.vocab_size, size=(B, T, n))
        w = rng.random((B, T, n)).astype(np.float32)
        w[..., n // 2 + 1:] = 0  # fewer unique draws than the padded width
        batch["sample_ids"], batch["sample_weights"] = ids, w / w.sum(-1, keepdims=True)
    for layer in spec.hidden_layers:
        batch[spec.hidden_column(layer)] = rng.standard_normal((B, T, spec.hidden_size)).astype(np.float32)
    for layer in spec.attention_layers:
        a = rng.random((B, spec.num_heads, T, T)).astype(np.float32)
        batch[spec.attention_column(layer)] = a / a.sum(-1, keepdims=True)
    if spec.num_labels:
        batch["task_logits"] = rng.standard_normal((B, spec.num_labels)).astype(np.float32)
    if spec.has_labels:
        batch["label"] = rng.integers(0, max(spec.num_labels, 2), size=B)
    return batch


def write_cache(url, spec: CacheSpec, *, shards: int = 3, rows_per_shard: int = 8, batch_rows: int = 4,
                seed: int = 0, overwrite: bool = False, generation: dict | None = None, write_options=None):
    """Write a small complete cache; returns (manifest, {sample_id: padded-row dict})."""
    rng = np.random.default_rng(seed)
    header = Header(spec=spec, teacher={"name_or_path": "synthetic", "kind": "test"},
                    tokenizer={"vocab_size": spec.vocab_size, "vocab_hash": "none"},
                    generation={"seed": seed, "num_shards": shards, **(generation or {})})
    writer = CacheWriter(str(url), header, overwrite=overwrite, options=write_options)
    written = {}
    sid = 0
    for index in range(shards):
        with writer.shard_writer(index) as w:
            for _ in range(rows_per_shard // batch_rows):
                batch = synthetic_batch(spec, np.arange(sid, sid + batch_rows), rng)
                w.write(batch)
                for r in range(batch_rows):
                    written[sid + r] = {k: (v[r] if not isinstance(v, list) else v[r]) for k, v in batch.items()}
                sid += batch_rows
    return writer.commit(expected_shards=shards), written


# -- tiny teachers built from a config (no hub access) -------------------------------------------

WORDS = ("the of and to in is was for on that with as by at from his her an which or were are this be "
         "it has had first new one two three after also their its city river world war king music film "
         "team game book water light time year people state north south east west school church house "
         "power group line form play part name life work land sea island mountain village language").split()


def tiny_corpus(path, docs: int = 40, seed: int = 0, words_per_doc=(5, 40)) -> str:
    """A jsonl corpus of `docs` documents made of WORDS (every word is in the tiny vocab)."""
    import json

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(docs):
            n = int(rng.integers(*words_per_doc))
            text = " ".join(rng.choice(WORDS, size=n))
            f.write(json.dumps({"text": text, "label": int(i % 2)}) + "\n")
    return str(path)


def bert_tokenizer(folder):
    from transformers import BertTokenizer  # transformers 5: the fast (tokenizers) backend

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer.from_pretrained(str(folder))


def llama_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_teacher(folder, kind: str = "masked-lm", layers: int = 2, hidden: int = 32, heads: int = 4,
                 num_labels: int = 2, seed: int = 0):
    """Save a tiny random teacher of `kind` with its tokenizer to `folder`; returns the folder path."""
    import torch
    from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel,
                              LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(seed)
    if kind == "causal-lm":
        tok = llama_tokenizer()
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        tok = bert_tokenizer(folder)
        cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=256,
                         num_labels=num_labels)
        model = {"masked-lm": BertForMaskedLM, "encoder": BertModel,
                 "classifier": BertForSequenceClassification}[kind](cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def word_tokenizer():
    """A word-level fast tokenizer over WORDS with every special token the model families use (pad, unk,
    mask, cls/sep, bos/eos): one tokenizer for BERT-, RoBERTa-, MPNet- and Llama-style teachers alike."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", bos_token="<s>", eos_token="</s>")


def byte_level_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer (the GPT-2/Qwen2 kind) trained on WORDS: transformers 5 rebuilds such
    model types' tokenizers from vocab + merges, which a word-level tokenizer does not survive."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<|endoftext|>")


# -- what a training run wrote ----------------------------------------------------------------------

def run_metrics(run) -> list[dict]:
    """<run>/metrics.jsonl, one dict per step."""
    import json
    from pathlib import Path

    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def run_samples(run, rank: int) -> list[dict]:
    """<run>/samples/rank-N.jsonl (log_samples=true): {step, epoch, sample_ids} per step of that rank."""
    import json
    from pathlib import Path

    path = Path(run) / "samples" / f"rank-{rank:05d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
