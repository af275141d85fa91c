"""Running a sequence classifier over a task's texts: the logits and the accuracy that fine-tuning
(dev-set model selection) and `kdcache eval` (test-set accuracy) both report."""
from __future__ import annotations

import torch


def accuracy(model, tok, rows: list[dict], max_length: int = 64) -> float:
    was_training = model.training
    model.eval()
    logits = predict_logits(model, tok, [r["text"] for r in rows], max_length=max_length)
    model.train(was_training)
    labels = torch.tensor([int(r["label"]) for r in rows])
    return float((logits.argmax(-1) == labels).float().mean())


@torch.inference_mode()
def predict_logits(model, tok, texts: list[str], batch_size: int = 64, max_length: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        out.append(model(**encode_texts(tok, model, texts[i:i + batch_size], max_length)).logits.float())
    return torch.cat(out)


def _drops_token_types(model) -> bool:
    # A DistilBERT-style student keeps only row 0 of the token-type table (what no ids means).
    # BiLSTM/CNN students have no config object and ignore token types.
    return getattr(getattr(model, "config", None), "type_vocab_size", 2) == 1


def encode_texts(tok, model, texts: list[str], max_length: int) -> dict:
    enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    if _drops_token_types(model):
        enc.pop("token_type_ids", None)
    return dict(enc)
