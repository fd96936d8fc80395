"""Fused Triton merge kernels for CUDA, tested on the CPU under ``TRITON_INTERPRET=1``.

- ``fold.fold_float``: W (F32/F16/BF16) + s * B @ A in one pass: a tile of W, ``tl.dot`` of the B and
  A tiles (rank padded to 16), fp32 add, one store in the output dtype.
- ``blocks.fold_q8_0`` / ``blocks.fold_q4_0`` (GGUF blocks of 32) and ``blocks.fold_nf4`` (bitsandbytes
  NF4, no double quant): dequantize -> fold -> requantize in one kernel, the same bytes as the torch
  codecs (``kernels.quant``) given the same fp32 merged values.
- ``engine``: the merge engine's hooks (``--kernels auto|torch|triton``).

Nothing here imports triton at package import time (``import adaptertools`` stays light).
"""

from __future__ import annotations

import importlib.util
import os


def available() -> bool:
    """Whether ``import triton`` would succeed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: kernels run on CPU tensors through triton's numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
