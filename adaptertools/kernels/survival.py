"""What a fold kept: the survival score of one quantized tensor's merge (``Survival``), and the
refusal of an output that holds Inf or NaN (``check_finite``). Below the merge engine, so that the
kernels (triton/engine.py) and merging/ both use them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedError
from .fold import all_finite, count_nonfinite


@dataclass(frozen=True)
class Survival:
    name: str
    type: str               # the output tensor type
    cosine: float           # intended vs realized change; 1 = fully kept, ~0 = erased
    rel_error: float        # |realized - intended| / |intended|


def check_finite(job, values: torch.Tensor, *, base: torch.Tensor | None = None) -> None:
    """Refuse a merge whose output tensor ``values`` (fp32 before encoding, or as stored) holds
    Inf or NaN: an UnsupportedError naming the tensor, saying whether the base already held them
    (``base``: the source tensor, when at hand) or the adapters' delta is too large for the output
    type. Cheap when every value is finite (``kernels.fold.all_finite``). ``job``: a
    ``merging.jobs.Job``."""
    if all_finite(values):
        return
    bad = count_nonfinite(values)
    if base is not None and base.is_floating_point() and not all_finite(base):
        raise UnsupportedError(f"{job.name}: the base tensor already holds "
                               f"{count_nonfinite(base)} Inf/NaN value(s), so the merge would too; "
                               "the base checkpoint is damaged: download or convert it again")
    terms = (*job.contributions, *job.bias_contributions)
    weights = ", ".join(f"{w:g}" for w in dict.fromkeys(c.factor for c in terms))
    scales = ", ".join(f"{s:g}" for s in dict.fromkeys(c.weight.scale for c in terms))
    # BF16 has float32's range: only F16 and block types (fp16 scales) have a wider type. (An HF
    # merge of one adapter rounds to the stored dtype, as PEFT does: --dtype fp32 would not help)
    wider = "" if job.out_dtype in ("F32", "BF16") else ", or merge into an F32 copy of the " \
        "base (a GGUF base: --requantize f32)"
    raise UnsupportedError(f"{job.name}: the merged tensor would hold {bad} Inf/NaN value(s) of "
                           f"{values.numel()}: the adapters' delta (--weights {weights or '-'}, "
                           f"scale {scales or '-'}) is too large for {job.out_dtype}; lower "
                           f"--weights or check the adapter's lora_alpha / r{wider}; nothing was "
                           "written")
