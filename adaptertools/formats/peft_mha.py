"""PEFT LoRA on ``nn.MultiheadAttention`` (peft/tuners/lora/layer.py ``MultiheadAttention``,
0.21.2), placed on the base's own tensors.

PEFT wraps the attention module and, inside it, its ``out_proj`` Linear; the saved keys are

    <m>.lora_A.weight (r, E), <m>.lora_B.weight (3E, r)          -> <m>.in_proj_weight (3E, E)
    <m>.base_layer.out_proj.lora_A.weight (r, E), ...lora_B (E, r) -> <m>.out_proj.weight (E, E)

with the in_proj delta ``(B @ A) * scale`` (no transpose, ``get_delta_weight`` at layer.py:2153).

out_proj's delta counts twice in PEFT. ``MultiheadAttention.merge`` adds it to the weight itself
and then calls the wrapped out_proj's own ``merge``, which adds it again (layer.py:2021-2080),
and the layer's forward merges before every call. So the model PEFT trained and serves computes
``W_out + 2 * scale * B @ A`` (measured: PEFT's unmerged outputs equal that weight's within
5e-7, and differ by 1.2 from a single delta). This reader gives out_proj that doubled scale, so
the merge computes what the PEFT model computed, and it says so in a warning.
"""

from __future__ import annotations

OUT_PROJ = ".base_layer.out_proj"
# Adapter.metadata key listing the attention modules: no writer can hold them (adapter_io.save)
METADATA = "peft_multihead_attention"
# what the doubled out_proj scale means, for the warning and the docs
DOUBLED = ("PEFT's LoRA on nn.MultiheadAttention applies out_proj's delta twice (its merge adds "
           "it and then merges the wrapped out_proj again, and its forward merges first), so "
           "the model it trained computes W_out + 2 * scale * B @ A: merged that way, as PEFT "
           "itself merges it")


def attention_modules(modules) -> set[str]:
    """The modules of a grouped PEFT state dict that are MultiheadAttention layers: those with
    LoRA factors of their own and on ``<m>.base_layer.out_proj``."""
    modules = set(modules)
    return {m[: -len(OUT_PROJ)] for m in modules
            if m.endswith(OUT_PROJ) and m[: -len(OUT_PROJ)] in modules}


def base_tensor(module: str, attention: set[str]) -> tuple[str, float]:
    """(the base tensor ``module``'s factors change, the factor on its scale)."""
    if module in attention:
        return module + ".in_proj_weight", 1.0
    if module.endswith(OUT_PROJ) and module[: -len(OUT_PROJ)] in attention:
        return module[: -len(OUT_PROJ)] + ".out_proj.weight", 2.0
    return module + ".weight", 1.0
