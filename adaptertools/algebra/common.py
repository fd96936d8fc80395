"""What combine.py and extract.py share: the per-tensor result (``TensorResult``) and its summary
(``summarize``), the truncation options check (``check_truncation``), the per-tensor random
generator (``tensor_generator``) and the output factors' finiteness check (``check_factors``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from ..adapter import check_cast
from ..errors import OptionError
from ..kernels.lowrank import SVD_CHOICES


@dataclass(frozen=True)
class TensorResult:
    """How much of one target delta the output keeps: norms are Frobenius norms."""

    name: str
    shape: tuple[int, ...]
    rank: int | None       # 0: left out; None: kept as a full tensor
    target_norm: float     # ||target delta||
    error: float           # ||output delta - target delta||
    note: str = ""


def check_truncation(rank, energy, svd: str, seed, *, what: str) -> None:
    """Exactly one of a rank >= 1 and an energy fraction in (0, 1]; a known SVD; a valid seed."""
    if rank is not None and energy is not None:
        raise OptionError("--rank and --energy both given; pass one of them")
    if rank is None and energy is None:
        raise OptionError(f"{what} needs --rank R or --energy E for the result")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise OptionError(f"--rank {rank!r}: give a whole number >= 1")
    if energy is not None and not 0 < energy <= 1:
        raise OptionError(f"--energy {energy!r}: give the fraction of the delta's energy "
                          "to keep, 0 < E <= 1 (e.g. 0.99)")
    if svd not in SVD_CHOICES:
        raise OptionError(f"unknown --svd {svd!r}; choose {', '.join(SVD_CHOICES)}")
    if svd == "randomized" and rank is None:
        raise OptionError("--svd randomized needs --rank (an --energy target needs the "
                          "whole spectrum: use --svd exact)")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise OptionError(f"--seed {seed!r}: give a whole number 0 <= seed < 2**31")


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """The generator of one tensor's random draws, seeded with ``crc32("<seed>:<name>")``:
    independent of the other tensors (torch's CPU generator keeps only 32 bits of a seed)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def check_factors(name: str, b: torch.Tensor, a: torch.Tensor, wide: tuple[torch.Tensor, ...], *,
                  cause: str = "lower --weights") -> None:
    """The output factors ``b`` and ``a`` of ``name``, cast from ``wide`` (the same factors in
    float64), must be finite: a refusal naming the tensor and the dtype that cannot hold them."""
    hint = cause if b.dtype == torch.float32 else f"{cause}, or use --dtype fp32"
    for label, cast, original in (("lora_B", b, wide[0]), ("lora_A", a, wide[1])):
        check_cast(f"{name} ({label})", original, cast, str(cast.dtype).removeprefix("torch."),
                   hint=hint)


def summarize(results: list[TensorResult]) -> dict:
    """Per-tensor and total fraction of the target energy kept and relative error.

    ``energy_kept = 1 - (error / norm)^2``: the share of ``||target||^2`` the output explains
    (for a truncated SVD, the kept singular values' share)."""
    def fractions(norm2: float, error2: float) -> dict:
        if norm2 == 0:
            return {"energy_kept": 1.0 if error2 == 0 else 0.0, "relative_error": 0.0}
        return {"energy_kept": 1 - error2 / norm2, "relative_error": (error2 / norm2) ** 0.5}

    rows = [{"name": r.name, "shape": list(r.shape), "rank": r.rank, "note": r.note,
             "delta_norm": r.target_norm, **fractions(r.target_norm ** 2, r.error ** 2)}
            for r in results]
    total = fractions(sum(r.target_norm ** 2 for r in results), sum(r.error ** 2 for r in results))
    return {"tensors": rows, "total": total}
