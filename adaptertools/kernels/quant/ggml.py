"""ggml's own quantizers, when llama-cpp-python is installed: the engine's fast CPU path.

The torch quantizers in ``gguf.py`` are ports that keep ggml's sequential sums to stay byte-exact,
and the K types are 2-10x slower than ggml's C (benchmarks/RESULTS.md). llama-cpp-python ships
libggml-base with ``ggml_quantize_chunk``, the function llama-quantize itself calls; through
ctypes (which releases the GIL) it quantizes row chunks on several threads. Same bytes as the
torch codecs (tests/test_quant_codecs.py checks both against it); used by the merge engine for
CPU tensors when the library loads, else the torch codecs run.
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
def _quantize_chunk():
    """``ggml_quantize_chunk`` from llama-cpp-python's libggml-base, or None."""
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError):   # absent, or its own library failed to load
        return None
    libs = sorted(glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib",
                                         "libggml-base.so*")))
    if not libs:
        return None
    try:
        func = ctypes.CDLL(libs[0]).ggml_quantize_chunk
    except (OSError, AttributeError):
        return None
    # size_t ggml_quantize_chunk(enum ggml_type, const float * src, void * dst, int64_t start,
    #                            int64_t nrows, int64_t n_per_row, const float * imatrix)
    func.restype = ctypes.c_size_t
    func.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                     ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return func


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

    starts = range(0, rows, ROWS_PER_CHUNK)
    workers = threads or os.cpu_count() or 1
    if workers == 1 or len(starts) == 1:
        for start in starts:
            chunk(start)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(chunk, starts))
    return out
