"""bitsandbytes codecs: NF4/FP4 (optionally double-quantized) and LLM.int8 row-wise int8, in torch.

Exact against bitsandbytes 0.50 on the CPU (tests/test_quant_codecs.py), operation for operation:

- 4-bit quantize = bnb's default (pure torch) ``quantize_4bit`` op: per block of ``blocksize`` values
  absmax, ``x * reciprocal(absmax)`` clamped to [-1, 1], ``bucketize`` against the midpoints of the
  sorted 16-value code, two codes per byte (first element in the high nibble). Packed weight
  (ceil(n/2), 1) uint8 in row-major order of ``shape``.
- Double quantization (``compress_statistics``): ``offset = absmax.mean()``; ``absmax - offset`` is
  quantized to 8 bits in blocks of 256 with bnb's dynamic code, the way bnb's CPU kernel does it: a
  65536-entry lookup table over [-1, 1] built from the code's midpoints. (bnb's CUDA kernel searches
  the code exactly instead, so a checkpoint made on a GPU can differ in a few nested-absmax bytes;
  dequantization is the same either way.)
- 4-bit dequantize: ``code[q] * absmax`` per block, nested absmax first rebuilt as
  ``code2[qabsmax] * absmax2 + offset``. float32 result; cast it to ``state.dtype`` as bnb does.
- int8 (``Linear8bitLt``): weight cast to fp16, ``SCB = max|row|`` (float32),
  ``CB = round(w * (127 / SCB))``; dequantize ``CB * SCB * (1/127)``.
"""

from __future__ import annotations

import torch

from ...errors import FormatError, UnsupportedError
from .bnb_state import (
    Bnb4bitState,
    int8_from_tensors,
    int8_to_tensors,
    state_from_tensors,
    state_to_tensors,
)

F32 = torch.float32
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256

# bitsandbytes.functional.get_4bit_type: NF4 quantiles of N(0, 1); FP4 e2m1 values in bit order.
_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0]
_FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


def code_4bit(quant_type: str, device=None) -> torch.Tensor:
    """(16,) float32: bnb's ``get_4bit_type(quant_type)`` (values scaled to max |v| = 1)."""
    if quant_type not in ("nf4", "fp4"):
        raise UnsupportedError(f"bitsandbytes 4-bit quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    data = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, device=device)
    return data.div_(data.abs().max())


def dynamic_code(device=None) -> torch.Tensor:
    """(256,) float32: bnb's ``create_dynamic_map()`` (signed, 7 exponent bits), same arithmetic."""
    data: list[float] = []
    for i in range(7):
        items = 2 ** i + 1
        bounds = torch.linspace(0.1, 1, items, dtype=F32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=F32, device=device)


def _check_4bit(quant_type: str, blocksize: int) -> None:
    code_4bit(quant_type)
    if blocksize not in BLOCKSIZES:
        raise UnsupportedError(f"bitsandbytes 4-bit blocksize must be one of {BLOCKSIZES}, got {blocksize}")


def _absmax_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's default quantize_4bit prologue: (absmax (n_blocks,), scaled (n,) in [-1, 1])."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    com = flat[:full].reshape(-1, blocksize)
    absmax = com.abs().max(dim=-1)[0]
    scaled = torch.clamp(com * torch.reciprocal(absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return absmax, scaled


def _lut_8bit(code: torch.Tensor) -> torch.Tensor:
    """(65536,) int64: bnb CPU's table from a uint16 bin over [-1, 1] to the nearest code index."""
    c = code.to("cpu", F32)
    mid = 0.5 * (c[:-1] + c[1:])
    i = torch.arange(65536, dtype=F32)
    val = -1.0 + (2.0 * i) / 65535.0
    return torch.searchsorted(mid, val, right=False)


def quantize_blockwise_8bit(a: torch.Tensor, code: torch.Tensor,
                            blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb CPU ``quantize_blockwise``: (n,) float32 -> (codes (n,) uint8, absmax (n_blocks,) float32)."""
    flat = a.reshape(-1).to(F32)
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = padded.abs().amax(-1)                                   # padding zeros never win
    zero = (absmax == 0).view(-1, 1)                                 # C: such blocks are all code 0
    inv = torch.div(torch.ones_like(absmax), absmax)                 # C: 1.0f / am
    v = torch.clamp(padded * inv.view(-1, 1), -1.0, 1.0)
    t = (((v + 1.0) * 0.5) * 65535.0 + 0.5)
    t = torch.where(zero, torch.zeros_like(t), t).to(torch.int64)    # truncation, in [0, 65535]
    q = torch.where(zero, 0, _lut_8bit(code).to(a.device)[t])
    return q.reshape(-1)[:n].to(torch.uint8), absmax


def quantize_4bit(w: torch.Tensor, *, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = False) -> tuple[torch.Tensor, Bnb4bitState]:
    """Weight of any shape -> (packed (ceil(n/2), 1) uint8, state), like ``bnb.functional.quantize_4bit``."""
    _check_4bit(quant_type, blocksize)
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedError(f"bitsandbytes 4-bit quantizes float32/float16/bfloat16 weights, got {w.dtype}")
    code = code_4bit(quant_type, w.device)
    order = torch.argsort(code.cpu()).to(w.device)                  # bnb sorts on the CPU too
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    absmax, scaled = _absmax_scaled(w.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        q = order[q]
    q8 = q.to(torch.uint8)
    packed = ((q8[::2] << 4) | q8[1::2]).unsqueeze(1)
    dtype = str(w.dtype).removeprefix("torch.")
    if not double_quant:
        return packed, Bnb4bitState(quant_type, blocksize, tuple(w.shape), dtype, absmax, code)
    offset = absmax.mean()
    code2 = dynamic_code(w.device)
    qabs, absmax2 = quantize_blockwise_8bit(absmax - offset, code2)
    return packed, Bnb4bitState(quant_type, blocksize, tuple(w.shape), dtype, qabs, code,
                                absmax2, code2, NESTED_BLOCKSIZE, offset.item(), "float32")


def absmax_of(state: Bnb4bitState) -> torch.Tensor:
    """(n_blocks,) float32 absmax, the nested codes decoded when double-quantized."""
    if not state.nested:
        return state.absmax.to(F32)
    q = state.absmax.reshape(-1).long()
    bs = state.nested_blocksize
    scale = state.nested_absmax.to(F32).repeat_interleave(bs)[: q.numel()]
    out = state.nested_quant_map.to(F32)[q] * scale
    return out + torch.tensor(state.nested_offset, dtype=F32, device=out.device)


def dequantize_4bit(packed: torch.Tensor, state: Bnb4bitState) -> torch.Tensor:
    """Packed 4-bit weight -> float32 of ``state.shape`` (``bnb.functional.dequantize_4bit`` in fp32)."""
    n = 1
    for s in state.shape:
        n *= s
    flat = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    if flat.numel() != -(-n // 2):
        raise FormatError(f"packed 4-bit weight has {flat.numel()} bytes, shape {state.shape} needs {-(-n // 2)}")
    absmax = absmax_of(state)
    if absmax.numel() != -(-n // state.blocksize):
        raise FormatError(f"4-bit quant state has {absmax.numel()} absmax values, shape {state.shape} with "
                          f"blocksize {state.blocksize} needs {-(-n // state.blocksize)}")
    idx = torch.stack([flat >> 4, flat & 0x0F], 1).reshape(-1)[:n].long()
    vals = state.quant_map.to(F32)[idx]
    if n % state.blocksize == 0:                                     # the same products, no (n,) scale copy
        return (vals.view(-1, state.blocksize) * absmax.view(-1, 1)).reshape(state.shape)
    scale = absmax.repeat_interleave(state.blocksize)[:n]
    return (vals * scale).reshape(state.shape)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) weight -> (CB int8 (rows, cols), SCB float32 (rows,)), as ``Int8Params`` does."""
    if w.dim() != 2:
        raise UnsupportedError(f"LLM.int8 quantizes 2-D weights, got shape {tuple(w.shape)}")
    a = w.to(torch.float16)
    scb = torch.max(a.abs(), dim=1).values.float()
    cb = torch.round(a * (127.0 / scb.unsqueeze(-1))).to(torch.int8)
    return cb, scb


def dequantize_int8(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """(rows, cols) int8 + (rows,) SCB -> float32, as ``int8_vectorwise_dequant``."""
    return cb * scb.view(-1, 1).to(F32) * 7.874015718698502e-3


__all__ = ["BLOCKSIZES", "Bnb4bitState", "absmax_of", "code_4bit", "dequantize_4bit", "dequantize_int8",
           "dynamic_code", "int8_from_tensors", "int8_to_tensors", "quantize_4bit", "quantize_int8",
           "state_from_tensors", "state_to_tensors"]
