"""Quantized-weight codecs: GGUF block types and bitsandbytes 4-bit/8-bit, vectorized torch.

All functions work on CPU and CUDA tensors (the result is on the input's device) and are exact against
their references (see tests/test_quant_codecs.py). Submodules import torch lazily: ``import
adaptertools.kernels.quant`` alone does not.

GGUF (``quant.gguf``), raw block bytes of one tensor <-> float32::

    w   = quant.gguf.dequantize(raw, "Q4_K", (rows, cols), name=...)   # uint8 (rows, row_bytes) -> f32 (rows, cols)
    raw = quant.gguf.quantize(w, "Q4_K", name=...)                     # f32 (rows, cols) -> uint8 (rows, row_bytes)
    quant.gguf.row_bytes("Q4_K", cols)
    quant.requantizable("IQ4_XS")   # False: dequantize only; quantize() raises UnsupportedError

  ``qtype`` is a name ("q4_k"), a ggml type id or a ``gguf.GGMLQuantizationType``. Quantizable: F32, F16,
  BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (the K types without an imatrix, as
  ``llama-quantize`` without ``--imatrix``). Any other GGUF type dequantizes through gguf-py. A row length
  that is not a multiple of the block size raises ``FormatError`` naming the tensor.

bitsandbytes (``quant.bnb``), the tensors of one ``Linear4bit``/``Linear8bitLt`` weight::

    packed, state = quant.bnb.quantize_4bit(w, quant_type="nf4", blocksize=64, double_quant=True)
    w = quant.bnb.dequantize_4bit(packed, state)                       # float32, state.shape
    state = quant.bnb.state_from_tensors(tensors, "model.layers.0.mlp.up_proj.weight")
    tensors = quant.bnb.state_to_tensors(packed, state, "model.layers.0.mlp.up_proj.weight")
    cb, scb = quant.bnb.quantize_int8(w); w = quant.bnb.dequantize_int8(cb, scb)
    quant.bnb.int8_to_tensors(cb, scb, prefix) / quant.bnb.int8_from_tensors(tensors, prefix)

  The checkpoint layout (key names, JSON quant state) is described in ``bnb_state``'s docstring.
"""

from __future__ import annotations

import importlib

from .types import GGUFType, requantizable, resolve

__all__ = ["GGUFType", "bnb", "gguf", "requantizable", "resolve"]


def __getattr__(name: str):
    if name in ("gguf", "bnb"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
