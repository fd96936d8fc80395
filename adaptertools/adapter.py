"""The data model: one LoRA factor pair per base tensor, in the layout of the stored base weight.

No I/O and no format knowledge lives here. Readers resolve alpha, rank, rsLoRA, patterns and
transpositions (``fan_in_fan_out``, embeddings) into ``LoraWeight.scale`` and the stored-weight
layout once; after that every consumer computes ``delta = scale * b @ a``, shaped like the stored
weight viewed 2-D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Literal

from .errors import FormatError, UnsupportedError

if TYPE_CHECKING:        # the light path's tensors are light.arrays.Stored (numpy), not torch
    import torch

# How the base layer stores its weight, which decides the layout of the factors and the DoRA axis.
#   linear    nn.Linear           weight (out, in)        delta = b @ a
#   embedding nn.Embedding        weight (vocab, dim)     PEFT's (B @ A).T, i.e. a = B.T, b = A.T
#   conv1d    GPT-2 Conv1D        weight (in, out)        PEFT's (B @ A).T (fan_in_fan_out)
#   conv      nn.ConvNd           weight (out, in, *k)    viewed (out, in * prod(k))
LayerKind = Literal["linear", "embedding", "conv1d", "conv"]
LAYER_KINDS: tuple[str, ...] = ("linear", "embedding", "conv1d", "conv")


@dataclass(frozen=True, eq=False)
class LoraWeight:
    """``delta = scale * (b @ a)`` in the layout of the stored base weight (viewed 2-D).

    a: (r, cols)   cols = stored weight's shape[1] (times the kernel size for conv)
    b: (rows, r)   rows = stored weight's shape[0]
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    layer: LayerKind = "linear"
    # DoRA: target norms of the merged weight, (outputs,): one per row (norm_dim 1) or column (0).
    magnitude: torch.Tensor | None = None
    # lora_bias: (outputs,), added to the base bias times ``scale``.
    bias: torch.Tensor | None = None
    # Full stored shape of a conv weight, e.g. (out, in, kh, kw); None for 2-D weights.
    weight_shape: tuple[int, ...] | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the delta as a 2-D matrix (rows, cols)."""
        return int(self.b.shape[0]), int(self.a.shape[1])

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of the base weight as stored: ``weight_shape`` for conv, else (rows, cols)."""
        return tuple(self.weight_shape) if self.weight_shape else self.shape

    @property
    def outputs(self) -> int:
        """Output features: rows of the stored weight, or its columns when stored (in, out)."""
        return self.shape[0] if self.norm_dim == 1 else self.shape[1]

    @property
    def norm_dim(self) -> int:
        """Axis of the stored weight (viewed 2-D) the DoRA norm runs over."""
        return 0 if self.layer in ("embedding", "conv1d") else 1


@dataclass(frozen=True, eq=False)
class TokenRows:
    """Rows of an embedding-like weight replaced outright (PEFT trainable tokens:
    ``trainable_token_indices`` / ``TrainableTokensConfig``): ``merged = W.index_copy(0,
    indices, values)``. Not a delta: the new rows do not depend on the base's.

    indices: the token ids, in the order of ``values``' rows
    values:  (len(indices), dim), the trained rows (PEFT's ``trainable_tokens_delta``)
    """

    indices: tuple[int, ...]
    values: torch.Tensor


@dataclass
class Adapter:
    """A LoRA adapter keyed by base tensor names, e.g. ``model.layers.0.self_attn.q_proj.weight``."""

    weights: dict[str, LoraWeight] = field(default_factory=dict)
    # modules_to_save and other trained full tensors, by base tensor name; they replace the base.
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    base_model: str | None = None
    # Provenance and format extras that must survive a round trip; JSON-serialisable.
    metadata: dict = field(default_factory=dict)
    # trained rows of embedding-like weights, by base tensor name (PEFT trainable tokens)
    token_rows: dict[str, TokenRows] = field(default_factory=dict)


def check_weight(name: str, w: LoraWeight, *, where: str = "") -> None:
    """Raise FormatError when the factors of ``name`` do not fit together."""
    at = f"{where}: " if where else ""
    if w.a.dim() != 2 or w.b.dim() != 2:
        raise FormatError(f"{at}{name}: LoRA factors must be 2-D, got A {tuple(w.a.shape)} and "
                          f"B {tuple(w.b.shape)}")
    if w.a.shape[0] != w.b.shape[1]:
        raise FormatError(f"{at}{name}: rank of A ({w.a.shape[0]}) and B ({w.b.shape[1]}) differ; "
                          "the file is corrupt or A and B come from different adapters")
    if w.rank == 0:
        raise FormatError(f"{at}{name}: rank-0 factors; drop this tensor from the adapter")
    if w.layer not in LAYER_KINDS:
        raise FormatError(f"{at}{name}: unknown layer kind {w.layer!r}")
    if not math.isfinite(w.scale):
        raise FormatError(f"{at}{name}: scale is {w.scale}; fix lora_alpha / r in the config")
    rows, cols = w.shape
    for label, extra in (("DoRA magnitude", w.magnitude), ("lora bias", w.bias)):
        if extra is not None and extra.numel() != w.outputs:
            raise FormatError(f"{at}{name}: {label} has {extra.numel()} values, expected "
                              f"{w.outputs} (one per output feature)")
    if w.layer == "conv":
        if w.weight_shape is None or math.prod(w.weight_shape[1:]) != cols or \
                w.weight_shape[0] != rows:
            raise FormatError(f"{at}{name}: conv factors {tuple(w.b.shape)} @ {tuple(w.a.shape)} "
                              f"do not fit weight shape {w.weight_shape}")


def tensor_fields(w) -> dict[str, torch.Tensor]:
    """Every tensor a delta holds, by field name: a LoraWeight's ``a``, ``b``, ``magnitude`` and
    ``bias`` where set; a LoHa/LoKr's factors and cores (kernels/deltas.py)."""
    return {f.name: t for f in fields(w) if _is_tensor(t := getattr(w, f.name))}


def _is_tensor(value) -> bool:
    """A torch tensor or a light path's Stored (both have a shape and a dtype; a weight_shape
    tuple has no dtype)."""
    return hasattr(value, "dtype") and hasattr(value, "shape")


# how errors name a LoraWeight's fields (PEFT's names); other kinds keep their field names
PART_NAMES = {"a": "lora_A", "b": "lora_B"}


def nonfinite_tensors(adapter: Adapter) -> list[str]:
    """Names ('<tensor>.lora_A' etc.) of every factor or tensor holding NaN or Inf."""
    from .light.arrays import all_finite

    bad = []
    for name, w in adapter.weights.items():
        bad += [f"{name} ({PART_NAMES.get(part, part)})" for part, t in tensor_fields(w).items()
                if t.is_floating_point() and not all_finite(t)]
    bad += [name for name, t in adapter.replacements.items()
            if t.is_floating_point() and not all_finite(t)]
    bad += [f"{name} (trainable tokens)" for name, rows in adapter.token_rows.items()
            if not all_finite(rows.values)]
    return bad


def map_tensors(w: LoraWeight, fn) -> LoraWeight:
    """A copy of ``w`` (any delta kind) with ``fn`` applied to each of its tensors."""
    return replace(w, **{part: fn(t) for part, t in tensor_fields(w).items()})


def check_cast(name: str, original: torch.Tensor, cast: torch.Tensor, type_name: str, *,
               most: float | None = None,
               hint: str = "keep a wider dtype (--dtype keep or fp32)") -> None:
    """Refuse (UnsupportedError naming the tensor, ending with ``hint``) a conversion of the
    finite ``original`` to ``type_name`` that gave Inf or NaN: its values are too large for that
    type, which holds magnitudes up to ``most`` (default: the largest finite value of ``cast``'s
    dtype)."""
    from .light.arrays import FLOAT_MAX, all_finite, max_abs   # (Stored tensors too)

    if not cast.is_floating_point() or all_finite(cast):
        return
    if not all_finite(original):
        return           # already non-finite: the callers' own NaN/Inf refusal says so
    largest = max_abs(original)
    most = most if most is not None else FLOAT_MAX[str(cast.dtype).removeprefix("torch.")]
    limit = f" (at most {most:g})"
    raise UnsupportedError(f"{name}: values up to {largest:g} do not fit {type_name}{limit}; "
                           f"{hint}")


def cast_adapter(adapter: Adapter, dtype: torch.dtype | None) -> Adapter:
    """A copy with every floating tensor in ``dtype`` (None keeps each tensor's own dtype);
    a value too large for ``dtype`` is refused (``check_cast``), never written as Inf."""
    if dtype is None:
        return adapter
    type_name = str(dtype).removeprefix("torch.")

    def cast(name: str, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or not t.is_floating_point():
            return t
        out = t.to(dtype)
        check_cast(name, t, out, type_name)
        return out

    parts = {"a": "lora_A", "b": "lora_B", "magnitude": "magnitude", "bias": "bias"}
    weights = {n: replace(w, **{part: cast(f"{n} ({label})", getattr(w, part))
                                for part, label in parts.items()})
               for n, w in adapter.weights.items()}
    replacements = {n: cast(n, t) for n, t in adapter.replacements.items()}
    token_rows = {n: replace(rows, values=cast(f"{n} (trainable tokens)", rows.values))
                  for n, rows in adapter.token_rows.items()}
    return Adapter(weights, replacements, adapter.base_model, dict(adapter.metadata), token_rows)


def module_name(tensor_name: str) -> str:
    """``model.layers.0.q_proj.weight`` -> ``model.layers.0.q_proj`` (the LoRA'd parameter's module)."""
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else tensor_name


def first_difference(x: Adapter, y: Adapter) -> str | None:
    """None when x and y are bit-exact equal (factors, dtypes, scales, extras, replacements),
    else a line saying where they first differ."""
    from .light.arrays import equal

    def same(s: torch.Tensor | None, t: torch.Tensor | None) -> bool:
        if s is None or t is None:
            return s is t
        return equal(s, t)

    if x.weights.keys() != y.weights.keys():
        return f"LoRA tensors differ: {sorted(x.weights.keys() ^ y.weights.keys())[:3]}"
    if x.replacements.keys() != y.replacements.keys():
        return f"full tensors differ: {sorted(x.replacements.keys() ^ y.replacements.keys())[:3]}"
    for name, w in x.weights.items():
        v = y.weights[name]
        for part in ("a", "b", "magnitude", "bias"):
            if not same(getattr(w, part), getattr(v, part)):
                return f"{name}: {part} differs"
        for attr in ("scale", "layer", "weight_shape"):
            if getattr(w, attr) != getattr(v, attr):
                return f"{name}: {attr} {getattr(w, attr)!r} != {getattr(v, attr)!r}"
    for name, t in x.replacements.items():
        if not same(t, y.replacements[name]):
            return f"{name}: full tensor differs"
    if x.token_rows.keys() != y.token_rows.keys():
        return f"trainable tokens differ: {sorted(x.token_rows.keys() ^ y.token_rows.keys())[:3]}"
    for name, rows in x.token_rows.items():
        other = y.token_rows[name]
        if rows.indices != other.indices or not same(rows.values, other.values):
            return f"{name}: trainable tokens differ"
    return None
