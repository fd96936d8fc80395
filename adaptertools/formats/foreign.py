"""Adapters of other tools, recognised by their tensor names and file metadata, so that a reader
can refuse them by name instead of reading them as something they are not.

No reader here: each row says what a name means, and where that comes from (FORMATS.md, "Wave 2",
and PEFT 0.21.2's own layers). A reader that meets tensors it cannot account for asks
``looks_like`` what they are and names it in its refusal.
"""

from __future__ import annotations

import json
import re

# (pattern searched in a tensor name, what such a tensor says the file is, the format that reads
# such files or None); the first row that matches any name wins, so the more specific rows come
# first.
KEY_SIGNS: tuple[tuple[str, str, str | None], ...] = (
    # PEFT LoRA variants, peft/tuners/lora/variants.py, velora.py, monteclora.py
    (r"(^|\.)lora_diag$", "a KaSA adapter (PEFT kasa_config: lora_diag tensors)", None),
    (r"\.lora_velora_embed$", "a VeLoRA adapter (PEFT velora_config)", None),
    (r"\.lora_monteclora_sampler\.", "a MonteCLoRA adapter (PEFT monteclora_config)", None),
    # kohya sd-scripts: module paths with underscores under lora_unet_ / lora_te*_ (LyCORIS
    # files for kohya's networks use the same names); lycoris-lora's own prefix lycoris_
    (r"^(lora_(unet|te\d?|transformer)|lycoris)_.*\.hada_(w[12]_[ab]|t[12])$",
     "a LyCORIS LoHa file (kohya-style names, hada_w1_a ... tensors)", "kohya"),
    (r"^(lora_(unet|te\d?|transformer)|lycoris)_.*\.lokr_(w[12](_[ab])?|t2)$",
     "a LyCORIS LoKr file (kohya-style names, lokr_w1 ... tensors)", "kohya"),
    (r"^(lora_(unet|te\d?|transformer)|lycoris)_", "a kohya (sd-scripts) LoRA (lora_unet_ / "
     "lora_te_ / lycoris_ keys)", "kohya"),
    # LyCORIS tensors under dotted (PEFT-style) names: PEFT's LoHa / LoKr keep them in a folder
    (r"\.hada_(w[12]_[ab]|t[12])$", "a LoHa adapter (hada_w1_a ... tensors; PEFT keeps them in "
     "a folder with peft_type LOHA)", None),
    (r"\.lokr_(w[12](_[ab])?|t2)$", "a LoKr adapter (lokr_w1 ... tensors; PEFT keeps them in a "
     "folder with peft_type LOKR)", None),
    # diffusers 0.42 save_lora_weights: PEFT keys under a pipeline component's name
    (r"^(unet|text_encoder(_\d)?)\.|^transformer\.(single_)?transformer_blocks\.",
     "a diffusers LoRA (PEFT keys under unet. / text_encoder. / transformer. prefixes)",
     "diffusers"),
    (r"\.lora\.(down|up)\.weight$", "a diffusers LoRA (attention-processor lora.down / lora.up "
     "keys, diffusers' old format)", None),
    # torchtune 0.6.1's own checkpoints (adapter_model.pt)
    (r"\.lora_[ab]\.weight$", "a torchtune checkpoint (lora_a.weight / lora_b.weight keys)",
     "torchtune"),
    # llama.cpp's GGUF names (blk.N.attn_q.weight.lora_a) outside a GGUF file
    (r"^(blk\.\d+\.|token_embd\.|output\.).*weight\.lora_[ab]$",
     "GGUF (llama.cpp) LoRA tensor names in a non-GGUF file", None),
    # mlx-lm 0.32: module path + lora_a (in, r) / lora_b (r, out), no .weight
    (r"\.lora_[ab]$", "an MLX (mlx-lm) adapter (lora_a / lora_b keys), read only as its "
                      "folder with mlx-lm's adapter_config.json (formats/mlx.py)", None),
    # the kohya convention without our metadata (our own files carry format = adaptertools.lora)
    (r"\.lora_(down|up)\.weight$", "a kohya-style LoRA (lora_down / lora_up keys) with dotted "
     "names and no adaptertools metadata (an adaptertools file whose metadata a tool "
     "stripped?)", None),
)


def _sign(keys) -> tuple[str, str | None] | None:
    keys = list(keys)
    for pattern, what, reader in KEY_SIGNS:
        if any(re.search(pattern, key) for key in keys):
            return what, reader
    return None


def looks_like(keys) -> str | None:
    """What the tensor names ``keys`` say the file is (a KEY_SIGNS description), or None."""
    sign = _sign(keys)
    return None if sign is None else sign[0]


def read_by(keys) -> str | None:
    """The format that reads files with tensor names like ``keys``, where one does."""
    sign = _sign(keys)
    return None if sign is None else sign[1]


def route(keys) -> str:
    """``what: read it with --from FORMAT`` where a format reads it, else ``what: not supported
    yet``; the keys must have a sign (``looks_like`` is not None)."""
    what, reader = _sign(keys)
    return f"{what}: read it with --from {reader}" if reader else f"{what}: not supported yet"


# Config fields of training tools that are not PEFT (adapter_config.json of mlx-lm 0.32).
MLX_CONFIG_FIELDS = ("fine_tune_type", "lora_parameters")
MLX = "an MLX (mlx-lm) adapter"
# diffusers' safetensors metadata entry holding the LoRA config (`unet.r`, `unet.lora_alpha`...).
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
DIFFUSERS = "a diffusers LoRA (pytorch_lora_weights.safetensors, alpha in lora_adapter_metadata)"


def mlx_config(config: dict) -> bool:
    """Is this adapter_config.json mlx-lm's (training arguments, no PEFT type)?"""
    return "peft_type" not in config and any(field in config for field in MLX_CONFIG_FIELDS)


def file_looks_like(keys, metadata: dict[str, str]) -> str | None:
    """What a single safetensors file without our tag is, from its metadata and tensor names."""
    entry = metadata.get(DIFFUSERS_METADATA_KEY)
    if entry is not None:
        try:
            components = sorted({k.split(".", 1)[0] for k in json.loads(entry) if "." in k})
        except (json.JSONDecodeError, RecursionError, TypeError, AttributeError):
            components = []
        return DIFFUSERS + (f" for {', '.join(components)}" if components else "")
    return looks_like(keys)


def unknown_keys(where, keys: list[str], *, why: str) -> Exception:
    """The refusal for tensors a reader cannot account for: the first few named, with the format
    they look like when known (UnsupportedError), else a FormatError. ``why`` says what the
    reader expected them to be."""
    from ..errors import FormatError, UnsupportedError

    shown = ", ".join(keys[:3]) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")
    if looks_like(keys) is not None:
        return UnsupportedError(f"{where}: {route(keys)} ({len(keys)} tensor(s) that are not "
                                f"PEFT LoRA tensors, e.g. {shown})")
    return FormatError(f"{where}: {len(keys)} tensor(s) are {why}: {shown}; refusing to guess "
                       "what they are (reading them as full replacement tensors would be wrong)")


def hint_for(path) -> str:
    """What an unrecognised input looks like, for the refusal that ends a failed sniff: the
    sign of its tensor names (a safetensors file, or the safetensors files of a folder), or
    what kind of file it is. Never unpickles anything."""
    from pathlib import Path

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file())[:20] if path.is_dir() else [path]
    for file in files:
        keys = _safetensors_keys(file)
        if keys:
            where = f" ({file.name})" if file != path else ""
            return f"its tensor names{where} look like {route(keys)}" \
                if looks_like(keys) else f"its tensor names{where} look like none of them, " \
                f"e.g. {', '.join(keys[:3])}"
    if path.is_dir():
        shown = ", ".join(p.name for p in files[:6]) or "nothing"
        return f"the folder holds {shown}"
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return ("a pickled checkpoint: torchtune's adapter_model.pt is read with --from "
                "torchtune, PEFT's adapter_model.bin inside its folder (pass the folder)")
    if suffix == ".gguf":
        return "a GGUF file that is not a LoRA adapter (a model? pass it as the base)"
    return "not a safetensors, GGUF or adapter folder"


def _safetensors_keys(file) -> list[str]:
    from ..errors import AdapterToolsError
    from ..tensor_index import read_safetensors_header

    try:
        return [t.name for t in read_safetensors_header(file).tensors]
    except (AdapterToolsError, OSError, ValueError):
        return []
