"""Exact float32 building blocks shared by the codecs.

Every helper here produces the same bits on CPU and CUDA as the C/numpy references do:

- ``div``/``rdiv`` divide by a *tensor*: CUDA turns ``t / python_scalar`` into a multiply by the
  reciprocal, and ``python_scalar / t`` is ``t.reciprocal() * scalar`` everywhere; both can be one
  ulp off a true division.
- ``nearest_int`` is ggml's own bit trick (``fval + 1.5 * 2**23``, keep the mantissa), so even out-of-
  range inputs give the same (garbage) integers as the C code would.
- ``sqrt`` is correctly rounded (C ``sqrtf``); ``torch.sqrt`` on CPU can be one ulp off.
- ``seqsum`` adds terms one by one, left to right, like a C ``for`` loop; ``Tensor.sum`` does not.
"""

from __future__ import annotations

import torch

F32 = torch.float32


def div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """IEEE ``a / b`` in float32, elementwise; one operand may be a Python number."""
    if not isinstance(a, torch.Tensor):
        a = torch.tensor(a, dtype=F32, device=b.device)
    if not isinstance(b, torch.Tensor):
        b = torch.tensor(b, dtype=F32, device=a.device)
    return torch.div(a, b)


def rdiv(a: float, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` for a Python number ``a``: the C expression ``1.0f/d``."""
    return div(a, b)


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: round half to even for ``|x| < 2**22`` (int32 result, same shape)."""
    v = x.to(F32) + 12582912.0
    return (v.view(torch.int32) & 0x007FFFFF) - 0x00400000


def sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root of non-negative float32 ``x``.

    A float64 root rounded to float32 is the candidate; squares of the midpoints to its neighbours are
    exact in float64 (25-bit numbers), so comparing them with ``x`` fixes any last-bit error.
    """
    xd = x.double()
    s = torch.sqrt(xd).float()
    sd = s.double()
    up = torch.nextafter(s, torch.full_like(s, float("inf")))
    dn = torch.nextafter(s, torch.zeros_like(s))
    mid_up, mid_dn = (sd + up.double()) / 2, (sd + dn.double()) / 2
    s = torch.where(mid_up * mid_up < xd, up, s)
    return torch.where((mid_dn * mid_dn > xd) & (s > 0), dn, s)


def round_away(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero), exactly as gguf-py's ``np_roundf``."""
    a = x.abs()
    fl = a.floor()
    return torch.sign(x) * (fl + (2 * (a - fl)).floor())


def seqsum(terms: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Left fold over dim 0: ``((start + t[0]) + t[1]) + ...``; ``start`` defaults to +0.0."""
    acc = torch.zeros_like(terms[0]) if start is None else start.clone()
    for i in range(terms.shape[0]):
        acc += terms[i]
    return acc


def f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(..., 1) float32 -> (..., 2) uint8: round to nearest-even fp16, little-endian bytes."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def f16_from(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 -> (..., 1) float32."""
    return raw.contiguous().view(torch.float16).to(F32)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., 8k) of 0/1 -> (..., k) uint8, bit j of byte i = element 8i + j (numpy 'little')."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    b = bits.to(torch.uint8).reshape(*bits.shape[:-1], -1, 8) << shifts
    return b.sum(-1, dtype=torch.uint8)


def unpack_bits(raw: torch.Tensor, n: int) -> torch.Tensor:
    """(..., k) uint8 -> (..., 8k) uint8 of 0/1, inverse of ``pack_bits``."""
    shifts = torch.arange(8, device=raw.device, dtype=torch.uint8)
    return ((raw.unsqueeze(-1) >> shifts) & 1).reshape(*raw.shape[:-1], n)


def shifts(values, device, shape) -> torch.Tensor:
    """A small uint8 tensor of shift amounts, reshaped for broadcasting."""
    return torch.tensor(values, dtype=torch.uint8, device=device).reshape(shape)
