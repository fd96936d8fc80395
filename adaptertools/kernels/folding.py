"""The one fold: what the adapters do to one stored tensor, decided once for every caller (the
float path of merging/run.py, the fp32 side of GGUF and codec-encoded merges).

The decision, in order:

1. A replacement (modules_to_save, a trained copy) takes the source's place; adapters that
   target the same tensor are folded into it.
2. ``kernels="triton"``: the fused kernel where it covers the terms (kernels/triton/engine.py).
3. On the CPU with ``buffers``: the fast fold (kernels/fold.py, the reference's bits in reused
   memory) for plain LoRA on a 2-D weight; "stacked" rounds to the stored dtype after each
   adapter, as PEFT does.
4. Else the reference (kernels/reference.py): weighted, stacked, or a bias's lora_bias terms.

Conv LoRA deltas and DoRA norms run on the caller's torch thread count (``threads``): oneDNN picks
its convolution algorithm, and with it the rounding, by thread count (measured: 7-13 of 160
elements differ from PEFT on one thread), and torch.linalg.norm splits its sum by thread count (a
DoRA embedding (100, 5), norm over the vocabulary: 1 ulp off PEFT on one thread); PEFT runs with
torch's default. Matmuls do not depend on it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch

from .fold import Buffers, fold_linear
from .fold import supports as fast_fold_supports
from .reference import Contribution, merge_bias, merge_stacked, merge_weighted


def fold_tensor(weight: torch.Tensor, contributions, bias_contributions=(), replacement=None, *,
                stacked: bool, out_dtype: torch.dtype, device: torch.device | None = None,
                buffers: Buffers | None = None, pool=None, kernels: str = "torch",
                threads: int | None = None, token_rows=()) -> torch.Tensor:
    """The output tensor (on the CPU, contiguous, ``out_dtype``) of folding ``contributions``
    (and ``bias_contributions``: a bias tensor's lora_bias terms) into ``weight``, or into
    ``replacement`` when given. ``pool`` (take(nbytes) / give(tensor), merging/streams.
    BufferPool) supplies the fast fold's output memory; ``threads``: the caller's torch thread
    count while the engine runs on one (None: leave the count alone). ``token_rows``: trained
    rows that replace the weight's (kernels/token_rows.py); the planner lets nothing else
    touch such a tensor."""
    device = device or torch.device("cpu")
    contributions = list(contributions)
    if token_rows:
        from .token_rows import apply_token_rows

        return apply_token_rows(weight, token_rows, stacked=stacked,
                                out_dtype=out_dtype).to("cpu")
    with _caller_threads(contributions, threads):
        if replacement is not None:
            weight = replacement
        if kernels == "triton" and contributions and replacement is None:
            from .triton.engine import fold_float_terms

            fused = fold_float_terms(contributions, weight, stacked, device, out_dtype)
            if fused is not None:
                return fused
        if device.type == "cpu" and buffers is not None and \
                fast_fold_supports(weight, contributions):
            return _fast(weight, contributions, stacked, out_dtype, buffers, pool)
        if contributions:
            moved = [_to(c, device) for c in contributions]
            merge = merge_stacked if stacked else merge_weighted
            weight = merge(weight.to(device), moved, out_dtype)
        elif bias_contributions:
            weight = merge_bias(weight.to(device), [_to(c, device) for c in bias_contributions],
                                out_dtype, stacked=stacked)
        return weight.to("cpu", out_dtype).contiguous()


def _fast(weight: torch.Tensor, contributions: list[Contribution], stacked: bool,
          out_dtype: torch.dtype, buffers: Buffers, pool) -> torch.Tensor:
    """The reference's arithmetic in reused blocks (kernels/fold.py): same bits, less memory."""
    if not stacked:
        return fold_linear(weight, contributions, out_dtype, buffers,
                           out=_output(pool, weight, out_dtype))
    result = weight
    for c in contributions:      # rounded to the stored dtype after each, as PEFT does
        previous = result
        result = fold_linear(result, [c], result.dtype, buffers,
                             out=_output(pool, result, result.dtype))
        if previous is not weight and pool is not None:
            pool.give(previous)
    if result.dtype != out_dtype:
        previous, result = result, result.to(out_dtype)
        if pool is not None:
            pool.give(previous)
    return result


def _output(pool, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Pooled memory for a fold's result, shaped like ``like`` in ``dtype``."""
    if pool is None:
        return None
    nbytes = like.numel() * torch.empty(0, dtype=dtype).element_size()
    return pool.take(nbytes).view(dtype).view(like.shape)


def _to(contribution: Contribution, device: torch.device) -> Contribution:
    if device.type == "cpu":
        return contribution
    from ..adapter import map_tensors

    return replace(contribution, weight=map_tensors(contribution.weight, lambda t: t.to(device)))


@contextmanager
def _caller_threads(contributions: list[Contribution], threads: int | None):
    """Conv deltas and DoRA norms on the caller's thread count (module docstring)."""
    if threads is None or not any(c.weight.layer == "conv" or c.weight.magnitude is not None
                                  for c in contributions):
        yield
        return
    inside = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(inside)
