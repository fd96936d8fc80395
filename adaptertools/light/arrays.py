"""Stored tensors as numpy, with the few ``torch.Tensor`` methods the readers call.

The format readers (formats/peft.py, gguf.py, mlx.py) only move stored values around: split
keys, transpose, reshape, check shapes and dtypes. ``Stored`` answers those calls on a numpy
array, so the same reader code builds an ``Adapter`` of ``Stored`` tensors without torch.
Arithmetic is never done in the stored dtype: ``double()`` widens exactly to float64, which
holds every float32, float16 and bfloat16 value.

bfloat16 (numpy has none) is kept as its raw 16-bit words (uint16); widened exactly by
``uint32 << 16`` viewed as float32 (bf16 is the top half of an fp32).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import AdapterToolsError

# safetensors dtype -> (numpy dtype of the stored words, torch's name of the dtype)
SAFETENSORS = {"F64": ("<f8", "float64"), "F32": ("<f4", "float32"), "F16": ("<f2", "float16"),
               "BF16": ("<u2", "bfloat16"), "I64": ("<i8", "int64"), "I32": ("<i4", "int32"),
               "I16": ("<i2", "int16"), "I8": ("i1", "int8"), "U8": ("u1", "uint8"),
               "BOOL": ("?", "bool")}
FLOATS = ("float64", "float32", "float16", "bfloat16")
# torch's dtype name -> safetensors' (the writers' header names)
SAFETENSORS_NAMES = {name: code for code, (_, name) in SAFETENSORS.items()}


class NeedsTorch(AdapterToolsError):
    """Raised inside the light path for what it does not do; the command then takes the torch
    path (never shown to a user)."""


class Stored:
    """One stored tensor: ``words`` (numpy, the stored dtype's values, bf16 as uint16 words) and
    ``dtype``, torch's name of the stored dtype (``str(tensor.dtype)`` without ``torch.``)."""

    __slots__ = ("dtype", "words")

    def __init__(self, words: np.ndarray, dtype: str):
        self.words = words
        self.dtype = dtype

    # -- what the readers ask (torch.Tensor's names)
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.words.shape)

    @property
    def ndim(self) -> int:
        return self.words.ndim

    def dim(self) -> int:
        return self.words.ndim

    def numel(self) -> int:
        return math.prod(self.words.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def T(self) -> Stored:
        return Stored(self.words.T, self.dtype)

    def reshape(self, *shape) -> Stored:
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return Stored(self.words.reshape(tuple(int(s) for s in shape)), self.dtype)

    def contiguous(self) -> Stored:
        return Stored(np.ascontiguousarray(self.words), self.dtype)

    def to(self, dtype: str) -> Stored:
        """``Tensor.to`` for a float dtype named as torch names it (``cast``)."""
        return cast(self, dtype)

    def element_size(self) -> int:
        return self.words.itemsize

    def is_floating_point(self) -> bool:
        return self.dtype in FLOATS

    def swapaxes(self, first: int, second: int) -> Stored:
        return Stored(self.words.swapaxes(first, second), self.dtype)

    def __getitem__(self, index) -> Stored:
        if hasattr(index, "__array__") and not isinstance(index, np.ndarray):
            index = np.asarray(index)        # a torch index (names.qkv_row_order's)
        return Stored(self.words[index], self.dtype)

    # -- values
    def double(self) -> np.ndarray:
        """The values as float64, exactly."""
        if self.dtype == "bfloat16":
            return (self.words.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return self.words.astype(np.float64)

    def any(self) -> bool:
        """Any value nonzero (-0.0 is zero, as in torch)."""
        if self.dtype == "bfloat16":
            return bool((self.words & 0x7FFF).any())
        return bool(self.words.any())

    def all_finite(self) -> bool:
        if self.dtype == "bfloat16":    # exponent bits all set: Inf or NaN
            return not bool(((self.words & 0x7F80) == 0x7F80).any())
        if not self.is_floating_point():
            return True
        return bool(np.isfinite(self.words).all())

    def __repr__(self) -> str:
        return f"Stored({self.dtype}, shape={self.shape})"


def is_stored(t) -> bool:
    return isinstance(t, Stored)


def all_finite(t) -> bool:
    """No Inf or NaN in ``t`` (a Stored or a torch tensor)."""
    if isinstance(t, Stored):
        return t.all_finite()
    import torch

    return bool(torch.isfinite(t).all())


def equal(s, t) -> bool:
    """Same dtype, shape and stored values (bit for bit but -0.0 == 0.0, as torch.equal)."""
    if isinstance(s, Stored) and isinstance(t, Stored):
        return s.dtype == t.dtype and s.shape == t.shape and \
            bool(np.array_equal(s.double(), t.double()))
    import torch

    return s.dtype == t.dtype and s.shape == t.shape and torch.equal(s, t)


def load_safetensors(path) -> tuple[dict[str, Stored], dict[str, str]]:
    """All tensors of a safetensors file as ``Stored`` (mapped, not read) and its
    ``__metadata__``; the header is checked by tensor_index.read_safetensors_header. A dtype
    not in SAFETENSORS (fp8, unsigned words) raises NeedsTorch."""
    from .._io import check_fits_in_memory
    from ..tensor_index import read_safetensors_header

    header = read_safetensors_header(path)
    check_fits_in_memory(path, {t.name: t.nbytes for t in header.tensors})
    if any(t.dtype not in SAFETENSORS for t in header.tensors):
        raise NeedsTorch(f"{path}: a dtype numpy does not hold")
    if not header.tensors:
        return {}, dict(header.metadata)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for t in sorted(header.tensors, key=lambda t: t.name):     # safe_open's keys() order
        words, name = SAFETENSORS[t.dtype]
        raw = data[t.offset:t.offset + t.nbytes]
        tensors[t.name] = Stored(raw.view(words).reshape(t.shape), name)
    return tensors, dict(header.metadata)


def save_file(tensors: dict, filename, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file, for Stored tensors too: the same serializer (safetensors'
    serialize_file) gets the same dtype names, shapes and bytes, so the file is the same. The
    ``__metadata__`` keys are then put in sorted order (``sort_metadata``)."""
    if not any(isinstance(t, Stored) for t in tensors.values()):
        from safetensors.torch import save_file as save_torch

        save_torch(tensors, str(filename), metadata=metadata)
    else:
        from safetensors import TensorSpec, serialize_file

        kept = {k: np.ascontiguousarray(t.words) for k, t in tensors.items()}   # alive while written
        specs = {k: TensorSpec(dtype=t.dtype, shape=t.shape, data_ptr=kept[k].ctypes.data,
                               data_len=kept[k].nbytes) for k, t in tensors.items()}
        serialize_file(specs, str(filename), metadata=metadata)
    if metadata and len(metadata) > 1:
        sort_metadata(filename)


def sort_metadata(filename) -> None:
    """Rewrite a safetensors header in place with its ``__metadata__`` keys sorted.

    safetensors serializes the metadata from a Rust HashMap, whose order is random per map: the
    same adapter written twice gave files that differ in their first bytes. Sorting keeps the
    header's length (same JSON, other order; the padding is unchanged), so offsets stay. Done only
    when re-serializing the header as parsed gives back its bytes exactly (serde_json's compact
    form), so nothing else in it can change."""
    import json
    import struct

    with open(filename, "r+b") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(length)
        header = json.loads(raw)

        def dump(obj) -> bytes:
            return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

        text = raw.rstrip(b" ")
        if dump(header) != text or not isinstance(header.get("__metadata__"), dict):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        fh.seek(8)
        fh.write(dump(header))


# torch's name of a float dtype -> its largest finite value (torch.finfo(dtype).max)
FLOAT_MAX = {"float64": float(np.finfo(np.float64).max), "float32": float(np.finfo(np.float32).max),
             "float16": float(np.finfo(np.float16).max), "bfloat16": (2 - 2 ** -7) * 2.0 ** 127}


def max_abs(t) -> float:
    """The largest magnitude in ``t`` (a Stored or a torch tensor)."""
    if isinstance(t, Stored):
        return float(np.abs(t.double()).max())
    return float(t.abs().max())


def float32_values(t: Stored) -> np.ndarray:
    """The values as float32: exact for float32, float16 and bfloat16 (torch's ``.float()``)."""
    if t.dtype == "bfloat16":
        return (t.words.astype(np.uint32) << 16).view(np.float32)
    if t.dtype not in FLOATS or t.dtype == "float64":
        raise NeedsTorch(f"{t.dtype} as float32")
    return t.words.astype(np.float32)


def cast(t: Stored, dtype: str) -> Stored:
    """``t`` in the float dtype ``dtype`` (torch's name), rounded as torch's ``Tensor.to``
    rounds: to nearest, ties to even. float32 and float16 by numpy's IEEE casts (widening is
    exact); bfloat16 by c10::BFloat16's rounding of the float32 bits (round_to_nearest_even:
    add 0x7FFF plus the lowest kept bit, keep the top 16), for finite values (NaN never gets
    here: writers refuse it first)."""
    if dtype == t.dtype:
        return t
    values = float32_values(t)
    if dtype == "float32":
        return Stored(values, dtype)
    if dtype == "float16":
        with np.errstate(over="ignore"):       # Inf: check_cast names the tensor
            return Stored(values.astype(np.float16), dtype)
    if dtype == "bfloat16":
        bits = values.view(np.uint32)
        rounded = (bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return Stored(rounded.astype(np.uint16), dtype)
    raise NeedsTorch(f"a cast to {dtype}")
