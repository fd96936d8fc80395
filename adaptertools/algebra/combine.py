"""Adapter algebra: several LoRA adapters -> one new adapter (``adaptertools combine``).

Every method acts on each adapter's delta ``s_i * B_i @ A_i`` (stored-weight layout, FORMATS.md
"Multi-adapter maths"), never on A and B separately as PEFT's ``add_weighted_adapter`` does:

- ``cat``: exact. Ranks concatenated, ``B = [w_1 s_1 B_1, ..., w_n s_n B_n]``,
  ``A = [A_1; ...; A_n]``: ``B @ A`` is the weighted sum itself.
- ``svd``: the weighted sum truncated to ``rank`` (or the fewest ranks keeping ``energy``),
  from the QR core of the stacked factors (kernels/lowrank.py): no (rows, cols) product.
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: PEFT's definitions
  (``peft.utils.merge_utils`` 0.21.2, after Yadav et al. 2023 for TIES and Yu et al. 2024 for
  DARE) applied to the full deltas, then factored back by truncated SVD. TIES: keep each delta's
  top ``density`` fraction by magnitude, elect a sign per element by the sign of the sum of the
  trimmed deltas, average the weighted entries that agree with it (divided by their count).
  DARE: keep each element with probability ``density`` and divide by ``density``; the masks are
  drawn from a generator seeded by ``seed`` and the tensor name (``tensor_generator``), one
  ``torch.rand`` of the tensor's shape per adapter in order, so results repeat.

Every output tensor has scale 1 (PEFT then gets ``lora_alpha = r``, with rank/alpha patterns
where ranks differ, and no rsLoRA), ``lora_bias`` is the weighted sum of the inputs' biases,
DoRA adapters are combined only through their full delta ``W' - W`` (``materialize`` with the
base weights), and modules_to_save tensors are carried when they do not conflict.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import reduce

import torch

from ..adapter import Adapter, LoraWeight
from ..errors import OptionError, UnsupportedError
from ..kernels.fold import all_finite
from ..kernels.lowrank import (
    choose_rank,
    product_norm,
    product_svd,
    split_factors,
    stack_factors,
    truncate_matrix,
)
from ..kernels.reference import apply_lora, lora_delta
from .common import (
    TensorResult,
    check_factors,
    check_truncation,
    tensor_generator,
)

METHODS = ("cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class Options:
    method: str = "cat"
    weights: tuple[float, ...] = ()
    rank: int | None = None
    energy: float | None = None
    density: float | None = None
    seed: int = 0
    svd: str = "auto"
    materialize: bool = False
    dtype: torch.dtype | None = None     # factor dtype; None: the inputs' widest


@dataclass(frozen=True)
class Term:
    """One adapter's share of one tensor."""

    adapter: int
    weight: float          # the user's weight (--weights)
    lora: LoraWeight


def check_options(options: Options, count: int) -> None:
    """Raise OptionError (misuse) for options that do not fit ``options.method``."""
    method, density = options.method, options.density
    if method not in METHODS:
        raise OptionError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if count < 1:
        raise OptionError("no adapters given; pass at least one")
    if method == "cat" and (options.rank is not None or options.energy is not None):
        raise OptionError("--method cat is exact (ranks add up); drop --rank/--energy or "
                          "use --method svd to truncate")
    if method != "cat":
        check_truncation(options.rank, options.energy, options.svd, options.seed, what=method)
    if method in PRUNING and (density is None or not 0 < density <= 1):
        raise OptionError(f"--method {method} needs --density D with 0 < D <= 1 (the "
                          f"fraction of each delta's entries kept), got {density!r}")
    if method not in PRUNING and density is not None:
        raise OptionError(f"--density applies to {', '.join(PRUNING)} only; drop it")


# ----------------------------------------------------------------------------- gathering

def gather_terms(adapters: list[Adapter], names: list[str],
                 weights: tuple[float, ...]) -> dict[str, list[Term]]:
    """Tensor name -> the adapters' terms, checked to have one layout per tensor."""
    terms: dict[str, list[Term]] = {}
    for i, adapter in enumerate(adapters):
        for name, lora in adapter.weights.items():
            terms.setdefault(name, []).append(Term(i, weights[i], lora))
    for name, group in terms.items():
        first = group[0]
        for term in group[1:]:
            layout, expected = _layout(term.lora), _layout(first.lora)
            if layout != expected:
                raise UnsupportedError(
                    f"{name}: {names[term.adapter]} has a {layout[0]} delta of shape {layout[1]} "
                    f"but {names[first.adapter]} has a {expected[0]} delta of shape "
                    f"{expected[1]}; combine adapters trained on the same base model")
    return dict(sorted(terms.items()))


def _layout(lora: LoraWeight) -> tuple[str, tuple[int, ...]]:
    return lora.layer, lora.stored_shape


def _check_kinds(terms: dict[str, list[Term]], names: list[str], options: Options) -> None:
    """LoHa/LoKr deltas (kernels/deltas.py) are not B @ A: ``cat`` cannot hold them; ``svd`` and
    the pruning methods go through their dense deltas, truncated to the rank asked for."""
    from ..kernels.deltas import exactly_low_rank, kind

    for name, group in terms.items():
        for t in group:
            if t.lora.layer == "param":      # PEFT target_parameters (formats/peft_params.py)
                raise UnsupportedError(
                    f"{name}: {names[t.adapter]} is a {kind(t.lora).name} (one LoRA per expert "
                    "of a fused tensor), which combine does not re-factor yet; merge it into "
                    "its base (adaptertools merge)")
            if not exactly_low_rank(t.lora) and options.method == "cat":
                raise UnsupportedError(
                    f"{name}: {names[t.adapter]} is a {kind(t.lora).name} delta "
                    f"({kind(t.lora).formula}), not B @ A, so --method cat cannot hold it; "
                    "take a LoRA of it by SVD: --method svd --rank R (or --energy E), which "
                    "reports how much of the delta it keeps")


def check_dora(terms: dict[str, list[Term]], names: list[str], options: Options,
               has_base: bool) -> list[str]:
    """Names of the tensors with a DoRA term; refuse them unless they can be materialized."""
    dora = [name for name, group in terms.items() if any(t.lora.magnitude is not None
                                                         for t in group)]
    if not dora:
        return dora
    term = next(t for t in terms[dora[0]] if t.lora.magnitude is not None)
    where = f"{names[term.adapter]}: {dora[0]} is DoRA"
    if not options.materialize or not has_base:
        raise UnsupportedError(f"{where}; its delta depends on the base weight, so combining it "
                               "needs --materialize --base MODEL (the HF base folder)")
    if options.method == "cat":
        raise UnsupportedError(f"{where}; a DoRA delta is not low-rank, so cat cannot be exact; "
                               "use --method svd with --rank or --energy")
    return dora


def combine_replacements(adapters: list[Adapter], names: list[str]) -> dict[str, torch.Tensor]:
    """modules_to_save tensors of every adapter; the same tensor with two values is an error.
    Two saved copies of the training base (copies.py) that are the same weight in different
    dtypes agree: the finer one is kept."""
    from ..copies import same_weight, saved_copies
    from ..dtypes import PRECISION

    out: dict[str, torch.Tensor] = {}
    owner: dict[str, int] = {}
    for i, adapter in enumerate(adapters):
        copies = saved_copies(adapter)
        for name, tensor in adapter.replacements.items():
            if name in out and name in copies and name in saved_copies(adapters[owner[name]]) \
                    and same_weight(tensor, out[name]):
                if PRECISION.get(tensor.dtype, 0) > PRECISION.get(out[name].dtype, 0):
                    out[name], owner[name] = tensor, i
                continue
            if name in out and not (out[name].shape == tensor.shape and
                                    torch.equal(out[name], tensor.to(out[name].dtype))):
                raise UnsupportedError(
                    f"{name}: {names[owner[name]]} and {names[i]} both replace it "
                    "(modules_to_save) with different values; a combination cannot hold both: "
                    "drop it from one adapter")
            out.setdefault(name, tensor)
            owner.setdefault(name, i)
    return out


# ----------------------------------------------------------------------------- one tensor

def check_sum(name: str, group: list[Term], *tensors: torch.Tensor) -> None:
    """The weighted sum of ``group``'s deltas (as ``tensors``: its float64 factors or the full
    target) must be finite: the inputs are (load refuses NaN/Inf), so only --weights times the
    scales can overflow it."""
    if all(all_finite(t) for t in tensors):
        return
    weights = ", ".join(f"{t.weight:g}" for t in group)
    scales = ", ".join(f"{t.lora.scale:g}" for t in group)
    raise UnsupportedError(f"{name}: the weighted sum of the adapters' deltas overflows (--weights "
                           f"{weights}; scales {scales}); lower --weights")


def out_dtype(group: list[Term], options: Options) -> torch.dtype:
    if options.dtype is not None:
        return options.dtype
    from ..adapter import tensor_fields

    return reduce(torch.promote_types, [t.dtype for term in group
                                        for t in tensor_fields(term.lora).values()
                                        if t.is_floating_point()])


def factored_terms(group: list[Term]):
    """``(w * s, b, a)`` per non-zero term: the weighted sum is ``X @ Y`` of their stacks."""
    return [(t.weight * t.lora.scale, t.lora.b, t.lora.a) for t in group if t.weight != 0]


def combine_factored(name: str, group: list[Term], options: Options):
    """cat or svd from the factors: (b, a, result) in float64."""
    terms = factored_terms(group)
    x, y = stack_factors(terms)                          # (rows, R), (R, cols)
    check_sum(name, group, x, y)
    shape = group[0].lora.stored_shape
    if options.method == "cat":
        return x, y, TensorResult(name, shape, x.shape[1], product_norm(x, y), 0.0)
    u, s, vh = product_svd(x, y)
    total = float((s ** 2).sum())
    k = choose_rank(s, rank=options.rank, energy=options.energy)
    b, a = split_factors(u, s, vh, k)
    return b, a, TensorResult(name, shape, k, total ** 0.5, 0.0)


def full_delta(term: Term, base_weight: torch.Tensor | None) -> torch.Tensor:
    """The term's delta in float64, (rows, cols): ``s B @ A``, or ``W' - W`` for DoRA."""
    from ..kernels.deltas import delta

    lora = term.lora
    if not isinstance(lora, LoraWeight):             # LoHa, LoKr: their dense delta
        return delta(lora, torch.float64)
    if lora.magnitude is None:
        return lora_delta(lora, torch.float64)
    weight = base_weight.double().reshape(lora.shape)
    return apply_lora(weight, lora, torch.float64) - weight


def prune_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude (PEFT's top-k)."""
    if density >= 1:
        return delta
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[torch.topk(delta.abs().reshape(-1), int(density * delta.numel())).indices] = True
    return delta * keep.view(delta.shape)


def prune_random(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, rescale the kept by 1 / density."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    return delta * keep / density


def merge_pruned(deltas: list[torch.Tensor], weights: list[float], method: str, density: float,
                 generator: torch.Generator) -> torch.Tensor:
    """PEFT's ties / dare_linear / dare_ties / magnitude_prune on full deltas (n of (rows, cols))."""
    if method in ("ties", "magnitude_prune"):
        pruned = torch.stack([prune_magnitude(d, density) for d in deltas])
    else:
        pruned = torch.stack([prune_random(d, density, generator) for d in deltas])
    weighted = pruned * torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1)
    if method in ("magnitude_prune", "dare_linear"):
        return weighted.sum(dim=0)
    majority = torch.where(pruned.sum(dim=0) >= 0, 1.0, -1.0).to(torch.float64)
    agree = pruned.sign() == majority                    # pruned-away entries (0) never agree
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def combine_full(name: str, group: list[Term], options: Options,
                 base_weight: torch.Tensor | None):
    """Any method through the full deltas, truncated by SVD: (b, a, target) in float64."""
    deltas = [full_delta(t, base_weight) for t in group]
    weights = [t.weight for t in group]
    generator = tensor_generator(options.seed, name)
    if options.method in PRUNING:
        target = merge_pruned(deltas, weights, options.method, options.density, generator)
    else:                                                # svd of a materialized DoRA sum
        target = sum(w * d for w, d in zip(weights, deltas))
    check_sum(name, group, target)
    b, a = truncate_matrix(target, rank=options.rank, energy=options.energy, svd=options.svd,
                           generator=generator)
    return b, a, target


def combine_bias(group: list[Term], dtype: torch.dtype) -> torch.Tensor | None:
    """``sum_i w_i s_i bias_i``: the lora_bias of an output with scale 1."""
    terms = [t.weight * t.lora.scale * t.lora.bias.double() for t in group if t.lora.bias is not None]
    return sum(terms).to(dtype) if terms else None


def combine_tensor(name: str, group: list[Term], options: Options,
                   base_weight: torch.Tensor | None = None):
    """One tensor's output LoraWeight (None when its combined delta is zero) and its result."""
    first, dtype = group[0].lora, out_dtype(group, options)
    shape = first.stored_shape
    use_full = options.method in PRUNING or base_weight is not None or \
        any(not isinstance(t.lora, LoraWeight) for t in group)
    if not use_full and not factored_terms(group):
        return None, TensorResult(name, shape, 0, 0.0, 0.0, "all weights are 0; left out")
    if use_full:
        wide = combine_full(name, group, options, base_weight)
        target = wide[2]
        b, a = wide[0].to(dtype), wide[1].to(dtype)
        check_factors(name, b, a, wide[:2])
        norm = float(torch.linalg.matrix_norm(target))
        error = float(torch.linalg.matrix_norm(target - b.double() @ a.double()))
        result = TensorResult(name, shape, b.shape[1], norm, error)
    else:
        *wide, result = combine_factored(name, group, options)
        b, a = wide[0].to(dtype), wide[1].to(dtype)
        check_factors(name, b, a, tuple(wide))
        x, y = stack_factors([(1.0, b, a)] + [(-c, bi, ai) for c, bi, ai in factored_terms(group)])
        result = replace(result, error=product_norm(x, y))
    if result.target_norm == 0:
        return None, replace(result, rank=0, note="the combined delta is zero; left out")
    out = LoraWeight(a=a, b=b, scale=1.0, layer=first.layer, bias=combine_bias(group, dtype),
                     weight_shape=first.weight_shape if first.layer == "conv" else None)
    return out, result


def fill_biases(weights: dict[str, LoraWeight]) -> dict[str, LoraWeight]:
    """PEFT's lora_bias is one switch: once any tensor has one, give the others zeros (exact)."""
    if not any(w.bias is not None for w in weights.values()):
        return weights
    return {name: w if w.bias is not None or w.layer == "embedding" else
            replace(w, bias=torch.zeros(w.outputs, dtype=w.b.dtype)) for name, w in weights.items()}


# ----------------------------------------------------------------------------- the whole adapter

def read_base_weights(base, wanted: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The base tensors DoRA needs, read one at a time from an HF safetensors base."""
    from ..merging.bases import open_base
    from .extract import read_float

    checkpoint = open_base(base)
    if checkpoint.kind != "safetensors":
        raise UnsupportedError(f"{base}: --materialize reads the base weights from an HF "
                               "safetensors model; pass the HF folder, not a GGUF file")
    entries = checkpoint.entries()
    out = {}
    for name, shape in wanted.items():
        entry = entries.get(name)
        if entry is None or tuple(entry.shape) != tuple(shape):
            found = "missing" if entry is None else f"of shape {tuple(entry.shape)}"
            raise UnsupportedError(f"{base}: {name} is {found}, the DoRA adapter needs shape "
                                   f"{tuple(shape)}; pass the base the adapter was trained on")
        out[name] = read_float(checkpoint.folder, entry)
    return out


def combine_adapters(adapters: list[Adapter], names: list[str], options: Options, *,
                     base=None) -> tuple[Adapter, list[TensorResult], list[str]]:
    """The combined adapter, one result per tensor, and warnings."""
    check_options(options, len(adapters))
    for name, adapter in zip(names, adapters):
        if adapter.token_rows:      # rows that replace, not deltas (kernels/token_rows.py)
            raise UnsupportedError(f"{name}: holds trained token rows (PEFT trainable tokens, "
                                   f"{next(iter(adapter.token_rows))}), which combine's "
                                   "methods do not take; merge it into its base instead")
    terms = gather_terms(adapters, names, options.weights)
    _check_kinds(terms, names, options)
    dora = check_dora(terms, names, options, base is not None)
    bases = read_base_weights(base, {n: terms[n][0].lora.stored_shape for n in dora}) if dora \
        else {}
    replacements = combine_replacements(adapters, names)
    weights, results, warnings = {}, [], []
    for name, group in terms.items():
        lora, result = combine_tensor(name, group, options, bases.get(name))
        results.append(result)
        if lora is None:
            warnings.append(f"{name}: {result.note}")
        else:
            weights[name] = lora
    if not weights and not replacements:
        raise UnsupportedError("the combination is empty (every delta is zero); check --weights")
    models = list(dict.fromkeys(a.base_model for a in adapters if a.base_model))
    if len(models) > 1:
        warnings.append(f"the adapters name different base models ({', '.join(models)}); "
                        f"the result says {models[0]}")
    metadata = {"source_format": "adaptertools.combine", "peft_config": _peft_config(adapters),
                "combine": {"method": options.method, "inputs": names,
                            "weights": list(options.weights)}}
    combined = Adapter(fill_biases(weights), replacements, models[0] if models else None, metadata)
    return combined, results, warnings


def _peft_config(adapters: list[Adapter]) -> dict:
    """A fresh PEFT config (the writer derives r, alpha and patterns for scale 1) keeping the
    task type when every PEFT input agrees on it."""
    from ..formats.peft import DEFAULT_CONFIG

    tasks = {a.metadata["peft_config"].get("task_type") for a in adapters
             if isinstance(a.metadata.get("peft_config"), dict)}
    return dict(DEFAULT_CONFIG, task_type=tasks.pop() if len(tasks) == 1 else None)


