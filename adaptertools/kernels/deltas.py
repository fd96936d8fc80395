"""Pure-torch ground truth for two more delta kinds, LoHa and LoKr, as PEFT 0.21.2 computes them.

What one adapter adds to one base tensor (DESIGN.md, "the delta seam"): its dense delta in the
stored weight's layout, its Frobenius norm (without forming the delta where that is cheaper) and
whether it is exactly low-rank. The protocol at the end of this module (``kind``, ``delta``,
``delta_rows``, ``norm``, ``exactly_low_rank``) is what the engine (kernels/reference.py), the
validator and the algebra ask of any delta: ``adapter.LoraWeight`` (``scale * B @ A``, with the
fast paths that only it has), ``LohaWeight`` and ``LokrWeight``.

The operation order is PEFT's own ``get_delta_weight`` so that a delta from here is bit-identical
to PEFT's on CPU, and ``W + delta`` to ``merge_and_unload``. Lines cited are PEFT 0.21.2's
(``peft/tuners/...``).

Scale rules (both kinds)
  * ``scale = alpha / r`` for every layer, with ``r`` and ``alpha`` the layer's own:
    ``config.rank_pattern`` / ``config.alpha_pattern`` first, else ``config.r`` / ``config.alpha``
    (loha/layer.py:130, lokr/layer.py:189; the patterns: loha/model.py:106-110,
    lokr/model.py:107-111). ``peft_scale`` is this rule.
  * LoKr keeps ``alpha / r`` even when both ``w1`` and ``w2`` are full matrices and ``r`` sizes
    nothing (lokr/layer.py:189, :271). LyCORIS does not: its ``LokrModule.__init__`` sets
    ``alpha = lora_dim`` when ``use_w1 and use_w2`` (scale 1; KohakuBlueleaf/LyCORIS
    lycoris/modules/lokr.py). A LyCORIS-format reader must apply that rule itself.
  * rank_dropout and module_dropout never reach a merge: ``get_delta_weight`` drops ranks only
    with ``apply_rank_dropout=True`` (loha/layer.py:209-217, lokr/layer.py:279-285), which only
    the training forward passes (loha/layer.py:269, lokr/layer.py:339); ``merge`` calls
    ``get_delta_weight(adapter)`` (lycoris_utils.py:137, :146). So the delta is dropout-free.
  * ``set_scale`` / ``scale_layer`` (lycoris_utils.py:152-166) change ``scaling`` at run time
    only; nothing of it is saved.
  * LoHa multiplies by ``torch.tensor(scaling)`` (a 0-dim default-dtype tensor, loha/layer.py:193,
    :201), LoKr by the Python float (``make_kron(w1, w2, self.scaling[...])``, lokr/layer.py:271,
    :503); kept as they are here (on CPU in fp32 the float gives LoHa the same bits too).

Forms (which tensors a layer has; shapes in lokr/layer.py:74-109, loha/layer.py:50-71)
  * ``use_effective_conv2d`` (the CP form, ``hada_t1/t2``, ``lokr_t2``) is honoured for Conv2d
    and Conv1d only, and dropped for a 1x1 Conv2d or a k=1 Conv1d (loha/layer.py:144, :158;
    lokr/layer.py:221, :236) and always for Linear (lokr/layer.py:205). A Conv1d's cores are
    ``(r, r, k, 1)``: the delta comes out ``(out, in, k, 1)`` and is reshaped (loha/layer.py:59,
    :207; lokr/layer.py:97, :277).
  * LoKr splits ``out = a * b`` and ``in = c * d`` with ``factorization(dim, decompose_factor)``
    (lokr/layer.py:199-200, :440-489): ``decompose_factor`` only picks the split, which the stored
    shapes carry, so the formulas here need neither it nor the config.
  * LoKr ``w1`` is full unless ``decompose_both and r < max(a, c) / 2``; ``w2`` is full when
    ``r >= max(b, d) / 2`` (lokr/layer.py:203-204, :214-215, :230-231).
  * LoKr's ``make_kron`` (lokr/layer.py:497-503) gives ``w1`` two trailing unit axes only when
    ``w2`` is 4-D. A Conv1d with a full ``w2`` (b, d, k) thus goes through ``torch.kron`` of a
    2-D and a 3-D tensor, which prepends an axis to ``w1``: the product is (b, a*d, c*k), then
    reshaped to (a*b, c*d, k). That is a permutation of the Kronecker layout LyCORIS uses (its
    ``make_kron`` appends the axes, lycoris/functional/lokr.py). PEFT trains and merges with its
    own layout, so ``lokr_delta`` follows PEFT; a LyCORIS Conv1d file differs there.
  * A rank-1 LoKr Conv1d in the CP form makes PEFT's own ``get_delta_weight`` raise (torch.kron
    on einsum's strides, see ``_standard_strides``); ``lokr_delta`` computes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from ..adapter import LoraWeight
from . import param_lora
from .param_lora import ExpertSlices, ParamLoraWeight


@dataclass(frozen=True)
class DeltaKind:
    """What a kind of delta is, as the engine, validator and algebra ask it."""

    name: str
    peft_type: str
    exactly_low_rank: bool     # the delta is ``B @ A`` with the adapter's own rank r
    formula: str


LORA = DeltaKind("lora", "LORA", True, "scale * B @ A")
LOHA = DeltaKind("loha", "LOHA", False, "(w1_a @ w1_b) * (w2_a @ w2_b) * scale")
LOKR = DeltaKind("lokr", "LOKR", False, "kron(w1, w2) * scale")
# PEFT target_parameters (kernels/param_lora.py): one B_e @ A_e per expert of a fused tensor
PARAM = DeltaKind("target_parameters LoRA", "LORA", False,
                  "scale * B_e @ A_e for each expert e of an nn.Parameter")
SLICES = DeltaKind("per-expert LoRA slices", "LORA", False,
                   "scale * B @ A of each expert's own Linear, in its rows of a fused tensor")


class _DenseShaped:
    """What the planner asks of every delta (``adapter.LoraWeight`` has the same names), for the
    kinds whose delta is only known dense: no lora_bias, the stored weight's shape.

    PEFT's LoHa and LoKr have no DoRA; LyCORIS's (``weight_decompose``, DoHa / DoKr) do, and the
    subclasses carry it as ``magnitude`` (outputs,), ``norm_dim`` (1: one norm per row of the
    2-D view, 0: per column) and ``norm_eps``, which LyCORIS adds to each norm
    (``torch.finfo(float32).eps``, lycoris/functional/general.py ``_weight_decompose``);
    kernels/reference.py ``dora_rescale`` applies them."""

    magnitude = None
    bias = None
    weight_shape: tuple[int, ...]

    @property
    def outputs(self) -> int:
        """The length of a DoRA magnitude: rows (norm_dim 1) or columns of the 2-D view."""
        return self.shape[0] if getattr(self, "norm_dim", 1) == 1 else self.shape[1]

    @property
    def layer(self) -> str:
        return "linear" if len(self.weight_shape) == 2 else "conv"

    @property
    def shape(self) -> tuple[int, int]:
        """The delta as a 2-D matrix (out, in * prod(kernel))."""
        return int(self.weight_shape[0]), math.prod(self.weight_shape[1:])

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(self.weight_shape)


@dataclass(frozen=True)
class LohaWeight(_DenseShaped):
    """One LoHa layer, PEFT's tensors under their PEFT names less ``hada_``.

    Linear, and conv without the CP form (``in*`` = in * prod(kernel)):
      w1_a, w2_a (out, r)   w1_b, w2_b (r, in*)
    Conv with the CP form (``use_effective_conv2d``; Conv1d cores are (r, r, k, 1)):
      w1_a, w2_a (r, out)   w1_b, w2_b (r, in)   t1, t2 (r, r, kh, kw)
    """

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    scale: float
    weight_shape: tuple[int, ...]      # the stored base weight: (out, in) or (out, in, *k)
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    # LyCORIS weight_decompose (DoHa), never PEFT's: see ``_DenseShaped``
    magnitude: torch.Tensor | None = None
    norm_dim: int = 1
    norm_eps: float = 0.0


@dataclass(frozen=True)
class LokrWeight(_DenseShaped):
    """One LoKr layer, PEFT's tensors under their PEFT names less ``lokr_``; out = a*b, in = c*d.

    w1 (a, c), or w1_a (a, r) and w1_b (r, c).
    w2 (b, d, *k) full; or w2_a (b, r) and w2_b (r, d * prod(k)); or the conv CP form
    w2_a (r, b), w2_b (r, d), t2 (r, r, kh, kw) (Conv1d: (r, r, k, 1)).
    """

    scale: float
    weight_shape: tuple[int, ...]
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    # LyCORIS weight_decompose (DoKr), never PEFT's: see ``_DenseShaped``
    magnitude: torch.Tensor | None = None
    norm_dim: int = 1
    norm_eps: float = 0.0


def peft_scale(alpha: float, r: int) -> float:
    """PEFT's LoHa and LoKr scale, ``alpha / r`` (loha/layer.py:130, lokr/layer.py:189)."""
    return alpha / r


def loha_weight(tensors: Mapping[str, torch.Tensor], *, scale: float,
                weight_shape: tuple[int, ...]) -> LohaWeight:
    """A LohaWeight from one layer's tensors keyed by PEFT's names (``hada_w1_a``, ...)."""
    return LohaWeight(**{k: tensors.get(f"hada_{k}") for k in ("w1_a", "w1_b", "w2_a", "w2_b",
                                                                "t1", "t2")},
                      scale=scale, weight_shape=tuple(weight_shape))


def lokr_weight(tensors: Mapping[str, torch.Tensor], *, scale: float,
                weight_shape: tuple[int, ...]) -> LokrWeight:
    """A LokrWeight from one layer's tensors keyed by PEFT's names (``lokr_w1``, ...)."""
    return LokrWeight(**{k: tensors.get(f"lokr_{k}") for k in ("w1", "w1_a", "w1_b", "w2",
                                                                "w2_a", "w2_b", "t2")},
                      scale=scale, weight_shape=tuple(weight_shape))


def kind_of(w: LohaWeight | LokrWeight) -> DeltaKind:
    return LOHA if isinstance(w, LohaWeight) else LOKR


def is_low_rank(w: LohaWeight | LokrWeight) -> bool:
    """Whether the delta is exactly ``B @ A`` with the adapter's rank: never for these two (see
    ``rank_bound`` for what their rank can be)."""
    return kind_of(w).exactly_low_rank


def _scaled(scale: float, factor: float) -> float:
    return scale * factor if factor != 1.0 else scale


# -- LoHa ----------------------------------------------------------------------------------------

def loha_delta(w: LohaWeight, dtype: torch.dtype = torch.float32,
               factor: float = 1.0) -> torch.Tensor:
    """``factor * scale * (w1_a @ w1_b) * (w2_a @ w2_b)`` in ``dtype``, shaped ``weight_shape``.

    PEFT's HadaWeight / HadaWeightCP forward (loha/layer.py:370, :394-397) and reshape (:207).
    """
    scale = torch.tensor(_scaled(w.scale, factor))                 # PEFT: torch.tensor(scaling)
    w1a, w1b, w2a, w2b = (t.to(dtype) for t in (w.w1_a, w.w1_b, w.w2_a, w.w2_b))
    if w.t1 is None:
        delta = ((w1a @ w1b) * (w2a @ w2b)) * scale                # (out, r) @ (r, in*)
    else:
        t1, t2 = w.t1.to(dtype), w.t2.to(dtype)                    # (r, r, kh, kw)
        rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)  # (out, in, kh, kw)
        rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
        delta = rebuild1 * rebuild2 * scale
    return delta.reshape(w.weight_shape)


def _lowrank_sq_norm(u: torch.Tensor, v: torch.Tensor) -> float:
    """``||u @ v||_F^2`` as ``sum((u^T u) * (v v^T))`` in fp64; u (m, q), v (q, n)."""
    u, v = u.double(), v.double()
    return float(((u.T @ u) * (v @ v.T)).sum())


def _loha_sq_norm_gram(w1a, w1b, w2a, w2b, t1, t2) -> float:
    """``(P1 Q1) * (P2 Q2) = (P1 . P2)(Q1 . Q2)``, the face-splitting (row-wise Kronecker)
    product, so the squared norm is ``sum(G_u * G_v)`` over (r1*r2)-square Gram matrices."""
    v = (w1b.double()[:, None, :] * w2b.double()[None, :, :]).flatten(0, 1)  # (r1*r2, in*)
    if t1 is None:
        u = (w1a.double()[:, :, None] * w2a.double()[:, None, :]).flatten(1)  # (out, r1*r2)
        return _lowrank_sq_norm(u, v)
    # CP: per kernel position s, rebuild[:, :, s] = (w_a^T @ t[:, :, s]) @ w_b
    p1 = torch.einsum("i j s, i p -> s p j", t1.double().flatten(2), w1a.double())  # (S, out, r)
    p2 = torch.einsum("i j s, i p -> s p j", t2.double().flatten(2), w2a.double())
    u = (p1[..., :, None] * p2[..., None, :]).flatten(2)                             # (S, out, r²)
    gram_u = torch.einsum("s o a, s o b -> a b", u, u)                                # (r², r²)
    return float((gram_u * (v @ v.T)).sum())


def loha_norm(w: LohaWeight, factor: float = 1.0, *,
              method: Literal["auto", "gram", "dense"] = "auto") -> float:
    """``||delta||_F``. "gram" never forms the delta: about (out * S + in) * (r1 r2)^2 operations
    (S = kernel positions in the CP form, else 1) against out * in* * (r1 + r2) for "dense";
    "auto" takes the cheaper."""
    r1, r2 = w.w1_b.shape[0], w.w2_b.shape[0]
    out, cols = w.weight_shape[0], math.prod(w.weight_shape[1:])
    positions = 1 if w.t1 is None else math.prod(w.t1.shape[2:])
    if method == "auto":
        gram_cost = (out * positions + cols) * (r1 * r2) ** 2
        method = "gram" if gram_cost <= out * cols * (r1 + r2) else "dense"
    if method == "dense":
        return float(torch.linalg.norm(loha_delta(w, torch.float32, factor).double()))
    sq = _loha_sq_norm_gram(w.w1_a, w.w1_b, w.w2_a, w.w2_b, w.t1, w.t2)
    return math.sqrt(max(sq, 0.0)) * abs(_scaled(w.scale, factor))


# -- LoKr ----------------------------------------------------------------------------------------

def _lokr_w1(w: LokrWeight, dtype: torch.dtype) -> torch.Tensor:
    if w.w1 is not None:
        return w.w1.to(dtype)                                            # (a, c)
    return w.w1_a.to(dtype) @ w.w1_b.to(dtype)                           # (a, r) @ (r, c)


def _lokr_w2(w: LokrWeight, dtype: torch.dtype) -> torch.Tensor:
    if w.w2 is not None:
        return w.w2.to(dtype)                                            # (b, d, *k)
    if w.t2 is not None:
        # PEFT's make_weight_cp (lokr/layer.py:492-494)
        return torch.einsum("i j k l, i p, j r -> p r k l",
                            w.t2.to(dtype), w.w2_a.to(dtype), w.w2_b.to(dtype))  # (b, d, kh, kw)
    return w.w2_a.to(dtype) @ w.w2_b.to(dtype)                           # (b, r) @ (r, d*k)


def lokr_delta(w: LokrWeight, dtype: torch.dtype = torch.float32,
               factor: float = 1.0) -> torch.Tensor:
    """``factor * scale * kron(w1, w2)`` in ``dtype``, shaped ``weight_shape``.

    PEFT's get_delta_weight and make_kron (lokr/layer.py:258-277, :497-503), its Conv1d layout
    included (module docstring).
    """
    w1, w2 = _lokr_w1(w, dtype), _standard_strides(_lokr_w2(w, dtype))
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)                                # (a, c, 1, 1)
    delta = torch.kron(w1, w2) * _scaled(w.scale, factor)               # Python-float scale
    return delta.reshape(w.weight_shape)


def _standard_strides(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides, size-1 axes included. ``torch.kron`` views its second
    argument and fails on a stride it cannot view (pytorch/pytorch#54135); the CP ``w2`` of a
    rank-1 Conv1d comes out of einsum ``(b, d, k, 1)`` with strides (d*k, k, 1, b*d*k), which
    ``.contiguous()`` keeps (it is contiguous) and kron rejects: PEFT 0.21.2's own
    ``get_delta_weight`` raises there (lokr/layer.py:500). The values are not changed."""
    row_major = tuple(math.prod(t.shape[i + 1:]) for i in range(t.dim()))
    if t.stride() == row_major:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _factor_sq_norm(full, a, b, dtype=torch.float64) -> float:
    if full is not None:
        return float(torch.linalg.norm(full.to(dtype))) ** 2
    return _lowrank_sq_norm(a, b)


def lokr_norm(w: LokrWeight, factor: float = 1.0) -> float:
    """``||kron(w1, w2)||_F = ||w1||_F ||w2||_F``; a low-rank factor's norm by its Gram matrices,
    the CP ``w2`` formed (it is (b, d, kh, kw), small)."""
    sq1 = _factor_sq_norm(w.w1, w.w1_a, w.w1_b)
    if w.t2 is not None:
        sq2 = float(torch.linalg.norm(_lokr_w2(w, torch.float64))) ** 2
    else:
        sq2 = _factor_sq_norm(w.w2, w.w2_a, w.w2_b)
    return math.sqrt(max(sq1, 0.0) * max(sq2, 0.0)) * abs(_scaled(w.scale, factor))


# -- rank ----------------------------------------------------------------------------------------

def rank_bound(w: LohaWeight | LokrWeight) -> int:
    """An upper bound on the rank of the delta viewed 2-D, (out, in * prod(k)).

    LoHa: r1 * r2 (a Hadamard product of a rank-r1 and a rank-r2 matrix; in the CP form each
    rebuild is ``w_a^T @ (r, in*)``, rank r too). LoKr: rank(w1) * rank(w2 viewed (b, d*k)), the
    rank of a Kronecker product (PEFT's Conv1d layout permutes rows and columns only).
    """
    out, cols = w.weight_shape[0], math.prod(w.weight_shape[1:])
    if isinstance(w, (ParamLoraWeight, ExpertSlices)):
        # the 2-D view (E, d1 * d2) has E rows; a 2-D parameter's LoRA is B @ A, rank r
        return min(out, cols, w.rank) if getattr(w, "num_experts", 0) == 1 else min(out, cols)
    if isinstance(w, LohaWeight):
        inner = w.w1_b.shape[0] * w.w2_b.shape[0]
    else:
        if w.w1 is not None:
            a, c = w.w1.shape
            rank1 = min(a, c)
        else:
            a, c = w.w1_a.shape[0], w.w1_b.shape[1]
            rank1 = min(a, c, w.w1_a.shape[1])
        b = out // a
        d_k = cols // c
        rank2 = min(b, d_k) if w.w2 is not None else min(b, d_k, w.w2_b.shape[0])
        inner = rank1 * rank2
    return min(out, cols, inner)


# -- the LoRA kind (``adapter.LoraWeight``) -------------------------------------------------------

def lora_delta(w: LoraWeight, dtype: torch.dtype = torch.float32, factor: float = 1.0) -> torch.Tensor:
    """``factor * scale * B @ A`` in ``dtype``, (rows, cols): the stored layout viewed 2-D."""
    scale = w.scale * factor if factor != 1.0 else w.scale
    a, b = w.a.to(dtype), w.b.to(dtype)
    if w.layer in ("embedding", "conv1d"):
        # PEFT keeps B (out, r) and A (r, in) and transposes the product to the stored layout
        return (a.T.contiguous() @ b.T.contiguous()).T * scale
    if w.layer == "conv" and not _pointwise_conv(w.weight_shape):
        return conv_delta(a, b, w.weight_shape) * scale
    return (b @ a) * scale


def _pointwise_conv(weight_shape: tuple[int, ...]) -> bool:
    """PEFT's test for its matmul branch: ``weight.size()[2:4] == (1, 1)`` (a 1x1 Conv2d)."""
    return tuple(weight_shape[2:4]) == (1, 1)


def conv_delta(a: torch.Tensor, b: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """A conv LoRA's ``B @ A`` computed the way PEFT computes it, as a convolution, so that the
    rounding is PEFT's: ``conv(A^T, B)^T`` with A as the input batch and B as a 1x1 kernel.

    a (r, in * k...) -> A (r, in, k...); b (out, r) -> B (out, r, 1...); returns (out, in * k...).
    """
    import torch.nn.functional as F

    kernel = tuple(weight_shape[2:])
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    factor_a = a.reshape(a.shape[0], weight_shape[1], *kernel)          # (r, in, k...)
    factor_b = b.reshape(b.shape[0], b.shape[1], *(1,) * len(kernel))   # (out, r, 1...)
    delta = conv(factor_a.transpose(0, 1), factor_b).transpose(0, 1)    # (out, in, k...)
    return delta.reshape(b.shape[0], -1)



# -- the protocol --------------------------------------------------------------------------------

Delta = LoraWeight | LohaWeight | LokrWeight | ParamLoraWeight | ExpertSlices


def kind(w: Delta) -> DeltaKind:
    if isinstance(w, LoraWeight):
        return LORA
    if isinstance(w, ParamLoraWeight):
        return PARAM
    if isinstance(w, ExpertSlices):
        return SLICES
    return kind_of(w)


def exactly_low_rank(w: Delta) -> bool:
    """Whether the delta is ``B @ A`` with the adapter's own factors: what ``combine --method
    cat``, rank truncation by factors and GGUF's LoRA tensors need."""
    return kind(w).exactly_low_rank


def delta(w: Delta, dtype: torch.dtype = torch.float32, factor: float = 1.0) -> torch.Tensor:
    """``factor`` times the delta in ``dtype``, (rows, cols): the stored layout viewed 2-D."""
    if isinstance(w, LoraWeight):
        return lora_delta(w, dtype, factor)
    if isinstance(w, ParamLoraWeight):
        return param_lora.param_delta(w, dtype, factor).reshape(w.shape)
    if isinstance(w, ExpertSlices):
        return param_lora.slices_delta(w, lora_delta, dtype, factor).reshape(w.shape)
    full = loha_delta(w, dtype, factor) if isinstance(w, LohaWeight) else \
        lokr_delta(w, dtype, factor)
    return full.reshape(w.shape)


def delta_rows(w: Delta, start: int, stop: int, dtype: torch.dtype = torch.float32,
               factor: float = 1.0) -> torch.Tensor:
    """Rows [start, stop) of ``delta(w)``: a plain LoRA's and a non-CP LoHa's from their
    factors' rows, the others sliced from the whole delta."""
    if isinstance(w, LoraWeight) and w.layer == "linear":
        from dataclasses import replace

        return lora_delta(replace(w, b=w.b[start:stop]), dtype, factor)
    if isinstance(w, LohaWeight) and w.t1 is None:
        part = LohaWeight(w.w1_a[start:stop], w.w1_b, w.w2_a[start:stop], w.w2_b, w.scale,
                          (stop - start, *w.weight_shape[1:]))
        return delta(part, dtype, factor)
    return delta(w, dtype, factor)[start:stop]


def norm(w: Delta, factor: float = 1.0) -> float:
    """``||factor * delta||_F`` without forming the delta where that is cheaper."""
    if isinstance(w, LohaWeight):
        return loha_norm(w, factor)
    if isinstance(w, LokrWeight):
        return lokr_norm(w, factor)
    if isinstance(w, ParamLoraWeight):
        return param_lora.param_norm(w, factor)
    if isinstance(w, ExpertSlices):
        return param_lora.slices_norm(w, norm, factor)
    if w.layer == "conv" and not _pointwise_conv(w.weight_shape):
        return float(torch.linalg.norm(lora_delta(w, torch.float64, factor)))
    return math.sqrt(max(_lowrank_sq_norm(w.b, w.a), 0.0)) * abs(_scaled(w.scale, factor))
