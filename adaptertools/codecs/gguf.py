"""GGUF tensor types as a codec: the block types (Q4_0 ... Q6_K, IQ*) and the float types a GGUF
file stores, each tensor typed by its own header entry (no companions, no quantization_config).

The merge engine's GGUF path (merging/quantized.py) goes through the per-type functions here
(``dequantize``, ``quantize``, ``roundtrip``: ggml's own codec on the CPU when llama-cpp-python
provides it, else the torch codec of kernels/quant); ``describe``/``decode``/``encode`` give the
same types the registry's contract, so that anything that handles an ``Encoding`` handles a GGUF
tensor too.
"""

from __future__ import annotations

import torch

from ..dtypes import FLOAT_DTYPES, TORCH_DTYPES
from . import Encoding

NAME = "gguf"
QUANT_METHODS: tuple[str, ...] = ()   # GGUF files type each tensor in its header instead
DAMAGED = "the GGUF file is damaged: download or convert it again"


def is_block_type(type_name: str) -> bool:
    """A GGUF block type (quantized), as opposed to F32/F16/BF16."""
    return type_name not in FLOAT_DTYPES


def dequantize(raw: torch.Tensor, type_name: str, shape: tuple[int, ...], *,
               name: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """A stored tensor of ``type_name`` as fp32 ``shape`` (rows, cols): block bytes decoded
    (into ``out`` when given), float values upcast exactly."""
    if is_block_type(type_name):
        from ..kernels.quant.codec import dequantize as block_dequantize

        return block_dequantize(raw, type_name, shape, name=name, out=out)
    return raw.reshape(shape).to(torch.float32)


def quantize(values: torch.Tensor, type_name: str, *, name: str | None = None) -> torch.Tensor:
    """fp32 ``values`` (rows, cols) stored as ``type_name``: block bytes (rows, row_bytes), or a
    float tensor (always a copy: ``values`` may be a reused buffer the writer must not see)."""
    if is_block_type(type_name):
        from ..kernels.quant.codec import quantize as block_quantize

        return block_quantize(values, type_name, name=name)
    return values.to(TORCH_DTYPES[type_name], copy=True)


def roundtrip(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """What storing ``x`` (rows, cols) in ``type_name`` keeps of it, as fp32."""
    if not is_block_type(type_name):
        return x.to(TORCH_DTYPES[type_name]).to(torch.float32)
    return dequantize(quantize(x.to(torch.float32), type_name), type_name, tuple(x.shape))


# ----------------------------------------------------------------------------- the contract

def encoding(name: str, type_name: str, shape: tuple[int, ...]) -> Encoding:
    return Encoding(NAME, type_name, name, tuple(shape), (name,))


def describe(entries, config, read, where) -> list[Encoding]:
    """Every block-typed tensor of a GGUF file's ``entries``."""
    return [encoding(n, e.dtype, e.shape) for n, e in entries.items() if is_block_type(e.dtype)]


def decode(enc: Encoding, tensors) -> tuple[torch.Tensor, None]:
    return dequantize(tensors[enc.name], enc.type, enc.shape, name=enc.name), None


def encode(enc: Encoding, values: torch.Tensor, state) -> tuple[dict, torch.Tensor]:
    data = quantize(values, enc.type, name=enc.name)
    return {enc.name: data}, dequantize(data, enc.type, enc.shape, name=enc.name)
