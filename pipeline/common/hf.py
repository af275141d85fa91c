"""Hugging Face helpers shared by the teacher pass and the student side: which kind of model a config
describes, the weight-file policy (safetensors; pickle only when asked), tokenizer identity and files.
One home each, so that the two sides can never disagree."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


class PickleRefused(PermissionError, ValueError):
    """Only pickle weights, and pickle was not allowed. A refusal by policy (PermissionError) of an input
    the caller could fix (ValueError): callers catching either keep working."""


def refuse_pickle(what: str, pickles: list[str], allow_pickle: bool, how_to_allow: str) -> None:
    """The pickle policy, for the teacher and the student side alike: pickle weights can run arbitrary
    code when loaded, so they are read only when the user says they trust them. `how_to_allow` names
    the switch in the caller's terms (`--allow-pickle`, `allow_pickle=True`)."""
    if not allow_pickle:
        raise PickleRefused(f"{what} has only pickle weights ({', '.join(pickles)}), which can run arbitrary code "
                            f"when loaded; convert them to safetensors, or pass {how_to_allow} if you trust their "
                            "origin (loaded with torch.load(weights_only=True))")


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
    refuse_pickle(f"teacher folder {path}", pickles, allow_pickle, "--allow-pickle")


# How an architecture's class name ends -> the kind of model it is. Finer than the teacher's kinds:
# loading a student needs the exact head (a pre-training head is not a masked-LM head), the teacher
# pass only the family (`detect_kind`).
ARCHITECTURE_KINDS = (("ForMaskedLM", "masked-lm"), ("ForPreTraining", "pretraining"),
                      ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"),
                      ("ForSequenceClassification", "classifier"), ("ForTokenClassification", "token-classifier"))
AUTO_CLASSES = {"masked-lm": "AutoModelForMaskedLM", "pretraining": "AutoModelForPreTraining",
                "causal-lm": "AutoModelForCausalLM", "classifier": "AutoModelForSequenceClassification",
                "token-classifier": "AutoModelForTokenClassification", "encoder": "AutoModel"}
_TEACHER_KINDS = {"pretraining": "masked-lm", "token-classifier": "encoder"}  # the rest map to themselves


def architecture_kind(arch: str | None) -> str:
    """The kind of model one architecture class name describes; "encoder" when no ending matches."""
    return next((kind for ending, kind in ARCHITECTURE_KINDS if arch and arch.endswith(ending)), "encoder")


def auto_class(kind: str):
    """The transformers Auto class that loads a model of this kind (with its head)."""
    import transformers

    return getattr(transformers, AUTO_CLASSES[kind])


def detect_kind(config) -> str:
    """The teacher pass's kind of a config: masked-lm, causal-lm, classifier or encoder. When the config
    lists several architectures, an LM head wins over a classifier, a classifier over a bare encoder."""
    found = {architecture_kind(a) for a in getattr(config, "architectures", None) or []}
    found = {_TEACHER_KINDS.get(k, k) for k in found}
    return next((k for k in ("masked-lm", "causal-lm", "classifier") if k in found), "encoder")


def hash_json(obj: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    vocab = tokenizer.get_vocab()
    return {"class": type(tokenizer).__name__, "vocab_size": len(vocab),
            "vocab_hash": hash_json(sorted(vocab.items(), key=lambda kv: kv[1])),
            "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "pad_token_id": tokenizer.pad_token_id}


# Tokenizer files, in one place: any of TOKENIZER_FILES means a folder holds a tokenizer (the
# student/cache compatibility check); TOKENIZER_COPY_PATTERNS is what travels with it when a student
# is made from a teacher (the tokenizer and the files its behaviour depends on), copied verbatim.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "*.model",
                   "*.tiktoken")
TOKENIZER_COPY_PATTERNS = (
    "tokenizer*.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "*.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "generation_config.json",  # eos/pad ids belong to the tokenizer, not the size
)


def import_user_object(spec: str, what: str = "student_factory") -> Any:
    """A user's own code named in a config as 'module:attribute' (e.g. a non-HF student factory).
    The one string import in the project: kdcache's own modules are always imported by name."""
    import importlib

    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"{what} must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)
