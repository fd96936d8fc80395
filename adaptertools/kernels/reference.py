"""Pure-torch ground truth for what a LoRA does to a weight. Slow, simple, exact in its dtype."""

from __future__ import annotations

import torch

from ..adapter import LoraWeight


def lora_delta(w: LoraWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale * b @ a`` in ``dtype``, (rows, cols): the stored weight's layout viewed 2-D."""
    return (w.b.to(dtype) @ w.a.to(dtype)) * w.scale


def apply_lora(weight: torch.Tensor, w: LoraWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The merged weight in ``dtype``, shaped like ``weight``; DoRA by PEFT's rule.

    DoRA: V = W + delta; W' = (m / ||V||) * V, the norm taken along ``w.norm_dim`` of the 2-D view
    (per output row for Linear/Conv, per column for Embedding and GPT-2 Conv1D).
    """
    merged = weight.to(dtype).reshape(w.shape) + lora_delta(w, dtype)
    if w.magnitude is not None:
        norm = torch.linalg.vector_norm(merged, dim=w.norm_dim, keepdim=True)
        magnitude = w.magnitude.to(dtype)
        magnitude = magnitude.reshape(-1, 1) if w.norm_dim == 1 else magnitude.reshape(1, -1)
        merged = merged * (magnitude / norm)
    return merged.reshape(weight.shape)


def apply_lora_bias(bias: torch.Tensor, w: LoraWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The base bias plus ``scale * lora_bias`` (PEFT's lora_bias merge)."""
    return bias.to(dtype) + w.bias.to(dtype) * w.scale
