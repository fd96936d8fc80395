"""kohya (sd-scripts) LoRA files: one .safetensors, module names in underscore form.

Tensors (sd-scripts networks/lora.py LoRAModule, lycoris-lora 4.1 LoConModule), per module
``<stem> = <prefix><module path, dots as underscores>`` (kohya_names.py resolves it):

    <stem>.lora_down.weight   A: (r, in) Linear, (r, in, k, k) Conv2d
    <stem>.lora_up.weight     B: (out, r) Linear, (out, r, 1, 1) Conv2d
    <stem>.alpha              0-d; missing or 0 means alpha = r; scale = alpha / r
    <stem>.dora_scale         DoRA magnitude (lycoris weight_decompose, wd_on_out=True):
                              (out, 1) Linear, (out, 1, 1, 1) Conv2d: the norm of each output
                              row, PEFT's lora_magnitude_vector (diffusers' kohya export renames
                              one to the other)

A conv LoRA is a k x k down conv then a 1 x 1 up conv, so the delta in the stored conv layout
is ``up (out, r) @ down (r, in*k*k)`` viewed (out, in, k, k): LoraWeight's conv layout as is.
Modules holding LyCORIS tensors (hada_*, lokr_*) go to formats/lycoris.py when it is there.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .._io import load_safetensors
from ..adapter import Adapter, LoraWeight, check_weight
from ..errors import FormatError, OptionError, UnsupportedError
from . import accounting, kohya_names

DESCRIPTION = "kohya (sd-scripts) LoRA .safetensors (lora_unet_ / lora_te_ keys; needs --base)"
SNIFF_ORDER = 40          # before our own safetensors format (50), which takes any .safetensors
# Adapter.metadata key of an adapter read without its base (inspect): adapter_io.save refuses it
UNPLACED = "kohya_unplaced"
BASE_AS_PATH = True       # adapter_io hands --base over as the path (kohya_names.open_names)
PIPELINE_KEYS = True      # one file holds every component (lora_unet_ + lora_te1_ ...)

LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
# LoCon's Tucker core (lycoris-lora LoConModule use_tucker): named, refused by _weight
LOCON_PARTS = LORA_PARTS + ("lora_mid.weight",)
STEM = re.compile(r"^(?:" + "|".join(kohya_names.PREFIXES) + r")[^.]+$")
REMADE = "the file is incomplete; save it again with the tool that trained it"


def sniff(path: Path) -> bool:
    """A safetensors file with kohya module names (``lora_unet_x.lora_down.weight``...) that is
    not one of our own tagged files."""
    from ..errors import AdapterToolsError
    from ..tensor_index import read_safetensors_header
    from .safetensors import FORMAT_TAG

    path = Path(path)
    if not path.is_file():
        return False
    try:
        header = read_safetensors_header(path)
    except (AdapterToolsError, OSError):
        return False
    if header.metadata.get("format") == FORMAT_TAG:
        return False
    return any(STEM.match(t.name.split(".", 1)[0]) and "." in t.name for t in header.tensors)


# ----------------------------------------------------------------------------- read

def _lycoris():
    """formats/lycoris.py (LoHa / LoKr module maths) when it is installed, else None."""
    try:
        return importlib.import_module("adaptertools.formats.lycoris")
    except ModuleNotFoundError:
        return None


def _group(tensors: dict, file: Path, claimed: tuple[str, ...]) -> dict[str, dict]:
    """{stem: {part: tensor}}; a tensor with no kohya module name or an unknown part is refused,
    all such keys named at once."""
    modules: dict[str, dict] = {}
    unknown = []
    for key, tensor in tensors.items():
        stem, _, part = key.partition(".")
        if STEM.match(stem) and (part in LOCON_PARTS or part in claimed or
                                 part.startswith(("hada_", "lokr_"))):
            modules.setdefault(stem, {})[part] = tensor
        else:
            unknown.append(key)
    if unknown:
        from .foreign import looks_like

        what = looks_like(unknown)
        shown = ", ".join(unknown[:3]) + (f" (and {len(unknown) - 3} more)"
                                          if len(unknown) > 3 else "")
        raise FormatError(f"{file}: {len(unknown)} tensor(s) are not kohya LoRA tensors "
                          f"(<prefix>_<module>.{{{', '.join(LORA_PARTS)}}}): {shown}"
                          + (f"; they look like {what}" if what else "") +
                          "; refusing to read the file without them")
    return modules


def _alpha(stem: str, parts: dict, rank: int, file: Path) -> float:
    """sd-scripts: ``alpha`` 0-d; absent, or 0, means alpha = rank (LoRAModule.__init__)."""
    alpha = parts.get("alpha")
    if alpha is None:
        return float(rank)
    if alpha.numel() != 1:
        raise FormatError(f"{file}: {stem}.alpha has shape {tuple(alpha.shape)}, expected one "
                          f"value (0-d); {REMADE}")
    value = float(alpha.reshape(()).double())
    if not math.isfinite(value):
        raise FormatError(f"{file}: {stem}.alpha is {value}; {REMADE}")
    return value or float(rank)


def _weight(stem: str, parts: dict, target, file: Path) -> LoraWeight:
    """One module's factors in the stored weight's layout (``target.shape``)."""
    if "lora_down.weight" not in parts and "lora_up.weight" not in parts:
        raise FormatError(f"{file}: {stem} has {', '.join(sorted(parts))} but neither "
                          f"lora_down.weight nor lora_up.weight; {REMADE}")
    for leaf, partner in (("lora_down.weight", "lora_up.weight"),
                          ("lora_up.weight", "lora_down.weight")):
        if leaf not in parts:
            raise FormatError(f"{file}: {stem}.{leaf} is missing (its partner {stem}.{partner} "
                              f"is there); {REMADE}")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    shape, rank = target.shape, int(down.shape[0])
    where = f"{file}: {stem} ({target.key}, {tuple(shape)})"
    # 2-D factors, or conv factors: down (r, in, *k), up (out, r, 1...); a 1 x 1 conv LoRA may
    # sit on a Linear (sd-scripts' merge_lora squeezes it) and a Linear one on a 1 x 1 conv
    dims = (2, len(shape), 4 if len(shape) == 2 else len(shape))
    if "lora_mid.weight" in parts or down.dim() not in dims or up.dim() not in dims or \
            any(k != 1 for k in up.shape[2:]):
        raise UnsupportedError(f"{where}: lora_down {tuple(down.shape)} / lora_up "
                               f"{tuple(up.shape)}" + (" / lora_mid" if "lora_mid.weight" in parts
                                                       else "") +
                               " are not a Linear or conv LoRA (2-D, or k x k down and 1 x 1 "
                               "up); LoCon's Tucker form (lora_mid) is not supported yet")
    a = down.reshape(rank, -1)                 # (r, in) or (r, in*k*k)
    b = up.reshape(up.shape[0], -1)            # (out, r)
    cols = math.prod(shape[1:])
    kernel = tuple(down.shape[2:]) if down.dim() > 2 else (1,) * (len(shape) - 2)
    kernel_ok = kernel == tuple(shape[2:]) or (len(shape) == 2 and all(k == 1 for k in kernel))
    if len(shape) < 2 or b.shape[0] != shape[0] or a.shape[1] != cols or not kernel_ok:
        raise FormatError(f"{where}: lora_down {tuple(down.shape)} and lora_up "
                          f"{tuple(up.shape)} do not fit this weight: the file was made for "
                          f"another model ({kohya_names.made_for(stem)}); pass the base it was "
                          "trained on")
    magnitude = parts.get("dora_scale")
    if magnitude is not None:
        if magnitude.shape[0] != shape[0] or magnitude.numel() != shape[0]:
            raise UnsupportedError(f"{where}: dora_scale {tuple(magnitude.shape)} is not one "
                                   "norm per output row (lycoris wd_on_out=False normalises "
                                   "input columns): not supported")
        magnitude = magnitude.reshape(shape[0])
    weight = LoraWeight(a=a.contiguous(), b=b.contiguous(),
                        scale=_alpha(stem, parts, rank, file) / rank,
                        layer="linear" if len(shape) == 2 else "conv", magnitude=magnitude,
                        weight_shape=None if len(shape) == 2 else tuple(shape))
    check_weight(stem, weight, where=str(file))
    accounting.check_factors(stem, weight, file)
    return weight


def _stacked(key: str, blocks: list, file: Path) -> LoraWeight:
    """q, k and v LoRAs on one fused weight (OpenCLIP's in_proj_weight (3d, d)) as one LoRA of
    rank r_q + r_k + r_v: a = [a_q; a_k; a_v] (sum r, d), b (3d, sum r) holding each module's
    B in its own rows and columns, zero elsewhere, so b @ a is each module's delta in its rows
    (the other products are exact zeros). One scale when the modules share it, else each
    folded into its B block (scale 1)."""
    import torch

    taken: dict[tuple[int, int], str] = {}
    for target, stem, w in blocks:
        if target.rows in taken:
            raise FormatError(f"{file}: {taken[target.rows]} and {stem} both name rows "
                              f"{target.rows[0]}:{target.rows[1]} of {key}; refusing to add one "
                              "and drop the other")
        taken[target.rows] = stem
        if w.magnitude is not None:
            raise UnsupportedError(f"{file}: {stem}: DoRA on part of the fused {key} (the norm "
                                   "runs over its own rows only): not supported; merge into the "
                                   "diffusers (split q/k/v) model instead")
    scales = {w.scale for _, _, w in blocks}
    scale = scales.pop() if len(scales) == 1 else 1.0
    dtype = functools.reduce(torch.promote_types, [w.a.dtype for _, _, w in blocks] +
                             [w.b.dtype for _, _, w in blocks])
    a = torch.cat([w.a.to(dtype) for _, _, w in blocks])
    b = torch.zeros(blocks[0][0].rows_of, a.shape[0], dtype=dtype)
    col = 0
    for target, _, w in blocks:
        part = w.b.to(dtype) if w.scale == scale else w.b.to(dtype) * w.scale
        b[target.rows[0]:target.rows[1], col:col + w.rank] = part
        col += w.rank
    return LoraWeight(a=a, b=b, scale=scale)


def _lycoris_delta(stem: str, parts: dict, target, file: Path, lycoris):
    if lycoris is None:
        found = sorted(p for p in parts if p.startswith(("hada_", "lokr_")))
        raise UnsupportedError(f"{file}: {stem} holds LyCORIS tensors ({', '.join(found)}): "
                               "LoHa / LoKr modules in kohya files are not supported yet")
    return lycoris.module_delta(f"{file}: {stem}", parts, target.shape)


@dataclass(frozen=True)
class _AsNamed:
    """A module named by the file itself and shaped by its factors: ``inspect`` without
    ``--base`` (``unplaced``), where nothing is merged or written."""

    key: str
    shape: tuple[int, ...]
    rows: None = None


def _factor_shape(stem: str, parts: dict, path: Path) -> tuple[int, ...]:
    """The adapted weight's shape as the factors give it: LoRA (out, in[, k...]) from
    lora_up / lora_down; LoHa (out, cols) from hada_w1_a / hada_w1_b; LoKr (a*b, c*d) from the
    Kronecker halves. Anything else needs the base."""
    def size(name: str) -> tuple[int, ...] | None:
        return tuple(int(n) for n in parts[name].shape) if name in parts else None

    down, up = size("lora_down.weight"), size("lora_up.weight")
    if down and up:
        return (up[0], *down[1:])
    w1a, w1b = size("hada_w1_a"), size("hada_w1_b")
    if w1a and w1b and "hada_t1" not in parts:
        return (w1a[0], w1b[1])
    halves = []
    for half in ("w1", "w2"):
        full, a, b = size(f"lokr_{half}"), size(f"lokr_{half}_a"), size(f"lokr_{half}_b")
        halves.append(full[:2] if full else (a[0], b[1]) if a and b and len(b) == 2 else None)
    if all(halves) and "lokr_t2" not in parts:
        return (halves[0][0] * halves[1][0], halves[0][1] * halves[1][1])
    raise OptionError(f"{path}: {stem}: its shape is not in its factors; pass --base <the model "
                      "it was trained on> to inspect it")


def read(path: Path, *, base=None, unplaced: bool = False) -> Adapter:
    """The file's modules keyed by the base's own tensor names (``base``: the path of a
    diffusers pipeline/component folder or a .safetensors checkpoint; required, except with
    ``unplaced``: inspect's view, keyed by the file's own module names)."""
    path = Path(path)
    if base is None and not unplaced:   # misuse (exit 2): the names need the base
        raise OptionError(f"{path}: a kohya LoRA names modules in underscore form, which "
                               "only its base model resolves; pass --base <the model it was "
                               "trained on> (a diffusers folder or .safetensors checkpoint)")
    tensors, metadata = load_safetensors(path)
    if not tensors:
        raise FormatError(f"{path}: holds no tensors; {REMADE}")
    lycoris = _lycoris()
    claimed = tuple(getattr(lycoris, "LYCORIS_PARTS", ()))
    modules = _group(tensors, path, claimed)
    names = kohya_names.open_names(base) if base is not None else None
    weights, stems, alphas, blocks = {}, {}, {}, {}
    for stem, parts in modules.items():
        target = names.resolve(stem, path) if names is not None else \
            _AsNamed(stem + ".weight", _factor_shape(stem, parts, path))
        if target.key in weights:
            raise FormatError(f"{path}: {stems[target.key]} and {stem} both name "
                              f"{target.key}; refusing to add one and drop the other")
        lyco = any(p not in LOCON_PARTS for p in parts)
        if target.rows is not None and not lyco:      # q/k/v of a fused in_proj_weight
            blocks.setdefault(target.key, []).append((target, stem,
                                                      _weight(stem, parts, target, path)))
            continue
        if target.rows is not None:
            raise UnsupportedError(f"{path}: {stem}: a LyCORIS module on part of the fused "
                                   f"{target.key}: not supported; merge into the diffusers "
                                   "(split q/k/v) model instead")
        if lyco:
            weights[target.key] = _lycoris_delta(stem, parts, target, path, lycoris)
        else:
            weights[target.key] = _weight(stem, parts, target, path)
            alpha = parts.get("alpha")
            alphas[target.key] = None if alpha is None else {     # as stored: 0, int64...
                "value": alpha.reshape(()).item(), "dtype": str(alpha.dtype).split(".")[-1]}
        stems[target.key] = stem
    for key, found in blocks.items():
        weights[key] = _stacked(key, found, path)
    # kohya_stems / kohya_alpha: the writer gives the same names and alpha dtypes back
    meta = {"source_format": "kohya", "kohya_stems": stems, "kohya_alpha": alphas,
            "kohya_metadata": {k: v for k, v in metadata.items() if isinstance(v, str)}}
    if names is None:       # keys are the file's own names: nothing may merge or write them
        meta[UNPLACED] = True
    elif names.components:    # against a pipeline folder: keys "<component>.<name>"
        meta["components"] = sorted({k.split(".", 1)[0] for k in weights})
    return Adapter(weights=weights, metadata=meta)


# ----------------------------------------------------------------------------- write

# component prefix of our pipeline keys -> kohya prefix, for adapters without a base at hand
COMPONENT_PREFIXES = {"unet": "lora_unet_", "transformer": "lora_transformer_",
                      "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def _stems(adapter: Adapter, base) -> dict[str, str]:
    """Adapter key -> kohya stem: the source file's own names where they still resolve, else the
    base's names; pipeline keys (``unet.``...) without a base by their component."""
    names = kohya_names.open_names(base) if base is not None else None
    kept = adapter.metadata.get("kohya_stems") or {}
    out = {}
    for key in adapter.weights:
        stem = kept.get(key)
        if names is not None and not (stem and names.targets.get(stem) and
                                      names.targets[stem].key == key):
            stem = names.stems.get(key)
            if stem is None:
                clash = [s for s, keys in names.collisions.items()
                         if key.removesuffix(".weight") in keys]
                fused = any(t.key == key and t.rows for t in names.targets.values())
                why = (f"its underscore form {clash[0]} also names "
                       f"{' and '.join(names.collisions[clash[0]])}") if clash else \
                    "a fused q/k/v weight, which kohya names as three modules" if fused else \
                    f"it is no weight of {names.source}"
                raise UnsupportedError(f"{key}: no kohya name ({why}); pass the base the "
                                       "adapter was trained on")
        if stem is None:
            component, _, inner = key.partition(".")
            if component not in COMPONENT_PREFIXES or not inner.endswith(".weight"):
                raise UnsupportedError(f"{key}: kohya names modules in underscore form, "
                                       "resolved by the base; pass --base <the model it was "
                                       "trained on>")
            prefix = COMPONENT_PREFIXES[component]
            module = kohya_names.forms(prefix, inner.removesuffix(".weight"))[0]
            stem = prefix + module.replace(".", "_")
        out[key] = stem
    if len(set(out.values())) < len(out):
        raise UnsupportedError("two adapted weights get the same kohya name; pass --base")
    return out


def _check_writable(adapter: Adapter) -> None:
    if adapter.replacements:
        raise UnsupportedError(f"{next(iter(adapter.replacements))}: a full tensor; kohya files "
                               "hold LoRA modules only: merge the adapter instead")
    for key, w in adapter.weights.items():
        if w.layer not in ("linear", "conv"):
            raise UnsupportedError(f"{key}: a LoRA on a {w.layer} layer; kohya's LoRA modules "
                                   "are Linear and Conv2d only")
        if w.bias is not None:
            raise UnsupportedError(f"{key}: a lora_bias; kohya's LoRA modules have none")


def _alpha_for(w: LoraWeight, stored):
    """``.alpha`` (0-d) for ``w``: the source file's own (its value and dtype, 0 and integers
    included; None where it had none) while it still gives ``w.scale``, else scale * rank as
    float32, what sd-scripts' LoRAModule registers (``torch.tensor(alpha)``)."""
    import torch

    if stored is None:
        return None if w.scale == 1.0 else torch.tensor(w.scale * w.rank, dtype=torch.float32)
    value, dtype = stored.get("value"), getattr(torch, str(stored.get("dtype")), None)
    if isinstance(value, (int, float)) and isinstance(dtype, torch.dtype):
        kept = torch.tensor(value, dtype=dtype)
        if (float(kept.double()) or w.rank) / w.rank == w.scale:
            return kept
    return torch.tensor(w.scale * w.rank, dtype=torch.float32)


def tensors_for(adapter: Adapter, stems: dict[str, str]) -> dict:
    kept = adapter.metadata.get("kohya_alpha") or {}
    out = {}
    for key, w in adapter.weights.items():
        stem, shape = stems[key], w.stored_shape
        if w.layer == "conv":          # (r, in, k, k) down, (out, r, 1, 1) up
            out[f"{stem}.lora_down.weight"] = w.a.reshape(w.rank, *shape[1:])
            out[f"{stem}.lora_up.weight"] = w.b.reshape(*w.b.shape, *[1] * (len(shape) - 2))
        else:
            out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = w.a, w.b
        alpha = _alpha_for(w, kept.get(key, {}))
        if alpha is not None:
            out[f"{stem}.alpha"] = alpha
        if w.magnitude is not None:    # (out, 1) / (out, 1, 1, 1), lycoris' dora_scale
            out[f"{stem}.dora_scale"] = w.magnitude.reshape(-1, *[1] * (len(shape) - 1))
    return {k: t.contiguous() for k, t in out.items()}


def metadata_for(adapter: Adapter) -> dict[str, str]:
    """The source's own metadata, with sd-scripts' network fields for what is written."""
    meta = dict(adapter.metadata.get("kohya_metadata") or {})
    ranks = {w.rank for w in adapter.weights.values()}
    alphas = {w.scale * w.rank for w in adapter.weights.values()}
    meta["ss_network_module"] = meta.get("ss_network_module", "networks.lora")
    meta["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    meta["ss_network_alpha"] = f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic"
    if any(w.magnitude is not None for w in adapter.weights.values()):
        meta.setdefault("ss_network_args", json.dumps({"dora_wd": "True"}))
    return meta


def write(adapter: Adapter, path: Path, *, base=None) -> None:
    """One kohya .safetensors at ``path``; ``base`` (a path) names the modules."""
    from ..light.arrays import save_file   # metadata in sorted order

    _check_writable(adapter)
    stems = _stems(adapter, base)
    save_file(tensors_for(adapter, stems), str(path), metadata=metadata_for(adapter))


# ----------------------------------------------------------------------------- inspect

def describe(path: Path) -> dict:
    """Storage facts for ``inspect``: prefixes, module count, ranks (from the header)."""
    from ..tensor_index import read_safetensors_header

    header = read_safetensors_header(Path(path))
    downs = [t for t in header.tensors if t.name.endswith(".lora_down.weight")]
    prefixes = sorted({p for t in header.tensors for p in kohya_names.PREFIXES
                       if t.name.startswith(p)})
    return {"prefixes": prefixes, "modules": len({t.name.split(".", 1)[0]
                                                  for t in header.tensors}),
            "ranks": sorted({int(t.shape[0]) for t in downs}),
            "network_module": header.metadata.get("ss_network_module")}
