"""The read path's memory savings keep the numbers: encoded merges score survival a block of rows
at a time (merging/encoded.changes_survival) and give the score of the one-shot
``quantized.survival`` on the full-size differences."""

from __future__ import annotations

import pytest
import torch

from adaptertools.merging import encoded
from adaptertools.merging.quantized import survival


@pytest.mark.parametrize("shape", [(600, 96), (3, 130, 40), (7,)])
def test_row_blocked_survival_equals_the_one_shot_score(shape, monkeypatch):
    monkeypatch.setattr(encoded, "SCORE_ROWS", 64)          # several steps, a ragged last one
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen)
    merged = weight + 0.05 * torch.randn(shape, generator=gen)
    realized = merged + 0.01 * torch.randn(shape, generator=gen)
    got = encoded.changes_survival("w", "FP8_E4M3", merged, realized, weight)
    want = survival("w", "FP8_E4M3", merged - weight, realized - weight)
    # fp32 sums of up to 600 x 96 products: relative rounding about 1e-7 * sqrt(n) per sum
    assert got.cosine == pytest.approx(want.cosine, abs=1e-5)
    assert got.rel_error == pytest.approx(want.rel_error, rel=1e-4)
    assert (got.name, got.type) == ("w", "FP8_E4M3")


def test_row_blocked_survival_of_changes_that_vanish():
    weight = torch.ones(300, 8)
    same = encoded.changes_survival("w", "T", weight.clone(), weight.clone(), weight)
    assert (same.cosine, same.rel_error) == (1.0, 0.0)        # nothing intended, nothing done
    erased = encoded.changes_survival("w", "T", weight + 1, weight.clone(), weight)
    assert (erased.cosine, erased.rel_error) == (0.0, 1.0)    # intended, nothing survived
    want = survival("w", "T", torch.zeros(300, 8), torch.ones(300, 8))
    got = encoded.changes_survival("w", "T", weight.clone(), weight + 1, weight)
    assert (got.cosine, got.rel_error) == (want.cosine, want.rel_error)
