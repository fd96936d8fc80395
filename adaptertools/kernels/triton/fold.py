"""Fused fold for float weights: ``out = round_out(W + s * (B @ A))``, W read once, out written once.

Arithmetic, per element, as the torch reference (``reference.merge_weighted``): the product of the
factors in fp32 (``tl.dot`` with ``input_precision="ieee"``: no TF32), times ``s``, added to W upcast to
fp32, rounded once to the output dtype. Only the order of the K-term dot product differs from torch's
matmul, so the result agrees with the reference within the fp32 accumulation-order bound
``2 * gamma_K * |s| * (|B| @ |A|)`` before the final rounding (see tests/test_triton_kernels.py).
Fp contraction is switched off (``enable_fp_fusion=False``) so ``dot * s + W`` is never one fma.
BF16 results are rounded with integer bit operations (``bf16_bits``), torch's round-to-nearest-even:
triton's interpreter truncates fp32 -> bf16, so the cast would differ between CPU tests and GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 64
BLOCK_N = 128


def rank_pad(r: int) -> int:
    """The K extent of the dot: the rank rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(r))


@triton.jit
def delta_tile(b_ptr, a_ptr, scale, rows, cols, rank, offs_m, offs_n, KP: tl.constexpr):
    """fp32 (BM, BN): ``scale * (B[offs_m, :rank] @ A[:rank, offs_n])``, zero outside the tensor."""
    offs_k = tl.arange(0, KP)
    b = tl.load(b_ptr + offs_m[:, None] * rank + offs_k[None, :],
                mask=(offs_m[:, None] < rows) & (offs_k[None, :] < rank), other=0.0)     # (BM, KP)
    a = tl.load(a_ptr + offs_k[:, None] * cols + offs_n[None, :],
                mask=(offs_k[:, None] < rank) & (offs_n[None, :] < cols), other=0.0)     # (KP, BN)
    return tl.dot(b, a, input_precision="ieee") * scale


@triton.jit
def bf16_bits(x):
    """fp32 -> bf16 bits (int16), round to nearest even, NaN -> 0x7FC0 (c10's round_to_nearest_even)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)          # NaN
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _fold_kernel(w_ptr, out_ptr, b_ptr, a_ptr, scale, rows, cols, rank,
                 BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr, OUT_BF16: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    delta = delta_tile(b_ptr, a_ptr, scale, rows, cols, rank, offs_m, offs_n, KP)
    mask = (offs_m[:, None] < rows) & (offs_n[None, :] < cols)
    where = offs_m[:, None] * cols + offs_n[None, :]
    w = tl.load(w_ptr + where, mask=mask, other=0.0).to(tl.float32)
    merged = w + delta
    if OUT_BF16:        # out_ptr is the int16 view of the bf16 output
        tl.store(out_ptr + where, bf16_bits(merged), mask=mask)
    else:
        tl.store(out_ptr + where, merged.to(out_ptr.dtype.element_ty), mask=mask)


def fold_float(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
               out_dtype: torch.dtype, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight (rows, cols) F32/F16/BF16, a (r, cols), b (rows, r) -> (rows, cols) in ``out_dtype``.

    ``scale`` multiplies the fp32 product, as ``lora_delta`` does (``(b @ a) * scale``); pass the
    combined factors of several adapters with scale 1 (``reference.combined_weight``).
    """
    rows, cols = weight.shape
    r = a.shape[0]
    assert b.shape == (rows, r) and a.shape == (r, cols), (weight.shape, a.shape, b.shape)
    weight = weight.contiguous()
    a = a.to(device=weight.device, dtype=torch.float32).contiguous()
    b = b.to(device=weight.device, dtype=torch.float32).contiguous()
    if out is None:
        out = torch.empty((rows, cols), dtype=out_dtype, device=weight.device)
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(cols, BLOCK_N))
    bf16 = out.dtype == torch.bfloat16
    _fold_kernel[grid](weight, out.view(torch.int16) if bf16 else out, b, a, float(scale), rows, cols, r,
                       BM=BLOCK_M, BN=BLOCK_N, KP=rank_pad(r), OUT_BF16=bf16, enable_fp_fusion=False)
    return out
