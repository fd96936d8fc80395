"""GGUF block bytes <-> fp32 for one tensor, the fastest exact way at hand: ggml's own codec on the
CPU when llama-cpp-python provides it (the same bytes and floats), else the torch codec
(``quant.gguf``)."""

from __future__ import annotations

import torch


def dequantize(raw: torch.Tensor, type_name: str, shape: tuple[int, ...], *,
               name: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Block bytes -> fp32 ``shape``: ggml's own to_float on the CPU when llama-cpp-python
    provides it (the same floats, several times faster; into ``out`` when given), else the
    torch codec."""
    from . import ggml
    from . import gguf as codec

    if raw.device.type == "cpu" and len(shape) == 2 and ggml.dequantizable(type_name):
        return ggml.dequantize(raw, type_name, shape, out=out)
    return codec.dequantize(raw, type_name, shape, name=name)


def quantize(x: torch.Tensor, type_name: str, *, name: str | None = None) -> torch.Tensor:
    """fp32 (rows, cols) -> block bytes, through ggml on the CPU when it can (same bytes)."""
    from . import ggml
    from . import gguf as codec

    if x.device.type == "cpu" and x.dim() == 2 and ggml.available(type_name):
        return ggml.quantize(x, type_name)
    return codec.quantize(x, type_name, name=name)
