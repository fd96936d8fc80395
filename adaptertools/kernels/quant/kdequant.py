"""GGUF K-quant dequantizers (super-block of 256): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

``raw`` (n, nbytes) uint8 -> (n, 256) float32, one row per super-block, with the same operations in the
same order as gguf-py's numpy ``dequantize_blocks`` (so the floats are bit-identical). Byte layouts are
ggml's ``block_q*_K`` structs (ggml-common.h), written out in ``kquant.py``'s packers.
"""

from __future__ import annotations

import torch

from ._ops import F32, f16_from, shifts


def _crumbs(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """(n, 32*groups) bytes of four 2-bit values -> (n, groups, 4, 32): value (g, k, l) = bits 2k of byte 32g+l."""
    n = qs.shape[0]
    return (qs.reshape(n, groups, 1, 32) >> shifts([0, 2, 4, 6], qs.device, (1, 1, 4, 1))) & 3


def dequantize_q2_k(raw: torch.Tensor) -> torch.Tensor:
    # scales[16] (low nibble scale, high nibble min) | qs[64] | d fp16 | dmin fp16
    n = raw.shape[0]
    sc, qs = raw[:, :16], raw[:, 16:80]
    d, dmin = f16_from(raw[:, 80:82]), f16_from(raw[:, 82:84])
    dl = (d * (sc & 0xF).to(F32)).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).to(F32)).reshape(n, 16, 1)
    q = _crumbs(qs, 2).reshape(n, 16, 16).to(F32)
    return (dl * q - ml).reshape(n, 256)


def scales_k3(sc: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 scale bytes -> (n, 16) signed 6-bit scales as float32 (-32..31)."""
    n = sc.shape[0]
    lo = (sc[:, :8].reshape(n, 1, 8) >> shifts([0, 4], sc.device, (1, 2, 1))).reshape(n, 16)
    hi = (sc[:, 8:12].reshape(n, 1, 4) >> shifts([0, 2, 4, 6], sc.device, (1, 4, 1))).reshape(n, 16)
    s = (lo & 0x0F) | ((hi & 0x03) << 4)
    return (s.to(torch.int8) - 32).to(F32)


def dequantize_q3_k(raw: torch.Tensor) -> torch.Tensor:
    # hmask[32] | qs[64] | scales[12] | d fp16; value = d * scale * (q2 - 4 * (1 - hbit))
    n = raw.shape[0]
    hmask, qs = raw[:, :32], raw[:, 32:96]
    d = f16_from(raw[:, 108:110])
    dl = (d * scales_k3(raw[:, 96:108])).reshape(n, 16, 1)
    ql = _crumbs(qs, 2).reshape(n, 16, 16)
    qh = ((hmask.reshape(n, 1, 1, 32) >> torch.arange(8, device=raw.device, dtype=torch.uint8)
           .reshape(1, 1, 8, 1)) & 1).reshape(n, 16, 16) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(F32)
    return (dl * q).reshape(n, 256)


def scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> (scales, mins), each (n, 8) uint8 of 6-bit values (get_scale_min_k4)."""
    n = sc.shape[0]
    s = sc.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scales = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], -1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], -1)
    return scales, mins


def _dm(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = raw.shape[0]
    d, dmin = f16_from(raw[:, 0:2]), f16_from(raw[:, 2:4])
    sc, mn = scale_min_k4(raw[:, 4:16])
    return (d * sc.to(F32)).reshape(n, 8, 1), (dmin * mn.to(F32)).reshape(n, 8, 1)


def _nibbles4(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) -> (n, 8, 32): sub-block 2g is byte 32g+l's low nibble, 2g+1 its high nibble."""
    n = qs.shape[0]
    return ((qs.reshape(n, 4, 1, 32) >> shifts([0, 4], qs.device, (1, 1, 2, 1))) & 0x0F).reshape(n, 8, 32)


def dequantize_q4_k(raw: torch.Tensor) -> torch.Tensor:
    # d fp16 | dmin fp16 | scales[12] | qs[128]; value = d * sc * q - dmin * m
    d, dm = _dm(raw)
    return (d * _nibbles4(raw[:, 16:144]).to(F32) - dm).reshape(raw.shape[0], 256)


def dequantize_q5_k(raw: torch.Tensor) -> torch.Tensor:
    # d fp16 | dmin fp16 | scales[12] | qh[32] | qs[128]
    n = raw.shape[0]
    d, dm = _dm(raw)
    ql = _nibbles4(raw[:, 48:176])
    qh = ((raw[:, 16:48].reshape(n, 1, 1, 32) >> torch.arange(8, device=raw.device, dtype=torch.uint8)
           .reshape(1, 1, 8, 1)) & 1).reshape(n, 8, 32)
    return (d * (ql | (qh << 4)).to(F32) - dm).reshape(n, 256)


def dequantize_q6_k(raw: torch.Tensor) -> torch.Tensor:
    # ql[128] | qh[64] | scales[16] int8 | d fp16; value = d * scale * (q - 32)
    n = raw.shape[0]
    sc = raw[:, 192:208].contiguous().view(torch.int8).to(F32)
    d = (f16_from(raw[:, 208:210]) * sc).reshape(n, 16, 1)
    ql = ((raw[:, :128].reshape(n, 2, 1, 64) >> shifts([0, 4], raw.device, (1, 1, 2, 1))) & 0x0F).reshape(n, 8, 32)
    qh = _crumbs(raw[:, 128:192], 2).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(F32)
    return (d * q).reshape(n, 256)


DEQUANTIZE = {"Q2_K": dequantize_q2_k, "Q3_K": dequantize_q3_k, "Q4_K": dequantize_q4_k,
              "Q5_K": dequantize_q5_k, "Q6_K": dequantize_q6_k}
