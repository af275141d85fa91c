"""Dense storage forms: how hidden states and attention maps become stored values.

One registry, ``DENSE_FORMS`` (name -> ``DenseForm``), as the top-k codecs have ``CODECS``. A form
holds everything that depends on it: its Arrow element type, whether it stores a per-vector scale
column, its Parquet encoding wish, the numpy encoder, the torch encoder (on the teacher's device,
bit-equal to numpy: see ``storage.torch_twins``) and the decoder. Schema building, the column
converters and the teacher runner all dispatch through ``get_dense_form``; a new form is one class
here (and, since older readers would misread it, a new ``FORMAT_VERSION``). The decode formulas and
error bounds are in docs/format.md, "Dense storage forms".
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from .torch_twins import torch_float16


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 values, rounded to nearest even,
    NaN as 0x7FC0: the same bits as ``torch.tensor(x).to(torch.bfloat16)``."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit and truncating rounds half to even;
    # NaNs would carry into the exponent, so they get torch's canonical NaN.
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded.astype(np.uint16))


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


class DenseForm:
    """One way to store a float tensor of any shape; ``encode`` returns (codes, params).

    ``params`` is {} except for a ``scaled`` form, whose ``params["scale"]`` (float32, shape
    ``x.shape[:-1]``: one per token for hidden states) the writer stores as ``<column>_scale``.
    """

    name: str = ""
    element_type: pa.DataType  # Arrow element type of the codes
    tensors: tuple[str, ...] = ("hidden", "attention")  # the teacher outputs it may store
    scaled: bool = False
    byte_stream_split: bool = True  # on its codes' Parquet leaf (docs/format.md §6)

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, dict]:
        if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"x: expected a floating numpy array, got {getattr(x, 'dtype', type(x))}")
        return self._encode(x)

    def encode_torch(self, x) -> tuple[Any, dict]:
        """``encode`` on a torch tensor, on its device: the same codes (and scales), as tensors."""
        import torch

        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x: expected a floating torch tensor, got {getattr(x, 'dtype', type(x))}")
        return self._encode_torch(x)

    def decode(self, codes: np.ndarray, params: dict | None = None) -> np.ndarray:
        """Inverse of ``encode``: float32 of the same shape as ``codes``."""
        return self._decode(np.asarray(codes), params or {})

    def is_stored(self, arr: np.ndarray) -> bool:
        """Whether a column arrived already in this form (the teacher runner encoded it on its
        device): integer codes of the element type. Float input is raw and still to encode."""
        return pa.from_numpy_dtype(arr.dtype) == self.element_type and not np.issubdtype(arr.dtype, np.floating)

    def _encode(self, x: np.ndarray) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def _encode_torch(self, x) -> tuple[Any, dict]:
        raise NotImplementedError

    def _decode(self, codes: np.ndarray, params: dict) -> np.ndarray:
        raise NotImplementedError


class Float16Form(DenseForm):
    name = "float16"
    element_type = pa.float16()

    def is_stored(self, arr):
        return pa.from_numpy_dtype(arr.dtype) == self.element_type  # its codes are floats

    def _encode(self, x):
        return x.astype(np.float16), {}

    def _encode_torch(self, x):
        return torch_float16(x), {}

    def _decode(self, codes, params):
        return codes.astype(np.float32)


class BFloat16Form(DenseForm):
    """bfloat16 has no Arrow type: its bit pattern travels as uint16 (NaN as 0x7FC0), and the
    field metadata ``kdcache.dtype = "bfloat16"`` says how to read it."""

    name = "bfloat16"
    element_type = pa.uint16()

    def _encode(self, x):
        return float32_to_bfloat16_bits(x), {}

    def _encode_torch(self, x):
        import torch

        x32 = x.to(torch.float32)
        bits = x32.to(torch.bfloat16).view(torch.int16)
        return torch.where(torch.isnan(x32), torch.full_like(bits, 0x7FC0), bits).view(torch.uint16), {}

    def _decode(self, codes, params):
        return bfloat16_bits_to_float32(codes)


class Int8Form(DenseForm):
    """Hidden states: absmax/127 of each vector along the last axis as its float32 scale."""

    name = "int8"
    element_type = pa.int8()
    tensors = ("hidden",)
    scaled = True
    byte_stream_split = False

    def _encode(self, x):
        if x.ndim < 1:
            raise ValueError("x: int8 needs at least one axis to scale over")
        x32 = x.astype(np.float32)
        scale = np.abs(x32).max(axis=-1) / np.float32(127)
        safe = np.where(scale > 0, scale, np.float32(1))[..., None]
        return np.rint(x32 / safe).clip(-127, 127).astype(np.int8), {"scale": scale.astype(np.float32)}

    def _encode_torch(self, x):
        import torch

        x32 = x.to(torch.float32)
        if x.ndim < 1:
            raise ValueError("x: int8 needs at least one axis to scale over")
        absmax = x32.abs().amax(dim=-1)
        # A tensor divisor: CUDA divides by a Python scalar as a product with its reciprocal, which
        # is not the correctly rounded float32 quotient numpy computes (one ulp off, now and then).
        scale = absmax / torch.full_like(absmax, 127)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
        return torch.round(x32 / safe).clamp(-127, 127).to(torch.int8), {"scale": scale}

    def _decode(self, codes, params):
        if "scale" not in params:
            raise ValueError("params: int8 needs params['scale']")
        scale = np.asarray(params["scale"], dtype=np.float32)
        if scale.shape != codes.shape[:-1]:
            raise ValueError(f"params: scale shape {scale.shape} != codes shape {codes.shape[:-1]}")
        return codes.astype(np.float32) * scale[..., None]


class SqrtUint8Form(DenseForm):
    """Attention probabilities in [0, 1] as round(255 * sqrt(p)).

    The square root keeps relative precision for the many small weights: most attention weights
    are below 1e-3, where a linear x*255 keeps no digit at all. A cube root would shrink the error
    there further but break the 1/255 bound near p = 1.
    """

    name = "uint8"
    element_type = pa.uint8()
    tensors = ("attention",)

    def _encode(self, x):
        return np.rint(np.sqrt(np.clip(x, 0, 1, dtype=np.float32)) * 255).astype(np.uint8), {}

    def _encode_torch(self, x):
        import torch

        x32 = x.to(torch.float32)
        return torch.round(torch.sqrt(x32.clamp(0, 1)) * 255).to(torch.uint8), {}

    def _decode(self, codes, params):
        return np.square(codes.astype(np.float32) / np.float32(255))


DENSE_FORMS: dict[str, DenseForm] = {f.name: f for f in (Float16Form(), BFloat16Form(), Int8Form(), SqrtUint8Form())}


def get_dense_form(name: str) -> DenseForm:
    if name not in DENSE_FORMS:
        raise ValueError(f"form: must be one of {tuple(DENSE_FORMS)}, got {name!r}")
    return DENSE_FORMS[name]


def forms_for(tensor: str) -> tuple[str, ...]:
    """Names of the forms a teacher output ("hidden" or "attention") may be stored in."""
    return tuple(name for name, form in DENSE_FORMS.items() if tensor in form.tensors)
