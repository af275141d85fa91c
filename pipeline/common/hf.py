"""Hugging Face helpers shared by the teacher pass and the student side: which kind of model a config
describes, the weight-file policy (safetensors; pickle only when asked), tokenizer identity and files.
One home each, so that the two sides can never disagree."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def check_weights(path: str, allow_pickle: bool) -> None:
    """Refuse a local teacher folder that has no weights, or only pickle weights (unless allowed)."""
    p = Path(path)
    if not p.is_dir():
        return  # a hub name: from_pretrained(use_safetensors=...) enforces the same rule remotely
    files = {f.name for f in p.iterdir()}
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"teacher folder {path} has no config.json; point --teacher at a folder written "
                                "by save_pretrained (config.json + model.safetensors)")
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if not pickles:
        raise FileNotFoundError(f"teacher folder {path} has no weights (no *.safetensors); save the model with "
                                "save_pretrained(..., safe_serialization=True)")
    if not allow_pickle:
        raise PermissionError(f"teacher folder {path} has only pickle weights ({', '.join(pickles)}), which can run "
                              "arbitrary code when loaded; convert them to safetensors, or pass --allow-pickle if "
                              "you trust their origin (loaded with torch.load(weights_only=True))")


def detect_kind(config) -> str:
    arch = " ".join(getattr(config, "architectures", None) or [])
    if "ForMaskedLM" in arch or "ForPreTraining" in arch:
        return "masked-lm"
    if "ForCausalLM" in arch or "LMHeadModel" in arch:
        return "causal-lm"
    if "ForSequenceClassification" in arch:
        return "classifier"
    return "encoder"


def hash_json(obj: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    vocab = tokenizer.get_vocab()
    return {"class": type(tokenizer).__name__, "vocab_size": len(vocab),
            "vocab_hash": hash_json(sorted(vocab.items(), key=lambda kv: kv[1])),
            "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "pad_token_id": tokenizer.pad_token_id}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "*.model",
                   "*.tiktoken")


def import_user_object(spec: str, what: str = "student_factory") -> Any:
    """A user's own code named in a config as 'module:attribute' (e.g. a non-HF student factory).
    The one string import in the project: kdcache's own modules are always imported by name."""
    import importlib

    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"{what} must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)
