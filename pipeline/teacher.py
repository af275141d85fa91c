"""Loading a teacher safely and turning one padded batch into the cache's columns.

Everything heavy happens on the teacher's device inside `torch.inference_mode()`: log-softmax over
the vocabulary, top-k (or RS-KD sampling), layer selection and the cast to the storage dtype. Only
the selected, already-narrowed tensors are copied to host memory.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

TEACHER_KINDS = ("auto", "masked-lm", "causal-lm", "encoder", "classifier")


@dataclass(frozen=True)
class TeacherOptions:
    name_or_path: str
    kind: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False  # runs code from the model folder: only when the user says so
    allow_pickle: bool = False  # pickle checkpoints can run code on load: refused unless asked
    device: str = "auto"  # auto = cuda if available
    autocast: str = "auto"  # auto = bf16 on GPU, none on CPU; or bfloat16 | float16 | none


def teacher_options_from(cfg) -> "TeacherOptions":
    """The teacher-loading part of a cache config."""
    return TeacherOptions(name_or_path=cfg.teacher, kind=cfg.teacher_kind, revision=cfg.revision,
                          trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, device=cfg.device,
                          autocast=cfg.autocast)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(opts: TeacherOptions, device: torch.device) -> torch.dtype | None:
    choice = opts.autocast
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


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


def load_teacher(opts: TeacherOptions, need_attentions: bool):
    """(model in eval mode on its device, tokenizer, kind)."""
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM,
                              AutoModelForSequenceClassification, AutoTokenizer)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    check_weights(opts.name_or_path, opts.allow_pickle)
    common = dict(revision=opts.revision, trust_remote_code=opts.trust_remote_code)
    config = AutoConfig.from_pretrained(opts.name_or_path, **common)
    kind = detect_kind(config) if opts.kind == "auto" else opts.kind
    if kind not in TEACHER_KINDS[1:]:
        raise ValueError(f"teacher kind must be one of {TEACHER_KINDS}, got {kind!r}")
    auto = {"masked-lm": AutoModelForMaskedLM, "causal-lm": AutoModelForCausalLM, "encoder": AutoModel,
            "classifier": AutoModelForSequenceClassification}[kind]
    # Eager attention only when maps are cached: the fused kernels cannot return them.
    attn = "eager" if need_attentions else "sdpa"
    model = auto.from_pretrained(opts.name_or_path, attn_implementation=attn,
                                 use_safetensors=not opts.allow_pickle, **common)
    device = resolve_device(opts.device)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(opts.name_or_path, **common)
    return model, tokenizer, kind


def _hash_json(obj: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def teacher_fingerprint_from_config(opts: TeacherOptions, model_config, kind: str) -> dict[str, Any]:
    """Identity of the teacher: changes whenever its config or weights change (weights are hashed, not loaded)."""
    from storage.checksum import checksum_stream

    config = model_config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_attn_implementation_autoset", "attn_implementation",
                     "_attn_implementation", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    weights = {}
    path = Path(opts.name_or_path)
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            with open(f, "rb") as fh:
                weights[f.name] = checksum_stream(fh)[0]
    else:  # hub model: its revision pins the weights
        weights["revision"] = opts.revision or "main"
    return {"name_or_path": os.path.basename(os.path.normpath(opts.name_or_path)) if path.is_dir() else opts.name_or_path,
            "revision": opts.revision, "kind": kind, "architecture": (model_config.architectures or ["?"])[0],
            "num_layers": model_config.num_hidden_layers, "hidden_size": model_config.hidden_size,
            "num_heads": model_config.num_attention_heads, "vocab_size": model_config.vocab_size,
            "config_hash": _hash_json(config), "weights_hash": _hash_json(weights)}


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    vocab = tokenizer.get_vocab()
    return {"class": type(tokenizer).__name__, "vocab_size": len(vocab),
            "vocab_hash": _hash_json(sorted(vocab.items(), key=lambda kv: kv[1])),
            "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "pad_token_id": tokenizer.pad_token_id}


@dataclass(frozen=True)
class OutputSpec:
    """What a forward pass must extract (derived from the cache's CacheSpec)."""

    targets: str  # topk | sampled | none
    k: int = 0
    num_samples: int = 0
    hidden_layers: tuple[int, ...] = ()
    hidden_dtype: str = "float16"
    attention_layers: tuple[int, ...] = ()
    attention_dtype: str = "float16"
    task_logits: bool = False
    seed: int = 0


def _host_dense(x: torch.Tensor, form: str) -> np.ndarray:
    # Narrow on the device before the copy: float16 halves the bytes over PCIe; bf16/int8 forms are
    # rounded by the storage codec from float32, which keeps their rounding in one place.
    if form == "float16":
        return x.to(torch.float16).cpu().numpy()
    return x.float().cpu().numpy()


def sample_rskd(logp: torch.Tensor, num_samples: int, generator: torch.Generator | None):
    """RS-KD targets: `num_samples` draws from the teacher distribution per token, deduplicated.

    Drawing from p itself makes the importance weight of a draw 1, so the weight of a unique id is
    its count / N, and sum_i w_i f(id_i) is an unbiased estimate of E_p[f] for any f.
    Returns ids [..., N] and weights [..., N] with weight 0 on padding slots.
    """
    flat = logp.reshape(-1, logp.shape[-1]).float().exp()
    draws = torch.multinomial(flat, num_samples, replacement=True, generator=generator)  # [M, N]
    draws, _ = draws.sort(dim=-1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    # Count of each unique id = distance between consecutive "first occurrence" positions.
    idx = torch.arange(num_samples, device=draws.device).expand_as(draws)
    starts = torch.where(first, idx, torch.full_like(idx, num_samples))
    starts_sorted, order = starts.sort(dim=-1)
    ids = torch.gather(draws, 1, order.clamp(max=num_samples - 1))
    nxt = torch.cat([starts_sorted[:, 1:], torch.full_like(starts_sorted[:, :1], num_samples)], dim=1)
    counts = torch.where(starts_sorted < num_samples, nxt.clamp(max=num_samples) - starts_sorted,
                         torch.zeros_like(starts_sorted))
    weights = counts.float() / num_samples
    ids = torch.where(counts > 0, ids, torch.zeros_like(ids))
    shape = (*logp.shape[:-1], num_samples)
    return ids.reshape(shape), weights.reshape(shape)


class TeacherRunner:
    """Runs one padded batch through the teacher and returns the writer's input columns."""

    def __init__(self, model, kind: str, out: OutputSpec, opts: TeacherOptions):
        self.model, self.kind, self.out = model, kind, out
        self.device = next(model.parameters()).device
        self.amp = autocast_dtype(opts, self.device)
        n_layers = model.config.num_hidden_layers
        for layer in out.hidden_layers:
            if not 0 <= layer <= n_layers:
                raise ValueError(f"hidden layer {layer} out of range: the teacher has layers 0..{n_layers} "
                                 "(0 = embedding output)")
        for layer in out.attention_layers:
            if not 1 <= layer <= n_layers:
                raise ValueError(f"attention layer {layer} out of range: the teacher has layers 1..{n_layers}")
        if out.targets != "none" and kind not in ("masked-lm", "causal-lm"):
            raise ValueError(f"a {kind} teacher has no LM head, so it cannot produce soft targets over the "
                             "vocabulary; use --top-k 0 (no targets) and cache hidden states/attention instead")
        self.generator = None
        if out.targets == "sampled":
            self.generator = torch.Generator(device=self.device)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        ids = torch.from_numpy(np.asarray(batch["input_ids"], dtype=np.int64)).to(self.device, non_blocking=True)
        mask = torch.from_numpy(np.asarray(batch["attention_mask"], dtype=np.int64)).to(self.device, non_blocking=True)
        want_hidden, want_attn = bool(self.out.hidden_layers), bool(self.out.attention_layers)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            result = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=want_hidden,
                                output_attentions=want_attn)
        out: dict[str, Any] = {}
        if self.out.targets != "none":
            # float32 before the softmax: bf16 logits would put ~1e-2 error into every log-prob.
            logp = torch.log_softmax(result.logits.float(), dim=-1)
            if self.out.targets == "topk":
                top_lp, top_ids = torch.topk(logp, self.out.k, dim=-1)
                covered = torch.logsumexp(top_lp, dim=-1)  # log of the top-k mass
                log_tail = torch.log(-torch.expm1(covered).clamp(max=0)).clamp(min=-1e4)  # log(1 - mass)
                out["topk_ids"] = top_ids.cpu().numpy()
                out["topk_logprobs"] = top_lp.cpu().numpy()
                out["topk_log_tail"] = log_tail.cpu().numpy()
            else:
                if self.generator is not None:
                    # Seeded per batch from its first sample id: draws do not depend on which actor ran it.
                    self.generator.manual_seed(self.out.seed * 1_000_003 + int(batch["sample_id"][0]))
                sids, w = sample_rskd(logp, self.out.num_samples, self.generator)
                out["sample_ids"], out["sample_weights"] = sids.cpu().numpy(), w.cpu().numpy()
        if self.kind == "classifier" and self.out.task_logits:
            out["task_logits"] = result.logits.float().cpu().numpy()
        for layer in self.out.hidden_layers:
            out[f"hidden_{layer}"] = _host_dense(result.hidden_states[layer], self.out.hidden_dtype)
        for layer in self.out.attention_layers:
            out[f"attention_{layer}"] = _host_dense(result.attentions[layer - 1], self.out.attention_dtype)
        return out
