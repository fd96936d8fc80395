"""Saved copies of the training base that adapters carry, and when one is the base's own weight.

PEFT saves a targeted embedding's (and lm_head's) weight with the adapter as
``<module>.base_layer.weight`` (``save_embedding_layers="auto"``), in the dtype the adapter was
trained on. The reader keeps it among ``Adapter.replacements`` and lists its name under
``Adapter.metadata["saved_base_copies"]`` (formats/peft.py); a full tensor that the same adapter
also has LoRA factors for is such a copy too (PEFT never trains both on one module).

A copy that is the same weight as the base's tensor (``same_weight``) is not a replacement: the
merge folds into the base's own tensor, with PEFT's roundings (an fp32 copy of a model merged
into its bf16 checkpoint, or a bf16 copy merged into the fp32 one, must not round the result
through the copy's dtype). A copy that really differs (a resized vocabulary, new tokens, a
trained embedding) is what the adapter needs: the merge folds into it, as PEFT does when it
loads the adapter, and says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .adapter import Adapter

if TYPE_CHECKING:     # saved_copies is asked by the light path's inspect, without torch
    import torch

SAVED_COPIES = "saved_base_copies"     # Adapter.metadata key (set by formats/peft.py read)

FP16_SUBNORMAL_STEP = 2.0 ** -24


def saved_copies(adapter: Adapter) -> set[str]:
    """Names among ``adapter.replacements`` that are saved copies of the training base, not
    trained replacements (modules_to_save, trained biases)."""
    marked = adapter.metadata.get(SAVED_COPIES) if isinstance(adapter.metadata, dict) else None
    names = {n for n in marked if isinstance(n, str)} if isinstance(marked, list) else set()
    names |= {n for n in adapter.replacements if n in adapter.weights}
    return names & adapter.replacements.keys()


def coarser(x: torch.dtype, y: torch.dtype) -> torch.dtype:
    """The float dtype of the two with fewer mantissa bits (fp16 vs bf16: bf16)."""
    from .dtypes import PRECISION

    return x if PRECISION.get(x, 0) <= PRECISION.get(y, 0) else y


def same_weight(copy: torch.Tensor, base: torch.Tensor) -> bool:
    """Is ``copy`` (an adapter's saved copy of its training base) the same weight as ``base``
    (the checkpoint's tensor), only stored in another float dtype?

    The definition: the same shape, and element for element equal once both are rounded (to
    nearest, ties to even, as ``Tensor.to`` does) to the coarser of the two dtypes, the one with
    fewer mantissa bits. So an fp32 copy is the same weight as a bf16 base when it rounds to
    exactly the base's values, and a bf16 copy is the same weight as an fp32 base when the base
    rounds to exactly the copy's values. fp16 and bf16 hold different sets of values (neither
    is a rounding of the other): an fp16 copy rounded to bf16 is a second rounding of the
    common weight and can land one bf16 step away from the base's own rounding; between those
    two, elements also count as equal when they differ by at most one bf16 step at their
    magnitude plus fp16's subnormal step (2^-24). A trained, resized or otherwise changed
    tensor differs by far more than that in some element."""
    import torch

    from .dtypes import PRECISION

    if copy.shape != base.shape or not (copy.is_floating_point() and base.is_floating_point()):
        return False
    if copy.dtype not in PRECISION or base.dtype not in PRECISION:
        return False
    target = coarser(copy.dtype, base.dtype)
    c, w = copy.to(target), base.to(target)
    if torch.equal(c, w):
        return True
    if {copy.dtype, base.dtype} != {torch.float16, torch.bfloat16}:
        return False
    c64, w64 = c.double(), w.double()
    _, exponent = torch.frexp(torch.maximum(c64.abs(), w64.abs()))   # m = f * 2^e, f in [0.5, 1)
    step = torch.ldexp(torch.ones_like(c64), exponent - 8)           # bf16: 2^(floor(log2 m) - 7)
    return bool(((c64 - w64).abs() <= step + FP16_SUBNORMAL_STEP).all())
