"""PEFT ``target_parameters`` LoRA (``lora.ParamWrapper``): a LoRA on an ``nn.Parameter``, 2-D
or a fused 3-D stack of MoE experts, as PEFT 0.21.2 computes its delta.

Facts (peft/tuners/lora/layer.py, ``ParamWrapper``):
  * a parameter of shape (E, d1, d2) has ``num_experts = E``, ``in_features = d1``,
    ``out_features = d2``; unless the experts module says ``is_transposed`` (gpt-oss, Aria,
    ...: stored (E, in, out)) the two are swapped, so the usual transformers-5 layout
    (Qwen3-MoE, Mixtral, Qwen2-MoE, DeepSeek-V3: ``gate_up_proj`` (E, 2*inter, hidden)) is
    (E, out, in). A 2-D parameter (out, in) has E = 1 (``_get_in_out_features``).
  * ``lora_A`` is ``nn.Linear(in, r * E)``: weight (r*E, in); ``lora_B`` ``nn.Linear(r * E,
    out)``: weight (out, r*E) (``update_layer``).
  * ``get_delta_weight``: E = 1 is Linear's ``(B @ A) * scaling``; else A viewed (E, r, in)
    (expert-major rows: expert e owns rows e*r .. e*r+r-1) and B viewed (out, r, E) (rank-major
    columns: expert e owns columns e, e+E, e+2E, ...), then
    ``einsum("o r e, e r i -> e o i") * scaling`` for (E, out, in), ``"... -> e i o"`` for the
    transposed layout. The delta is cast to the parameter's dtype (float dtypes) and
    ``merge`` adds it in place: ``param += delta.to(param.dtype)``, so a bf16 parameter is
    rounded twice (delta, then sum), as PEFT's embedding merge (kernels/reference.py).
  * scaling ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); no dropout, DoRA, bias or
    fan_in_fan_out (ParamWrapper refuses them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

# model types whose experts module is ``@use_experts_implementation(is_transposed=True)``, i.e.
# stored (E, in, out) (transformers 5.25: models/gpt_oss, aria, ergo, openai_privacy_filter):
# where in == out only the architecture tells the layout
TRANSPOSED_EXPERTS = ("gpt_oss", "aria", "aria_text", "ergo", "openai_privacy_filter")


@dataclass(frozen=True)
class ParamLoraWeight:
    """One PEFT ParamWrapper's factors: a (r*E, in), b (out, r*E), as PEFT stores them."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    num_experts: int
    transposed: bool = False     # stored (E, in, out) (``is_transposed``); else (E, out, in)
    magnitude = None             # ParamWrapper has no DoRA and no lora_bias
    bias = None
    layer = "param"

    @property
    def rank(self) -> int:
        return int(self.a.shape[0]) // self.num_experts

    @property
    def stored_shape(self) -> tuple[int, ...]:
        out, inp = int(self.b.shape[0]), int(self.a.shape[1])
        if self.num_experts == 1:
            return (out, inp)
        return (self.num_experts, inp, out) if self.transposed else (self.num_experts, out, inp)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.stored_shape

    @property
    def shape(self) -> tuple[int, int]:
        """The delta as a 2-D matrix, the stored tensor viewed (shape[0], rest)."""
        stored = self.stored_shape
        return stored[0], math.prod(stored[1:])

    @property
    def outputs(self) -> int:
        return self.shape[0]

    def for_model(self, model_type: str) -> ParamLoraWeight:
        """This LoRA in the layout of ``model_type``'s experts (TRANSPOSED_EXPERTS)."""
        transposed = self.num_experts > 1 and model_type in TRANSPOSED_EXPERTS
        return self if transposed == self.transposed else replace(self, transposed=transposed)

    def laid_on(self, shape: tuple[int, ...]) -> ParamLoraWeight:
        """This LoRA in the base tensor's own layout: a 3-D base stored (E, in, out) where
        (E, out, in) was assumed (the adapter cannot tell; the base's shape does unless
        in == out)."""
        if self.num_experts > 1 and tuple(shape) != self.stored_shape and \
                tuple(shape) == replace(self, transposed=not self.transposed).stored_shape:
            return replace(self, transposed=not self.transposed)
        return self


def check(name: str, w: ParamLoraWeight, where: str) -> None:
    """A FormatError naming the tensor when the factors do not fit PEFT's ParamWrapper."""
    from ..errors import FormatError

    a, b, e = w.a, w.b, w.num_experts
    if a.dim() != 2 or b.dim() != 2:
        raise FormatError(f"{where}: {name}: target_parameters LoRA factors must be 2-D, got A "
                          f"{tuple(a.shape)} and B {tuple(b.shape)}")
    if a.shape[0] != b.shape[1] or a.shape[0] % e or a.shape[0] == 0:
        raise FormatError(f"{where}: {name}: lora_A {tuple(a.shape)} and lora_B "
                          f"{tuple(b.shape)} are not (r*E, in) and (out, r*E) for one r and "
                          f"E = {e} experts; the file is corrupt")


def param_delta(w: ParamLoraWeight, dtype: torch.dtype = torch.float32,
                factor: float = 1.0) -> torch.Tensor:
    """``factor`` times PEFT's ``get_delta_weight`` in ``dtype``, in the stored shape."""
    scale = w.scale * factor if factor != 1.0 else w.scale
    a, b = w.a.to(dtype), w.b.to(dtype)
    if w.num_experts == 1:
        return (b @ a) * scale                                            # (out, in)
    e = w.num_experts
    a3 = a.reshape(e, -1, a.shape[-1])                                   # (E, r, in)
    b3 = b.reshape(b.shape[0], -1, e)                                    # (out, r, E)
    pattern = "o r e, e r i -> e i o" if w.transposed else "o r e, e r i -> e o i"
    return torch.einsum(pattern, b3, a3) * scale


def param_norm(w: ParamLoraWeight, factor: float = 1.0) -> float:
    """``||factor * delta||_F``: the experts' deltas are disjoint blocks, so the squared norm
    is the sum of each expert's ``||B_e @ A_e||^2`` by its Gram matrices, in fp64."""
    e = w.num_experts
    a3 = w.a.double().reshape(e, -1, w.a.shape[-1])                      # (E, r, in)
    b3 = w.b.double().reshape(w.b.shape[0], -1, e).permute(2, 0, 1)      # (E, out, r)
    sq = float(((b3.transpose(1, 2) @ b3) * (a3 @ a3.transpose(1, 2))).sum())
    scale = w.scale * factor if factor != 1.0 else w.scale
    return math.sqrt(max(sq, 0.0)) * abs(scale)


# -- per-expert 2-D LoRAs on a fused expert tensor (the unsloth-zoo#885 case) --------------------

@dataclass(frozen=True)
class ExpertSlices:
    """Per-expert 2-D LoRAs (an adapter trained where experts were separate Linear modules,
    ``mlp.experts.{e}.gate_proj``) laid onto one fused tensor stored (E, d1, d2): each piece is
    (expert e, first row r0, a linear LoraWeight (rows, d2)) and changes ``W[e, r0:r0+rows]``
    only (merging/expert_slices.py places them). The delta is zero elsewhere, so the usual
    ``(W + delta)`` rounded once is, slice by slice, the per-module Linear merge PEFT made."""

    pieces: tuple[tuple[int, int, object], ...]
    weight_shape: tuple[int, ...]
    magnitude = None
    bias = None
    layer = "expert slices"

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(self.weight_shape)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weight_shape[0]), math.prod(self.weight_shape[1:])

    @property
    def outputs(self) -> int:
        return self.shape[0]

    @property
    def rank(self) -> int:
        return max(int(w.rank) for _, _, w in self.pieces)


def slices_delta(w: ExpertSlices, lora_delta, dtype: torch.dtype = torch.float32,
                 factor: float = 1.0) -> torch.Tensor:
    """The stored-shape delta: each piece's ``scale * B @ A`` (``lora_delta``, kernels/deltas.py,
    as PEFT's Linear computes it) in its expert's rows, zero elsewhere."""
    out = torch.zeros(w.weight_shape, dtype=dtype)
    for expert, row, piece in w.pieces:
        part = lora_delta(piece, dtype, factor)                           # (rows, d2)
        out[expert, row:row + part.shape[0]] += part
    return out


def slices_norm(w: ExpertSlices, norm, factor: float = 1.0) -> float:
    """``||delta||_F``: the pieces are disjoint blocks, so the root of their squared norms
    (``norm``: kernels/deltas.py's, per piece)."""
    return math.sqrt(sum(norm(piece, factor) ** 2 for _, _, piece in w.pieces))
