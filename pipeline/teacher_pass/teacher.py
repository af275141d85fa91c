"""Loading a teacher safely and turning one padded batch into the cache's columns.

Everything heavy happens on the teacher's device inside `torch.inference_mode()`: log-softmax over
the vocabulary, top-k (or RS-KD sampling), layer selection and, beside a GPU, the storage codecs
themselves (top-k codec, dense forms): only the narrow encoded leaves (uint16/uint8/float16) are
copied to host memory, on a side stream into pinned buffers, overlapping the next forward.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kdcache.pipeline.common.hf import auto_class, check_weights, detect_kind, hash_json
from kdcache.pipeline.common.runtime import amp_dtype, resolve_device

# Rows per CPU top-k block: ~4M float32 values (16 MB, 137 rows of a 30k vocabulary) stay in cache.
_CPU_TOPK_BLOCK_VALUES = 1 << 22

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


def teacher_options_from(cfg, kind: str | None = None) -> "TeacherOptions":
    """The teacher-loading part of a cache config; `kind` = the kind `prepare` resolved (default: the config's)."""
    return TeacherOptions(name_or_path=cfg.teacher, kind=kind or cfg.teacher_kind, revision=cfg.revision,
                          trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, device=cfg.device,
                          autocast=cfg.autocast)


# What each kind's head produces in a cache: a head that was newly initialised would fill it with noise.
HEAD_OUTPUTS = {"masked-lm": "top-k/RS-KD soft targets", "causal-lm": "top-k/RS-KD soft targets",
                "classifier": "task logits"}


class TeacherHeadMissing(ValueError):
    """The teacher's weights lack parameters that produce a cached output (they would be random)."""


class TeacherLoadError(ValueError):
    """The teacher could not be loaded: one line naming the folder, what failed and what to do."""


def _details_log(text: str) -> None:
    # The run's log file only (run_console routes the root logger there); not the terminal.
    logging.getLogger("kdcache_details").info(text)


def checkpoint_keys(folder: str) -> set[str] | None:
    """Tensor names in a local folder's safetensors files, read from their headers (no tensor is loaded);
    None where that cannot be known (a hub name, pickle weights)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return None
    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            keys.update(fh.keys())
    return keys


def head_parameters(config, kind: str) -> list[str]:
    """Names of the parameters the `kind` model has beyond its base model (the head), minus those tied to
    another parameter (a decoder tied to the input embeddings is loaded with them). Built on the meta device:
    no memory, no initialisation. Empty when the model cannot be built that way."""
    try:
        with torch.device("meta"):
            model = auto_class(kind).from_config(config)
    except Exception:  # remote code, exotic configs: the load-time check still guards them
        return []
    prefix = getattr(model, "base_model_prefix", "") or ""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return [name for name, _ in model.named_parameters()
            if not (prefix and name.startswith(prefix + ".")) and name not in tied]


def missing_head(folder: str, config, kind: str) -> tuple[list[str], int] | None:
    """(head parameters absent from the folder's weights, head size) when the `kind` model has a head whose
    parameters the checkpoint lacks; None when it has them all or this cannot be told before loading."""
    if kind not in HEAD_OUTPUTS:
        return None
    keys = checkpoint_keys(folder)
    head = head_parameters(config, kind)
    if keys is None or not head:
        return None
    missing = [name for name in head if name not in keys]
    return (missing, len(head)) if missing else None


def resolve_kind(opts: TeacherOptions, config, uses_head: bool) -> tuple[str, list[str]]:
    """The kind the teacher runs as, and notes for the user. `auto` takes the config's architecture, but a
    folder whose weights lack that head entirely (a sentence-transformers export names `*ForMaskedLM` over an
    encoder) runs as an encoder: its hidden states and attention are real, its head would be random. An
    explicit kind whose head is missing is refused when the cache would use the head. Read from the weights'
    headers only; `load_teacher` checks again with what transformers actually initialised."""
    kind = detect_kind(config) if opts.kind == "auto" else opts.kind
    if kind not in TEACHER_KINDS[1:]:
        raise ValueError(f"teacher kind must be one of {TEACHER_KINDS}, got {kind!r}")
    found = missing_head(opts.name_or_path, config, kind)
    if found is None:
        return kind, []
    missing, size = found
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    if opts.kind == "auto" and len(missing) == size:
        return "encoder", [f"teacher {opts.name_or_path}: its config names {arch} but its weights have no "
                           f"{kind} head ({_names(missing)}): running it as an encoder (hidden states and "
                           "attention only; no soft targets, no masking)"]
    if uses_head and len(missing) == size:
        raise TeacherHeadMissing(_head_message(opts.name_or_path, kind, missing))
    return kind, []  # a partly missing head (or renamed legacy keys): the load-time check decides


def _names(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _head_message(folder: str, kind: str, missing: list[str]) -> str:
    return (f"teacher {folder}: the {kind} head that produces the cache's {HEAD_OUTPUTS[kind]} is not in its "
            f"weights ({_names(missing)} would be randomly initialised); use teacher_kind=encoder (with "
            "--top-k 0 and --hidden-layers/--attention-layers) to cache hidden states and attention only, or "
            "a checkpoint that has its head")


def _fatal_missing(missing: list[str], kind: str, uses_head: bool, base_prefix: str) -> list[str]:
    """The newly initialised parameters that would corrupt a cached output: anything in the encoder but its
    pooler (read only by a classifier's head), and the head itself when the cache uses it."""
    fatal = []
    for name in missing:
        in_head = bool(base_prefix) and not name.startswith(base_prefix + ".") and kind != "encoder"
        if in_head and not uses_head:
            continue
        if ".pooler." in f".{name}" and not (kind == "classifier" and uses_head):
            continue
        fatal.append(name)
    return fatal


def load_teacher(opts: TeacherOptions, need_attentions: bool, uses_head: bool = True):
    """(model in eval mode on its device, tokenizer, kind). `opts.kind` should be the resolved kind
    (`Prepared.teacher_options()`); any newly initialised parameter that would feed the cache is refused
    here, before any inference, and a load failure becomes one `TeacherLoadError` line (traceback logged)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    check_weights(opts.name_or_path, opts.allow_pickle)
    common = dict(revision=opts.revision, trust_remote_code=opts.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(opts.name_or_path, **common)
        kind = resolve_kind(opts, config, uses_head)[0]
        auto = auto_class(kind)
        # Eager attention only when maps are cached (fused kernels cannot return them); otherwise transformers
        # picks the fused kernel (sdpa) where the architecture has one, and eager where it has none.
        attn = {"attn_implementation": "eager"} if need_attentions else {}
        model, info = auto.from_pretrained(opts.name_or_path, use_safetensors=not opts.allow_pickle,
                                           output_loading_info=True, **attn, **common)
        tokenizer = AutoTokenizer.from_pretrained(opts.name_or_path, **common)
    except TeacherHeadMissing:
        raise
    except Exception as exc:
        import traceback

        _details_log(traceback.format_exc())
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TeacherLoadError(f"teacher {opts.name_or_path}: loading it failed ({type(exc).__name__}: {first}); "
                               "check that the folder was written by save_pretrained and matches this transformers "
                               "version (the traceback is in the run's log file)") from None
    fatal = _fatal_missing(sorted(info.get("missing_keys") or ()), kind, uses_head,
                           getattr(model, "base_model_prefix", "") or "")
    if fatal:
        if kind in HEAD_OUTPUTS and uses_head:
            raise TeacherHeadMissing(_head_message(opts.name_or_path, kind, fatal))
        raise TeacherHeadMissing(f"teacher {opts.name_or_path}: its weights lack {_names(fatal)}, which would be "
                                 "randomly initialised; use a complete checkpoint")
    if not need_attentions and getattr(model.config, "_attn_implementation", None) == "eager":
        _details_log(f"teacher {opts.name_or_path}: {type(model).__name__} has no fused attention kernel (sdpa) in "
                     "this transformers version; running eager attention")
    device = resolve_device(opts.device)
    model.to(device).eval()
    return model, tokenizer, kind


def teacher_fingerprint_from_config(opts: TeacherOptions, model_config, kind: str) -> dict[str, Any]:
    """Identity of the teacher: changes whenever its config or weights change (weights are hashed, not loaded)."""
    from kdcache.storage.checksum import checksum_stream

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
            "config_hash": hash_json(config), "weights_hash": hash_json(weights)}



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
    vocab_size: int = 0  # the cache's: fixes the width of encoded top-k id leaves


def _raw_dense(x: torch.Tensor, form: str) -> torch.Tensor:
    # Not encoded on the device (a CPU teacher): float16 is already the stored form; the other forms
    # are rounded by the storage codec on the host, from float32.
    return x.to(torch.float16) if form == "float16" else x.float()


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
    """Runs one padded batch through the teacher and returns the writer's input columns.

    Safe to call from several threads (the cache pass keeps several shards in flight): the forward
    and the device work of one batch run under a lock, so the device sees one batch at a time and
    the RS-KD generator is never shared; the wait for the host copy runs outside it, so another
    thread's forward is already queued while this batch's leaves travel.
    """

    # On a CPU teacher the numpy codecs, in encoder threads beside the forward, are faster than the
    # torch twins on the forward's own thread; tests set this to run the device path on a CPU.
    encode_on_cpu = False

    def __init__(self, model, kind: str, out: OutputSpec, opts: TeacherOptions):
        self.model, self.kind, self.out = model, kind, out
        self.device = next(model.parameters()).device
        self.amp = amp_dtype(opts.autocast, self.device)
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
        self.encode_on_device = self.device.type != "cpu" or self.encode_on_cpu
        self._lock = threading.Lock()
        self._logp_block: torch.Tensor | None = None  # CPU top-k scratch, used under the lock
        # Device-to-host copies on their own stream: they overlap the next batch's forward instead
        # of queueing behind it (and it behind them) on the compute stream.
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __call__(self, batch: dict[str, np.ndarray], codec=None) -> dict[str, Any]:
        """The batch's output columns as numpy arrays.

        Without `codec`: raw top-k ids and float32 log-probs (calibration, tools). With the cache's
        top-k `codec` and `encode_on_device`: the codec's leaves under "topk_encoded" and dense
        columns already in their storage dtype (int8 with "<name>_scale"), which `to_record_batch`
        takes as they are; on a CPU teacher the raw columns, encoded by the writer.
        """
        with self._lock:
            outputs = self._device_outputs(batch, codec if self.encode_on_device else None)
            finish = self._start_copy(outputs)
        return finish()

    @torch.inference_mode()
    def _device_outputs(self, batch: dict[str, np.ndarray], codec) -> dict[str, Any]:
        ids = torch.from_numpy(np.asarray(batch["input_ids"], dtype=np.int64)).to(self.device, non_blocking=True)
        mask = torch.from_numpy(np.asarray(batch["attention_mask"], dtype=np.int64)).to(self.device, non_blocking=True)
        want_hidden, want_attn = bool(self.out.hidden_layers), bool(self.out.attention_layers)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            result = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=want_hidden,
                                output_attentions=want_attn)
        out: dict[str, Any] = {}
        if self.out.targets != "none":
            logits = result.logits
            if self.out.targets == "topk":
                top_ids, top_lp = self.topk_logprobs(logits)
                out.update(self.topk_columns(top_ids, top_lp, codec))
            else:
                logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
                if self.generator is not None:
                    # Seeded per batch from its first sample id: draws do not depend on which actor ran it.
                    self.generator.manual_seed(self.out.seed * 1_000_003 + int(batch["sample_id"][0]))
                out["sample_ids"], out["sample_weights"] = sample_rskd(logp, self.out.num_samples, self.generator)
        if self.kind == "classifier" and self.out.task_logits:
            out["task_logits"] = result.logits.float()
        out.update(self.dense_outputs(result, encode=codec is not None))
        return out

    def dense_outputs(self, result, encode: bool) -> dict[str, Any]:
        """The chosen hidden-state and attention columns of a forward's `result`."""
        dense = [(f"hidden_{layer}", result.hidden_states[layer], self.out.hidden_dtype)
                 for layer in self.out.hidden_layers]
        dense += [(f"attention_{layer}", result.attentions[layer - 1], self.out.attention_dtype)
                  for layer in self.out.attention_layers]
        out: dict[str, Any] = {}
        for name, x, form in dense:
            out.update(self.dense_columns(name, x, form, encode=encode))
        return out

    @torch.inference_mode()
    def topk_logprobs(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ids and their float32 log-probs, [..., k] each. On a CPU it writes the runner's one
        scratch buffer: callers hold `self._lock` (as `__call__` does) or run single-threaded.

        The normaliser is always float32 (bf16 would put ~1e-2 error into every log-prob). On a GPU,
        the fused kernel that reads bf16 logits and writes float32 log-probs in one pass, and top-k on
        the raw logits (same order, half the bytes). On a CPU, blocks of rows through one reused
        buffer: a fresh [B, T, V] float32 tensor per batch costs more in page faults than the
        log-softmax itself, and a block that stays in cache is read again by top-k almost for free
        (measured on 2 cores, 2,048 tokens × 30,522 of random logits: 86 ms, against 190 ms for top-k +
        logsumexp on the whole tensor, beside a 1.5 s BERT-base forward; 108 ms on a real forward's
        logits, `pipeline/bench/runner_profile.py`).
        """
        k = self.out.k
        if logits.device.type != "cpu":
            logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            top_ids = torch.topk(logits, k, dim=-1).indices
            return top_ids, logp.gather(-1, top_ids)
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        rows = max(8, _CPU_TOPK_BLOCK_VALUES // vocab)
        if self._logp_block is None or self._logp_block.shape != (rows, vocab):
            self._logp_block = torch.empty(rows, vocab, dtype=torch.float32)
        top_lp = torch.empty(flat.shape[0], k, dtype=torch.float32)
        top_ids = torch.empty(flat.shape[0], k, dtype=torch.int64)
        for start in range(0, flat.shape[0], rows):
            block = flat[start:start + rows]
            logp = self._logp_block[:block.shape[0]]
            torch.log_softmax(block, dim=-1, dtype=torch.float32, out=logp)
            torch.topk(logp, k, dim=-1, out=(top_lp[start:start + rows], top_ids[start:start + rows]))
        shape = (*logits.shape[:-1], k)
        return top_ids.reshape(shape), top_lp.reshape(shape)

    def topk_columns(self, top_ids: torch.Tensor, top_lp: torch.Tensor, codec) -> dict[str, Any]:
        """Top-k columns from the [B, T, k] ids and float32 log-probs: encoded by `codec`, or raw."""
        covered = torch.logsumexp(top_lp, dim=-1)  # log of the top-k mass
        log_tail = torch.log(-torch.expm1(covered).clamp(max=0)).clamp(min=-1e4)  # log(1 - mass)
        if codec is None:
            return {"topk_ids": top_ids, "topk_logprobs": top_lp, "topk_log_tail": log_tail}
        B, T, k = top_ids.shape
        leaves = codec.encode_torch(top_ids.reshape(B * T, k), top_lp.reshape(B * T, k),
                                    vocab_size=self.out.vocab_size or None)
        return {"topk_encoded": {name: leaf.reshape(B, T, *leaf.shape[1:]) for name, leaf in leaves.items()},
                "topk_log_tail": log_tail.to(torch.float16)}  # its stored form

    @staticmethod
    def dense_columns(name: str, x: torch.Tensor, form: str, encode: bool) -> dict[str, Any]:
        """A hidden-state or attention column: in its storage form (+ int8 scales), or raw."""
        from kdcache.storage.dense_forms import get_dense_form

        if not encode:
            return {name: _raw_dense(x, form)}
        codes, params = get_dense_form(form).encode_torch(x)
        return {name: codes, **({f"{name}_scale": params["scale"]} if "scale" in params else {})}

    def _start_copy(self, outputs: dict[str, Any]):
        """Start the copy of `outputs` to host memory; returns a function that waits for it and
        gives the same structure as numpy arrays."""
        flat = list(_flatten(outputs))
        if self._copy_stream is None:  # CPU tensors: already in host memory
            return lambda: _unflatten([(path, t.numpy()) for path, t in flat])
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            # non_blocking device-to-host copies land in pinned memory (torch's caching host allocator).
            host = [(path, t.to("cpu", non_blocking=True)) for path, t in flat]
            done = torch.cuda.Event()
            done.record(stream)

        def finish() -> dict[str, Any]:
            done.synchronize()
            # `flat` keeps the device tensors alive until here: the copy reads them on the side stream.
            flat.clear()
            return _unflatten([(path, t.numpy()) for path, t in host])

        return finish


def _flatten(tree: dict[str, Any], prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _unflatten(items) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in items:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out
