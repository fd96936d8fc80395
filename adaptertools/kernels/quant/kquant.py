"""GGUF K-quant quantizers (super-block of 256): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Ports of ggml's ``quantize_row_q*_K_ref`` (ggml-quants.c, what ``ggml_quantize_chunk`` and
``llama-quantize`` run without an importance matrix): ``x`` (n, 256) float32 -> (n, nbytes) uint8, one
row per super-block, byte-identical to ggml. Sub-block searches live in ``ksearch``; this module does
the super-block scale coding and the bit packing (layouts as in ggml-common.h, mirrored in
``kdequant``). Work is chunked so the candidate tensors stay a few hundred MB.
"""

from __future__ import annotations

import torch

from ._ops import F32, div, f16_bytes, nearest_int, shifts, sqrt
from .ksearch import GROUP_MAX_EPS, make_q3, make_qkx2, make_qx_rmse1

U8 = torch.uint8


def _pos_max(v: torch.Tensor) -> torch.Tensor:
    """(n, k) -> (n,): C's ``float m = 0; if (v > m) m = v;`` (+0.0 when nothing is positive, never -0.0)."""
    m = v.amax(1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _requant(x: torch.Tensor, d: torch.Tensor, L: torch.Tensor, lo: int, hi: int,
             dm: torch.Tensor | None = None) -> torch.Tensor:
    """Second pass with the coded scales: L = clamp(nearest_int((x + dm) / d)); where d == 0 keep L."""
    num = x if dm is None else x + dm.unsqueeze(-1)
    new = nearest_int(div(num, d.unsqueeze(-1))).clamp(lo, hi)
    return torch.where(d.unsqueeze(-1) != 0, new, L)


def _crumbs_pack(L: torch.Tensor) -> torch.Tensor:
    """(n, 256) values 0..3 -> (n, 64): byte 32h + l = L[128h + l] | L[+32] << 2 | L[+64] << 4 | L[+96] << 6."""
    q = L.to(U8).reshape(-1, 2, 4, 32) << shifts([0, 2, 4, 6], L.device, (1, 1, 4, 1))
    return q.sum(2, dtype=U8).reshape(-1, 64)


def _scale_min_pack(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """(n, 8) 6-bit scales and mins -> Q4_K/Q5_K's 12 bytes (inverse of get_scale_min_k4)."""
    ls, lm = ls.to(U8), lm.to(U8)
    return torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                      (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)], -1)


def _qkx_superblock(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Q4_K/Q5_K shared part: (d16, dmin16, scale bytes (n, 12), L (n, 8, 32) after the second pass)."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    sum_x2 = torch.zeros(n * 8, dtype=F32, device=x.device)
    for v in sub.t():
        sum_x2 += v * v
    av_x = sqrt(div(sum_x2, 32.0))
    weights = av_x.unsqueeze(1) + sub.abs()
    scale, the_min, L = make_qkx2(sub, weights, nmax, rmin, 0.1, nstep, False)
    scales, mins = scale.view(n, 8), the_min.view(n, 8)
    max_scale, max_min = _pos_max(scales), _pos_max(mins)
    inv_scale = torch.where(max_scale > 0, div(63.0, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, div(63.0, max_min), torch.zeros_like(max_min))
    ls = (nearest_int(inv_scale.unsqueeze(1) * scales) & 0xFF).clamp(max=63)   # C: uint8_t, MIN(63, .)
    lm = (nearest_int(inv_min.unsqueeze(1) * mins) & 0xFF).clamp(max=63)
    d16, dmin16 = div(max_scale, 63.0).to(torch.float16), div(max_min, 63.0).to(torch.float16)
    d = d16.to(F32).unsqueeze(1) * ls.to(F32)                        # (n, 8)
    dm = dmin16.to(F32).unsqueeze(1) * lm.to(F32)
    L = _requant(x.view(n, 8, 32), d, L.reshape(n, 8, 32), 0, nmax, dm)
    return d16, dmin16, _scale_min_pack(ls, lm), L


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    # d fp16 | dmin fp16 | scales[12] | qs[128]: byte 32g + l = L[64g + l] | L[64g + 32 + l] << 4
    d16, dmin16, sc, L = _qkx_superblock(x, 15, -1.0, 20)
    L = L.to(U8).reshape(-1, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([f16_bytes(d16.unsqueeze(1)), f16_bytes(dmin16.unsqueeze(1)), sc, qs], -1)


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales[12] | qh[32]: bit 2g (2g+1) of byte l = bit 4 of L[64g + l] (L[64g + 32 + l]) | qs[128]
    d16, dmin16, sc, L = _qkx_superblock(x, 31, -0.5, 15)
    L = L.to(U8).reshape(-1, 8, 32)
    qh = ((L >> 4) << torch.arange(8, device=x.device, dtype=U8).view(1, 8, 1)).sum(1, dtype=U8)
    L = (L & 0x0F).reshape(-1, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([f16_bytes(d16.unsqueeze(1)), f16_bytes(dmin16.unsqueeze(1)), sc, qh, qs], -1)


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    # ql[128] | qh[64] | scales[16] int8 | d fp16
    n = x.shape[0]
    scale, L = make_qx_rmse1(x.reshape(n * 16, 16), 32)
    scales = scale.view(n, 16)
    max_abs = scales.abs().amax(1)
    max_scale = scales.gather(1, scales.abs().argmax(1, keepdim=True)).squeeze(1)   # first of largest |.|
    zero = max_abs < GROUP_MAX_EPS
    iscale = div(-128.0, max_scale)
    d16 = div(1.0, iscale).to(torch.float16)
    sc = nearest_int(iscale.unsqueeze(1) * scales).clamp(max=127)  # (n, 16), in -128..127
    d = d16.to(F32).unsqueeze(1) * sc.to(F32)
    L = _requant(x.view(n, 16, 16), d, L.reshape(n, 16, 16), -32, 31)
    L = torch.where(d.unsqueeze(-1) != 0, L + 32, L).to(U8).reshape(n, 2, 4, 32)   # kept L already 0..63
    ql = torch.cat([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                    (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], -1).reshape(n, 128)
    qh = ((L >> 4) << shifts([0, 2, 4, 6], x.device, (1, 1, 4, 1))).sum(2, dtype=U8).reshape(n, 64)
    out = torch.cat([ql, qh, sc.to(torch.int8).view(U8), f16_bytes(d16.unsqueeze(1))], -1)
    return torch.where(zero.unsqueeze(1), torch.zeros_like(out), out)


def quantize_q3_k(x: torch.Tensor) -> torch.Tensor:
    # hmask[32]: bit k of byte l = bit 2 of L[32k + l] | qs[64] (2-bit) | scales[12] | d fp16
    n = x.shape[0]
    scale, L = make_q3(x.reshape(n * 16, 16), 4)
    scales = scale.view(n, 16)
    max_scale = scales.gather(1, scales.abs().argmax(1, keepdim=True)).squeeze(1)
    nz = max_scale != 0
    iscale = div(-32.0, max_scale)
    li = nearest_int(iscale.unsqueeze(1) * scales)
    li = ((li + 128) & 0xFF) - 128                                   # C: int8_t l = nearest_int(...)
    ls = torch.where(nz.unsqueeze(1), li.clamp(-32, 31) + 32, 0).to(U8)   # stored 6-bit values, 0 if !nz
    d16 = torch.where(nz, div(1.0, iscale), torch.zeros_like(iscale)).to(torch.float16)
    sb = torch.cat([(ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4),
                    ((ls >> 4).reshape(n, 4, 4) << shifts([0, 2, 4, 6], x.device, (1, 4, 1))).sum(1, dtype=U8)], -1)
    d = d16.to(F32).unsqueeze(1) * (ls.to(torch.int32) - 32).to(F32)
    L = _requant(x.view(n, 16, 16), d, L.reshape(n, 16, 16), -4, 3)
    L = torch.where(d.unsqueeze(-1) != 0, L + 4, L).reshape(n, 256)  # kept L already 0..7
    hi = (L > 3).to(U8).reshape(n, 8, 32)
    hmask = (hi << torch.arange(8, device=x.device, dtype=U8).view(1, 8, 1)).sum(1, dtype=U8)
    return torch.cat([hmask, _crumbs_pack(L & 3), sb, f16_bytes(d16.unsqueeze(1))], -1)


def quantize_q2_k(x: torch.Tensor) -> torch.Tensor:
    # scales[16]: low nibble scale, high nibble min | qs[64] (2-bit) | d fp16 | dmin fp16
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scale, the_min, L = make_qkx2(sub, sub.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins = scale.view(n, 16), the_min.view(n, 16)
    max_scale, max_min = _pos_max(scales), _pos_max(mins)
    has_s, has_m = (max_scale > 0).unsqueeze(1), (max_min > 0).unsqueeze(1)
    lo = torch.where(has_s, nearest_int(div(15.0, max_scale).unsqueeze(1) * scales), 0)
    hi = torch.where(has_m, nearest_int(div(15.0, max_min).unsqueeze(1) * mins), 0)
    sb = ((lo & 0xFF) | ((hi << 4) & 0xFF)).to(U8)                   # uint8 stores, as in C
    d16 = torch.where(has_s[:, 0], div(max_scale, 15.0), torch.zeros_like(max_scale)).to(torch.float16)
    dmin16 = torch.where(has_m[:, 0], div(max_min, 15.0), torch.zeros_like(max_min)).to(torch.float16)
    d = d16.to(F32).unsqueeze(1) * (sb & 0xF).to(F32)
    dm = dmin16.to(F32).unsqueeze(1) * (sb >> 4).to(F32)
    L = _requant(x.view(n, 16, 16), d, L.reshape(n, 16, 16), 0, 3, dm).reshape(n, 256)
    return torch.cat([sb, _crumbs_pack(L), f16_bytes(d16.unsqueeze(1)), f16_bytes(dmin16.unsqueeze(1))], -1)


def _chunked(fn, rows_per_chunk: int):
    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= rows_per_chunk:
            return fn(x)
        return torch.cat([fn(c) for c in torch.split(x, rows_per_chunk)], 0)
    run.__name__ = fn.__name__
    return run


# super-blocks per chunk: the sequential steps then work on vectors of 16384 sub-blocks, below torch's
# parallel grain (32768) and cache-sized; many small threaded ops were 4x slower on a busy 2-core machine
QUANTIZE = {"Q2_K": _chunked(quantize_q2_k, 1024), "Q3_K": _chunked(quantize_q3_k, 1024),
            "Q4_K": _chunked(quantize_q4_k, 2048), "Q5_K": _chunked(quantize_q5_k, 2048),
            "Q6_K": _chunked(quantize_q6_k, 1024)}
