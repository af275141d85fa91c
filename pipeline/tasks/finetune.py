"""Fine-tune a teacher with a classification head (TinyBERT's task stage needs a task teacher).

This is teacher preparation, not distillation: a plain in-process loop (AdamW, linear warm-up and
decay, dynamic padding), the best dev-accuracy epoch kept. The result is a `save_pretrained` folder
(safetensors + tokenizer) that `kdcache cache --mode examples` runs as a sequence-classifier
teacher. A `finetune.json` written last marks it finished, so a re-run reuses it.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch


def _length_bucketed(rows: list[dict], batch_size: int, rng: random.Random, pool: int = 16) -> list[list[dict]]:
    """Shuffled batches of similar-length texts: padding to each batch's longest text then wastes little."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    batches = []
    for i in range(0, len(order), batch_size * pool):
        chunk = sorted(order[i:i + batch_size * pool], key=lambda j: len(rows[j]["text"]))
        batches += [[rows[j] for j in chunk[k:k + batch_size]] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def finetune_classifier(base: str | Path, train_rows: list[dict], dev_rows: list[dict], out: str | Path, *,
                        num_labels: int = 2, epochs: int = 2, batch_size: int = 32, lr: float = 5e-5,
                        max_length: int = 64, seed: int = 0, log=print) -> dict[str, Any]:
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from kdcache.pipeline.tasks.classify import accuracy

    out = Path(out)
    done = out / "finetune.json"
    if done.exists():
        info = json.loads(done.read_text())
        log(f"teacher already fine-tuned: {out} (dev accuracy {info['dev_accuracy']:.4f}); reusing it")
        return info
    torch.manual_seed(seed)
    hf_logging.set_verbosity_error()  # "newly initialised classifier weights" is expected here
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=num_labels)
    hf_logging.set_verbosity_warning()
    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    total = steps_per_epoch * epochs
    no_decay = ("bias", "LayerNorm.weight", "norm.weight")
    groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr)
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    rng = random.Random(seed)
    best: dict[str, Any] = {"dev_accuracy": -1.0}
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="fine-tune teacher", unit="step", mininterval=2.0)
    for epoch in range(epochs):
        model.train()
        for rows in _length_bucketed(train_rows, batch_size, rng):
            enc = tok([r["text"] for r in rows], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            out_ = model(**enc, labels=torch.tensor([int(r["label"]) for r in rows]))
            out_.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{out_.loss.item():.3f}", refresh=False)
        model.eval()
        dev_acc = accuracy(model, tok, dev_rows, max_length=max_length)
        log(f"fine-tune epoch {epoch + 1}/{epochs}: dev accuracy {dev_acc:.4f}")
        if dev_acc > best["dev_accuracy"]:
            # The best epoch on dev is the teacher (dev is never used by the students).
            model.save_pretrained(str(out))
            tok.save_pretrained(str(out))
            best = {"dev_accuracy": dev_acc, "epoch": epoch + 1}
    bar.close()
    info = {**best, "epochs": epochs, "steps": total, "lr": lr, "batch_size": batch_size, "max_length": max_length,
            "train_examples": len(train_rows), "seconds": time.perf_counter() - t0}
    done.write_text(json.dumps(info, indent=1) + "\n")
    return info


