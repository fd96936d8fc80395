"""PEFT's BD-LoRA (``use_bdlora``: ``BdLoraConfig``, peft/tuners/lora/variants.py 0.21.2,
``BdLoraLinearVariant`` and ``BlockDiagonalLinear``) read as the plain LoRA it is.

One factor of each targeted Linear is block-diagonal with ``nblocks`` blocks and is saved as
its blocks stacked, ``(rows, cols / nblocks)``: lora_A ``(r, in / nb)`` for modules matching
``target_modules_bd_a``, lora_B ``(out, r / nb)`` for ``target_modules_bd_b`` (a substring
match on the module name, as ``BdLoraLinearVariant.init`` does). PEFT merges
``B_full @ A_full`` with ``A_full = torch.block_diag(*torch.chunk(A, nblocks, dim=0))``
(``weight_as_blockdiagonal_matrix``). Expanding the stored factor the same way gives an
ordinary LoRA with the same delta (the zeros are exact), which every LoRA format can hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import FormatError

if TYPE_CHECKING:      # the light path's tensors are numpy (light.arrays.Stored)
    import torch

CONFIG_FIELD = "use_bdlora"


def _side(config: dict, module: str, where) -> str | None:
    """"lora_A" or "lora_B": which factor of ``module`` is block-diagonal, or None."""
    bd = config.get(CONFIG_FIELD) or {}
    in_a = any(p in module for p in bd.get("target_modules_bd_a") or [])
    in_b = any(p in module for p in bd.get("target_modules_bd_b") or [])
    if in_a and in_b:
        raise FormatError(f"{where}: {module} matches both target_modules_bd_a and "
                          "target_modules_bd_b of use_bdlora; PEFT refuses such a config too")
    return "lora_A" if in_a else "lora_B" if in_b else None


def expand(config: dict, module: str, parts: dict[str, torch.Tensor], where) -> dict:
    """``parts`` (one module's PEFT tensors) with its block-diagonal factor made whole."""
    side = _side(config, module, where)
    if side is None or side not in parts:
        return parts
    blocks = int((config.get(CONFIG_FIELD) or {}).get("nblocks") or 0)
    stored = parts[side]                           # (rows, cols / nb)
    if blocks < 1 or stored.dim() != 2 or stored.shape[0] % blocks:
        raise FormatError(f"{where}: {module}.{side} is {tuple(stored.shape)}, which is not "
                          f"{blocks} diagonal blocks stacked (use_bdlora.nblocks); the file "
                          "does not match its adapter_config.json")
    import torch

    full = torch.block_diag(*torch.chunk(stored, blocks, dim=0))   # (rows, cols)
    return {**parts, side: full}
