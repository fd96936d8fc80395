"""What an adapter holds, computed from its factors without ever forming ``B @ A``."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from .adapter import Adapter, LoraWeight, module_name, nonfinite_tensors, tensor_fields
from .copies import saved_copies
from .light.arrays import all_finite, is_stored

if TYPE_CHECKING:    # the light path (light/) passes light.arrays.Stored factors: numpy float64
    import torch


def delta_singular_values(w: LoraWeight) -> torch.Tensor:
    """Singular values of ``scale * b @ a``, (min(r, rows, cols),), from two thin QRs.

    b = Qb Rb and a.T = Qa Ra give b @ a = Qb (Rb Ra^T) Qa^T, so the spectrum is that of the
    small (r, r) core: O((rows + cols) r^2) work instead of O(rows cols r). Factors held as
    numpy (light.arrays.Stored) take numpy's LAPACK (the same geqrf and gesdd), in float64.
    """
    if is_stored(w.a):
        import numpy as np

        # column-major, as LAPACK takes them (a C-order input costs a transposed copy inside
        # numpy's qr: 10x here); a.T of the C-order (r, cols) a is column-major already
        rb = np.linalg.qr(np.asfortranarray(w.b.double()), mode="r")   # (rows, r) -> Rb (r, r)
        ra = np.linalg.qr(w.a.double().T, mode="r")                    # (cols, r) -> Ra (r, r)
        return np.linalg.svd(rb @ ra.T, compute_uv=False) * abs(w.scale)
    import torch

    _, rb = torch.linalg.qr(w.b.double())      # (rows, r) -> Rb (r, r)
    _, ra = torch.linalg.qr(w.a.double().T)    # (cols, r) -> Ra (r, r)
    return torch.linalg.svdvals(rb @ ra.T) * abs(w.scale)


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised spectrum."""
    total = singular_values.sum()
    if total <= 0:
        return 0.0
    p = singular_values / total
    p = p[p > 0]
    if not hasattr(p, "log"):      # numpy (the light path)
        import numpy as np

        return float(np.exp(-(p * np.log(p)).sum()))
    import torch

    return float(torch.exp(-(p * p.log()).sum()))


def _norm(singular_values) -> float:
    """The Frobenius norm of the delta: the root of its squared singular values' sum."""
    if not hasattr(singular_values, "square"):      # numpy (the light path)
        return float(((singular_values ** 2).sum()) ** 0.5)
    return float(singular_values.square().sum().sqrt())


def _dense_kind_report(name: str, w) -> dict:
    """A LoHa/LoKr row: its kind, the bound on its delta's rank, its norm (deltas.norm)."""
    from .kernels.deltas import kind, norm, rank_bound

    tensors = list(tensor_fields(w).values())
    finite = all(all_finite(t) for t in tensors)
    return {"name": name, "kind": kind(w).name, "layer": w.layer, "shape": list(w.stored_shape),
            "rank": None, "rank_bound": rank_bound(w), "scale": w.scale,
            "dtype": str(tensors[0].dtype).removeprefix("torch."),
            "delta_norm": norm(w) if finite else None, "effective_rank": None,
            "dora": False, "lora_bias": False, "flags": [] if finite else ["nan/inf"]}


def layer_report(name: str, w: LoraWeight) -> dict:
    """One tensor's row; norms are None (JSON null) when the factors hold NaN or Inf. A LoHa or
    LoKr row also says its kind and, instead of a rank, the bound on its delta's rank."""
    if not isinstance(w, LoraWeight):
        return _dense_kind_report(name, w)
    finite = all(all_finite(t) for t in (w.a, w.b))
    sv = delta_singular_values(w) if finite else None
    flags = [] if finite else ["nan/inf"]
    if finite and not w.b.any():
        flags.append("zero B (untrained)")
    return {
        "name": name,
        "layer": w.layer,
        "shape": list(w.stored_shape),
        "rank": w.rank,
        "scale": w.scale,
        "dtype": str(w.a.dtype).removeprefix("torch."),
        "delta_norm": _norm(sv) if sv is not None else None,
        "effective_rank": effective_rank(sv) if sv is not None else None,
        "dora": w.magnitude is not None,
        "lora_bias": w.bias is not None,
        "flags": flags,
    }


# how the field names each kind of delta (LyCORIS's names; LoCon is LoRA on a convolution)
KIND_LABELS = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


def kind_label(w) -> str:
    """LoRA, LoCon, LoHa or LoKr, with ``+DoRA`` where the delta carries DoRA magnitudes: the
    same words for every format's adapters."""
    if isinstance(w, LoraWeight):     # deltas.LORA, named without importing the kernels (torch)
        label = KIND_LABELS["lora"]
    else:
        from .kernels.deltas import kind

        label = KIND_LABELS.get(kind(w).name, kind(w).name)
    if label == "LoRA" and getattr(w, "layer", "") == "conv":
        label = "LoCon"
    return label + ("+DoRA" if getattr(w, "magnitude", None) is not None else "")


def size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _init_warning(adapter: Adapter) -> str | None:
    from .formats.peft import base_modifying_init

    init = base_modifying_init(adapter.metadata.get("peft_config"))
    if init is not None:
        return (f"init_lora_weights={init!r}: fits a modified base only; merge refuses it unless "
                "converted (PEFT's path_initial_model_for_weight_conversion) or merged into the "
                "modified base with --allow-modified-base")
    return None


def adapter_report(adapter: Adapter, *, path: Path, format_name: str, layers: bool) -> dict:
    """The dictionary behind ``adaptertools inspect`` (also its ``--json`` output)."""
    tensors = [t for w in adapter.weights.values() for t in tensor_fields(w).values()] + \
        list(adapter.replacements.values()) + [r.values for r in adapter.token_rows.values()]
    per_layer = [layer_report(n, w) for n, w in adapter.weights.items()]
    problems = [f"NaN/Inf values in {n}" for n in nonfinite_tensors(adapter)]
    zero_b = [r["name"] for r in per_layer if "zero B (untrained)" in r["flags"]]
    if zero_b:
        problems.append(f"all-zero B factor in {len(zero_b)} tensor(s), e.g. {zero_b[0]}: "
                        "the adapter was never trained, its delta is zero")
    init_warning = _init_warning(adapter)
    if init_warning:
        problems.append(init_warning)
    peft_config = adapter.metadata.get("peft_config") or {}
    report = {
        "path": str(path),
        "format": format_name,
        "base_model": adapter.base_model,
        "size_bytes": size_on_disk(path),
        "adapted_tensors": len(adapter.weights),
        # saved copies of the training base (PEFT's base_layer tensors) are not replacements:
        # a merge folds into the base's own tensor where the copy is the same weight
        "replaced_tensors": sorted(adapter.replacements.keys() - saved_copies(adapter)),
        "saved_base_copies": sorted(saved_copies(adapter)),
        "parameters": sum(t.numel() for t in tensors),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
        "ranks": _counts(r["rank"] if r["rank"] is not None else f"<={r['rank_bound']}"
                         for r in per_layer),
        "scales": _counts(w.scale for w in adapter.weights.values()),
        "rslora": bool(peft_config.get("use_rslora", False)),
        "target_modules": sorted(set(target_names([module_name(n) for n in adapter.weights],
                                                  peft_config.get("target_modules")))),
        "layer_kinds": _counts(w.layer for w in adapter.weights.values()),
        "dora": any(w.magnitude is not None for w in adapter.weights.values()),
        "lora_bias": any(w.bias is not None for w in adapter.weights.values()),
        "total_delta_norm": (math.sqrt(sum(r["delta_norm"] ** 2 for r in per_layer))
                             if all(r["delta_norm"] is not None for r in per_layer) else None),
        "problems": problems,
    }
    kinds = [r["kind"] for r in per_layer if "kind" in r]
    if kinds:                   # LoHa / LoKr (LoRA-only reports keep their keys as they were)
        report["delta_kinds"] = _counts(kinds)
    report["kinds"] = _counts(kind_label(w) for w in adapter.weights.values())
    if adapter.token_rows:      # PEFT trainable tokens: rows that replace the base's
        report["trained_token_rows"] = {n: list(r.indices)
                                        for n, r in sorted(adapter.token_rows.items())}
    if layers:
        report["layers"] = per_layer
    return report


def target_names(modules: list[str], configured=None) -> list[str]:
    """How a person names each of ``modules`` (dotted module names), PEFT-style: the entry of
    the adapter's ``target_modules`` list it matches (the longest, other than its full name),
    else its own name from its container on, never a bare index: ``self_attn.q_proj`` ->
    ``q_proj``; a Sequential's ``to_out.0`` -> ``to_out.0``, ``ff.net.0.proj`` -> ``net.0.proj``.
    An index just before the name is a block index (``layers.3.q_proj`` -> ``q_proj``) when
    it varies among the modules of the same shape, else part of the name."""
    configured = [t for t in configured if isinstance(t, str)] \
        if isinstance(configured, (list, tuple)) else []
    parts = [m.split(".") for m in modules]
    varying = _varying_indices(parts)
    names = []
    for module, comps in zip(modules, parts):
        matches = [t for t in configured if t != module and module.endswith("." + t)]
        if matches:
            names.append(max(matches, key=len))
            continue
        start = len(comps) - 1
        while start > 0 and (comps[start].isdigit() or (
                comps[start - 1].isdigit() and start - 1 not in varying[_shape(comps)])):
            start -= 1
        names.append(".".join(comps[start:]))
    return names


def _shape(comps: list[str]) -> tuple[str, ...]:
    return tuple("*" if c.isdigit() else c for c in comps)


def _varying_indices(parts: list[list[str]]) -> dict[tuple[str, ...], set[int]]:
    """For each module shape (indices as ``*``), the index positions whose values differ."""
    seen: dict[tuple[str, ...], dict[int, set[str]]] = {}
    for comps in parts:
        values = seen.setdefault(_shape(comps), {})
        for i, c in enumerate(comps):
            if c.isdigit():
                values.setdefault(i, set()).add(c)
    return {shape: {i for i, v in values.items() if len(v) > 1} for shape, values in seen.items()}


def _counts(values) -> dict:
    """{value: how many}, keys as strings so the dict is valid JSON, most common first."""
    return {str(k): n for k, n in Counter(values).most_common()}
