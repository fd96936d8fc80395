"""Merging into quantized GGUF tensors: dequantize, fold in fp32, requantize; and measure how
much of the adapter's change survived the requantization.

A 4-bit grid is coarse next to a typical LoRA update: requantizing W + delta can land most
weights back on the values W already had, erasing the adapter without any error. So every
quantized tensor's merge is scored: the cosine between the intended change ``delta`` and the
realized change ``deq(new) - deq(old)``, and the relative error ``|realized - delta| / |delta|``.
``old`` is the base tensor as the output type stores it (the base's own bytes for a keep-type
merge; the float base quantized to the output type otherwise).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict

import torch

from ..codecs.gguf import dequantize, is_block_type, quantize, roundtrip
from ..kernels.folding import fold_tensor
from ..kernels.survival import Survival, check_finite
from .jobs import Job

# below this median cosine the report warns in plain words
LOW_SURVIVAL = 0.7


def check_output(job: Job, tensor: torch.Tensor, source: torch.Tensor | None) -> None:
    """The engine's check of each output tensor as it is produced (merging/run.py): float
    outputs here, against their ``source`` when it is a float tensor; block-quantized and
    codec-encoded outputs are checked before they are encoded (``fold_gguf``, encoded.py)."""
    kept_encoding = job.group is not None and job.group.out_dtype is None   # FP8 codes, ...
    if job.changed and tensor.is_floating_point() and not kept_encoding:
        float_source = source is not None and source.is_floating_point()
        check_finite(job, tensor, base=source if float_source else None)


def is_quantized(type_name: str) -> bool:
    return is_block_type(type_name)


def needs_codec(job: Job) -> bool:
    """A GGUF job whose input or output is a block-quantized type."""
    return is_quantized(job.source.dtype) or is_quantized(job.out_dtype)


def _scratch(buffers, role: str, job: Job) -> torch.Tensor | None:
    return buffers.named(role, tuple(job.shape)) if buffers is not None and \
        len(job.shape) == 2 else None


def _decode(job: Job, type_name: str, raw: torch.Tensor, out: torch.Tensor | None = None,
            *, copy: bool = False) -> torch.Tensor:
    """``raw`` stored as ``type_name`` -> fp32 (rows, cols), through the GGUF codec; ``copy``: a
    float result the caller may change in place."""
    values = dequantize(raw, type_name, job.shape, name=job.name, out=out)
    if copy and values.data_ptr() == raw.data_ptr():      # an F32 tensor, upcast as itself
        return values.clone()
    return values


def fold_fp32(job: Job, weight: torch.Tensor, mode: str, buffers=None, pool=None, *,
              threads: int | None = None) -> torch.Tensor:
    """The job's adapters (or its replacement) applied to the fp32 ``weight`` (rows, cols), in
    fp32 (kernels/folding.py): the decoded side of every quantized merge (GGUF here,
    codec-encoded HF weights in encoded.py). With ``buffers``, plain LoRA takes the fast fold
    (the reference's bits), its result in memory from ``pool`` when given."""
    replacement = job.replacement.reshape(weight.shape) if job.replacement is not None else None
    return fold_tensor(weight, job.contributions, job.bias_contributions, replacement,
                       stacked=mode == "stacked", out_dtype=torch.float32, buffers=buffers,
                       pool=pool, threads=threads, token_rows=job.token_rows)


def fold_gguf(job: Job, source: torch.Tensor, mode: str, buffers=None, pool=None, *,
              threads: int | None = None) -> tuple[torch.Tensor, Survival | None]:
    """The output bytes of one GGUF job with a quantized side, and its survival score (None for
    tensors the adapters do not change: a ``--quantize-like`` tensor is only converted).
    ``buffers`` (kernels/fold.Buffers) lets plain LoRA take the fast fold (the same bits)."""
    # full-size fp32 temporaries (rows, cols) live in reused buffers when given
    weight = _decode(job, job.source.dtype, source, _scratch(buffers, "weight", job))
    merged = fold_fp32(job, weight, mode, buffers, pool, threads=threads)
    if job.changed:
        check_finite(job, merged, base=weight)
    # on the CPU, ggml's own quantizer when llama-cpp-python provides it (same bytes, 2-10x
    # faster for the K types, and on every core), else the torch codec (codecs/gguf.py)
    encoded = quantize(merged, job.out_dtype, name=job.name)
    if not job.changed:
        return encoded, None
    old = weight if job.out_dtype == job.source.dtype else roundtrip(weight, job.out_dtype)
    intended = torch.sub(merged, weight, out=_scratch(buffers, "intended", job))
    if pool is not None:
        pool.give(merged)
    decoded = _decode(job, job.out_dtype, encoded, _scratch(buffers, "decoded", job), copy=True)
    if is_quantized(job.out_dtype):     # finite values can still overflow fp16 block scales
        check_finite(job, decoded)
    realized = decoded.sub_(old)
    return encoded, survival(job.name, job.out_dtype, intended, realized, scratch=True)


def survival(name: str, type_name: str, intended: torch.Tensor, realized: torch.Tensor, *,
             scratch: bool = False) -> Survival:
    """Cosine and relative error between two changes of one tensor. fp32 reductions (BLAS dot,
    norms): a score reported to three decimals needs no more, and float64 copies cost a second
    per large tensor. ``scratch``: ``realized`` may be overwritten (no full-size temporary)."""
    i, r = intended.float().reshape(-1), realized.float().reshape(-1)
    norm_i, norm_r = float(torch.linalg.vector_norm(i)), float(torch.linalg.vector_norm(r))
    dot = float(torch.dot(i, r)) if norm_i and norm_r else 0.0
    # one pass; torch.dist is 3-4x slower on one thread
    difference = r.sub_(i) if scratch else torch.sub(r, i)
    return from_sums(name, type_name, dot, norm_i, norm_r, float(torch.linalg.vector_norm(difference)))


def from_sums(name: str, type_name: str, dot: float, norm_i: float, norm_r: float,
              norm_difference: float) -> Survival:
    """The score from <intended, realized>, their norms and ||realized - intended||: a change
    that vanished on both sides survived (cosine 1), on one side only not (0)."""
    if norm_i and norm_r:
        cosine = min(1.0, max(-1.0, dot / (norm_i * norm_r)))
    else:
        cosine = 1.0 if norm_i == norm_r else 0.0
    rel_error = norm_difference / norm_i if norm_i else float(norm_r > 0)
    return Survival(name, type_name, cosine, rel_error)


def summarize(records: list[Survival], *, gguf: bool) -> dict | None:
    """The report's survival section: worst tensors first, the median, and a warning when the
    adapter mostly did not survive (its better routes depend on whether the base is ``gguf``)."""
    if not records:
        return None
    rows = sorted(records, key=lambda s: s.cosine)
    median = statistics.median(s.cosine for s in rows)
    summary = {"tensors": len(rows), "median_cosine": median, "min_cosine": rows[0].cosine,
               "median_rel_error": statistics.median(s.rel_error for s in rows),
               "rows": [asdict(s) for s in rows]}
    if median < LOW_SURVIVAL:
        routes = ("--requantize bf16 (a plain 16-bit model), merging into the unquantized model and "
                  "quantizing the result once with the tool that made this checkpoint" if not gguf else
                  "merge into the F16/BF16 base with --quantize-like REF.gguf (one quantization "
                  "instead of two), --requantize f16 or q8_0")
        summary["warning"] = (
            f"only part of the adapter survived requantization (median cosine {median:.2f} between "
            f"the intended and the realized change; 1 means fully kept). Better routes: {routes}, "
            "or keep the adapter separate and apply it at run time")
    return summary
