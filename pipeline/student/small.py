"""Small non-transformer students for task distillation: Tang et al.'s BiLSTM, Kim's CNN and the
AdaBERT-style cell CNN that `kdcache search` searches.

Both read the teacher's token ids (so one cache serves every student) and return per-example
logits, `forward(input_ids, attention_mask) -> .logits [B, C]`, like a sequence classifier; the
trainer, `kdcache eval` and a user's own code call them the same way. They save and load the
Hugging Face way for custom models (`PyTorchModelHubMixin`): `config.json` holds the constructor's
arguments, `model.safetensors` the weights, and the teacher's tokenizer files travel beside them,
so `load_small_student(folder)` (or `BiLSTMClassifier.from_pretrained(folder)`) is the one call.

Padding never changes a logit: the BiLSTM packs each row to its real length, and the CNN zeroes
the embeddings of padding and drops every window that holds no real token, so a padded batch
gives the logits of one-by-one inference (tests/pipeline/student/test_small.py). Real tokens are
taken wherever the mask says, so left and right padding both work.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin
from transformers.modeling_outputs import SequenceClassifierOutput

__all__ = ["BiLSTMClassifier", "CNNClassifier", "CellCNNClassifier", "CELL_OPS", "SMALL_STUDENTS", "is_small_student", "load_small_student",
           "init_small_student", "describe_small_student"]

_CARD = {"library_name": "kdcache", "tags": ["knowledge-distillation", "kdcache"]}


def _compact(input_ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real tokens moved to the front of each row (stable), pads after them; and the lengths."""
    mask = mask.bool()
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    ids = torch.gather(input_ids, 1, order)
    lengths = mask.sum(1)
    keep = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
    return torch.where(keep, ids, torch.full_like(ids, pad_id)), lengths


def _segments(ids: torch.Tensor, lengths: torch.Tensor, sep_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair inputs (`[CLS] a [SEP] b [SEP]`): a per-token segment index, 0 up to and including the
    first separator, 1 after it; tokens past the length get -1."""
    t = torch.arange(ids.shape[1], device=ids.device)[None, :]
    is_sep = (ids == sep_id) & (t < lengths[:, None])
    first = torch.where(is_sep.any(1), is_sep.int().argmax(1), lengths)
    seg = (t > first[:, None]).long()
    return torch.where(t < lengths[:, None], seg, torch.full_like(seg, -1))


class BiLSTMClassifier(nn.Module, PyTorchModelHubMixin, **_CARD):
    """Tang et al. 2019: embedding → 1-layer BiLSTM → [final fwd; final bwd] (or max over time) →
    ReLU dense → logits. `pair=True`: both sentences encoded by the same BiLSTM, then
    [h1, h2, h1⊙h2, |h1−h2|] (the sentence-pair variant), split at the first `sep_token_id`."""

    def __init__(self, vocab_size: int, num_labels: int = 2, embedding_size: int = 300, hidden: int = 300,
                 dense: int = 400, pooling: str = "final", pair: bool = False, dropout: float = 0.1,
                 pad_token_id: int = 0, sep_token_id: int | None = None, architecture: str = "bilstm"):
        super().__init__()
        if architecture != "bilstm":
            raise ValueError(f"BiLSTMClassifier got architecture={architecture!r}")
        if pooling not in ("final", "max"):
            raise ValueError(f"pooling must be 'final' or 'max', got {pooling!r}")
        if pair and sep_token_id is None:
            raise ValueError("pair=True needs sep_token_id (the tokenizer's separator) to split the two sentences")
        self.vocab_size, self.num_labels, self.pooling, self.pair = vocab_size, num_labels, pooling, pair
        self.pad_token_id, self.sep_token_id = pad_token_id, sep_token_id
        self.embed = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_token_id)
        self.lstm = nn.LSTM(embedding_size, hidden, num_layers=1, batch_first=True, bidirectional=True)
        feat = 2 * hidden * (4 if pair else 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feat, dense), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(dense, num_labels))

    def _encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, 2H] sentence vectors of rows whose real tokens are at the front; an empty row (a pair
        input without a second sentence) encodes as zeros."""
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths.clamp(min=1).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        if self.pooling == "final":
            vec = torch.cat([h[0], h[1]], dim=-1)
        else:
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, padding_value=float("-inf"),
                                                      total_length=ids.shape[1])
            vec = out.max(dim=1).values
        return vec * (lengths > 0)[:, None]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> SequenceClassifierOutput:
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        ids, lengths = _compact(input_ids, mask, self.pad_token_id)
        if not self.pair:
            return SequenceClassifierOutput(logits=self.head(self._encode(ids, lengths)))
        seg = _segments(ids, lengths, self.sep_token_id)
        halves = [_compact(ids, seg == s, self.pad_token_id) for s in (0, 1)]
        h1, h2 = (self._encode(i, n) for i, n in halves)
        return SequenceClassifierOutput(logits=self.head(torch.cat([h1, h2, h1 * h2, (h1 - h2).abs()], dim=-1)))


class CNNClassifier(nn.Module, PyTorchModelHubMixin, **_CARD):
    """Kim 2014: embedding → parallel 1-D convolutions (widths 3/4/5, 100 filters each) → ReLU →
    max over time → dropout → logits."""

    def __init__(self, vocab_size: int, num_labels: int = 2, embedding_size: int = 300, filters: int = 100,
                 kernel_sizes: list[int] | tuple[int, ...] = (3, 4, 5), dropout: float = 0.5, pad_token_id: int = 0,
                 architecture: str = "cnn"):
        super().__init__()
        if architecture != "cnn":
            raise ValueError(f"CNNClassifier got architecture={architecture!r}")
        if not kernel_sizes or min(kernel_sizes) < 1:
            raise ValueError(f"kernel_sizes must be positive widths, got {kernel_sizes!r}")
        self.vocab_size, self.num_labels, self.pad_token_id = vocab_size, num_labels, pad_token_id
        self.kernel_sizes = [int(k) for k in kernel_sizes]
        self.embed = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_token_id)
        # Full convolution (zero padding w-1 each side): every window that touches a real token exists,
        # also for texts shorter than the widest kernel.
        self.convs = nn.ModuleList(nn.Conv1d(embedding_size, filters, k, padding=k - 1) for k in self.kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(filters * len(self.kernel_sizes), num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> SequenceClassifierOutput:
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        ids, lengths = _compact(input_ids, mask, self.pad_token_id)
        real = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        x = (self.embed(ids) * real[..., None]).transpose(1, 2)  # [B, E, T], pads are zeros
        pooled = []
        for k, conv in zip(self.kernel_sizes, self.convs):
            y = torch.relu(conv(x))  # [B, F, T + k - 1]; window j covers tokens j-k+1 .. j
            j = torch.arange(y.shape[-1], device=y.device)[None, :]
            touches = j < (lengths[:, None].clamp(min=1) + k - 1)  # starts at or before the last real token
            pooled.append(y.masked_fill(~touches[:, None, :], float("-inf")).max(dim=-1).values)
        return SequenceClassifierOutput(logits=self.out(self.dropout(torch.cat(pooled, dim=-1))))


# AdaBERT's operation set (Chen et al. 2020) on [B, C, T] with real tokens at the front: every op keeps
# the length, and pads stay zero (max-pool sees them as -inf, avg-pool counts only real tokens), so a
# padded batch gives the logits of one-by-one inference. "zero" is not an op: a node always has inputs.
def _conv_op(channels: int, k: int, dilation: int) -> nn.Module:
    return nn.Sequential(nn.Conv1d(channels, channels, k, dilation=dilation, padding=(k // 2) * dilation), nn.ReLU())


class _Pool(nn.Module):
    def __init__(self, kind: str, k: int = 3):
        super().__init__()
        self.kind, self.k = kind, k

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pad = self.k // 2
        if self.kind == "max":
            y = nn.functional.max_pool1d(x.masked_fill(~mask, float("-inf")), self.k, 1, pad)
        else:
            m = mask.to(x.dtype)
            y = nn.functional.avg_pool1d(x * m, self.k, 1, pad) / nn.functional.avg_pool1d(m, self.k, 1, pad).clamp(
                min=1e-6)
        return y.masked_fill(~mask, 0.0)


CELL_OPS: dict[str, Any] = {
    "conv3": lambda c: _conv_op(c, 3, 1), "conv5": lambda c: _conv_op(c, 5, 1), "conv7": lambda c: _conv_op(c, 7, 1),
    "dilconv3": lambda c: _conv_op(c, 3, 2), "dilconv5": lambda c: _conv_op(c, 5, 2),
    "dilconv7": lambda c: _conv_op(c, 7, 2), "maxpool3": lambda c: _Pool("max"), "avgpool3": lambda c: _Pool("avg"),
    "identity": lambda c: nn.Identity(),
}


class _Cell(nn.Module):
    """One searched cell: states [s0 (two cells back), s1 (previous cell)]; node i sums two ops of
    earlier states (`genotype[i] = [[op, input], [op, input]]`); the cell's output is the mean of
    its nodes plus s1 (residual: a deep stack of cells still trains)."""

    def __init__(self, channels: int, genotype: list):
        super().__init__()
        self.genotype = [[(str(op), int(src)) for op, src in node] for node in genotype]
        self.ops = nn.ModuleList()
        for i, node in enumerate(self.genotype):
            for op, src in node:
                if op not in CELL_OPS:
                    raise ValueError(f"cell op {op!r} is not one of {', '.join(CELL_OPS)}")
                if not 0 <= src < 2 + i:
                    raise ValueError(f"node {i} reads state {src}: only 0..{1 + i} exist before it")
                self.ops.append(CELL_OPS[op](channels))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states, k = [s0, s1], 0
        for node in self.genotype:
            acc = 0
            for _, src in node:
                op = self.ops[k]
                k += 1
                y = op(states[src], mask) if isinstance(op, _Pool) else op(states[src])
                acc = acc + y.masked_fill(~mask, 0.0)
            states.append(acc)
        return s1 + torch.stack(states[2:]).mean(0)


class CellCNNClassifier(nn.Module, PyTorchModelHubMixin, **_CARD):
    """AdaBERT-style searched CNN: embedding → width `channels` → `cells` stacked copies of one searched
    cell (ops from `CELL_OPS`) → max over real tokens → dropout → logits. `kdcache search` picks the
    genotype, depth, width and embedding size; `init-student --architecture-config` rebuilds it."""

    def __init__(self, vocab_size: int, num_labels: int = 2, embedding_size: int = 128, channels: int = 64,
                 cells: int = 2, genotype: list | None = None, dropout: float = 0.1, pad_token_id: int = 0,
                 architecture: str = "cellcnn"):
        super().__init__()
        if architecture != "cellcnn":
            raise ValueError(f"CellCNNClassifier got architecture={architecture!r}")
        if cells < 1:
            raise ValueError(f"cells must be >= 1, got {cells}")
        genotype = genotype or [[["conv3", 1], ["conv5", 0]], [["maxpool3", 2], ["identity", 1]]]
        self.vocab_size, self.num_labels, self.pad_token_id = vocab_size, num_labels, pad_token_id
        self.embed = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_token_id)
        self.stem = nn.Conv1d(embedding_size, channels, 1)
        self.cells = nn.ModuleList(_Cell(channels, genotype) for _ in range(cells))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(channels, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> SequenceClassifierOutput:
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        ids, lengths = _compact(input_ids, mask, self.pad_token_id)
        real = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None].clamp(min=1))[:, None, :]
        x = self.stem(self.embed(ids).transpose(1, 2)).masked_fill(~real, 0.0)  # [B, C, T]
        s0 = s1 = x
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, real)
        pooled = s1.masked_fill(~real, float("-inf")).max(dim=-1).values
        return SequenceClassifierOutput(logits=self.out(self.dropout(pooled)))


class TinyTransformerClassifier(nn.Module, PyTorchModelHubMixin, **_CARD):
    """A tiny pre-LN transformer encoder on the teacher's tokenizer: embedding (`embedding_size`,
    projected to `width` when narrower) + learned positions → `layers` blocks (`heads`, FFN `ffn`) →
    mean over real tokens → logits. The search's transformer family: trained from cached logits like
    the CNN/BiLSTM students (not a Hugging Face model: `kdcache search` builds it from a flat config)."""

    def __init__(self, vocab_size: int, num_labels: int = 2, embedding_size: int = 128, width: int = 128,
                 layers: int = 2, heads: int = 2, ffn: int = 256, dropout: float = 0.1, max_positions: int = 512,
                 pad_token_id: int = 0, architecture: str = "tinytransformer"):
        super().__init__()
        if architecture != "tinytransformer":
            raise ValueError(f"TinyTransformerClassifier got architecture={architecture!r}")
        if layers < 1 or heads < 1 or width % heads:
            raise ValueError(f"width {width} must split into heads {heads} (layers {layers} >= 1)")
        self.vocab_size, self.num_labels, self.pad_token_id = vocab_size, num_labels, pad_token_id
        self.embed = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_token_id)
        self.up = nn.Linear(embedding_size, width) if embedding_size != width else nn.Identity()
        self.positions = nn.Embedding(max_positions, width)
        block = nn.TransformerEncoderLayer(width, heads, ffn, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        # no nested-tensor fast path: the same kernels (and logits) in train and eval, padded or not
        self.encoder = nn.TransformerEncoder(block, layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.out = nn.Linear(width, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> SequenceClassifierOutput:
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        ids, lengths = _compact(input_ids, mask, self.pad_token_id)
        ids = ids[:, :self.positions.num_embeddings]
        lengths = lengths.clamp(min=1, max=ids.shape[1])
        real = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        x = self.up(self.embed(ids)) + self.positions(torch.arange(ids.shape[1], device=ids.device))[None]
        h = self.encoder(x, src_key_padding_mask=~real)
        pooled = (h * real[..., None]).sum(1) / lengths[:, None].to(h.dtype)
        return SequenceClassifierOutput(logits=self.out(pooled))


SMALL_STUDENTS: dict[str, type[nn.Module]] = {"bilstm": BiLSTMClassifier, "cnn": CNNClassifier,
                                              "cellcnn": CellCNNClassifier,
                                              "tinytransformer": TinyTransformerClassifier}


def _small_config(folder: str | Path) -> dict[str, Any] | None:
    f = Path(folder) / "config.json"
    if not f.is_file():
        return None
    try:
        config = json.loads(f.read_text())
    except ValueError:
        return None
    return config if isinstance(config, dict) and config.get("architecture") in SMALL_STUDENTS else None


def is_small_student(folder: str | Path) -> bool:
    """True for a folder written by `init_small_student` / a trained BiLSTM or CNN student."""
    return _small_config(folder) is not None


def load_small_student(folder: str | Path) -> nn.Module:
    """The student in `folder`, in eval mode (weights from safetensors, strict)."""
    from safetensors.torch import load_model

    config = _small_config(folder)
    if config is None:
        raise ValueError(f"{folder} holds no kdcache BiLSTM/CNN student (config.json with architecture "
                         f"{' | '.join(SMALL_STUDENTS)}); make one with `kdcache init-student --architecture bilstm`")
    model = SMALL_STUDENTS[config["architecture"]](**config)
    load_model(model, str(Path(folder) / "model.safetensors"), strict=True)
    return model.eval()


def describe_small_student(folder: str | Path) -> dict[str, Any]:
    """The sizes the trainer's plan checks (the `describe_student` keys)."""
    config = _small_config(folder) or {}
    return {"num_layers": 1, "hidden_size": None, "num_heads": None, "vocab_size": config.get("vocab_size"),
            "max_positions": None, "num_labels": config.get("num_labels"), "architecture": config.get("architecture"),
            "meta": {}}


def param_counts(model: nn.Module) -> dict[str, int]:
    """All parameters, and those outside the embedding table (the report gives both)."""
    total = sum(p.numel() for p in model.parameters())
    embed = getattr(model, "embed", None)
    table = embed.weight.numel() if isinstance(embed, nn.Embedding) else 0
    return {"params": total, "params_without_embeddings": total - table}


def init_small_student(teacher_dir: str | Path, out_dir: str | Path, architecture: str, *,
                       num_labels: int | None = None, embedding_size: int | None = None,
                       embedding_init: str = "teacher", seed: int = 0, allow_pickle: bool = False,
                       **shape: Any) -> dict[str, Any]:
    """Write a BiLSTM/CNN student for `teacher_dir`'s tokenizer; never runs the teacher.

    `embedding_init="teacher"`: the token table is the teacher's input embeddings, projected onto
    their top principal directions when `embedding_size` is narrower (the default is the teacher's
    width: a plain copy); `"random"`: drawn under `seed`. `shape`: the class's other arguments
    (`hidden`, `dense`, `pooling`, `pair` / `filters`, `kernel_sizes`, `dropout`).
    """
    from kdcache.pipeline.student.models import TeacherWeights, pca_projection

    if architecture not in SMALL_STUDENTS:
        raise ValueError(f"--architecture {architecture!r}: small students are {', '.join(SMALL_STUDENTS)}")
    if embedding_init not in ("teacher", "random"):
        raise ValueError(f"embedding_init must be 'teacher' or 'random', got {embedding_init!r}")
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    tconf_path = teacher_dir / "config.json"
    if not tconf_path.is_file():
        raise FileNotFoundError(f"teacher {teacher_dir} has no config.json (a save_pretrained folder is expected)")
    tconf = json.loads(tconf_path.read_text())
    vocab, width = int(tconf["vocab_size"]), int(tconf.get("hidden_size") or tconf.get("dim") or 0)
    if num_labels is None:
        num_labels = len(tconf.get("id2label") or {}) or 2
    embedding_size = int(embedding_size or width or 300)
    cls = SMALL_STUDENTS[architecture]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "architecture"}
    unknown = sorted(k for k, v in shape.items() if v is not None and k not in accepted)
    if unknown:
        flags = lambda names: ", ".join(f"--{n.replace('_', '-')}" for n in names)  # noqa: E731
        raise ValueError(f"{architecture} students take no {flags(unknown)} (they take "
                         f"{flags(sorted(accepted - {'vocab_size', 'pad_token_id', 'sep_token_id'}))})")
    kwargs: dict[str, Any] = {"vocab_size": vocab, "num_labels": int(num_labels), "embedding_size": embedding_size,
                              "pad_token_id": int(tconf.get("pad_token_id") or 0),
                              **{k: v for k, v in shape.items() if v is not None}}
    if architecture == "bilstm" and kwargs.get("pair") and kwargs.get("sep_token_id") is None:
        kwargs["sep_token_id"] = int(tconf.get("sep_token_id") or tconf.get("eos_token_id") or 102)
    torch.manual_seed(seed)
    model = cls(**kwargs)
    source = "random"
    if embedding_init == "teacher":
        weights = TeacherWeights(teacher_dir, allow_pickle)
        key = next((k for k in weights.keys() if k.endswith(("word_embeddings.weight", "embed_tokens.weight",
                                                             "wte.weight"))), None)
        if key is None:
            raise ValueError(f"embedding_init='teacher': no token embedding table found in {teacher_dir}'s weights; "
                             "use --embedding-init random")
        table = weights.get(key).float()
        if table.shape[0] != vocab:
            raise ValueError(f"{teacher_dir}: {key} has {table.shape[0]} rows, the config says {vocab} tokens")
        if embedding_size > table.shape[1]:
            raise ValueError(f"--embedding-size {embedding_size} is wider than the teacher's embeddings "
                             f"({table.shape[1]}): use at most {table.shape[1]} or --embedding-init random")
        if embedding_size < table.shape[1]:
            table = table @ pca_projection(table, embedding_size)
            source = f"teacher {key}, PCA {weights.get(key).shape[1]} -> {embedding_size}"
        else:
            source = f"teacher {key}, copied"
        with torch.no_grad():
            model.embed.weight.copy_(table)
    record = {"architecture": architecture, "teacher": str(teacher_dir), "seed": seed, "embedding_init": source,
              **kwargs, **param_counts(model)}
    save_small_student(model, out_dir, teacher_dir, record)
    return record


def save_small_student(model: nn.Module, out_dir: str | Path, tokenizer_from: str | Path | None,
                       record: dict[str, Any]) -> None:
    """`out_dir` = the model (config.json + safetensors), the tokenizer files of `tokenizer_from` and
    `kdcache_student.json`, written beside it and moved into place in one step."""
    import shutil

    from kdcache.pipeline.student.models import copy_tokenizer

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    if tokenizer_from:
        copy_tokenizer(Path(tokenizer_from), tmp, drop_token_types=False)
    (tmp / "kdcache_student.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
