"""LyCORIS LoHa and LoKr modules (lycoris-lora 4.1.3) as deltas of the protocol (kernels/deltas.py).

Not a registered format: a LyCORIS file is a kohya-style safetensors file (``lycoris_<module>.``
or ``lora_unet_<module>.`` + suffix); formats/kohya.py owns that container, resolves the names
against the base and hands each module's suffixes here (``claims``, ``module_delta``). LoCon
(``lora_down`` / ``lora_up`` / ``alpha``) is plain LoRA and stays with the kohya reader.

Every rule below is lycoris-lora 4.1.3's own code (``lycoris/modules/loha.py``,
``lycoris/modules/lokr.py``, ``lycoris/functional/loha.py``, ``lycoris/functional/lokr.py``,
``lycoris/functional/general.py``), cited by file and function.

What the delta is: the one LyCORIS's forward adds, ``get_weight(shape) * scalar``
(``LohaModule.forward``, ``LokrModule._rebuild_forward``), which is what the adapter was trained
with and what inference tools apply. ``scalar`` is folded into ``hada_w1_a`` / ``lokr_w1(_a)``
when the module is saved (``custom_state_dict``) and never stored, so the file's factors are the
whole story. ``get_weight`` already multiplies by ``self.scale`` (``gamma=scale`` /
``kron_weight(..., scale=self.scale)``); lycoris-lora 4.1.3's ``get_diff_weight`` multiplies by
``self.scale`` once more, so its ``get_merged_weight`` / ``merge_to`` add ``scale**2 * ...``:
they disagree with its own forward whenever ``alpha != rank``. We follow the forward (tests pin
both facts: bit-identical to the forward, and to ``merge_to`` when the scale is 1).

Scale (``__init__`` of both modules): ``scale = alpha / r``; ``alpha`` missing or 0 means
``alpha = r``; the saved ``alpha`` buffer is ``alpha * r / r_factor`` (``r_factor = sqrt(r)``
with rs_lora), so ``saved_alpha / r`` is the trained scale either way. ``r`` is the module's
``lora_dim``: ``hada_w1_b.shape[0]`` (``LohaModule.make_module_from_state_dict``); for LoKr the
rank of its factorised side, ``lokr_w1_b.shape[0]`` else ``lokr_w2_b.shape[0]``.
(``LokrModule.make_module_from_state_dict`` reads ``w2a.size(1)``, which for the CP form's
``lokr_w2_a`` (r, b) is b, not r: its loader misreads the scale of a CP LoKr with a full w1.)
A LoKr whose w1 and w2 are both full has scale 1 whatever alpha says (``LokrModule.__init__``:
``if self.use_w2 and self.use_w1: alpha = lora_dim``; its loader, with ``lora_dim = 1``, too;
trained with rs_lora such a module had scale sqrt(r), which the file cannot tell: no factor
carries r).

DoRA (``weight_decompose``, DoHa / DoKr: ``dora_scale``): the merged weight rescaled per output
row (or per input column), LyCORIS's eps in the norm (``_decomposition``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

import torch

from ..errors import FormatError, UnsupportedError

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# ``alpha``: 0-d, both kinds. ``dora_scale``: weight_decompose (DoHa / DoKr), saved by both
# modules' custom_state_dict (``_decomposition``). LyCORIS 4.1.3 saves no ``scalar`` (folded
# into w1, see above) and never creates ``lokr_t1`` (in LokrModule.weight_list only).
LYCORIS_PARTS: tuple[str, ...] = LOHA_PARTS + LOKR_PARTS + ("alpha", "dora_scale")


def claims(parts: Iterable[str]) -> bool:
    """Whether a module's suffixes are a LyCORIS LoHa or LoKr module's: any ``hada_`` or
    ``lokr_`` suffix makes it ours (``module_delta`` then names any suffix that does not fit)."""
    return any(p.startswith(("hada_", "lokr_")) for p in parts)


def module_delta(module: str, parts: dict[str, torch.Tensor], base_shape: tuple[int, ...]):
    """The LohaWeight / LokrWeight (kernels/deltas.py) of one module, in the stored base weight's
    layout ``base_shape`` ((out, in) or (out, in, *k)), its scale resolved.

    ``parts``: suffix -> tensor (``hada_w1_a``, ``alpha``, ...). FormatError naming ``module``
    and the missing, extra or misshapen part; UnsupportedError for what is valid but not read.
    """
    base_shape = tuple(int(s) for s in base_shape)
    loha = any(p.startswith("hada_") for p in parts)
    if loha and any(p.startswith("lokr_") for p in parts):
        raise FormatError(f"{module}: has both LoHa (hada_*) and LoKr (lokr_*) tensors; one "
                          "module is one or the other: the file is damaged")
    kind, names = ("LoHa", LOHA_PARTS) if loha else ("LoKr", LOKR_PARTS)
    extra = sorted(set(parts) - set(names) - {"alpha", "dora_scale"})
    if extra:
        raise FormatError(f"{module}: {', '.join(extra)} is not a LyCORIS {kind} tensor (a "
                          f"{kind} module has {', '.join(names)}, alpha, dora_scale)")
    if len(base_shape) not in (2, 3, 4, 5):
        raise FormatError(f"{module}: a {kind} module on a base weight of shape "
                          f"{list(base_shape)}; LyCORIS adapts Linear and Conv1d/2d/3d only")
    weight = (_loha if loha else _lokr)(module, parts, base_shape)
    if "dora_scale" in parts:
        weight = replace(weight, **_decomposition(module, parts["dora_scale"], base_shape, kind))
    return weight


def _decomposition(module: str, dora_scale: torch.Tensor, base_shape: tuple[int, ...],
                   kind: str) -> dict:
    """``weight_decompose`` (DoHa / DoKr): the merged weight V rescaled to
    ``V * dora_scale / (||V|| + eps)`` with ``eps = finfo(float32).eps`` (functional/general.py
    ``_weight_decompose``; the module's dtype is fp32). ``dora_scale`` is saved (out, 1, ...)
    with ``wd_on_out=True``, the default (one norm per output row), and (1, in, 1, ...) with
    ``wd_on_out=False`` (one per input column over (out, *kernel)): LohaModule / LokrModule
    ``__init__``. A column norm over a conv's kernel axes is no axis of the 2-D view, so only a
    Linear or a 1x1 conv takes that form here."""
    out, inputs = base_shape[0], base_shape[1]
    ones = (1,) * (len(base_shape) - 1)
    if tuple(dora_scale.shape) == (out, *ones):
        magnitude, norm_dim = dora_scale.reshape(out), 1
    elif tuple(dora_scale.shape) == (1, inputs, *ones[1:]) and math.prod(base_shape[2:]) == 1:
        magnitude, norm_dim = dora_scale.reshape(inputs), 0
    elif tuple(dora_scale.shape) == (1, inputs, *ones[1:]):
        raise UnsupportedError(f"{module}: a Do{kind[2:]} conv module with wd_on_out=False "
                               f"(dora_scale {list(dora_scale.shape)}: one norm per input "
                               "channel over the kernel): not supported; merge it with LyCORIS")
    else:
        raise FormatError(f"{module}: dora_scale has shape {list(dora_scale.shape)}, expected "
                          f"{[out, *ones]} (or {[1, inputs, *ones[1:]]} with wd_on_out=False) "
                          f"for the base weight {list(base_shape)}")
    return {"magnitude": magnitude, "norm_dim": norm_dim,
            "norm_eps": float(torch.finfo(torch.float32).eps)}


def _alpha_scale(module: str, parts: dict, rank: int) -> float:
    """``alpha / r``, alpha missing or 0 meaning r (LohaModule / LokrModule ``__init__``)."""
    alpha = parts.get("alpha")
    if alpha is None:
        return 1.0
    if alpha.numel() != 1:
        raise FormatError(f"{module}: alpha has shape {list(alpha.shape)}; LyCORIS saves one "
                          "number (a 0-d tensor)")
    value = float(alpha)      # the loaders' float(alpha) (make_module_from_state_dict)
    if not math.isfinite(value):
        raise FormatError(f"{module}: alpha is {value}; the file is damaged")
    return 1.0 if value == 0 else value / rank


def _missing(module: str, parts: dict, need: tuple[str, ...], kind: str) -> None:
    missing = [n for n in need if n not in parts]
    if missing:
        have = ", ".join(sorted(p for p in parts if p != "alpha")) or "nothing"
        raise FormatError(f"{module}: a {kind} module with {have} but no {', '.join(missing)}; "
                          "the file is incomplete: save or download it again")


def _expect(module: str, name: str, tensor: torch.Tensor, shape: tuple[int, ...],
            why: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise FormatError(f"{module}: {name} has shape {list(tensor.shape)}, expected "
                          f"{list(shape)} ({why})")


def _cores(t: torch.Tensor) -> torch.Tensor:
    """A CP core (r, r, *k) as (r, r, k1, prod(k[1:])): the 4-D form kernels/deltas.py's
    einsums take. The kernel axes are carried, never summed, so the values are those of
    LyCORIS's ``einsum("i j ..., ...")`` (functional/loha.py HadaWeightTucker,
    functional/general.py rebuild_tucker) for Conv1d and Conv3d too."""
    return t.reshape(t.shape[0], t.shape[1], t.shape[2], -1)


def _loha(module: str, parts: dict, base_shape: tuple[int, ...]):
    """LohaModule (modules/loha.py). Flat: w*_a (out, r), w*_b (r, in * prod(k)); delta
    ``((w1_a @ w1_b) * (w2_a @ w2_b)) * scale`` (functional/loha.py HadaWeight.forward, scale a
    tensor in the factors' dtype as in LohaModule.get_weight). CP (``use_tucker`` on a conv
    with a kernel > 1): w*_a (r, out), w*_b (r, in), t* (r, r, *k) (HadaWeightTucker)."""
    from ..kernels.deltas import LohaWeight

    _missing(module, parts, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoHa")
    if ("hada_t1" in parts) != ("hada_t2" in parts):
        _missing(module, parts, ("hada_t1", "hada_t2"), "LoHa (CP form)")
    w1a, w1b, w2a, w2b = (parts[f"hada_{n}"] for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
    out, cols = base_shape[0], math.prod(base_shape[1:])
    if w1b.dim() != 2 or w2b.dim() != 2:
        raise FormatError(f"{module}: hada_w1_b / hada_w2_b must be 2-D, got "
                          f"{list(w1b.shape)} and {list(w2b.shape)}")
    r1, r2 = int(w1b.shape[0]), int(w2b.shape[0])
    cp = "hada_t1" in parts
    if cp:
        if len(base_shape) < 3:
            raise FormatError(f"{module}: hada_t1/hada_t2 (the CP form) on a Linear base weight "
                              f"{list(base_shape)}; LyCORIS uses it for conv layers only")
        kernel = base_shape[2:]
        for i, (a, b) in enumerate(((w1a, w1b), (w2a, w2b)), start=1):
            r = (r1, r2)[i - 1]
            _expect(module, f"hada_w{i}_a", a, (r, out), "CP form: (rank, out)")
            _expect(module, f"hada_w{i}_b", b, (r, base_shape[1]), "CP form: (rank, in)")
            _expect(module, f"hada_t{i}", parts[f"hada_t{i}"], (r, r, *kernel),
                    "CP form: (rank, rank, *kernel)")
        t1, t2 = _cores(parts["hada_t1"]), _cores(parts["hada_t2"])
    else:
        for i, (a, b) in enumerate(((w1a, w1b), (w2a, w2b)), start=1):
            r = (r1, r2)[i - 1]
            _expect(module, f"hada_w{i}_a", a, (out, r), "(out, rank)")
            _expect(module, f"hada_w{i}_b", b, (r, cols), "(rank, in * prod(kernel))")
        t1 = t2 = None
    return LohaWeight(w1a, w1b, w2a, w2b, _alpha_scale(module, parts, r1), base_shape, t1, t2)


def _lokr(module: str, parts: dict, base_shape: tuple[int, ...]):
    """LokrModule (modules/lokr.py): out = a*b, in = c*d; w1 (a, c) or w1_a (a, r) @ w1_b
    (r, c); w2 (b, d, *k) full, or w2_a (b, r) @ w2_b (r, d * prod(k)), or CP w2_a (r, b),
    w2_b (r, d), t2 (r, r, *k) rebuilt by ``rebuild_tucker`` (functional/general.py). Delta
    ``make_kron(w1, w2, scale)`` (functional/lokr.py): w1 gets trailing unit axes up to w2's
    dims, ``torch.kron``, times the Python-float scale (skipped when it is 1: x * 1.0 is x)."""
    from ..kernels.deltas import LokrWeight

    if "lokr_w1" not in parts:
        _missing(module, parts, ("lokr_w1_a", "lokr_w1_b"), "LoKr")
    if "lokr_w2" not in parts:
        _missing(module, parts, ("lokr_w2_a", "lokr_w2_b"), "LoKr")
    for full, pair in (("lokr_w1", ("lokr_w1_a", "lokr_w1_b")),
                       ("lokr_w2", ("lokr_w2_a", "lokr_w2_b", "lokr_t2"))):
        both = [p for p in pair if p in parts]
        if full in parts and both:
            raise FormatError(f"{module}: has {full} and {', '.join(both)}; a LoKr half is "
                              "either full or factorised: the file is damaged")
    out, cols = base_shape[0], math.prod(base_shape[1:])
    kernel = base_shape[2:]
    if "lokr_w1" in parts:
        w1 = parts["lokr_w1"]
        if w1.dim() != 2:
            raise FormatError(f"{module}: lokr_w1 has shape {list(w1.shape)}, expected (a, c)")
        a, c = map(int, w1.shape)
    else:
        w1a, w1b = parts["lokr_w1_a"], parts["lokr_w1_b"]
        if w1a.dim() != 2 or w1b.dim() != 2:
            raise FormatError(f"{module}: lokr_w1_a / lokr_w1_b must be 2-D, got "
                              f"{list(w1a.shape)} and {list(w1b.shape)}")
        a, c = int(w1a.shape[0]), int(w1b.shape[1])
        _expect(module, "lokr_w1_a", w1a, (a, w1b.shape[0]), "(a, rank), rank = lokr_w1_b's rows")
    if out % a or base_shape[1] % c:
        raise FormatError(f"{module}: lokr_w1 is ({a}, {c}), which does not divide the base "
                          f"weight {list(base_shape)} (out = a*b, in = c*d)")
    b, d = out // a, base_shape[1] // c
    fields: dict[str, torch.Tensor] = {}
    if "lokr_w1" in parts:
        fields["w1"] = parts["lokr_w1"]
    else:
        fields["w1_a"], fields["w1_b"] = parts["lokr_w1_a"], parts["lokr_w1_b"]
    if "lokr_w2" in parts:
        _expect(module, "lokr_w2", parts["lokr_w2"], (b, d, *kernel), "(b, d, *kernel)")
        w2 = parts["lokr_w2"]
        # Conv1d / Conv3d: LyCORIS's make_kron appends unit axes to w1 up to w2's dims; the
        # 4-D view (b, d, k1, prod(rest)) is the layout kernels/deltas.py's kron gives that
        # (w1 -> (a, c, 1, 1)), the same products in the same places
        fields["w2"] = _cores(w2) if len(kernel) in (1, 3) else w2
    elif "lokr_t2" in parts:
        if not kernel:
            raise FormatError(f"{module}: lokr_t2 (the CP form) on a Linear base weight "
                              f"{list(base_shape)}; LyCORIS uses it for conv layers only")
        r = int(parts["lokr_w2_b"].shape[0])
        _expect(module, "lokr_w2_a", parts["lokr_w2_a"], (r, b), "CP form: (rank, b)")
        _expect(module, "lokr_w2_b", parts["lokr_w2_b"], (r, d), "CP form: (rank, d)")
        _expect(module, "lokr_t2", parts["lokr_t2"], (r, r, *kernel),
                "CP form: (rank, rank, *kernel)")
        fields.update(w2_a=parts["lokr_w2_a"], w2_b=parts["lokr_w2_b"],
                      t2=_cores(parts["lokr_t2"]))
    else:
        w2b = parts["lokr_w2_b"]
        if w2b.dim() > 2 and tuple(w2b.shape[1:]) == (d, *kernel):
            w2b = w2b.reshape(w2b.shape[0], -1)   # functional/lokr.py weight_gen's (r, d, *k)
        if w2b.dim() != 2:
            raise FormatError(f"{module}: lokr_w2_b has shape {list(w2b.shape)}, expected "
                              "(rank, d * prod(kernel))")
        _expect(module, "lokr_w2_a", parts["lokr_w2_a"], (b, w2b.shape[0]), "(b, rank)")
        _expect(module, "lokr_w2_b", w2b, (w2b.shape[0], cols // c), "(rank, d * prod(kernel))")
        fields.update(w2_a=parts["lokr_w2_a"], w2_b=w2b)
    if "w1" in fields and "w2" in fields:
        scale = 1.0                                   # LokrModule.__init__: alpha = lora_dim
    else:
        rank = int((fields.get("w1_b") if "w1_b" in fields else fields["w2_b"]).shape[0])
        scale = _alpha_scale(module, parts, rank)
    return LokrWeight(scale, base_shape, **fields)
