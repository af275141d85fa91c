"""The student adapter: the loop needs nothing from a student but a module
`forward(input_ids, attention_mask) -> StudentOutputs`, so a non-transformer student plugs in through
`student_factory: "module:function"`; Hugging Face models are wrapped in `HFStudent`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kdcache.pipeline.common.hf import import_user_object
from kdcache.pipeline.student.config import TrainConfig
from kdcache.pipeline.student.head import find_head
from kdcache.pipeline.student.small import describe_small_student, is_small_student, load_small_student


@dataclass
class StudentOutputs:
    """What the losses read from a student: all optional, shapes as in `kdcache.pipeline.student.losses`."""

    logits: torch.Tensor | None = None  # [B, T, V] (token) or [B, C] (classifier)
    hidden_states: tuple | None = None  # index 0 = embeddings, l = after layer l
    attentions: tuple | None = None  # attentions[l - 1] = layer l, [B, heads, T, T]
    # Instead of logits: the vocabulary head's input [B, T, H] and the head, which the losses run
    # only on the rows they read (`kdcache.pipeline.student.head`).
    head_input: torch.Tensor | None = None
    head: nn.Module | None = None


class HFStudent(nn.Module):
    """A Hugging Face model behind the `forward(input_ids, attention_mask) -> StudentOutputs` interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # With `capture_head` on (set by the trainer when the active losses read vocabulary logits),
        # the model's head gets zero positions in train mode and its input comes back as `head_input`.
        self.head = find_head(model)
        self.capture_head = False
        self._capturing = False  # only inside forward: the losses call the same head afterwards
        self._captured: torch.Tensor | None = None
        if self.head is not None:
            self.head.register_forward_pre_hook(self._skip_head)

    def _skip_head(self, module: nn.Module, args: tuple):
        if not self._capturing or not args:
            return None
        self._captured = args[0]
        return (args[0][..., :0, :], *args[1:])  # [B, 0, H]: the head computes nothing

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> StudentOutputs:
        # Training only: in eval mode (evaluation, perplexity) the student gives its logits as usual.
        capture = self.capture_head and self.training
        self._captured, self._capturing = None, capture
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            captured = self._captured
        finally:
            self._captured, self._capturing = None, False
        if capture:
            if captured is None:
                raise RuntimeError(f"{type(self.model).__name__}'s forward did not call its head "
                                   f"({type(self.head).__name__}); train with full_logits=true")
            return StudentOutputs(hidden_states=getattr(out, "hidden_states", None),
                                  attentions=getattr(out, "attentions", None), head_input=captured, head=self.head)
        return StudentOutputs(logits=getattr(out, "logits", None), hidden_states=getattr(out, "hidden_states", None),
                              attentions=getattr(out, "attentions", None))

    def save(self, folder: Path) -> None:
        # Hidden states and attentions were switched on for the losses; the saved student returns
        # them only on request, like any checkpoint (a config saying output_attentions=True also
        # fails to load or save under the default SDPA attention).
        config = self.model.config
        flags = config.output_hidden_states, config.output_attentions
        config.output_hidden_states = config.output_attentions = False
        try:
            self.model.save_pretrained(str(folder))
        finally:
            config.output_hidden_states, config.output_attentions = flags


def build_student(cfg: TrainConfig, needs_hidden: bool, needs_attentions: bool) -> nn.Module:
    """The student module in train mode; a factory's module must follow `HFStudent.forward`."""
    if cfg.student_factory:
        return import_user_object(cfg.student_factory)(dataclasses.asdict(cfg)).train()
    if is_small_student(cfg.student):  # BiLSTM / CNN: logits only, no hidden states to give
        return load_small_student(cfg.student).train()
    from transformers.utils import logging as hf_logging

    from kdcache.pipeline.student.models import load_student

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker is noise
    model = load_student(cfg.student, output_hidden_states=needs_hidden, output_attentions=needs_attentions,
                         trust_remote_code=cfg.trust_remote_code, dtype=torch.float32)
    return HFStudent(model).train()


def describe_student(cfg: TrainConfig) -> dict[str, Any]:
    """Sizes the checks need, from the student's config (or a factory module's attributes)."""
    if cfg.student_factory:
        module = import_user_object(cfg.student_factory)(dataclasses.asdict(cfg))
        get = lambda k: getattr(module, k, None)  # noqa: E731
        return {k: get(k) for k in ("num_layers", "hidden_size", "num_heads", "vocab_size", "max_positions",
                                    "num_labels")} | {"architecture": type(module).__name__, "meta": {}}
    if is_small_student(cfg.student):
        return describe_small_student(cfg.student)
    from transformers import AutoConfig

    from kdcache.pipeline.student.models import read_student_meta

    if not (Path(cfg.student) / "config.json").exists():
        raise FileNotFoundError(f"student {cfg.student} has no config.json; make one with `kdcache init-student "
                                "--teacher T --out STUDENT` (or point --student at a save_pretrained folder)")
    c = AutoConfig.from_pretrained(cfg.student, trust_remote_code=cfg.trust_remote_code)
    archs = getattr(c, "architectures", None) or []
    return {"num_layers": getattr(c, "num_hidden_layers", None), "hidden_size": getattr(c, "hidden_size", None),
            "num_heads": getattr(c, "num_attention_heads", None), "vocab_size": getattr(c, "vocab_size", None),
            "max_positions": getattr(c, "max_position_embeddings", None),
            "num_labels": c.num_labels if any("Classification" in a for a in archs) else None,
            "architecture": archs[0] if archs else type(c).__name__, "meta": read_student_meta(cfg.student) or {}}
