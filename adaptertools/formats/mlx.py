"""mlx-lm adapters (MLX on Apple silicon, and on Linux CPUs): ``adapters.safetensors`` +
``adapter_config.json``, as ``mlx_lm.lora`` saves them (checked against mlx-lm 0.32.2).

- Config (the training arguments, ``mlx_lm/lora.py``): ``fine_tune_type`` lora | dora | full,
  ``num_layers`` (the LAST N blocks ``model.layers[-N:]`` are adapted; N <= 0 means all),
  ``lora_parameters`` {``rank``, ``scale``, ``dropout``, ``keys``}. ``keys`` are module paths
  inside a block (``self_attn.q_proj``) or of the whole model (``lm_head``); without ``keys``
  every Linear and Embedding of the adapted blocks is (``tuner/utils.linear_to_lora_layers``).
- Tensors (``tree_flatten(model.trainable_parameters())``): ``<module>.lora_a`` (in, r),
  ``<module>.lora_b`` (r, out), DoRA ``<module>.m`` (out,). The module paths of mlx-lm's Llama,
  Qwen2, Mistral... are the HF ones, so the base tensor is ``<module>.weight``.
- Fused weight (``tuner/lora.py`` LoRALinear.fuse): ``W + (scale * lora_b.T) @ lora_a.T``:
  ``scale`` multiplies directly (no alpha / r), so ``a = lora_a.T`` (r, in), ``b = lora_b.T``
  (out, r). DoRA (``tuner/dora.py``): ``V = W + delta``, ``W' = (m / ||V||_row) * V``, PEFT's rule
  with ``m`` its ``lora_magnitude_vector``. Embedding LoRA: ``W (vocab, dim) + scale * lora_a @
  lora_b``, lora_a (vocab, r), lora_b (r, dim); mlx-lm's DoRA on an embedding normalises each
  token's row, PEFT's each dimension over the vocabulary: not read.
- ``full``: the trained blocks' own tensors under their names: full replacement tensors.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .._io import load_safetensors, read_json, write_json
from ..adapter import Adapter, LoraWeight, check_weight, module_name
from ..errors import AdapterToolsWarning, FormatError, UnsupportedError
from . import accounting, foreign

if TYPE_CHECKING:    # read(light=True) holds light.arrays.Stored tensors instead
    import torch

DESCRIPTION = "mlx-lm adapter folder (adapters.safetensors + adapter_config.json)"
SNIFF_ORDER = 5            # before PEFT (10): both folders hold an adapter_config.json
OUTPUT_IS_DIR = True

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
FINE_TUNE_TYPES = ("lora", "dora", "full")
LEAVES = ("lora_a", "lora_b", "m")
# the attribute names of nn.Embedding in mlx-lm's models (llama/qwen2/mistral..., gpt2, olmo):
# their LoRA is LoRAEmbedding, whose factors are laid out the other way round
EMBEDDINGS = ("embed_tokens", "wte", "tok_embeddings", "word_embeddings")
# ``model.layers.3.self_attn.q_proj`` -> (``model.layers``, 3, ``self_attn.q_proj``)
BLOCK = re.compile(r"^(?P<outer>(?:.*\.)?layers)\.(?P<index>\d+)\.(?P<inner>.+)$")
REMADE = "save the adapter again with mlx_lm.lora"


# ----------------------------------------------------------------------------- locating

def locate(path: Path) -> Path | None:
    """The mlx-lm adapter folder ``path`` designates (the folder, or one of its two files)."""
    path = Path(path)
    folder = path.parent if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME) else path
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        return None
    try:
        return folder if foreign.mlx_config(read_json(folder / CONFIG_NAME)) else None
    except (FormatError, OSError):
        return None


def sniff(path: Path) -> bool:
    return locate(path) is not None


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class Settings:
    """What mlx-lm's ``load_adapters`` reads of adapter_config.json."""

    fine_tune_type: str             # lora | dora | full
    num_layers: int                 # the last N blocks; <= 0: all
    rank: int | None                # lora_parameters (None for full)
    scale: float | None
    keys: tuple[str, ...] | None    # None: every Linear / Embedding of the adapted blocks


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def settings(config: dict, where: Path) -> Settings:
    """The config's fields mlx-lm uses, each checked; a FormatError naming the field."""
    def bad(field: str, expected: str) -> FormatError:
        return FormatError(f"{where}: `{field}` is {config_value(config, field)!r}, expected "
                           f"{expected}; fix the config")

    kind = config.get("fine_tune_type", "lora")
    if kind not in FINE_TUNE_TYPES:
        raise bad("fine_tune_type", " or ".join(FINE_TUNE_TYPES))
    layers = config.get("num_layers")
    if not isinstance(layers, int) or isinstance(layers, bool):
        raise bad("num_layers", "a whole number (the last N blocks; -1 for all)")
    if kind == "full":
        return Settings(kind, layers, None, None, None)
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise bad("lora_parameters", "an object with rank, scale, dropout and keys")
    rank, scale, keys = params.get("rank"), params.get("scale"), params.get("keys")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise bad("lora_parameters.rank", "a whole number >= 1")
    if not _number(scale):
        hint = " (mlx-lm's scale multiplies B @ A directly; it has no alpha)" \
            if "alpha" in params else ""
        raise bad("lora_parameters.scale", f"a finite number{hint}")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise bad("lora_parameters.keys", "a list of module paths, or null")
    return Settings(kind, layers, rank, float(scale), None if keys is None else tuple(keys))


def config_value(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


# ----------------------------------------------------------------------------- read

def read(path: Path, *, light: bool = False) -> Adapter:
    """``light``: the tensors as light.arrays.Stored (numpy, no torch)."""
    folder = locate(Path(path))
    if folder is None:
        raise FormatError(f"{path}: no mlx-lm adapter here ({CONFIG_NAME} with lora_parameters "
                          f"and {WEIGHTS_NAME}); pass the adapter folder mlx_lm.lora wrote")
    config = read_json(folder / CONFIG_NAME)
    s = settings(config, folder / CONFIG_NAME)
    file = folder / WEIGHTS_NAME
    if light:
        from ..light.arrays import load_safetensors as load_light

        tensors, _ = load_light(file)
    else:
        tensors, _ = load_safetensors(file)
    if not tensors:
        raise FormatError(f"{file}: holds no tensors; {REMADE}")
    if s.fine_tune_type == "full":
        adapter = Adapter(replacements=_full_tensors(tensors, file))
    else:
        modules = _group(tensors, s, file)
        _check_modules(modules, s, file, folder / CONFIG_NAME)
        adapter = Adapter(weights={m + ".weight": _weight(m, parts, s, file)
                                   for m, parts in modules.items()})
    model = config.get("model")
    adapter.base_model = model if isinstance(model, str) else None
    adapter.metadata = {"source_format": "mlx", "mlx_config": config}
    return adapter


def _full_tensors(tensors: dict, file: Path) -> dict[str, torch.Tensor]:
    """fine_tune_type full: the trained tensors themselves, each replacing the base's."""
    odd = [k for k in tensors if k.rsplit(".", 1)[-1] in LEAVES + ("scales", "biases")]
    if odd:
        raise FormatError(f"{file}: {odd[0]} is a LoRA factor or a quantization state, but "
                          "fine_tune_type is full (whole trained tensors); fix fine_tune_type "
                          "in the config")
    return dict(tensors)


def _group(tensors: dict, s: Settings, file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {leaf: tensor}}; every tensor is a lora_a, lora_b or (DoRA) m, or refused."""
    leaves = LEAVES if s.fine_tune_type == "dora" else LEAVES[:2]
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        module, _, leaf = key.rpartition(".")
        if module and leaf in leaves:
            modules.setdefault(module, {})[leaf] = tensor
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" (and {len(unknown) - 3} more)" if len(unknown) > 3
                                          else "")
        what = "" if s.fine_tune_type == "dora" or not any(k.endswith(".m") for k in unknown) \
            else " (DoRA magnitudes, but fine_tune_type is lora: set it to dora if it is DoRA)"
        raise FormatError(f"{file}: {len(unknown)} tensor(s) are not mlx-lm "
                          f"{s.fine_tune_type.upper()} tensors ({', '.join(leaves)}): "
                          f"{shown}{what}; mlx-lm would refuse to load them")
    return modules


def _weight(module: str, parts: dict[str, torch.Tensor], s: Settings, file: Path) -> LoraWeight:
    """One module's factors in the stored weight's layout."""
    for leaf, partner in (("lora_a", "lora_b"), ("lora_b", "lora_a")):
        if leaf not in parts:
            raise FormatError(f"{file}: {module}.{leaf} is missing (its partner "
                              f"{module}.{partner} is there); the adapter file is incomplete, "
                              f"{REMADE}")
    if s.fine_tune_type == "dora" and "m" not in parts:
        raise FormatError(f"{file}: {module}.m is missing (fine_tune_type dora): mlx-lm would "
                          "use the base weight's own norms; the adapter file is incomplete, "
                          f"{REMADE}")
    lora_a, lora_b = parts["lora_a"], parts["lora_b"]      # (in, r), (r, out)
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise UnsupportedError(f"{file}: {module}: {lora_a.dim()}-D factors {tuple(lora_a.shape)}"
                               ": a LoRA on MoE experts (SwitchLinear): not supported yet")
    for leaf, axis in (("lora_a", 1), ("lora_b", 0)):
        if parts[leaf].shape[axis] != s.rank:
            raise FormatError(f"{file}: {module}.{leaf} is {tuple(parts[leaf].shape)}, not of "
                              f"rank {s.rank} (lora_parameters.rank); mlx-lm would refuse to "
                              "load it: fix the rank in the config")
    embedding = module.rsplit(".", 1)[-1] in EMBEDDINGS
    if embedding and "m" in parts:
        raise UnsupportedError(f"{file}: {module}: mlx-lm's DoRA on an embedding normalises each "
                               "token's row (PEFT's each dimension): not supported yet")
    if embedding:       # stored (vocab, dim): a (r, dim), b (vocab, r)
        a, b, layer = lora_b, lora_a, "embedding"
    else:               # stored (out, in): a (r, in), b (out, r)
        a, b, layer = lora_a.T, lora_b.T, "linear"
    weight = LoraWeight(a=a.contiguous(), b=b.contiguous(), scale=s.scale, layer=layer,
                        magnitude=parts.get("m"))
    check_weight(module, weight, where=str(file))
    accounting.check_factors(module, weight, file)
    return weight


def _check_modules(modules: dict, s: Settings, file: Path, config_path: Path) -> None:
    """The modules are those mlx-lm's load_adapters would wrap: in ``keys``, and in the last
    ``num_layers`` blocks."""
    blocks = {}
    for module in modules:
        found = BLOCK.match(module)
        inner = found["inner"] if found else module
        if s.keys is None and not found:
            raise FormatError(f"{file}: {module} is outside the model's blocks, and "
                              "lora_parameters has no keys (mlx-lm then adapts blocks only); "
                              f"add \"{module}\" to lora_parameters.keys in {config_path.name}")
        if s.keys is not None and inner not in s.keys:
            raise FormatError(f"{file}: {module} is not among lora_parameters.keys "
                              f"({', '.join(s.keys)}); mlx-lm would refuse to load its tensors: "
                              f"add \"{inner}\" to keys in {config_path.name}")
        if found:
            blocks.setdefault(int(found["index"]), module)
    if not blocks or s.num_layers <= 0:
        return
    low, high = min(blocks), max(blocks)
    if high - low + 1 > s.num_layers:
        raise FormatError(f"{config_path}: num_layers is {s.num_layers} (LoRA on the last "
                          f"{s.num_layers} blocks) but {file.name} has LoRA tensors in blocks "
                          f"{low}-{high} ({len(blocks)} blocks, e.g. {blocks[low]}.lora_a); "
                          f"set num_layers to {high - low + 1} if the base has {high + 1} "
                          "blocks, or -1 for all")
    if low > 0 and len(blocks) < s.num_layers:
        warnings.warn(f"{config_path}: num_layers is {s.num_layers} but {file.name} has LoRA "
                      f"tensors in {len(blocks)} blocks only ({low}-{high}): the other blocks "
                      "are left unchanged (as mlx-lm leaves them); if tensors are missing, "
                      f"{REMADE}", AdapterToolsWarning, stacklevel=4)


# ----------------------------------------------------------------------------- write

def _one(values: dict[str, object], what: str, why: str):
    """The one value mlx-lm's config can hold for every module, or an UnsupportedError."""
    counts = Counter(values.values())
    if len(counts) > 1:
        (common, _), (other, _) = counts.most_common(2)
        example = {v: m for m, v in values.items()}
        raise UnsupportedError(f"mlx-lm has one {what} for every module ({why}); this adapter "
                               f"has {what} {common} ({example[common]}) and {other} "
                               f"({example[other]}): refusing to write it as an MLX adapter; "
                               "convert it to PEFT or GGUF, or merge it")
    return next(iter(counts))


def _check_representable(adapter: Adapter) -> bool:
    """Refuse what mlx-lm's LoRA / DoRA layers cannot hold; True for DoRA."""
    if adapter.replacements:
        raise UnsupportedError(f"{next(iter(adapter.replacements))}: a full tensor beside LoRA "
                               "factors; an mlx-lm adapter holds either (fine_tune_type lora/"
                               "dora or full), not both: merge the adapter instead")
    for name, w in adapter.weights.items():
        embedding = module_name(name).rsplit(".", 1)[-1] in EMBEDDINGS
        if w.layer not in ("linear", "embedding") or (w.layer == "embedding") != embedding:
            raise UnsupportedError(f"{name}: a LoRA on a {w.layer} layer; mlx-lm's LoRA layers "
                                   "are Linear and Embedding (named " + "/".join(EMBEDDINGS) +
                                   ") only")
        if w.bias is not None:
            raise UnsupportedError(f"{name}: a lora_bias; mlx-lm's LoRA layers have none")
        if w.layer == "embedding" and w.magnitude is not None:
            raise UnsupportedError(f"{name}: DoRA on an embedding: mlx-lm normalises each "
                                   "token's row, PEFT each dimension; they differ")
    dora = [module_name(n) for n, w in adapter.weights.items() if w.magnitude is not None]
    plain = [module_name(n) for n, w in adapter.weights.items() if w.magnitude is None]
    if dora and plain:
        raise UnsupportedError(f"{dora[0]} has a DoRA magnitude and {plain[0]} none; mlx-lm's "
                               "fine_tune_type (lora or dora) is one for every module: split the "
                               "adapter, or merge it")
    return bool(dora)


def config_for(adapter: Adapter) -> dict:
    """The adapter_config.json that makes mlx-lm rebuild ``adapter``; the source's own config
    is kept where it still describes the tensors (an MLX round trip gives it back unchanged)."""
    original = adapter.metadata.get("mlx_config")
    config = dict(original) if isinstance(original, dict) else {}
    modules = [module_name(n) for n in adapter.weights]
    peft_config = adapter.metadata.get("peft_config") or {}
    if adapter.base_model and not isinstance(config.get("model"), str):
        config["model"] = adapter.base_model
    if not adapter.weights:
        blocks = {int(m["index"]) for n in adapter.replacements if (m := BLOCK.match(n))}
        config.update(fine_tune_type="full", lora_parameters=None,
                      num_layers=config.get("num_layers", len(blocks) or -1))
        return config
    dora = _check_representable(adapter)
    rank = _one({m: w.rank for m, w in zip(modules, adapter.weights.values())}, "rank",
                "lora_parameters.rank")
    scale = _one({m: w.scale for m, w in zip(modules, adapter.weights.values())}, "scale",
                 "lora_parameters.scale")
    params = dict(config.get("lora_parameters") or {})
    params.update(rank=rank, scale=scale)
    params.setdefault("dropout", float(peft_config.get("lora_dropout") or 0.0))
    inner = sorted({m["inner"] if (m := BLOCK.match(n)) else n for n in modules})
    keys = params.get("keys")
    if keys is None and original and all(BLOCK.match(n) for n in modules):
        pass                 # none: every Linear / Embedding of the blocks, ours among them
    elif not (isinstance(keys, list) and set(inner) <= set(keys)):
        params["keys"] = inner
    config.update(fine_tune_type="dora" if dora else "lora", lora_parameters=params)
    blocks = [int(m["index"]) for n in modules if (m := BLOCK.match(n))]
    layers = config.get("num_layers")
    if not (isinstance(layers, int) and (layers <= 0 or not blocks or
                                         max(blocks) - min(blocks) < layers)):
        config["num_layers"] = -1  # every block wrapped; those without tensors stay unchanged
    return config


def tensors_for(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter as mlx-lm's trainable parameters: lora_a (in, r), lora_b (r, out), m."""
    out = {name: t.contiguous() for name, t in adapter.replacements.items()}
    for name, w in adapter.weights.items():
        module = module_name(name)
        if w.layer == "embedding":        # lora_a (vocab, r), lora_b (r, dim)
            out[f"{module}.lora_a"], out[f"{module}.lora_b"] = w.b, w.a
        else:                             # lora_a (in, r), lora_b (r, out)
            out[f"{module}.lora_a"], out[f"{module}.lora_b"] = w.a.T, w.b.T
        if w.magnitude is not None:
            out[f"{module}.m"] = w.magnitude
    return {k: t.contiguous() for k, t in out.items()}


def write(adapter: Adapter, path: Path) -> None:
    """Fill the folder ``path`` (it exists and is empty) with an mlx-lm adapter."""
    from ..light.arrays import save_file     # torch's, or the light path's Stored tensors

    config = config_for(adapter)         # refuses first: nothing is written then
    path = Path(path)
    save_file(tensors_for(adapter), str(path / WEIGHTS_NAME), metadata={"format": "mlx"})
    write_json(path / CONFIG_NAME, config)


# ----------------------------------------------------------------------------- inspect

def describe(path: Path) -> dict:
    """Storage facts for ``inspect``: what mlx-lm reads of the config."""
    folder = locate(Path(path))
    s = settings(read_json(folder / CONFIG_NAME), folder / CONFIG_NAME)
    return {"fine_tune_type": s.fine_tune_type, "num_layers": s.num_layers, "rank": s.rank,
            "scale": s.scale, "keys": list(s.keys) if s.keys is not None else None}
