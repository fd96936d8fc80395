"""The merge engine's hooks for the Triton kernels: which kernels run (``--kernels``), and the fused
fold of one job when the kernels cover it (else None, and the engine runs the torch reference).

Covered: plain LoRA (no DoRA) on a 2-D view of the weight (linear, Conv1D, 1x1 conv; embeddings in
"weighted" mode), any number of adapters ("weighted": one product of the combined factors, as
``reference.merge_weighted``; "stacked": one kernel per adapter, rounded to the stored dtype after
each, as ``merge_stacked``); GGUF Q8_0 and Q4_0 tensors kept in their type. Everything else (bias
terms, replacements, DoRA, type changes, other block types) takes the torch path.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

from ...errors import OptionError, UnsupportedError
from ..fold import all_finite
from . import available, interpreting

KERNELS = ("auto", "torch", "triton")
FUSED_GGUF = ("Q8_0", "Q4_0")


def resolve_kernels(kernels: str, device: torch.device) -> str:
    """``auto`` -> "triton" on a CUDA device with triton importable, else "torch"; an explicit
    "triton" that cannot run raises (on the CPU it runs only under TRITON_INTERPRET=1, for tests)."""
    if kernels not in KERNELS:
        raise OptionError(f"--kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels == "auto":
        return "triton" if device.type == "cuda" and available() else "torch"
    if kernels == "triton":
        if not available():
            raise UnsupportedError("--kernels triton: triton is not installed; pip install "
                                   "'adaptertools[triton]', or use --kernels torch")
        if device.type != "cuda" and not interpreting():
            raise OptionError("--kernels triton needs --device cuda (or TRITON_INTERPRET=1, "
                              "triton's slow CPU interpreter); use --kernels torch on the CPU")
    return kernels


def _plain(contributions, mode: str) -> bool:
    from ..reference import _pointwise_conv

    from ...adapter import LoraWeight

    for c in contributions:
        w = c.weight
        if not isinstance(w, LoraWeight) or w.magnitude is not None or (w.layer == "conv" and not _pointwise_conv(w.weight_shape)):
            return False
        if w.layer == "embedding" and mode == "stacked":     # PEFT rounds the delta first
            return False
    return bool(contributions)


def _factors(contributions) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(a (r, cols), b (rows, r), s) per kernel launch for "weighted": one, from the combined factors."""
    from ..reference import combined_weight

    if len(contributions) == 1:
        c = contributions[0]
        scale = c.weight.scale * c.factor if c.factor != 1.0 else c.weight.scale
        return [(c.weight.a, c.weight.b, scale)]
    w = combined_weight(list(contributions))
    return [(w.a, w.b, 1.0)]


@contextmanager
def _interpreter_quiet():
    """Under TRITON_INTERPRET=1 the kernels run in numpy, which warns about the Inf/NaN values a
    refused merge produces (the engine checks the results and says so itself); on a GPU the
    kernels never warn."""
    if not interpreting():
        yield
        return
    import numpy as np

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def fold_float_terms(contributions, tensor: torch.Tensor, stacked: bool, device: torch.device,
                     out_dtype: torch.dtype) -> torch.Tensor | None:
    """``contributions`` folded into ``tensor`` (the result on the CPU, shaped like ``tensor``)
    through ``fold.fold_float``, or None where the kernels do not cover them (kernels/folding.py
    then runs the torch path)."""
    contributions = list(contributions)
    mode = "stacked" if stacked else "weighted"
    if not _plain(contributions, mode) or \
            tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    from .fold import fold_float

    shape = contributions[0].weight.shape                    # (rows, cols), the stored layout 2-D
    weight = tensor.to(device).reshape(shape)
    with _interpreter_quiet():
        if mode == "stacked":
            for c in contributions:         # rounded to the stored dtype after each, as PEFT does
                (a, b, s), = _factors([c])
                weight = fold_float(weight, a, b, s, tensor.dtype)
            result = weight.to(out_dtype)
        else:
            (a, b, s), = _factors(contributions)
            result = fold_float(weight, a, b, s, out_dtype)
    return result.reshape(tensor.shape).to("cpu").contiguous()


def fold_gguf_job(job, source: torch.Tensor, mode: str, device: torch.device):
    """(encoded bytes on the CPU, Survival) for a keep-type Q8_0/Q4_0 job, or None."""
    contributions = list(job.contributions)
    if (job.source.dtype not in FUSED_GGUF or job.out_dtype != job.source.dtype
            or job.replacement is not None or job.token_rows or len(job.shape) != 2 or not _plain(contributions, mode)
            or (mode == "stacked" and len(contributions) > 1)):
        return None
    from ..survival import Survival
    from .blocks import Q4_0_BYTES, Q8_0_BYTES, fold_gguf

    (a, b, s), = _factors(contributions)
    with _interpreter_quiet():
        encoded, stats = fold_gguf(source.to(device), job.out_dtype, tuple(job.shape), a, b, s)
    # each block is an fp16 scale d (its first 2 bytes) times small integers: its values are
    # finite exactly when d is (Inf/NaN merged values, or a block too large for fp16, give none)
    block = {"Q8_0": Q8_0_BYTES, "Q4_0": Q4_0_BYTES}[job.out_dtype]
    if not all_finite(encoded.reshape(-1, block)[:, :2].contiguous().view(torch.float16)):
        from ..quant.codec import dequantize
        from ..survival import check_finite

        check_finite(job, dequantize(encoded.to("cpu"), job.out_dtype, tuple(job.shape)),
                     base=dequantize(source.to("cpu"), job.source.dtype, tuple(job.shape)))
    ir, ii, rr, err = stats.double().sum(0).tolist()
    cosine = ir / (ii ** 0.5 * rr ** 0.5) if ii and rr else (1.0 if ii == rr else 0.0)
    rel_error = (err ** 0.5) / ii ** 0.5 if ii else float(rr > 0)
    return encoded.to("cpu").reshape(source.shape), Survival(job.name, job.out_dtype, cosine, rel_error)
