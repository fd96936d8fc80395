"""One self-describing ``.safetensors`` file, loadable with nothing but ``safetensors``.

Tensors follow the kohya convention with dotted HF module names (``stem`` is the base tensor name
without its trailing ``.weight``):

    <stem>.lora_down.weight   A, (r, cols)        in the layout of the stored base weight
    <stem>.lora_up.weight     B, (rows, r)
    <stem>.alpha              0-d float32, scale * r (so alpha / r is the kohya-style scale)
    <stem>.dora_scale         DoRA magnitude, 1-D
    <stem>.lora_up.bias       lora_bias, (rows,)
    <base tensor name>        full replacement tensors (modules_to_save)

``__metadata__`` holds ``format = adaptertools.lora``, ``format_version``, ``base_model`` and
``adaptertools``: a JSON string with the exact float64 scale, layer kind and conv shape of each
tensor plus the adapter's metadata, so a round trip is bit-exact.

Reading also accepts a bare file of PEFT-style keys (``lora_A`` / ``lora_B``) without a config;
its scale comes from ``scale=`` (``--scale``), else 1 with a warning.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .._io import load_safetensors
from ..adapter import Adapter, LoraWeight, check_weight
from ..errors import AdapterToolsWarning, FormatError, OptionError, UnsupportedError
from . import accounting, foreign, peft

if TYPE_CHECKING:    # read(light=True) holds light.arrays.Stored tensors instead
    import torch

DESCRIPTION = "single self-describing .safetensors file (kohya-style keys, config in __metadata__)"
SNIFF_ORDER = 50
PIPELINE_KEYS = True       # any names: a pipeline LoRA's "<component>.<name>" keys too
FORMAT_TAG = "adaptertools.lora"
FORMAT_VERSION = "1"
SUFFIXES = {"a": ".lora_down.weight", "b": ".lora_up.weight", "alpha": ".alpha",
            "magnitude": ".dora_scale", "bias": ".lora_up.bias"}


def stem_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def sniff(path: Path) -> bool:
    """A ``.safetensors`` file, or any file that is one of ours (by its header, not its name)."""
    path = Path(path)
    return path.is_file() and (path.suffix == ".safetensors" or _tagged(path))


def _tagged(path: Path) -> bool:
    """Does ``path`` start with a safetensors header whose metadata says ``format = FORMAT_TAG``?"""
    try:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
            if not 2 <= length <= 100_000_000:        # as read_safetensors_header bounds it
                return False
            raw = fh.read(length)
        if FORMAT_TAG.encode() not in raw:           # cheap: most files stop here
            return False
        metadata = json.loads(raw).get("__metadata__") or {}
    except (OSError, ValueError, RecursionError, AttributeError):
        return False
    return isinstance(metadata, dict) and metadata.get("format") == FORMAT_TAG


def read(path: Path, *, scale: float | None = None, light: bool = False) -> Adapter:
    """``light``: the tensors as light.arrays.Stored (numpy, no torch)."""
    path = Path(path)
    if light:
        from ..light.arrays import load_safetensors as load_light

        tensors, metadata = load_light(path)
    else:
        tensors, metadata = load_safetensors(path)
    if metadata.get("format") == FORMAT_TAG:
        if scale is not None:
            raise OptionError(f"{path}: --scale only applies to files without a config; "
                              "this adaptertools file carries its own scales, drop --scale")
        return _read_own(path, tensors, metadata)
    other = _read_by_another(path)
    if other is not None:
        raise UnsupportedError(f"{path}: not an adaptertools file but {other.description} "
                               f"(format {other.name}); drop --from safetensors, or pass "
                               f"--from {other.name}")
    what = foreign.file_looks_like(tensors, metadata)
    if what is not None:
        reader = foreign.read_by(tensors)
        raise UnsupportedError(f"{path}: {what}: " + (f"read it with --from {reader}" if reader
                                                      else "not supported yet"))
    if any(".lora_A." in k or ".lora_embedding_A" in k for k in tensors):
        accounting.check_accounted(tensors, None, path)
        return _read_bare_peft(path, tensors, scale)
    raise FormatError(f"{path}: neither an adaptertools LoRA file (no `format = {FORMAT_TAG}` in "
                      "its metadata) nor PEFT-style lora_A/lora_B tensors; pass --from FORMAT")


def _read_by_another(path: Path):
    """The first other readable format that claims ``path`` (kohya, diffusers...), or None."""
    from ..registry import _sniffs, usable

    for fmt in usable().values():     # a plugin whose sniff raises is "not mine" (registry.py)
        if fmt.name != "safetensors" and fmt.can_read and _sniffs(fmt, path):
            return fmt
    return None


def _read_bare_peft(path: Path, tensors: dict, scale: float | None) -> Adapter:
    if scale is None:
        warnings.warn(f"{path}: bare LoRA tensors without a config: using scale 1.0; pass --scale "
                      "(lora_alpha / r of the training run) if that is wrong",
                      AdapterToolsWarning, stacklevel=3)
        scale = 1.0
    adapter = peft.adapter_from_state_dict(tensors, lambda module, rank: float(scale),
                                           fan_in_fan_out=False, where=path)
    adapter.metadata = {"source_format": "bare-peft-safetensors"}
    return adapter


# The `adaptertools` metadata entry: (check, what is expected) per field of a tensor's entry.
ENTRY_FIELDS = {
    "scale": (lambda v: peft._number(v), "a number"),
    "layer": (lambda v: isinstance(v, str), 'a layer kind such as "linear"'),
    "weight_shape": (lambda v: v is None or (isinstance(v, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)),
        "a list of sizes, or null"),
}


def _info(path: Path, metadata: dict[str, str]) -> dict:
    """The `adaptertools` metadata entry, checked: {"tensors": {name: entry}, "metadata": {}}."""
    damaged = "the file was damaged, write it again"
    try:
        info = json.loads(metadata.get("adaptertools", "{}"))
        entries = info["tensors"]
    except (json.JSONDecodeError, RecursionError, KeyError, TypeError):
        raise FormatError(f"{path}: the `adaptertools` metadata entry is missing or not valid "
                          f"JSON; {damaged}") from None
    if not isinstance(entries, dict):
        raise FormatError(f"{path}: `tensors` in the `adaptertools` metadata is "
                          f"{peft._shown(entries)}, expected an object; {damaged}")
    for name, entry in entries.items():
        if not isinstance(entry, dict) or "scale" not in entry:
            raise FormatError(f"{path}: the `adaptertools` metadata of {name} is "
                              f"{peft._shown(entry)}, expected an object with a `scale`; {damaged}")
        for field, (ok, expected) in ENTRY_FIELDS.items():
            if field in entry and not ok(entry[field]):
                raise FormatError(f"{path}: `{field}` of {name} in the `adaptertools` metadata is "
                                  f"{peft._shown(entry[field])}, expected {expected}; {damaged}")
    peft.check_metadata(info.get("metadata", {}), f"{path} (`adaptertools` metadata)")
    return info


def _read_own(path: Path, tensors: dict, metadata: dict[str, str]) -> Adapter:
    info = _info(path, metadata)
    entries = info["tensors"]
    weights = {}
    used: set[str] = set()
    for name, entry in entries.items():
        stem = stem_of(name)
        keys = {part: stem + suffix for part, suffix in SUFFIXES.items()}
        for part in ("a", "b"):
            if keys[part] not in tensors:
                other = keys["b" if part == "a" else "a"]
                raise FormatError(f"{path}: {keys[part]} is missing (its partner {other} is "
                                  "listed); the file is incomplete, write it again")
        shape = entry.get("weight_shape")
        weight = LoraWeight(a=tensors[keys["a"]], b=tensors[keys["b"]], scale=float(entry["scale"]),
                            layer=entry.get("layer", "linear"),
                            magnitude=tensors.get(keys["magnitude"]), bias=tensors.get(keys["bias"]),
                            weight_shape=tuple(shape) if shape is not None else None)
        check_weight(name, weight, where=str(path))
        accounting.check_factors(name, weight, path)
        weights[name] = weight
        used.update(keys.values())
    stray = [k for k in tensors if k not in used and k.endswith(tuple(SUFFIXES.values()))]
    if stray:
        raise FormatError(f"{path}: {stray[0]} has no entry in the metadata (A without B, or an "
                          "edited file); write the file again")
    replacements = {k: t for k, t in tensors.items() if k not in used}
    return Adapter(weights=weights, replacements=replacements,
                   base_model=metadata.get("base_model") or None,
                   metadata=info.get("metadata", {}))


def _alpha_tensor(value: float, like):
    """The 0-d float32 alpha tensor kohya-style readers take: torch, or Stored beside Stored
    factors (numpy's float64 -> float32 rounds as torch's, to nearest even)."""
    from ..light.arrays import Stored, is_stored

    if is_stored(like):
        import numpy as np

        return Stored(np.array(value, dtype=np.float32), "float32")
    import torch

    return torch.tensor(value, dtype=torch.float32)


def write(adapter: Adapter, path: Path) -> None:
    """``adapter`` (torch or the light path's Stored tensors) as our own safetensors file."""
    from ..light.arrays import save_file

    tensors: dict[str, torch.Tensor] = {}
    entries = {}
    for name, w in adapter.weights.items():
        stem = stem_of(name)
        tensors[stem + SUFFIXES["a"]] = w.a.contiguous()
        tensors[stem + SUFFIXES["b"]] = w.b.contiguous()
        tensors[stem + SUFFIXES["alpha"]] = _alpha_tensor(w.scale * w.rank, w.a)
        if w.magnitude is not None:
            tensors[stem + SUFFIXES["magnitude"]] = w.magnitude.contiguous()
        if w.bias is not None:
            tensors[stem + SUFFIXES["bias"]] = w.bias.contiguous()
        entries[name] = {"scale": w.scale, "layer": w.layer,
                         "weight_shape": list(w.weight_shape) if w.weight_shape else None}
    for name, tensor in adapter.replacements.items():
        if name in tensors:
            raise FormatError(f"replacement tensor {name} collides with a LoRA factor key")
        tensors[name] = tensor.contiguous()
    info = {"tensors": entries, "metadata": adapter.metadata}
    header = {"format": FORMAT_TAG, "format_version": FORMAT_VERSION,
              "base_model": adapter.base_model or "",
              "adaptertools": json.dumps(info, sort_keys=True)}
    save_file(tensors, str(path), metadata=header)
