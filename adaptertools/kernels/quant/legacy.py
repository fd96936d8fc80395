"""GGUF legacy block codecs (block of 32): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Each function maps ``blocks`` (n, 32) float32 <-> ``raw`` (n, nbytes) uint8, one row per block. The
arithmetic follows gguf-py's numpy codecs operation for operation (which equal ggml's
``quantize_row_*_ref``), so the bytes and floats are identical to theirs.
"""

from __future__ import annotations

import torch

from ._ops import (
    F32,
    div,
    f16_bytes,
    f16_from,
    pack_bits,
    rdiv,
    round_away,
    shifts,
    unpack_bits,
)

U8 = torch.uint8


def _inv(d: torch.Tensor) -> torch.Tensor:
    """C ``d ? 1.0f/d : 0.0f``."""
    return torch.where(d == 0, torch.zeros_like(d), rdiv(1.0, d))


def _signed_max(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 1): the value of largest magnitude, first one on ties (C ``if (amax < fabsf(v))``)."""
    return blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) values 0..31 -> (n, 16): low nibbles of the first half | of the second half << 4."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) -> (n, 32) nibbles: element j < 16 is byte j's low nibble, j >= 16 its high nibble."""
    return ((qs.unsqueeze(1) >> shifts([0, 4], qs.device, (1, 2, 1))) & 0x0F).reshape(qs.shape[0], 32)


# ---- Q8_0: d fp16 | 32 x int8 ----------------------------------------------------------------

def quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = div(blocks.abs().amax(-1, keepdim=True), 127.0)                   # (n, 1)
    q = round_away(blocks * _inv(d)).to(torch.int8).view(U8)              # (n, 32)
    return torch.cat([f16_bytes(d), q], -1)


def dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    return raw[:, 2:].contiguous().view(torch.int8).to(F32) * f16_from(raw[:, :2])


# ---- Q4_0: d fp16 | 16 B nibbles; value = d * (q - 8) -------------------------------------------

def quantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = div(_signed_max(blocks), -8.0)
    q = torch.trunc(blocks * _inv(d) + 8.5).clamp(0, 15).to(U8)
    return torch.cat([f16_bytes(d), _nibbles(q)], -1)


def dequantize_q4_0(raw: torch.Tensor) -> torch.Tensor:
    q = (_unnibble(raw[:, 2:]).to(torch.int8) - 8).to(F32)
    return f16_from(raw[:, :2]) * q


# ---- Q4_1: d fp16 | m fp16 | 16 B nibbles; value = d * q + m ------------------------------------

def quantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    mx, mn = blocks.amax(-1, keepdim=True), blocks.amin(-1, keepdim=True)
    d = div(mx - mn, 15.0)
    q = torch.trunc((blocks - mn) * _inv(d) + 0.5).clamp(0, 15).to(U8)
    return torch.cat([f16_bytes(d), f16_bytes(mn), _nibbles(q)], -1)


def dequantize_q4_1(raw: torch.Tensor) -> torch.Tensor:
    q = _unnibble(raw[:, 4:]).to(F32)
    return f16_from(raw[:, :2]) * q + f16_from(raw[:, 2:4])


# ---- Q5_0: d fp16 | qh 4 B (bit j = bit 4 of element j) | 16 B nibbles; value = d * (q - 16) ----

def quantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = div(_signed_max(blocks), -16.0)
    q = torch.trunc(blocks * _inv(d) + 16.5).clamp(0, 31).to(U8)
    return torch.cat([f16_bytes(d), pack_bits(q >> 4), _nibbles(q)], -1)


def dequantize_q5_0(raw: torch.Tensor) -> torch.Tensor:
    q = _unnibble(raw[:, 6:]) | (unpack_bits(raw[:, 2:6], 32) << 4)
    return f16_from(raw[:, :2]) * (q.to(torch.int8) - 16).to(F32)


# ---- Q5_1: d fp16 | m fp16 | qh 4 B | 16 B nibbles; value = d * q + m ---------------------------

def quantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    mx, mn = blocks.amax(-1, keepdim=True), blocks.amin(-1, keepdim=True)
    d = div(mx - mn, 31.0)
    q = torch.trunc((blocks - mn) * _inv(d) + 0.5).clamp(0, 31).to(U8)
    return torch.cat([f16_bytes(d), f16_bytes(mn), pack_bits(q >> 4), _nibbles(q)], -1)


def dequantize_q5_1(raw: torch.Tensor) -> torch.Tensor:
    q = (_unnibble(raw[:, 8:]) | (unpack_bits(raw[:, 4:8], 32) << 4)).to(F32)
    return f16_from(raw[:, :2]) * q + f16_from(raw[:, 2:4])


QUANTIZE = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q4_1": quantize_q4_1,
            "Q5_0": quantize_q5_0, "Q5_1": quantize_q5_1}
DEQUANTIZE = {"Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0, "Q4_1": dequantize_q4_1,
              "Q5_0": dequantize_q5_0, "Q5_1": dequantize_q5_1}
