"""PEFT's own LoHa and LoKr adapters (``peft_type`` LOHA / LOKR): the folder ``save_pretrained``
writes, read into the delta protocol's kinds (kernels/deltas.py), so that they merge exactly.

Keys: ``base_model.model.<module>.hada_w1_a`` ... (no ``.weight``, no adapter name; ``.default``
kept by some savers is dropped). Scale: ``alpha / r`` with the module's own r and alpha
(``rank_pattern`` / ``alpha_pattern`` first), PEFT's rule (kernels/deltas.py, peft_scale). Every
tensor of the file is placed or named in an error.

A non-CP conv factor is stored flattened, ``(r, in * prod(kernel))``, so the base weight's
kernel shape is not in the file: such a delta is read 2-D and laid onto the base's own shape at
plan time (the same row-major values: PEFT reshapes its delta to the base's shape the same way).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..adapter import Adapter
from ..errors import FormatError, UnsupportedError
from .peft_keys import KEY_PREFIX

if TYPE_CHECKING:      # the light path's tensors are numpy (light.arrays.Stored)
    import torch

PARTS = {"LOHA": ("hada_", ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
         "LOKR": ("lokr_", ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"))}
KINDS = tuple(PARTS)


def read(folder: Path, config: dict, state_dict: dict[str, torch.Tensor], pattern_value) -> Adapter:
    """The Adapter of a PEFT LoHa/LoKr folder's ``state_dict`` under its ``config``;
    ``pattern_value(patterns, module, default)``: PEFT's rank/alpha pattern rule (formats/peft.py)."""
    peft_type = config["peft_type"].upper()
    prefix, names = PARTS[peft_type]
    if config.get("modules_to_save"):
        raise UnsupportedError(f"{folder}: a {peft_type} adapter with modules_to_save: not "
                               "supported yet")
    for key in ("r", "alpha"):
        if config.get(key) is None:
            raise FormatError(f"{folder}: `{key}` is missing from adapter_config.json; set it to "
                              "the value used in training")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        stem = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        tokens = [t for t in stem.split(".") if t != "default"]
        part = tokens[-1] if tokens else ""
        if not part.startswith(prefix) or part[len(prefix):] not in names or len(tokens) < 2:
            unknown.append(key)
            continue
        modules.setdefault(".".join(tokens[:-1]), {})[part[len(prefix):]] = tensor
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise FormatError(f"{folder}: {len(unknown)} tensor(s) are not {peft_type} tensors "
                          f"({prefix}{{{', '.join(names)}}}): {shown}; the file does not match "
                          "its adapter_config.json")
    weights = {}
    for module, parts in sorted(modules.items()):
        r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["alpha"])
        make = _loha if peft_type == "LOHA" else _lokr
        weights[module + ".weight"] = make(module, parts, alpha / r, folder)
    if not weights:
        raise FormatError(f"{folder}: the weights file holds no {peft_type} tensors")
    return Adapter(weights=weights)


def _need(module: str, parts: dict, names: tuple[str, ...], folder: Path, kind: str) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        raise FormatError(f"{folder}: {module} has {', '.join(sorted(parts))} but no "
                          f"{', '.join(missing)}: an incomplete {kind} layer; save it again")


def _loha(module: str, parts: dict, scale: float, folder: Path):
    from ..kernels.deltas import LohaWeight

    _need(module, parts, ("w1_a", "w1_b", "w2_a", "w2_b"), folder, "LoHa")
    if ("t1" in parts) != ("t2" in parts):
        _need(module, parts, ("t1", "t2"), folder, "LoHa (CP form)")
    w1a, w1b = parts["w1_a"], parts["w1_b"]
    if "t1" in parts:     # CP: w*_a (r, out), w*_b (r, in), t* (r, r, *k)
        shape = (int(w1a.shape[1]), int(w1b.shape[1]), *map(int, parts["t1"].shape[2:]))
    else:                 # w*_a (out, r), w*_b (r, in * prod(k))
        shape = (int(w1a.shape[0]), int(w1b.shape[1]))
    w = LohaWeight(parts["w1_a"], parts["w1_b"], parts["w2_a"], parts["w2_b"], scale, shape,
                   parts.get("t1"), parts.get("t2"))
    _check_shapes(module, w, folder)
    return w


def _lokr(module: str, parts: dict, scale: float, folder: Path):
    from ..kernels.deltas import LokrWeight

    if "w1" not in parts:
        _need(module, parts, ("w1_a", "w1_b"), folder, "LoKr")
    if "w2" not in parts:
        _need(module, parts, ("w2_a", "w2_b"), folder, "LoKr")
    w1 = parts.get("w1")
    a, c = (w1.shape if w1 is not None else (parts["w1_a"].shape[0], parts["w1_b"].shape[1]))
    if "w2" in parts:                       # (b, d, *k)
        b, *rest = parts["w2"].shape
        shape = (a * b, c * rest[0], *rest[1:]) if rest else (a * b, c)
    elif "t2" in parts:                     # CP: w2_a (r, b), w2_b (r, d), t2 (r, r, *k)
        shape = (a * parts["w2_a"].shape[1], c * parts["w2_b"].shape[1], *parts["t2"].shape[2:])
    else:                                   # w2_a (b, r), w2_b (r, d * prod(k))
        shape = (a * parts["w2_a"].shape[0], c * parts["w2_b"].shape[1])
    w = LokrWeight(scale, tuple(int(s) for s in shape),
                   **{k: parts.get(k) for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")})
    _check_shapes(module, w, folder)
    return w


def _check_shapes(module: str, w, folder: Path) -> None:
    """The factors must make the delta they describe: computed once on the meta device."""
    from ..adapter import map_tensors
    from ..kernels.deltas import delta

    meta = map_tensors(w, lambda t: t.to("meta"))
    try:
        delta(meta)
    except RuntimeError as e:
        raise FormatError(f"{folder}: {module}: its {type(w).__name__[:4]} factors do not fit "
                          f"together ({str(e).splitlines()[0][:120]}); the file is damaged, save "
                          "it again") from None
