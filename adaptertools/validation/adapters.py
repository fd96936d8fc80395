"""Two adapters give the same delta for every tensor (``validate ADAPTER --against OTHER``),
computed from the factors without forming ``B @ A``.

The difference ``s1 B1 A1 - s2 B2 A2`` is the product X Y of X = [s1 B1, -s2 B2] (rows, r1+r2)
and Y = [A1; A2] (r1+r2, cols); with thin QRs X = Qx Rx and Y^T = Qy Ry its Frobenius norm is
that of the small core Rx Ry^T, in float64, free of the cancellation that summing squared
norms would suffer.
"""

from __future__ import annotations

import torch

from ..adapter import Adapter, LoraWeight
from ..dtypes import TORCH_UNIT_ROUNDOFF
from ..kernels.lowrank import product_norm

EXACT = 1e-12      # float64 noise of the QR route, relative to the delta's norm


def delta_norm(w: LoraWeight) -> float:
    return product_norm(w.b.double() * w.scale, w.a.double())


def delta_difference(w: LoraWeight, v: LoraWeight) -> float:
    """||scale_w B_w A_w - scale_v B_v A_v||_F, exactly 0 for bit-identical factors."""
    if w.scale == v.scale and all(torch.equal(p, q) and p.dtype == q.dtype
                                  for p, q in ((w.a, v.a), (w.b, v.b))):
        return 0.0
    x = torch.cat([w.b.double() * w.scale, -v.b.double() * v.scale], dim=1)
    y = torch.cat([w.a.double(), v.a.double()], dim=0)
    return product_norm(x, y)


def tolerance(w: LoraWeight, v: LoraWeight) -> float:
    """Allowed relative error: float64 noise when both adapters store the same dtypes, else
    the rounding of the coarser one: each of B and A off by u relative, so about 2u."""
    dtypes = {w.a.dtype, w.b.dtype, v.a.dtype, v.b.dtype}
    if len(dtypes) == 1:
        return EXACT
    return 2.01 * max(TORCH_UNIT_ROUNDOFF.get(d, 0.0) for d in dtypes) + EXACT


def _extra_difference(p: torch.Tensor | None, q: torch.Tensor | None) -> float | None:
    """Relative max difference of two optional tensors; None when only one exists."""
    if p is None or q is None:
        return None if (p is None) != (q is None) else 0.0
    p, q = p.double().reshape(-1), q.double().reshape(-1)
    if p.shape != q.shape:
        return None
    return float((p - q).abs().max() / p.abs().max().clamp_min(1e-300)) if p.numel() else 0.0


def compare_tensor(name: str, w: LoraWeight | None, v: LoraWeight | None) -> dict:
    row = {"name": name, "passed": False, "relative_error": None, "tolerance": None, "problem": ""}
    if w is None or v is None:
        row["problem"] = f"only in {'the first' if v is None else 'the other'} adapter"
        return row
    if (w.layer, w.shape, w.weight_shape) != (v.layer, v.shape, v.weight_shape):
        row["problem"] = (f"layout differs: {w.layer} {w.stored_shape} vs "
                          f"{v.layer} {v.stored_shape}")
        return row
    norm = delta_norm(w)
    error = delta_difference(w, v) / max(norm, 1e-300) if norm else delta_difference(w, v)
    row.update(relative_error=error, tolerance=tolerance(w, v))
    for label, p, q in (("DoRA magnitude", w.magnitude, v.magnitude), ("lora_bias", w.bias, v.bias)):
        extra = _extra_difference(p, q)
        if extra is None or extra > row["tolerance"]:
            row["problem"] = f"{label} differs" if extra is not None else f"{label} in one only"
    row["passed"] = not row["problem"] and error <= row["tolerance"]
    if not row["passed"] and not row["problem"]:
        row["problem"] = "delta differs"
    return row


def compare_adapters(x: Adapter, y: Adapter) -> dict:
    """Per-tensor comparison of two adapters' deltas, worst first; ``passed`` if all pass."""
    names = sorted(x.weights.keys() | y.weights.keys())
    rows = [compare_tensor(n, x.weights.get(n), y.weights.get(n)) for n in names]
    for name in sorted(x.replacements.keys() | y.replacements.keys()):
        p, q = x.replacements.get(name), y.replacements.get(name)
        error = _extra_difference(p, q)
        allowed = EXACT if p is None or q is None or p.dtype == q.dtype else \
            max(TORCH_UNIT_ROUNDOFF.get(p.dtype, 0.0), TORCH_UNIT_ROUNDOFF.get(q.dtype, 0.0)) + EXACT
        same = error is not None and error <= allowed
        rows.append({"name": name, "passed": same, "relative_error": error, "tolerance": allowed,
                     "problem": "" if same else "full tensor differs or is missing"})
    for name in sorted(x.token_rows.keys() | y.token_rows.keys()):
        p, q = x.token_rows.get(name), y.token_rows.get(name)
        same = p is not None and q is not None and p.indices == q.indices and \
            _extra_difference(p.values, q.values) == 0.0
        rows.append({"name": name, "passed": same, "relative_error": None, "tolerance": EXACT,
                     "problem": "" if same else "trained token rows differ or are missing"})
    rows.sort(key=lambda r: (r["passed"], -(r["relative_error"] or 0.0)))
    return {"passed": all(r["passed"] for r in rows), "tensors": rows,
            "failed": sum(not r["passed"] for r in rows)}
