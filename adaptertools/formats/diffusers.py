"""diffusers LoRA files: ``pytorch_lora_weights.safetensors`` as diffusers 0.42's
``save_lora_weights`` writes it (checked against diffusers 0.42.1 with PEFT 0.21.2).

- Keys: PEFT's (``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r), ``lora_B.bias``,
  ``lora_magnitude_vector`` for DoRA; conv ``lora_A`` (r, in, kh, kw), ``lora_B`` (out, r, 1, 1))
  under the pipeline component they belong to: ``unet.``, ``text_encoder.``,
  ``text_encoder_2.``, ``transformer.`` (``LoraBaseMixin._save_lora_weights`` packs each
  component's ``get_peft_model_state_dict`` with ``_pack_dict_with_prefix``).
- Metadata: ``lora_adapter_metadata``, a JSON object of each component's ``LoraConfig.to_dict()``
  flattened under the same prefix (``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``, ...);
  diffusers rebuilds ``LoraConfig(**those)`` when it loads, so PEFT's scale rule applies per
  component (``lora_alpha / r``, rsLoRA, patterns: formats/peft.py).
- A model's own file (``ModelMixin.save_lora_adapter``, e.g. ``unet.save_lora_adapter(dir)``):
  the same without prefixes, its LoraConfig unprefixed in the metadata; read with its own names
  (merge it into that model's folder) and written back the same way.
- No metadata (older trainers): diffusers' ``get_peft_kwargs`` takes alpha = r, scale 1; read
  with ``scale=`` (``--scale``) when given, else 1.0 with a warning that says so.

An Adapter read here keys each tensor ``<component>.<tensor name inside that component>``
(``unet.down_blocks.0.attentions.0.proj_in.weight``), the convention the kohya reader shares;
``split_by_component`` gives one Adapter per component with that prefix stripped
(merging/pipeline.py merges each into its subfolder of a pipeline folder). Older diffusers keys
(``.lora.down.weight``) and kohya's ``lora_unet_`` are formats/kohya.py's.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from .._io import load_safetensors
from ..adapter import Adapter
from ..errors import AdapterToolsWarning, FormatError, OptionError, UnsupportedError
from . import accounting, foreign, peft
from .peft_keys import KEY_PREFIX

DESCRIPTION = "diffusers LoRA (pytorch_lora_weights.safetensors: unet./text_encoder./transformer.)"
SNIFF_ORDER = 40           # before our own safetensors file (50): both are one .safetensors
OUTPUT_IS_DIR = True       # a folder with pytorch_lora_weights.safetensors, as save_lora_weights
PIPELINE_KEYS = True       # writes "<component>.<name>" keys (adapter_io: others get one component)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"     # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = foreign.DIFFUSERS_METADATA_KEY         # "lora_adapter_metadata"
# The component names diffusers' LoRA loader mixins give their models (loaders/lora_pipeline.py
# 0.42: unet_name, transformer_name, text_encoder_name, and the SDXL / SD3 / Flux text encoders'
# attribute names in their save_lora_weights); ``prior`` is Wuerstchen's / Stable Cascade's.
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")
# PEFT's key leaves (formats/peft_keys.py LORA_PARTS) as they end a diffusers key
PEFT_LEAF = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight|\.bias)?$|"
                       r"\.lora_magnitude_vector$")
# Keys without a component prefix (a PEFT folder of one model), by their first module: which
# component they are, for writing a diffusers file (diffusers' own module names: UNet2D blocks,
# transformers' CLIPTextModel (4.x: text_model.; 5.x: encoder., embeddings.), the DiT
# transformers' block lists).
COMPONENT_ROOTS = {
    "unet": ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding"),
    "text_encoder": ("text_model", "encoder", "embeddings", "final_layer_norm"),
    "transformer": ("transformer_blocks", "single_transformer_blocks", "x_embedder",
                    "context_embedder", "proj_out", "pos_embed"),
}
# Module-path prefixes that one library version has and another drops, so a LoRA's names and a
# checkpoint's can differ by them: transformers 5 dropped CLIPTextModel's ``text_model.``
# (transformers/conversion_mapping.py: PrefixChange(prefix_to_remove="text_model")), while the
# SD / SDXL text encoders on the Hub were saved with it.
RENAMED_PREFIXES = ("text_model.",)
NO_METADATA = ("no lora_adapter_metadata (alpha unknown): scale {scale:g} assumed for every "
               "module, as diffusers assumes (alpha = rank); pass --scale S if the trainer used "
               "another alpha")


# ----------------------------------------------------------------------------- locating

def locate(path: Path) -> Path | None:
    """The diffusers LoRA file ``path`` designates: the file, or a folder holding
    ``pytorch_lora_weights.safetensors``; None when it is neither."""
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file() or file.suffix != ".safetensors":
        return None
    return file


def _header(file: Path):
    from ..tensor_index import read_safetensors_header

    try:
        return read_safetensors_header(file)
    except (FormatError, OSError, ValueError):
        return None


def sniff(path: Path) -> bool:
    """diffusers' metadata entry, or PEFT keys under a pipeline component's prefix."""
    file = locate(path)
    header = _header(file) if file is not None else None
    if header is None or header.metadata.get("format") == "adaptertools.lora":
        return False
    if METADATA_KEY in header.metadata:
        return True
    names = [t.name for t in header.tensors]
    return any(n.split(".", 1)[0] in COMPONENTS and PEFT_LEAF.search(n) for n in names)


# ----------------------------------------------------------------------------- components

def component_of(name: str) -> str | None:
    """``unet.down_blocks.0...`` -> ``unet``; None for a name without a component prefix."""
    head = name.split(".", 1)[0]
    return head if head in COMPONENTS and "." in name else None


def _guess_component(name: str) -> str | None:
    head = name.split(".", 1)[0]
    return next((c for c, roots in COMPONENT_ROOTS.items() if head in roots), None)


def split_by_component(adapter: Adapter, *, where: str = "", guess: bool = False
                       ) -> dict[str, Adapter]:
    """One Adapter per pipeline component, keys without the ``<component>.`` prefix, metadata
    kept (plus ``component``). A name outside every component is an error naming it; with
    ``guess``, names without a prefix are placed by their first module (COMPONENT_ROOTS) when
    that is unambiguous."""
    at = f"{where}: " if where else ""
    parts: dict[str, Adapter] = {}
    unplaced = []
    for table in ("weights", "replacements"):
        for name, value in getattr(adapter, table).items():
            component = component_of(name)
            rest = name[len(component) + 1:] if component else name
            if component is None and guess:
                component = _guess_component(name)
            if component is None:
                unplaced.append(name)
                continue
            metadata = {k: v for k, v in adapter.metadata.items() if k != "components"}
            part = parts.setdefault(component, Adapter(base_model=adapter.base_model,
                                                       metadata=dict(metadata,
                                                                     component=component)))
            getattr(part, table)[rest] = value
    if unplaced:
        roots = "; ".join(f"{c}: {', '.join(r[:3])}..." for c, r in COMPONENT_ROOTS.items())
        raise FormatError(f"{at}{len(unplaced)} tensor(s) belong to no pipeline component "
                          f"({', '.join(p + '.' for p in COMPONENTS)}): "
                          f"{', '.join(unplaced[:3])}; a diffusers LoRA keys each tensor under "
                          "its component" + (f" (names placed by their first module: {roots})"
                                              if guess else ""))
    return parts


def join_components(parts: dict[str, Adapter]) -> Adapter:
    """The inverse of ``split_by_component``: one Adapter, names prefixed ``<component>.``."""
    joined = Adapter()
    for component, part in parts.items():
        joined.weights.update({f"{component}.{n}": w for n, w in part.weights.items()})
        joined.replacements.update({f"{component}.{n}": t for n, t in part.replacements.items()})
    return joined


# ----------------------------------------------------------------------------- one model's folder

def for_component(adapter: Adapter, entries: dict, base, where: str) -> Adapter:
    """``adapter`` as it applies to the single model folder ``base`` (tensor names
    ``entries``): a one-component adapter (``unet.<name>``) loses its prefix when the base's
    tensors are named without it; a multi-component one is refused (merge into the pipeline
    folder). Any other adapter comes back as it is."""
    names = list(adapter.weights) + list(adapter.replacements)
    found = {component_of(n) for n in names}
    if not names or None in found or any(n in entries for n in names):
        return adapter
    parts = split_by_component(adapter, where=where)
    matching = [c for c, part in parts.items()
                if any(n in entries for n in list(part.weights) + list(part.replacements))]
    if len(parts) > 1:
        here = f" ({matching[0]})" if len(matching) == 1 else ""
        raise UnsupportedError(f"{where}: holds LoRA tensors for {', '.join(sorted(parts))}, "
                               f"but {base} is one model{here}; merge into the pipeline folder "
                               "(the one with model_index.json) so that each component gets its "
                               "own")
    if not matching:
        return adapter           # nothing fits either way: the planner names the mismatches
    (part,) = parts.values()
    part.metadata.pop("component", None)
    return align_names(part, entries)


def align_names(part: Adapter, entries: dict) -> Adapter:
    """``part`` with a RENAMED_PREFIXES prefix added to (or dropped from) every name when that
    makes all of them the base's tensor names (``entries``); else ``part`` as it is (the
    planner names what does not fit)."""
    names = list(part.weights) + list(part.replacements)
    if all(n in entries for n in names):
        return part
    for prefix in RENAMED_PREFIXES:
        for fix in (lambda n, p=prefix: p + n, lambda n, p=prefix: n.removeprefix(p)):
            if all(fix(n) in entries for n in names):
                return Adapter({fix(n): w for n, w in part.weights.items()},
                               {fix(n): t for n, t in part.replacements.items()},
                               part.base_model, part.metadata)
    return part


# ----------------------------------------------------------------------------- read

def _metadata(file: Path, metadata: dict[str, str]) -> dict | None:
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise FormatError(f"{file}: `{METADATA_KEY}` is not a JSON object; the file's metadata "
                          "is damaged, save the LoRA again with save_lora_weights")
    return config


def component_config(config: dict | None, component: str) -> dict | None:
    """A component's LoraConfig fields from the flat metadata (``unet.r`` -> ``r``), or None
    when the metadata has none for it."""
    prefix = component + "."
    found = {k[len(prefix):]: v for k, v in (config or {}).items() if k.startswith(prefix)}
    return found or None


def _outside(file: Path, keys: list[str]) -> FormatError | UnsupportedError:
    what = foreign.looks_like(keys)
    shown = ", ".join(keys[:3]) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")
    if what is not None and "diffusers LoRA (PEFT" not in what:
        return UnsupportedError(f"{file}: {len(keys)} tensor(s) are not a diffusers component's "
                                f"PEFT tensors but look like {what}: {shown}")
    return FormatError(f"{file}: {len(keys)} tensor(s) belong to no pipeline component "
                       f"({', '.join(c + '.' for c in COMPONENTS)}): {shown}; diffusers would "
                       "not load them either: rename them under their component or drop them")


def _model_level(config: dict | None, tensors: dict) -> bool:
    """A file of one model (``save_lora_adapter``): unprefixed keys, its LoraConfig unprefixed
    in the metadata (``r``, ``lora_alpha``)."""
    return config is not None and "r" in config and "lora_alpha" in config and \
        not any(component_of(k) for k in tensors)


def _read_component(file: Path, component: str, state: dict, config: dict | None,
                    scale: float | None) -> Adapter:
    """One component's PEFT state dict -> an Adapter with its own (unprefixed) names."""
    where = f"{file} ({component})"
    if config is None:
        value = 1.0 if scale is None else float(scale)
        if scale is None:
            warnings.warn(f"{where}: " + NO_METADATA.format(scale=value), AdapterToolsWarning,
                          stacklevel=4)

        def scale_for(module: str, rank: int) -> float:
            return value
    else:
        peft.check_config(config, f"{file}: {METADATA_KEY} for {component}")
        rslora = bool(config.get("use_rslora", False))

        def scale_for(module: str, rank: int) -> float:
            expected, alpha = peft.resolve_rank_alpha(config, module)
            if rank and rank != expected:
                raise FormatError(f"{where}: {module} has rank {rank} but {METADATA_KEY} says "
                                  f"{expected} ({component}.r / rank_pattern); fix the metadata")
            return peft.scale_of(alpha, expected, rslora)
    accounting.check_accounted(state, config, where)
    adapter = peft.adapter_from_state_dict(state, scale_for, where=Path(where),
                                           fan_in_fan_out=bool((config or {}).get(
                                               "fan_in_fan_out")))
    if config is not None:
        accounting.warn_disagreements(adapter, config, where)
    return adapter


def read(path: Path, *, scale: float | None = None) -> Adapter:
    file = locate(Path(path))
    if file is None:
        raise FormatError(f"{path}: no {WEIGHTS_NAME} here; pass the file diffusers' "
                          "save_lora_weights wrote, or its folder")
    tensors, metadata = load_safetensors(file)
    if not tensors:
        raise FormatError(f"{file}: holds no tensors; save the LoRA again")
    config = _metadata(file, metadata)
    if _model_level(config, tensors):
        if scale is not None:
            raise OptionError(f"{file}: --scale only applies to files without {METADATA_KEY}; "
                              "this one carries lora_alpha and r, drop --scale")
        adapter = _read_component(file, "model", tensors, config, None)
        adapter.metadata = {"source_format": "diffusers", "diffusers_metadata": config,
                            "diffusers_layout": "model"}
        return adapter
    states: dict[str, dict] = {}
    outside = []
    for key, tensor in tensors.items():
        component = component_of(key)
        if component is None:
            outside.append(key)
        else:
            states.setdefault(component, {})[key[len(component) + 1:]] = tensor
    if outside:
        raise _outside(file, outside)
    configs = {c: component_config(config, c) for c in states}
    if scale is not None and all(configs.values()):
        raise OptionError(f"{file}: --scale only applies to files without {METADATA_KEY}; this "
                          "one carries each component's lora_alpha and r, drop --scale")
    parts = {c: _read_component(file, c, s, configs[c], scale) for c, s in states.items()}
    adapter = join_components(parts)
    adapter.metadata = {"source_format": "diffusers", "diffusers_metadata": config,
                        "components": sorted(parts)}
    copies = [f"{c}.{n}" for c, s in states.items() if configs[c]
              for n in peft.saved_base_copies(s, configs[c])]
    if copies:
        from ..copies import SAVED_COPIES

        adapter.metadata[SAVED_COPIES] = copies
    return adapter


# ----------------------------------------------------------------------------- write

def _component_state(part: Adapter, component: str, config: dict | None) -> tuple[dict, dict]:
    """(tensors under ``<component>.``, the component's LoraConfig fields) for one component."""
    part.metadata = {"peft_config": config} if config else {}
    lora_config = peft.config_for(part)
    prefix = f"{component}." if component else ""      # "": a model's own file
    state = {prefix + k.removeprefix(KEY_PREFIX): t for k, t in peft.state_dict_for(part).items()}
    return state, lora_config


def write(adapter: Adapter, path: Path) -> None:
    """Fill the folder ``path`` with ``pytorch_lora_weights.safetensors``, as diffusers'
    save_lora_weights writes it (metadata included, so load_lora_weights gets each component's
    alpha and r)."""
    from ..light.arrays import save_file   # metadata in sorted order

    source = adapter.metadata.get("diffusers_metadata")
    source = source if isinstance(source, dict) else None
    if adapter.metadata.get("diffusers_layout") == "model":     # save_lora_adapter's file
        part = Adapter(adapter.weights, adapter.replacements, adapter.base_model)
        state, lora_config = _component_state(part, "", source)
        save_file({k: t.contiguous() for k, t in state.items()},
                  str(Path(path) / WEIGHTS_NAME), metadata={
                      "format": "pt", METADATA_KEY: json.dumps(lora_config, indent=2,
                                                               sort_keys=True)})
        return
    parts = split_by_component(adapter, where="diffusers output", guess=True)
    tensors, flat = {}, {}
    for component, part in parts.items():
        own = component_config(source, component)
        if own is None and len(parts) == 1 and isinstance(adapter.metadata.get("peft_config"),
                                                          dict):
            own = adapter.metadata["peft_config"]       # a PEFT folder of this one component
        state, lora_config = _component_state(part, component, own)
        tensors.update(state)
        flat.update({f"{component}.{k}": v for k, v in lora_config.items()})
    text = json.dumps(flat, indent=2, sort_keys=True)   # as diffusers' write_lora_layers
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(Path(path) / WEIGHTS_NAME),
              metadata={"format": "pt", METADATA_KEY: text})


# ----------------------------------------------------------------------------- inspect

def describe(path: Path) -> dict:
    """Storage facts for ``inspect``: the components and each one's r / lora_alpha."""
    file = locate(Path(path))
    header = _header(file)
    config = _metadata(file, header.metadata) if header is not None else None
    components = sorted({c for t in (header.tensors if header else ()) if (c := component_of(
        t.name))})
    return {"file": file.name, "components": components, "metadata": config is not None,
            **{f"{c}.{k}": v for c in components for k in ("r", "lora_alpha", "use_dora",
                                                            "use_rslora")
               if (v := (component_config(config, c) or {}).get(k)) is not None}}
