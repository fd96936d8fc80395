"""GGUF tensor codecs: raw block bytes <-> float32, vectorized torch (CPU or CUDA).

``dequantize(raw, qtype, shape)``: ``raw`` uint8 (rows, row_bytes) (any shape with that many bytes, or a
numpy array such as a ``GGUFReader`` tensor's ``data``) -> float32 tensor of ``shape`` (numpy order,
last dim = the row length ggml calls ne[0]), on ``raw``'s device.

``quantize(w, qtype)``: float tensor (..., cols) -> uint8 (..., row_bytes), on ``w``'s device.

Both are exact: dequantize equals gguf-py's ``gguf.quants.dequantize`` bit for bit; quantize equals
gguf-py's ``gguf.quants.quantize`` for the legacy types and ggml's ``ggml_quantize_chunk`` (no imatrix)
for the K types, byte for byte. Types without a torch codec dequantize through gguf-py (on the CPU) and
cannot be quantized (``UnsupportedError`` suggesting Q8_0 or F16).
"""

from __future__ import annotations

import numpy as np
import torch

from ...dtypes import FLOAT_DTYPES, TORCH_DTYPES
from ...errors import FormatError, UnsupportedError
from . import kdequant, kquant, legacy
from .types import GGUFType, requantizable, resolve

__all__ = ["GGUFType", "dequantize", "quantize", "requantizable", "resolve", "row_bytes"]

_DEQUANT = {**legacy.DEQUANTIZE, **kdequant.DEQUANTIZE}
_QUANT = {**legacy.QUANTIZE, **kquant.QUANTIZE}


def _where(name: str | None) -> str:
    return f" (tensor {name!r})" if name else ""


def _check_cols(t: GGUFType, cols: int, name: str | None) -> None:
    if cols % t.block:
        raise FormatError(
            f"row length {cols} is not a multiple of the {t.name} block size {t.block}{_where(name)}; "
            f"this tensor cannot be stored as {t.name}: use a type whose block divides {cols} "
            f"(F16, BF16 or F32 always work)")


def row_bytes(qtype, cols: int, *, name: str | None = None) -> int:
    """Bytes one row of ``cols`` values takes in ``qtype``."""
    t = resolve(qtype)
    _check_cols(t, cols, name)
    return t.row_bytes(cols)


def dequantize(raw, qtype, shape, *, name: str | None = None) -> torch.Tensor:
    """Raw GGUF bytes of ``qtype`` -> float32 tensor of ``shape``."""
    t = resolve(qtype)
    shape = tuple(int(s) for s in shape)
    cols = shape[-1] if shape else 1
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    _check_cols(t, cols, name)
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8))
    raw = raw.contiguous().view(torch.uint8)
    if raw.numel() != rows * t.row_bytes(cols):
        raise FormatError(f"{t.name} tensor of shape {shape} needs {rows * t.row_bytes(cols)} bytes, "
                          f"got {raw.numel()}{_where(name)}: the file is truncated or the type is wrong")
    if t.name in FLOAT_DTYPES:
        return raw.reshape(-1).view(TORCH_DTYPES[t.name]).to(torch.float32).reshape(shape)
    blocks = raw.reshape(-1, t.nbytes)                                  # (rows * cols / block, nbytes)
    if t.name in _DEQUANT:
        out = _DEQUANT[t.name](blocks)                                  # (n_blocks, block)
    else:
        import gguf  # IQ*, TQ*, MXFP4, ...: gguf-py's numpy codecs

        arr = gguf.quants.dequantize(blocks.cpu().numpy(), gguf.GGMLQuantizationType(t.ggml_id))
        out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(raw.device)
    return out.reshape(shape)


def quantize(w: torch.Tensor, qtype, *, name: str | None = None) -> torch.Tensor:
    """Float tensor (..., cols) -> uint8 (..., row_bytes) in ``qtype``."""
    t = resolve(qtype)
    if not t.requantizable:
        raise UnsupportedError(
            f"cannot write {t.name}{_where(name)}: adaptertools has no {t.name} quantizer "
            f"(IQ*/TQ*/MXFP4 types need llama.cpp's importance-matrix tools); write it as another type, "
            f"e.g. --requantize q8_0 (near-lossless, 8.5 bits) or --requantize f16")
    shape = tuple(w.shape)
    cols = shape[-1] if shape else 1
    _check_cols(t, cols, name)
    x = w.detach().to(torch.float32).contiguous()
    if t.name == "F32":
        return x.view(torch.uint8).reshape(*shape[:-1], cols * 4)
    if t.name in ("F16", "BF16"):
        dt = torch.float16 if t.name == "F16" else torch.bfloat16
        return x.to(dt).view(torch.uint8).reshape(*shape[:-1], cols * 2)
    out = _QUANT[t.name](x.reshape(-1, t.block))                        # (n_blocks, nbytes)
    return out.reshape(*shape[:-1], t.row_bytes(cols))
