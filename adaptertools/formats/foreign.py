"""Adapters of other tools, recognised by their tensor names and file metadata, so that a reader
can refuse them by name instead of reading them as something they are not.

No reader here: each row says what a name means, and where that comes from (FORMATS.md, "Wave 2",
and PEFT 0.21.2's own layers). A reader that meets tensors it cannot account for asks
``looks_like`` what they are and names it in its refusal.
"""

from __future__ import annotations

import json
import re

# (pattern searched in a tensor name, what such a tensor says the file is); the first row that
# matches any name wins, so the more specific rows come first.
KEY_SIGNS: tuple[tuple[str, str], ...] = (
    # PEFT LoRA variants, peft/tuners/lora/variants.py, velora.py, monteclora.py
    (r"(^|\.)lora_diag$", "a KaSA adapter (PEFT kasa_config: lora_diag tensors)"),
    (r"\.lora_velora_embed$", "a VeLoRA adapter (PEFT velora_config)"),
    (r"\.lora_monteclora_sampler\.", "a MonteCLoRA adapter (PEFT monteclora_config)"),
    # LyCORIS 4.1 and PEFT's LoHa / LoKr
    (r"\.hada_(w[12]_[ab]|t[12])$", "a LyCORIS LoHa adapter (hada_w1_a ... tensors)"),
    (r"\.lokr_(w[12](_[ab])?|t2)$", "a LyCORIS LoKr adapter (lokr_w1 ... tensors)"),
    # kohya sd-scripts: module paths with underscores under lora_unet_ / lora_te*_
    (r"^lora_(unet|te\d?)_", "a kohya (sd-scripts) LoRA (lora_unet_ / lora_te_ keys)"),
    # diffusers 0.42 save_lora_weights: PEFT keys under a pipeline component's name
    (r"^(unet|text_encoder(_\d)?)\.|^transformer\.(single_)?transformer_blocks\.",
     "a diffusers LoRA (PEFT keys under unet. / text_encoder. / transformer. prefixes)"),
    (r"\.lora\.(down|up)\.weight$", "a diffusers LoRA (attention-processor lora.down / lora.up keys)"),
    # torchtune 0.6.1's own checkpoints (its PEFT-form export is a PEFT folder)
    (r"\.lora_[ab]\.weight$", "a torchtune checkpoint (lora_a.weight / lora_b.weight keys; use "
                              "its PEFT-form export, adapter_config.json + adapter_model.safetensors)"),
    # llama.cpp's GGUF names (blk.N.attn_q.weight.lora_a) outside a GGUF file
    (r"^(blk\.\d+\.|token_embd\.|output\.).*weight\.lora_[ab]$",
     "GGUF (llama.cpp) LoRA tensor names in a non-GGUF file"),
    # mlx-lm 0.32: module path + lora_a (in, r) / lora_b (r, out), no .weight
    (r"\.lora_[ab]$", "an MLX (mlx-lm) adapter (lora_a / lora_b keys), read only as its "
                      "folder with mlx-lm's adapter_config.json (formats/mlx.py)"),
    # the kohya convention without our metadata (our own files carry format = adaptertools.lora)
    (r"\.lora_(down|up)\.weight$", "a kohya-style LoRA (lora_down / lora_up keys) that is not an "
                                   "adaptertools file"),
)

# Config fields of training tools that are not PEFT (adapter_config.json of mlx-lm 0.32).
MLX_CONFIG_FIELDS = ("fine_tune_type", "lora_parameters")
MLX = "an MLX (mlx-lm) adapter"
# diffusers' safetensors metadata entry holding the LoRA config (`unet.r`, `unet.lora_alpha`...).
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
DIFFUSERS = "a diffusers LoRA (pytorch_lora_weights.safetensors, alpha in lora_adapter_metadata)"


def looks_like(keys) -> str | None:
    """What the tensor names ``keys`` say the file is (a KEY_SIGNS description), or None."""
    keys = list(keys)
    for pattern, what in KEY_SIGNS:
        if any(re.search(pattern, key) for key in keys):
            return what
    return None


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
    what = looks_like(keys)
    if what is not None:
        return UnsupportedError(f"{where}: {what}: not supported yet ({len(keys)} tensor(s) that "
                                f"are not PEFT LoRA tensors, e.g. {shown})")
    return FormatError(f"{where}: {len(keys)} tensor(s) are {why}: {shown}; refusing to guess "
                       "what they are (reading them as full replacement tensors would be wrong)")
