"""Low-rank maths shared by validation, adapter algebra (combine) and extraction.

A sum of LoRA deltas ``sum_i c_i B_i @ A_i`` is the product ``X @ Y`` of the stacked factors
``X = [c_1 B_1, ..., c_n B_n]`` (rows, R) and ``Y = [A_1; ...; A_n]`` (R, cols). With thin QRs
``X = Qx Rx`` and ``Y^T = Qy Ry``, ``X @ Y = Qx (Rx Ry^T) Qy^T``: its norm and its SVD are those
of the small core ``Rx Ry^T`` (at most R x R), so neither needs the (rows, cols) product, and
the float64 core is free of the cancellation that summing squared norms would suffer.

Full matrices (pruned deltas, fine-tune differences) are truncated by an exact SVD or by a
seeded randomized SVD (Halko, Martinsson & Tropp 2011, algorithm 4.4: range finder with
subspace iteration).
"""

from __future__ import annotations

import math

import torch

OVERSAMPLE = 10       # extra columns of the randomized range finder
POWER_ITERATIONS = 2  # subspace iterations: enough for the slowly decaying spectra of deltas
SVD_CHOICES = ("auto", "exact", "randomized")


def stack_factors(terms) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(c, b (rows, r_i), a (r_i, cols)), ...]`` -> X (rows, R), Y (R, cols) in float64."""
    x = torch.cat([b.double() * c for c, b, _ in terms], dim=1)
    y = torch.cat([a.double() for _, _, a in terms], dim=0)
    return x, y


def product_core(x: torch.Tensor, y: torch.Tensor):
    """``x @ y = qx @ core @ qy.T`` with orthonormal qx (rows, k1), qy (cols, k2)."""
    qx, rx = torch.linalg.qr(x)
    qy, ry = torch.linalg.qr(y.T)
    return qx, rx @ ry.T, qy


def product_norm(x: torch.Tensor, y: torch.Tensor) -> float:
    """``||x @ y||_F`` from x (rows, k) and y (k, cols) through two thin QRs."""
    _, rx = torch.linalg.qr(x)
    _, ry = torch.linalg.qr(y.T)
    return float(torch.linalg.matrix_norm(rx @ ry.T))


def product_svd(x: torch.Tensor, y: torch.Tensor):
    """Thin SVD ``u, s, vh`` of ``x @ y`` from the core: u (rows, k), s (k,), vh (k, cols)."""
    qx, core, qy = product_core(x, y)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return qx @ u, s, vh @ qy.T


def choose_rank(s: torch.Tensor, *, rank: int | None = None, energy: float | None = None) -> int:
    """How many of the singular values ``s`` (descending, the whole spectrum for ``energy``) to
    keep: ``rank``, or the fewest whose squares reach ``energy`` of the sum of all squares (that
    sum, not a separately computed norm, so that ``energy=1`` keeps every direction). Directions
    with a numerically zero singular value are never kept; the result is at least 1."""
    tiny = float(s[0]) * max(s.numel(), 1) * torch.finfo(s.dtype).eps if s.numel() else 0.0
    useful = max(int((s > tiny).sum()), 1)
    if rank is not None:
        return max(1, min(rank, useful))
    kept = torch.cumsum(s.double() ** 2, dim=0)
    short = int((kept < energy * float(kept[-1]) * (1 - 1e-12)).sum())
    return max(1, min(short + 1, useful))


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int):
    """``(b, a)`` with ``b @ a = u[:, :k] diag(s[:k]) vh[:k]``, the singular values split as
    square roots over both factors (balanced: neither factor dwarfs the other)."""
    root = s[:k].sqrt()
    return (u[:, :k] * root).contiguous(), (root[:, None] * vh[:k]).contiguous()


def randomized_svd(m: torch.Tensor, q: int, *, generator: torch.Generator):
    """Approximate leading ``q`` singular triplets of ``m`` (rows, cols), seeded by ``generator``."""
    omega = torch.randn(m.shape[1], q, generator=generator, dtype=m.dtype)
    basis, _ = torch.linalg.qr(m @ omega)                  # (rows, q)
    for _ in range(POWER_ITERATIONS):
        other, _ = torch.linalg.qr(m.T @ basis)            # (cols, q)
        basis, _ = torch.linalg.qr(m @ other)
    # SVD of the wide (q, cols) projection through a thin QR of its transpose: LAPACK's SVD of
    # a wide matrix is ~15x slower than a QR plus the SVD of a (q, q) triangle
    qt, rt = torch.linalg.qr((basis.T @ m).T)             # (cols, q), (q, q)
    u, s, wh = torch.linalg.svd(rt.T)
    return basis @ u, s, wh @ qt.T


def use_randomized(svd: str, shape: tuple[int, int], rank: int | None) -> bool:
    """``auto``: randomized for a requested rank well below the matrix's, exact otherwise (an
    energy target needs the whole spectrum)."""
    if svd != "auto":
        return svd == "randomized" and rank is not None
    return rank is not None and 4 * (rank + OVERSAMPLE) <= min(shape)


def truncate_matrix(m: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                    svd: str = "auto", generator: torch.Generator | None = None):
    """Low-rank factors of a full matrix m (rows, cols): ``(b (rows, k), a (k, cols))``.

    ``rank`` or ``energy`` as in ``choose_rank``; ``svd`` auto | exact | randomized (randomized
    needs ``rank`` and uses ``generator``)."""
    if use_randomized(svd, tuple(m.shape), rank):
        q = min(rank + OVERSAMPLE, *m.shape)
        u, s, vh = randomized_svd(m, q, generator=generator or torch.Generator().manual_seed(0))
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = choose_rank(s, rank=rank, energy=energy)
    return split_factors(u, s, vh, k)


def relative(error: float, norm: float) -> float:
    return error / norm if norm > 0 else (0.0 if error == 0 else math.inf)
