"""kohya (sd-scripts) module names resolved against a base's own tensor names.

sd-scripts names a LoRA module ``<prefix><module path with every dot replaced by _>``
(``networks/lora.py``: ``lora_name = prefix + "." + name + "." + child_name`` then
``.replace(".", "_")``), the module path being the one of the model it trained: diffusers-style
names for SD1.5/SD2 (its own original_unet.py), the original SGM names for SDXL
(``input_blocks_4_1_transformer_blocks_0_attn1_to_q``), BFL's names for Flux
(``double_blocks_0_img_attn_qkv``). So a name is resolved only against the base actually given,
by the underscore form of each of its tensors' modules; nothing is guessed.

A base is one of (``open_names``):

- a diffusers pipeline folder (model_index.json): each component's names, keyed
  ``<component>.<name>`` (the shared convention); ``lora_unet_`` -> unet (transformer when the
  pipeline has no unet), ``lora_te_`` / ``lora_te1_`` -> text_encoder, ``lora_te2_`` ->
  text_encoder_2, ``lora_transformer_`` -> transformer (diffusers' kohya export of Flux/SD3);
- one component folder (``unet/``: config.json + diffusion_pytorch_model.safetensors) or an HF
  model folder: its own names, for the prefixes its config's class allows;
- one .safetensors checkpoint in the original naming: its names with the known prefixes stripped
  (``CHECKPOINT_PREFIXES``), keyed by the full original name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .._io import read_json
from ..errors import FormatError, UnsupportedError

# sd-scripts networks/lora.py (LORA_PREFIX_UNET, LORA_PREFIX_TEXT_ENCODER, and for SDXL
# "lora_te1" / "lora_te2"), diffusers' kohya export of transformers ("lora_transformer"),
# lycoris-lora 4.1 LycorisNetwork on any torch module ("lycoris"). Longest first is not needed:
# none is a prefix of another.
PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_", "lycoris_")
UNET_PREFIXES = ("lora_unet_",)
TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")

# pipeline component -> the kohya prefixes that name its modules (diffusers' own kohya
# converters, loaders/lora_conversion_utils.py, map them the same way)
PIPELINE_COMPONENTS = {
    "unet": ("lora_unet_",),
    "transformer": ("lora_transformer_", "lora_unet_"),   # lora_unet_ only without a unet
    "text_encoder": ("lora_te_", "lora_te1_"),
    "text_encoder_2": ("lora_te2_",),
}

# Original (SGM / ldm) single-file checkpoints: tensor-name prefix -> the kohya prefixes of the
# module it holds (SD1.5 v1-inference.yaml, SDXL sd_xl_base.yaml, ComfyUI's Flux files).
CHECKPOINT_PREFIXES = (
    ("model.diffusion_model.", UNET_PREFIXES),
    ("cond_stage_model.transformer.", ("lora_te_", "lora_te1_")),        # SD1.5 CLIP-L
    ("conditioner.embedders.0.transformer.", ("lora_te1_",)),            # SDXL CLIP-L
    ("conditioner.embedders.1.model.", ("lora_te2_",)),                  # SDXL OpenCLIP-bigG
)

# What a kohya module name says about the model it was made for (first match wins).
MADE_FOR = (
    (r"^lora_unet_(input_blocks|middle_block|output_blocks)_",
     "the original (SGM) UNet naming sd-scripts uses for SDXL"),
    (r"^lora_unet_(down_blocks|mid_block|up_blocks)_",
     "diffusers-style UNet names (sd-scripts' SD1.5 / SD2 UNet)"),
    (r"^lora_unet_(double_blocks|single_blocks)_", "Flux in BFL's original naming"),
    (r"^lora_transformer_", "a diffusers transformer (Flux / SD3, diffusers' kohya export)"),
    (r"^lora_te2_", "SDXL's second text encoder"),
    (r"^lora_te1?_", "a CLIP text encoder"),
)


def made_for(stem: str) -> str:
    return next((what for pattern, what in MADE_FOR if re.search(pattern, stem)),
                "another model")


@dataclass(frozen=True)
class Target:
    key: str                      # the Adapter key: the base tensor's name (component-prefixed)
    shape: tuple[int, ...]        # the stored base weight's shape (of the row block, if one)
    # a block of the weight's rows [start, stop) (OpenCLIP's fused in_proj_weight), else None
    rows: tuple[int, int] | None = None
    rows_of: int = 0              # the whole weight's row count when ``rows`` is set


@dataclass(frozen=True)
class BaseNames:
    """Every kohya module name a base can take, and what it resolves to."""

    source: str
    what: str                     # for errors: "diffusers pipeline folder (unet, text_encoder)"
    # kohya stem (prefix + underscored module) -> the base weight it names
    targets: dict[str, Target] = field(default_factory=dict)
    # kohya stem -> the two or more dotted module names sharing that underscore form
    collisions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # adapter key -> kohya stem (the writer's inverse)
    stems: dict[str, str] = field(default_factory=dict)
    prefixes: tuple[str, ...] = PREFIXES      # the kohya prefixes this base has modules for
    components: bool = False      # a pipeline folder: keys are "<component>.<name>"

    def resolve(self, stem: str, file) -> Target:
        """The base weight ``stem`` names; a FormatError naming it when none or two do."""
        if stem in self.collisions:
            raise FormatError(f"{file}: {stem} names two modules of {self.source} "
                              f"({' and '.join(self.collisions[stem])}: one underscore form); "
                              "refusing to guess which; rename one module or drop this LoRA")
        target = self.targets.get(stem)
        prefix = next((p for p in PREFIXES if stem.startswith(p)), "")
        if target is None and prefix not in self.prefixes:
            raise FormatError(f"{file}: {stem} adapts {made_for(stem)} ({prefix}*), and "
                              f"{self.source} is {self.what}, which takes "
                              f"{', '.join(p + '*' for p in self.prefixes)} only; merge into the "
                              "whole pipeline folder (or the checkpoint holding that model)")
        if target is None:
            raise FormatError(f"{file}: {stem} maps to no weight of {self.source} ({self.what}); "
                              f"its name looks made for {made_for(stem)}: the names do not map, "
                              f"{self._hint(stem)}")
        return target

    def _hint(self, stem: str) -> str:
        """What to do about a name that maps nowhere: the same model in the other UNet naming
        (sd-scripts names SD1.5/SD2 UNets the diffusers way, SDXL's the original way), or
        another model."""
        ours = {"original": r"^lora_unet_(input_blocks|middle_block|output_blocks)_",
                "diffusers": r"^lora_unet_(down_blocks|mid_block|up_blocks)_"}
        styles = {"original": ("input_blocks_", "middle_block_", "output_blocks_"),
                  "diffusers": ("down_blocks_", "mid_block_", "up_blocks_")}
        theirs = next((k for k, pattern in ours.items() if re.search(pattern, stem)), None)
        held = {k for k, marks in styles.items()
                if any(m in t for t in self.targets for m in marks)}
        if theirs and held and theirs not in held:
            other = ("the original single-file checkpoint (SGM/ldm names) of that model"
                     if theirs == "original" else "that model's diffusers UNet folder "
                     "(diffusers' from_single_file + save_pretrained writes one)")
            return (f"because this base uses {' and '.join(sorted(held))} UNet names and the "
                    f"file {theirs} ones; merge into {other}")
        return "so the file was trained on another model; pass the base it was trained on"


def forms(prefix: str, module: str) -> tuple[str, ...]:
    """The dotted module paths a kohya name may spell ``module`` as, the one written first.
    sd-scripts' text encoder names come from transformers 4's CLIPTextModel
    (``text_model.encoder.layers.0...``); transformers 5 saves it without ``text_model.``
    (and diffusers' kohya export of such a model then writes ``lora_te1_encoder_...``)."""
    if prefix not in TE_PREFIXES:
        return (module,)
    inner = module.removeprefix("text_model.")
    return ("text_model." + inner, inner)


def _modules(names: dict[str, tuple[int, ...]], strip: str, prefixes, key_prefix: str,
             out: dict[str, list[Target]]) -> None:
    """Each ``<module>.weight`` of ``names`` starting with ``strip``, under each kohya prefix."""
    for name, shape in names.items():
        if not name.startswith(strip) or not name.endswith(".weight"):
            continue
        module = name[len(strip):-len(".weight")]
        for prefix in prefixes:
            for form in forms(prefix, module):
                out.setdefault(prefix + form.replace(".", "_"), []).append(
                    Target(key_prefix + name, tuple(shape)))


def _build(source: str, what: str, found: dict[str, list[Target]], prefixes,
           components: bool = False) -> BaseNames:
    targets, collisions, stems = {}, {}, {}
    for stem, hits in found.items():
        keys = tuple(dict.fromkeys(t.key for t in hits))
        if len(keys) > 1:
            collisions[stem] = tuple(k.removesuffix(".weight") for k in keys)
            continue
        targets[stem] = hits[0]
        if hits[0].rows is None:   # a row block has no name of its own to write
            stems.setdefault(hits[0].key, stem)     # the first prefix listed is the one written
    return BaseNames(source, what, targets, collisions, stems, tuple(prefixes),
                     components)


# SDXL's second text encoder in its original checkpoint is OpenCLIP's TextTransformer, but
# sd-scripts names its LoRA modules after the HF CLIPTextModelWithProjection it converts it to
# (sdxl_model_util.convert_sdxl_text_encoder_2_checkpoint; diffusers' single_file_utils
# DIFFUSERS_TO_LDM_MAPPING["openclip"] and convert_open_clip_checkpoint are the same table):
# OpenCLIP tensor in block N -> the HF modules of layer N; in_proj_weight (3d, d) is q, k and v
# stacked by rows.
OPENCLIP_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
OPENCLIP_MODULES = {"attn.in_proj_weight": ("self_attn.q_proj", "self_attn.k_proj",
                                            "self_attn.v_proj"),
                    "attn.out_proj.weight": ("self_attn.out_proj",),
                    "mlp.c_fc.weight": ("mlp.fc1",), "mlp.c_proj.weight": ("mlp.fc2",)}


def _openclip(names: dict[str, tuple[int, ...]], strip: str, out: dict) -> None:
    """lora_te2_ names for an OpenCLIP text encoder under ``strip`` (OPENCLIP_MODULES)."""
    for name, shape in names.items():
        found = OPENCLIP_BLOCK.match(name[len(strip):]) if name.startswith(strip) else None
        modules = OPENCLIP_MODULES.get(found[2]) if found else None
        if not modules or len(shape) != 2:
            continue
        rows = shape[0] // len(modules)
        for i, module in enumerate(modules):
            target = Target(name, (rows, shape[1]), None if len(modules) == 1 else
                            (i * rows, (i + 1) * rows), shape[0])
            for form in forms("lora_te2_", f"text_model.encoder.layers.{found[1]}.{module}"):
                out.setdefault("lora_te2_" + form.replace(".", "_"), []).append(target)


def _shapes(folder_or_file: Path) -> dict[str, tuple[int, ...]]:
    from ..merging.bases import open_base

    base = open_base(folder_or_file)
    if base.kind != "safetensors":
        raise UnsupportedError(f"{folder_or_file}: a {base.kind} base; kohya LoRAs merge into "
                               "diffusers folders and .safetensors checkpoints")
    return {name: tuple(e.shape) for name, e in base.entries().items()}


def _component_prefixes(config: dict) -> tuple[str, ...]:
    """The kohya prefixes a component folder's config allows (diffusers ``_class_name`` or
    transformers ``architectures``); all of them when it names no known class."""
    names = [str(config.get("_class_name") or "")] + [str(a) for a in
                                                     config.get("architectures") or ()]
    if any("UNet" in n for n in names):
        return UNET_PREFIXES + ("lycoris_",)
    if any(n.endswith(("Transformer2DModel", "Transformer3DModel")) for n in names):
        return ("lora_transformer_", "lora_unet_", "lycoris_")
    if any(n.startswith(("CLIPText", "T5")) for n in names):
        return TE_PREFIXES + ("lycoris_",)
    return PREFIXES


def open_names(base) -> BaseNames:
    """The kohya names of ``base`` (a path: pipeline folder, component folder or .safetensors
    checkpoint); an UnsupportedError for anything else (a GGUF model)."""
    if base is None:
        raise UnsupportedError("kohya LoRAs name modules in underscore form, which only the "
                               "base model resolves; pass --base <the model it was trained on>")
    if not isinstance(base, (str, Path)):
        raise UnsupportedError(f"{getattr(base, 'source', base)}: kohya LoRAs are resolved "
                               "against a diffusers folder or a .safetensors checkpoint, not "
                               "a GGUF model")
    path = Path(base)
    found: dict[str, list[Target]] = {}
    taken: list[str] = []             # the kohya prefixes the base has modules for
    if path.is_dir() and (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json")
        parts = [c for c in PIPELINE_COMPONENTS if c in index and (path / c).is_dir()]
        if not parts:
            raise FormatError(f"{path}/model_index.json lists none of "
                              f"{', '.join(PIPELINE_COMPONENTS)}; is this a diffusers pipeline?")
        for component in parts:
            prefixes = PIPELINE_COMPONENTS[component]
            if component == "transformer" and "unet" in parts:
                prefixes = prefixes[:1]
            if component == "text_encoder" and "text_encoder_2" in parts:
                prefixes = prefixes[::-1]      # SDXL: lora_te1_ is the name written
            _modules(_shapes(path / component), "", prefixes, component + ".", found)
            taken += prefixes
        return _build(str(path), f"a diffusers pipeline folder: {', '.join(parts)}", found,
                      dict.fromkeys(taken), components=True)
    shapes = _shapes(path)
    if path.is_file():
        known = [(s, p) for s, p in CHECKPOINT_PREFIXES if any(n.startswith(s) for n in shapes)]
        for strip, prefixes in known:
            _modules(shapes, strip, prefixes, "", found)
            taken += prefixes
            if prefixes == ("lora_te2_",):
                _openclip(shapes, strip, found)
        if known:
            return _build(str(path), "a single-file checkpoint in the original naming "
                          f"({', '.join(s.rstrip('.') for s, _ in known)})", found,
                          dict.fromkeys(taken))
        _modules(shapes, "", PREFIXES, "", found)
        return _build(str(path), "a single .safetensors file", found, PREFIXES)
    config_path = path / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    cls = config.get("_class_name") or (config.get("architectures") or ["a model"])[0]
    prefixes = _component_prefixes(config)
    _modules(shapes, "", prefixes, "", found)
    return _build(str(path), f"one component folder, {cls}", found, prefixes)
