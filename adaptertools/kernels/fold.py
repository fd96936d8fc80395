"""Fast CPU fold of plain LoRA into Linear weights: the reference's arithmetic, in reused memory.

``kernels.reference.merge_weighted`` allocates about five full-size fp32 temporaries per tensor
(upcast, product, scaled product, sum, rounded copy); on a 5632x2048 weight that is ~230 MB of
fresh pages, and page faults were most of a merge's time. Here the same operations run in
place in two fp32 buffers kept from tensor to tensor, so each output element sees exactly the
reference's operations (exact upcast, the same product, the same scale, add, one rounding) and
the result is bit-identical (tests/test_fold.py).

The product ``B @ A`` is one matmul over the whole tensor, never split into blocks of rows: MKL
picks different kernels for different row counts, and blocked products were measured to differ
from the full one in the last bit.
"""

from __future__ import annotations

import torch

from .reference import Contribution, combined_weight

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def supports(weight: torch.Tensor, contributions: list[Contribution]) -> bool:
    """Plain LoRA on a 2-D float weight: no DoRA, no transposed layouts, no conv views."""
    return (weight.dim() == 2 and weight.dtype in FLOATS and bool(contributions)
            and all(c.weight.layer == "linear" and c.weight.magnitude is None
                    and c.weight.shape == tuple(weight.shape) for c in contributions))


# fp32 elements per block of the elementwise pass (4 MB): it stays in cache between the scale,
# the add and the rounding. Measured on a 5632x2048 bf16 weight, 2 cores: 1<<16 38 ms, 1<<18
# 25 ms, 1<<20 24 ms, 1<<22 33 ms; the reference's whole-tensor temporaries 154 ms.
BLOCK_ELEMENTS = 1 << 20


class Buffers:
    """Reused fp32 scratch space: one full-size product buffer, and one block."""

    def __init__(self) -> None:
        self.products = torch.empty(0)
        self.block = torch.empty(BLOCK_ELEMENTS)

    def product(self, rows: int, cols: int) -> torch.Tensor:
        if self.products.numel() < rows * cols:
            self.products = torch.empty(rows * cols)
        return self.products[: rows * cols].view(rows, cols)


def fold_linear(weight: torch.Tensor, contributions: list[Contribution], out_dtype: torch.dtype,
                buffers: Buffers, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``merge_weighted(weight, contributions, out_dtype)`` for plain Linear LoRA: the sum
    accumulated in fp32, rounded once to ``out_dtype``. (Stacked merges chain calls with one
    contribution each, rounding to the stored dtype in between.)

    weight (rows, cols); each contribution's b (rows, r) and a (r, cols). The products are whole
    matmuls (see the module notes); the elementwise rest runs block by block, in cache. ``out``
    (rows, cols) in ``out_dtype``, when given, receives the result (the engine's pooled memory).
    """
    rows, cols = weight.shape
    if len(contributions) > 1:     # one product over the combined factors, as the reference
        w = combined_weight(contributions)
        b, a, scale = w.b, w.a, None                    # scales already in b
    else:
        c = contributions[0]
        b, a = c.weight.b.float(), c.weight.a.float()
        scale = c.weight.scale * c.factor if c.factor != 1.0 else c.weight.scale
    product = buffers.product(rows, cols)
    torch.matmul(b, a, out=product)                     # (rows, r) @ (r, cols)
    if out is None:
        out = torch.empty((rows, cols), dtype=out_dtype)
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        acc = buffers.block[: (stop - start) * cols].view(stop - start, cols)
        acc.copy_(weight[start:stop])                   # exact upcast to fp32
        block = product[start:stop]
        if scale is not None:
            block.mul_(scale)                           # (B @ A) * scale, as the reference
        acc.add_(block)
        out[start:stop].copy_(acc)                      # round to nearest even, once
    return out
