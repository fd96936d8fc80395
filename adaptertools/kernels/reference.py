"""Pure-torch ground truth for what LoRA adapters do to a weight. Simple, and exact in its dtype.

The operation order follows PEFT's own merge (``LoraLayer.get_delta_weight`` and
``merge(safe_merge=False)``) so that a merge through these functions is bit-identical to
``merge_and_unload`` on CPU: factors in fp32, ``transpose(B @ A) * scale`` with B and A in
PEFT's own layout, the weight promoted to fp32, added, rounded once to the stored dtype. One
exception, PEFT's too: a plain (non-DoRA) embedding delta is rounded to the stored dtype before it
is added (``Embedding.merge`` adds ``delta.to(orig_dtype)``), so a bf16 embedding is rounded twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapter import LoraWeight
from . import deltas
from .deltas import Delta, _pointwise_conv, conv_delta, lora_delta  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Contribution:
    """One adapter's share of one base tensor."""

    weight: Delta              # adapter.LoraWeight, or a LoHa/LoKr delta (kernels/deltas.py)
    factor: float = 1.0        # the user's weight for this adapter (--weights)
    adapter: int = 0           # position in the adapter list, for reports


def dora_rescale(merged: torch.Tensor, w: LoraWeight) -> torch.Tensor:
    """DoRA: W' = (m / ||V||) * V, the norm along ``w.norm_dim`` of the 2-D view V (plus the
    delta's ``norm_eps`` where it has one: LyCORIS's weight_decompose, kernels/deltas.py)."""
    norm = torch.linalg.norm(merged, dim=w.norm_dim)
    if getattr(w, "norm_eps", 0.0):
        norm = norm + w.norm_eps
    factor = w.magnitude.to(merged.dtype) / norm
    factor = factor.view(-1, 1) if w.norm_dim == 1 else factor.view(1, -1)
    return factor * merged


def apply_lora(weight: torch.Tensor, w: Delta, dtype: torch.dtype = torch.float32,
               factor: float = 1.0) -> torch.Tensor:
    """The merged weight in ``dtype``, shaped like ``weight``; DoRA by PEFT's rule. Any delta
    kind: PEFT's LoHa/LoKr merge adds ``get_delta_weight`` to the weight the same way."""
    merged = weight.to(dtype).reshape(w.shape) + deltas.delta(w, dtype, factor)
    if w.magnitude is not None:
        merged = dora_rescale(merged, w)
    return merged.reshape(weight.shape)


def apply_lora_bias(bias: torch.Tensor, w: LoraWeight, dtype: torch.dtype = torch.float32,
                    factor: float = 1.0) -> torch.Tensor:
    """The base bias plus ``factor * scale * lora_bias`` (PEFT's lora_bias merge)."""
    scale = w.scale * factor if factor != 1.0 else w.scale
    return bias.to(dtype) + w.bias.to(dtype) * scale


def rounds_delta_first(w: Delta) -> bool:
    """Does PEFT's merge round this delta to the stored dtype before adding it (so a 16-bit
    weight is rounded twice)? A plain embedding LoRA (``Embedding.merge``: ``weight +=
    delta.to(orig_dtype)``) and a target_parameters LoRA (``ParamWrapper.merge``: ``param +=
    get_delta_weight()``, cast to the parameter's dtype, kernels/param_lora.py) do; a no-op
    for fp32 bases."""
    return w.layer == "param" or (w.layer == "embedding" and w.magnitude is None)


def merge_step(weight: torch.Tensor, c: Contribution) -> torch.Tensor:
    """One adapter folded into ``weight`` in PEFT's order; the result is in ``weight.dtype``.

    This is what ``merge_and_unload`` does to one layer, bit for bit on CPU.
    """
    w = c.weight
    if rounds_delta_first(w):
        delta = deltas.delta(w, torch.float32, c.factor).reshape(weight.shape).to(weight.dtype)
        return weight + delta
    return apply_lora(weight, w, torch.float32, c.factor).to(weight.dtype)


def combined_weight(contributions: list[Contribution]) -> LoraWeight:
    """Several adapters' plain LoRA on one tensor as ONE factor pair of rank R = sum(r_i), so
    that their sum is one matmul: A_i stacked (R, cols), B_i side by side (rows, R), each B_i
    scaled by w_i * s_i in fp32 first; scale 1. (One product and one pass over the weight
    instead of one per adapter; the rounding differs from a sum of separate deltas only by the
    usual fp32 dot-product bound, now over R terms.)"""
    first = contributions[0].weight
    a = torch.cat([c.weight.a.float() for c in contributions], dim=0)             # (R, cols)
    b = torch.cat([c.weight.b.float() * (c.weight.scale * c.factor)
                   for c in contributions], dim=1)                                # (rows, R)
    return LoraWeight(a=a, b=b, scale=1.0, layer=first.layer, weight_shape=first.weight_shape)


def merge_weighted(weight: torch.Tensor, contributions: list[Contribution],
                   out_dtype: torch.dtype) -> torch.Tensor:
    """``W + sum_i w_i * s_i * B_i @ A_i`` accumulated in fp32, rounded once to ``out_dtype``;
    several adapters through one product of their combined factors (``combined_weight``).

    A DoRA adapter rescales the sum; it must then be the only contribution (the planner checks).
    (A merge of ONE adapter runs ``merge_stacked`` instead, PEFT's order: see merge/run.py.)
    """
    merged = weight.to(torch.float32).reshape(contributions[0].weight.shape)
    if len(contributions) > 1 and all(isinstance(c.weight, LoraWeight) for c in contributions):
        merged = merged + lora_delta(combined_weight(contributions), torch.float32)
    else:                       # one adapter, or deltas of other kinds: added one by one
        for c in contributions:
            merged = merged + deltas.delta(c.weight, torch.float32, c.factor)
    dora = [c.weight for c in contributions if c.weight.magnitude is not None]
    if dora:
        merged = dora_rescale(merged, dora[0])
    return merged.reshape(weight.shape).to(out_dtype)


def merge_stacked(weight: torch.Tensor, contributions: list[Contribution],
                  out_dtype: torch.dtype) -> torch.Tensor:
    """Adapters folded one after another, rounding to the stored dtype after each: bit for bit
    PEFT merging the first adapter (merge_and_unload), wrapping the result with the second,
    merging again, and so on. A DoRA norm is thus taken on the weight the previous adapters made.

    (PEFT's merge of several adapters loaded into ONE model, ``merge_and_unload(adapter_names=
    [...])``, takes every DoRA norm on the unmerged base instead; that is not "one after another",
    and differs from this by about the size of a DoRA update.)"""
    for c in contributions:
        weight = merge_step(weight, c)
    return weight.to(out_dtype)


def merge_bias(bias: torch.Tensor, contributions: list[Contribution], out_dtype: torch.dtype,
               *, stacked: bool) -> torch.Tensor:
    """The base bias plus every adapter's lora_bias; stacked rounds after each, like weights."""
    stored = bias.dtype
    for c in contributions:
        bias = apply_lora_bias(bias, c.weight, torch.float32, c.factor)
        if stacked:
            bias = bias.to(stored)
    return bias.to(out_dtype)
