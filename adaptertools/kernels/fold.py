"""Fast CPU fold of plain LoRA into Linear weights: the reference's arithmetic, in reused memory.

``kernels.reference.merge_weighted`` allocates about five full-size fp32 temporaries per tensor
(upcast, product, scaled product, sum, rounded copy); on a 5632x2048 weight that is ~230 MB of
fresh pages, and page faults were most of a merge's time. Here the same operations run in
place in small fp32 buffers kept from tensor to tensor, so each output element sees exactly the
reference's operations (exact upcast, the same product, the same scale, add, one rounding) and
the result is bit-identical (tests/test_fold.py).

The product ``B @ A`` is computed a block of rows at a time, so that it is still in cache when
the scale, the add and the rounding read it (a full-size fp32 product goes out to memory and
back: 46 MB each way for a 5632x2048 weight). Each element of ``B @ A`` is one dot product over
the rank; whether MKL sums it in the same order for a block of rows as for the whole matrix
depends on the kernel it picks for the shape. Measured here (AVX-512, MKL 2024.2): identical
for blocks of 64 rows or more at every rank tried (1..512), different for blocks of 32 rows or
fewer. Blocks are therefore never shorter than ``MIN_BLOCK_ROWS``, and, because other CPUs and
BLAS builds may choose differently, the first tensor of each shape is computed both ways and
compared: if the bits differ, that shape falls back to one whole-tensor product for the rest
of the run (``Buffers.whole``).
"""

from __future__ import annotations

import math

import torch

from ..dtypes import FLOAT_TORCH_DTYPES
from ..adapter import LoraWeight
from .reference import Contribution, combined_weight


def supports(weight: torch.Tensor, contributions: list[Contribution]) -> bool:
    """Plain LoRA on a 2-D float weight: no DoRA, no transposed layouts, no conv views, no
    other delta kinds (LoHa, LoKr: the reference folds them)."""
    return (weight.dim() == 2 and weight.dtype in FLOAT_TORCH_DTYPES and bool(contributions)
            and all(isinstance(c.weight, LoraWeight) and c.weight.layer == "linear" and c.weight.magnitude is None
                    and c.weight.shape == tuple(weight.shape) for c in contributions))


# fp32 elements per block (4 MB): product and sum stay in cache between the matmul, the scale,
# the add and the rounding. Measured on a 5632x2048 bf16 weight, 2 cores: 1<<16 38 ms, 1<<18
# 25 ms, 1<<20 24 ms, 1<<22 33 ms; the reference's whole-tensor temporaries 154 ms.
BLOCK_ELEMENTS = 1 << 20
MIN_BLOCK_ROWS = 256      # 4x the shortest block measured to match the whole product


class Buffers:
    """Reused fp32 scratch space (a product block and a sum block), and per product shape
    whether row blocks were checked to give the whole product's bits."""

    def __init__(self) -> None:
        self.product = torch.empty(0)
        self.block = torch.empty(0)
        self.blocked_ok: dict[tuple[int, int, int], bool] = {}   # (rows, cols, rank) -> ok
        self.roles: dict[str, torch.Tensor] = {}

    def named(self, role: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A reused fp32 tensor of ``shape`` for one role (quantized merges' full-size
        temporaries: fresh 46 MB tensors cost their page faults every time)."""
        n = math.prod(shape)
        if role not in self.roles or self.roles[role].numel() < n:
            self.roles[role] = torch.empty(n)
        return self.roles[role][:n].view(shape)

    def scratch(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two fp32 (rows, cols) views: the product block and the sum block."""
        n = rows * cols
        if self.product.numel() < n:
            self.product, self.block = torch.empty(n), torch.empty(n)
        return self.product[:n].view(rows, cols), self.block[:n].view(rows, cols)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite (non-float tensors: True). The sum first: one pass,
    no temporary (0.6 ms for 11.5M bf16 values on one thread, ``isfinite().all()`` 43 ms), and
    finite whenever every value is; only a sum that is not (an Inf or NaN in ``t``, or finite
    values whose sum overflows) pays for the exact test."""
    if not t.is_floating_point() or t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def count_nonfinite(t: torch.Tensor) -> int:
    return int(t.numel() - torch.isfinite(t).sum()) if t.is_floating_point() else 0


def row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of about BLOCK_ELEMENTS values, none shorter than MIN_BLOCK_ROWS
    (a short tail joins the block before it)."""
    step = max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // max(cols, 1))
    starts = list(range(0, rows, step))
    if len(starts) > 1 and rows - starts[-1] < MIN_BLOCK_ROWS:
        starts.pop()
    return list(zip(starts, starts[1:] + [rows]))


def _blocks_match(b: torch.Tensor, a: torch.Tensor, blocks: list[tuple[int, int]]) -> bool:
    """Do row-block products give the whole product's bits for this shape? (Once per shape.)"""
    whole = b @ a
    return all(torch.equal(b[start:stop] @ a, whole[start:stop]) for start, stop in blocks)


def fold_linear(weight: torch.Tensor, contributions: list[Contribution], out_dtype: torch.dtype,
                buffers: Buffers, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``merge_weighted(weight, contributions, out_dtype)`` for plain Linear LoRA: the sum
    accumulated in fp32, rounded once to ``out_dtype``. (Stacked merges chain calls with one
    contribution each, rounding to the stored dtype in between.)

    weight (rows, cols); each contribution's b (rows, r) and a (r, cols); several adapters go
    through one product of their combined factors, as in the reference. ``out`` (rows, cols)
    in ``out_dtype``, when given, receives the result (the engine's pooled memory).
    """
    rows, cols = weight.shape
    if len(contributions) > 1:     # one product over the combined factors, as the reference
        w = combined_weight(contributions)
        b, a, scale = w.b, w.a, None                    # scales already in b
    else:
        c = contributions[0]
        b, a = c.weight.b.float(), c.weight.a.float()
        scale = c.weight.scale * c.factor if c.factor != 1.0 else c.weight.scale
    if out is None:
        out = torch.empty((rows, cols), dtype=out_dtype)
    blocks = row_blocks(rows, cols)
    key = (rows, cols, b.shape[1])
    if len(blocks) > 1 and key not in buffers.blocked_ok:
        buffers.blocked_ok[key] = _blocks_match(b, a, blocks)
    if len(blocks) > 1 and not buffers.blocked_ok[key]:
        blocks, whole = [(0, rows)], True               # this BLAS sums blocks differently
    else:
        whole = False
    longest = max(stop - start for start, stop in blocks)
    for start, stop in blocks:
        product, acc = buffers.scratch(longest if not whole else rows, cols)
        product, acc = product[: stop - start], acc[: stop - start]
        torch.matmul(b[start:stop], a, out=product)     # (n, r) @ (r, cols)
        if scale is not None:
            product.mul_(scale)                         # (B @ A) * scale, as the reference
        acc.copy_(weight[start:stop])                   # exact upcast to fp32
        acc.add_(product)
        out[start:stop].copy_(acc)                      # round to nearest even, once
    return out
