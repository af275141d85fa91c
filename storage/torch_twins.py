"""Helpers of the torch twins of the encoders: ``TopKCodec.encode_torch`` and ``DenseForm.encode_torch``.

Those run on the teacher's device and must give the leaves the numpy encoders give, so that where a
cache was encoded does not show in it. The same operations in the same precision do that: stable
sorts, float64 wherever numpy uses float64, IEEE float32 division (tensor by tensor: see the int8
form) and sqrt, round half to even, float16 rounded once (``torch_float16``). Checked on CPU and on
an H100 by tests/storage/test_codecs.py and test_dense_forms.py. Only exp and log may differ in the
last bit between libraries; a code moves only if that bit straddles a bin edge (a chance of about
1e-14 per entry), and either code is a valid encoding. Nothing here reads a value back to the host
(that would stall the device), so unlike the numpy encoders the values are not checked: the inputs
are the teacher runner's own outputs. torch is imported inside the functions: the rest of storage
needs no torch.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def torch_dtype(dtype: np.dtype):
    import torch

    return torch.from_numpy(np.empty(0, dtype)).dtype


def check_torch_topk(ids: Any, logprobs: Any):
    import torch

    for name, x in (("ids", ids), ("logprobs", logprobs)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch tensor, got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"{name}: expected shape (N, k), got {tuple(x.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"ids: expected an integer dtype, got {ids.dtype}")
    if not logprobs.is_floating_point():
        raise ValueError(f"logprobs: expected a floating dtype, got {logprobs.dtype}")
    if logprobs.shape != ids.shape:
        raise ValueError(f"logprobs: shape {tuple(logprobs.shape)} does not match {tuple(ids.shape)}")
    return ids.long(), logprobs


def torch_top_id(ids, vocab_size: int | None) -> int:
    """The largest id the id leaf must hold (reads ``ids.max()`` back only without ``vocab_size``)."""
    if vocab_size:
        return vocab_size - 1
    return int(ids.max()) if ids.numel() else 0


def torch_float16(x):
    """``x`` as float16 rounded once, to nearest even, like numpy's ``astype(np.float16)``.

    torch converts float64 through float32, and that double rounding is one ulp off for about one
    value in 16,000 (those that land exactly on a float16 tie in float32). Rounding to float32 *to
    odd* first (toward zero, lowest bit set if inexact) makes the second rounding exact.
    """
    import torch

    if x.dtype != torch.float64:
        return x.to(torch.float16)
    f = x.to(torch.float32)
    f = torch.where(f.double().abs() > x.abs(), torch.nextafter(f, torch.zeros_like(f)), f)
    inexact = (f.double() != x).to(torch.int32)
    return (f.view(torch.int32) | inexact).view(torch.float32).to(torch.float16)


def torch_sort_rows(key, *arrays):
    key, order = key.sort(dim=1, stable=True)
    return [key, *(a.gather(1, order) for a in arrays)]


def torch_deltas(sorted_ids):
    return sorted_ids.diff(dim=1, prepend=sorted_ids.new_zeros((len(sorted_ids), 1)))
