"""Trained token rows (PEFT trainable tokens) folded into an embedding-like weight.

PEFT 0.21.2's ``TrainableTokensLayer.merge`` (peft/tuners/trainable_tokens/layer.py:185-205)
replaces rows outright: ``merged = weight.index_copy(0, indices, values.to(weight))``, the values
first cast to the stored dtype. So a merge of one adapter with weight 1 is that copy, bit for bit.

A weight ``f`` other than 1, or several adapters in ``weighted`` mode, has no PEFT counterpart;
the rows then move by ``f * (values - W[rows])`` (a replacement is a delta of ``values - W``),
accumulated in fp32 and rounded once, like every other weighted merge. ``stacked`` mode applies
the adapters one after another, rounding to the stored dtype after each, as PEFT would merging
them in turn.
"""

from __future__ import annotations

import torch

from ..adapter import TokenRows


def _rows_index(rows: TokenRows, device: torch.device) -> torch.Tensor:
    return torch.tensor(rows.indices, dtype=torch.long, device=device)


def _step(weight: torch.Tensor, rows: TokenRows, factor: float) -> torch.Tensor:
    """One adapter's rows on ``weight`` (in its dtype), PEFT's copy when ``factor`` is 1."""
    index = _rows_index(rows, weight.device)
    if factor == 1.0:
        return weight.index_copy(0, index, rows.values.to(weight))
    moved = weight.to(torch.float32, copy=True)      # never the caller's tensor, even if fp32
    moved[index] += factor * (rows.values.float() - moved[index])
    return moved.to(weight.dtype)


def apply_token_rows(weight: torch.Tensor, terms, *, stacked: bool,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """``weight`` (vocab, dim) with ``terms`` ((TokenRows, factor, adapter index)) applied, in
    ``out_dtype``, contiguous on the weight's device."""
    terms = list(terms)
    if stacked or len(terms) == 1:
        for rows, factor, _ in terms:
            weight = _step(weight, rows, factor)
        return weight.to(out_dtype).contiguous()
    base = weight.float()
    merged = base.clone()
    for rows, factor, _ in terms:
        index = _rows_index(rows, weight.device)
        merged[index] += factor * (rows.values.float() - base[index])
    return merged.to(out_dtype).contiguous()
