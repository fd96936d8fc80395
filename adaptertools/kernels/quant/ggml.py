"""ggml's own quantizers and dequantizers, when llama-cpp-python is installed: the engine's fast
CPU path.

The torch quantizers in ``gguf.py`` are ports that keep ggml's sequential sums to stay byte-exact,
and the K types are 2-10x slower than ggml's C (benchmarks/RESULTS.md). llama-cpp-python ships
libggml-base with ``ggml_quantize_chunk``, the function llama-quantize itself calls; through
ctypes (which releases the GIL) it quantizes row chunks on several threads; its type traits'
``to_float`` dequantizes. Same bytes and the same floats as the torch codecs (tests check both
against each other and against ggml/gguf-py); used by the merge engine for CPU tensors when the
library loads, else the torch codecs run.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .types import resolve

ROWS_PER_CHUNK = 64


@functools.lru_cache(maxsize=1)
def _library():
    """llama-cpp-python's libggml-base, or None."""
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError):   # absent, or its own library failed to load
        return None
    libs = sorted(glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib",
                                         "libggml-base.so*")))
    if not libs:
        return None
    try:
        return ctypes.CDLL(libs[0])
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _quantize_chunk():
    """``ggml_quantize_chunk``, or None."""
    lib = _library()
    func = getattr(lib, "ggml_quantize_chunk", None) if lib is not None else None
    if func is None:
        return None
    # size_t ggml_quantize_chunk(enum ggml_type, const float * src, void * dst, int64_t start,
    #                            int64_t nrows, int64_t n_per_row, const float * imatrix)
    func.restype = ctypes.c_size_t
    func.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                     ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return func


class _TypeTraits(ctypes.Structure):
    """ggml.h ``struct ggml_type_traits`` (its first fields, up to ``to_float``)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool),
                ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_int64))]


@functools.cache
def _to_float(ggml_id: int):
    """The type's ``to_float(const void * x, float * y, int64_t k)``, or None."""
    lib = _library()
    get = getattr(lib, "ggml_get_type_traits", None) if lib is not None else None
    if get is None:
        return None
    get.restype = ctypes.POINTER(_TypeTraits)
    get.argtypes = [ctypes.c_int]
    traits = get(ggml_id).contents
    return traits.to_float if traits.to_float else None


def dequantizable(qtype) -> bool:
    t = resolve(qtype)
    return t.requantizable and t.block > 1 and _to_float(t.ggml_id) is not None


def dequantize(raw: torch.Tensor, qtype, shape: tuple[int, ...], *,
               threads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Raw block bytes (rows, row_bytes) on the CPU -> float32 ``shape``, ggml's own values
    (into ``out``, a contiguous float32 tensor of ``shape``, when given)."""
    t = resolve(qtype)
    func = _to_float(t.ggml_id)
    rows, cols = int(shape[0]), int(shape[-1])
    src = raw.contiguous().view(torch.uint8).reshape(rows, t.row_bytes(cols))
    if out is None:
        out = torch.empty((rows, cols), dtype=torch.float32)
    assert out.is_contiguous() and out.dtype == torch.float32 and out.numel() == rows * cols
    row_bytes, x, y = t.row_bytes(cols), src.data_ptr(), out.data_ptr()

    def chunk(start: int) -> None:
        n = min(ROWS_PER_CHUNK, rows - start)
        func(x + start * row_bytes, y + start * cols * 4, n * cols)

    _run(chunk, range(0, rows, ROWS_PER_CHUNK), threads)
    return out.reshape(shape)


def _run(chunk, starts: range, threads: int | None) -> None:
    workers = threads or os.cpu_count() or 1
    if workers == 1 or len(starts) == 1:
        for start in starts:
            chunk(start)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(chunk, starts))


def available(qtype) -> bool:
    """True when ggml can write ``qtype`` here (a requantizable block type, library loaded)."""
    t = resolve(qtype)
    return t.requantizable and t.block > 1 and _quantize_chunk() is not None


def quantize(w: torch.Tensor, qtype, *, threads: int | None = None) -> torch.Tensor:
    """float (rows, cols) on the CPU -> uint8 (rows, row_bytes), bytes from ggml itself."""
    func = _quantize_chunk()
    t = resolve(qtype)
    x = w.detach().to(torch.float32).contiguous()
    rows, cols = x.shape
    out = torch.empty((rows, t.row_bytes(cols)), dtype=torch.uint8)
    src, dst = x.data_ptr(), out.data_ptr()

    def chunk(start: int) -> None:       # ggml writes row r at dst + r * row_bytes
        func(t.ggml_id, src, dst, start * cols, min(ROWS_PER_CHUNK, rows - start), cols, None)

    _run(chunk, range(0, rows, ROWS_PER_CHUNK), threads)
    return out
