"""The fast CPU fold (kernels/fold.py, reused buffers) against the pure-torch reference: bit for
bit, including when one Buffers object serves tensors of different shapes in turn."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adaptertools as at
import adaptertools.kernels.fold as fast
from adaptertools.adapter import LoraWeight
from adaptertools.kernels.reference import Contribution, merge_stacked, merge_weighted

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def contribution(rows: int, cols: int, rank: int, gen: torch.Generator, factor: float,
                 dtype=torch.float32) -> Contribution:
    w = LoraWeight(a=(torch.randn(rank, cols, generator=gen) / cols ** 0.5).to(dtype),
                   b=(torch.randn(rows, rank, generator=gen) * 0.05).to(dtype),
                   scale=float(torch.rand(1, generator=gen)) * 4 + 0.1)
    return Contribution(w, factor)


SHARED = fast.Buffers()    # reused across examples, as the engine reuses it across tensors


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 40), count=st.integers(1, 3),
       dtype=st.sampled_from(DTYPES),
       out=st.sampled_from(DTYPES), factor_dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1), stacked=st.booleans())
def test_fast_fold_is_bit_identical_to_reference(rows, cols, count, dtype, out, factor_dtype,
                                                 seed, stacked):
    """Any shape, several adapters, weights != 1, every dtype pairing, weighted and stacked."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, cols, generator=gen) * 0.02).to(dtype)
    contributions = [contribution(rows, cols, r, gen, f, factor_dtype)
                     for r, f in zip((1, 4, 7), (1.0, 0.7, -1.3))][:count]
    assert fast.supports(weight, contributions)
    buffers = SHARED
    if stacked:
        got = weight
        for c in contributions:
            got = fast.fold_linear(got, [c], got.dtype, buffers)
        got, want = got.to(out), merge_stacked(weight, contributions, out)
    else:
        got = fast.fold_linear(weight, contributions, out, buffers)
        want = merge_weighted(weight, contributions, out)
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_fold_at_model_sizes(dtype):
    """Realistic shapes (BLAS's large-matrix paths, several row blocks with and without a short
    tail), after the buffers served a larger tensor: bit for bit the whole-tensor reference."""
    gen = torch.Generator().manual_seed(3)
    buffers = fast.Buffers()
    buffers.scratch(2000, 2000)
    for rows, cols, ranks in ((1408, 1024, (16,)), (2300, 700, (8, 3)), (5632, 256, (64,)),
                              (1100, 2048, (1,))):
        weight = (torch.randn(rows, cols, generator=gen) * 0.02).to(dtype)
        contributions = [contribution(rows, cols, r, gen, f) for r, f in zip(ranks, (1.0, 0.6))]
        assert len(fast.row_blocks(rows, cols)) > 1
        got = fast.fold_linear(weight, contributions, dtype, buffers)
        assert torch.equal(got, merge_weighted(weight, contributions, dtype)), (rows, cols, ranks)
        assert buffers.blocked_ok[(rows, cols, sum(ranks))]      # this machine: blocks agree


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5000), cols=st.integers(1, 9000))
def test_row_blocks_cover_every_row_once_and_are_never_short(rows, cols):
    blocks = fast.row_blocks(rows, cols)
    assert blocks[0][0] == 0 and blocks[-1][1] == rows
    assert all(stop == start for (_, stop), (start, _) in zip(blocks, blocks[1:]))
    assert len(blocks) == 1 or all(stop - start >= fast.MIN_BLOCK_ROWS for start, stop in blocks)


def test_blas_that_sums_blocks_differently_falls_back_to_whole_products(monkeypatch):
    """On a CPU where a block of rows is summed in another order than the whole matrix, the
    once-per-shape check sends that shape through one whole product: still the reference."""
    gen = torch.Generator().manual_seed(5)
    weight = (torch.randn(1300, 1024, generator=gen) * 0.02).to(torch.bfloat16)
    contributions = [contribution(1300, 1024, 16, gen, 1.0)]
    calls = []

    def mismatch(b, a, blocks):
        calls.append(len(blocks))
        return False

    monkeypatch.setattr(fast, "_blocks_match", mismatch)
    buffers = fast.Buffers()
    want = merge_weighted(weight, contributions, torch.bfloat16)
    for _ in range(2):
        assert torch.equal(fast.fold_linear(weight, contributions, torch.bfloat16, buffers), want)
    assert calls == [len(fast.row_blocks(1300, 1024))]            # checked once per shape
    assert buffers.blocked_ok == {(1300, 1024, 16): False}


def test_unsupported_layouts_stay_on_the_reference():
    gen = torch.Generator().manual_seed(0)
    plain = contribution(8, 6, 2, gen, 1.0)
    for change in (dict(layer="embedding"), dict(layer="conv1d"),
                   dict(magnitude=torch.ones(8))):
        w = LoraWeight(**{**plain.weight.__dict__, **change})
        assert not fast.supports(torch.zeros(8, 6), [Contribution(w)])
    assert fast.supports(torch.zeros(8, 6), [plain])
    assert not fast.supports(torch.zeros(8, 6, dtype=torch.float64), [plain])


def test_merge_files_identical_with_and_without_the_fast_fold(tmp_path, monkeypatch):
    """Whole merges (weighted, three adapters, bf16 base): the engine's output does not depend
    on which fold ran."""
    from adaptertools.tiny import TinyLlama, make_adapter, make_base

    spec = TinyLlama()
    base = make_base(tmp_path / "base", spec, dtype=torch.bfloat16)
    adapters = []
    for seed in range(3):
        at.save(make_adapter(spec, rank=4 + seed, seed=seed), tmp_path / f"a{seed}", format="peft")
        adapters.append(tmp_path / f"a{seed}")
    at.merge(base, adapters, tmp_path / "fast", weights=[0.5, -1.0, 2.0])
    import adaptertools.kernels.folding as folding

    monkeypatch.setattr(folding, "fast_fold_supports", lambda *args: False)
    at.merge(base, adapters, tmp_path / "reference", weights=[0.5, -1.0, 2.0])
    fast_bytes = (tmp_path / "fast" / "model.safetensors").read_bytes()
    assert fast_bytes == (tmp_path / "reference" / "model.safetensors").read_bytes()
    assert fast_bytes != (base / "model.safetensors").read_bytes()
