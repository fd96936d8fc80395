"""PEFT state-dict keys: the ``base_model.model.`` prefix, the LoRA parts, ``split_key``, and the
embedding layers PEFT saves whole. Data and one pure function, below peft.py and accounting.py,
which both read keys with them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import LoraWeight

KEY_PREFIX = "base_model.model."
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

# Full tensors that are copies of the training base, not trained: a targeted layer's
# ``base_layer`` tensors (save_embedding_layers), biases excepted when ``bias`` trains them, and
# embedding layers saved whole that modules_to_save does not list (a resized vocabulary).
SAVED_EMBEDDING_LAYERS = ("embed_tokens", "lm_head", "wte")


def split_key(key: str) -> tuple[str, str | None, str | None]:
    """``base_model.model.m.lora_A.weight`` -> (module ``m``, part ``lora_A``, param ``weight``).

    Non-LoRA keys give (base tensor name, None, None). Adapter names kept by some savers
    (``lora_A.default.weight``) are dropped.
    """
    key = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    tokens = key.split(".")
    part_at = max((i for i, t in enumerate(tokens) if t in LORA_PARTS), default=None)
    if part_at is None or part_at == 0:
        # a full tensor; ``m.base_layer.weight`` and ``m.modules_to_save.<name>.weight`` are m's
        if "modules_to_save" in tokens:
            i = tokens.index("modules_to_save")
            tokens = tokens[:i] + tokens[i + 2:]
        return ".".join(t for t in tokens if t != "base_layer"), None, None
    rest = tokens[part_at + 1:]
    param = rest[-1] if rest and rest[-1] in ("weight", "bias") else None
    return ".".join(tokens[:part_at]), tokens[part_at], param


# transformers' GPT-2-style Conv1D layers (``transformers.pytorch_utils.Conv1D``, weight stored
# (in, out)), by model_type (from each model's modeling code). PEFT decides fan_in_fan_out per
# layer from the wrapped module's type, Conv1D on and Linear off, whatever adapter_config.json
# says: its saved flag is whatever the last layer it wrapped left there (GPT-2 with c_proj and
# lm_head targeted saves false). So where the base is known, the layout follows the base.
CONV1D_MODULES = {
    "gpt2": ("c_attn", "q_attn", "c_proj", "c_fc"),
    "openai-gpt": ("c_attn", "c_proj", "c_fc"),
    "imagegpt": ("c_attn", "q_attn", "c_proj", "c_fc"),
    "decision_transformer": ("c_attn", "q_attn", "c_proj", "c_fc"),
}


def base_layer_layout(name: str, w: LoraWeight, model_type: str) -> LoraWeight:
    """``w`` in the layout of the base's own layer ``name``: a Linear-or-Conv1D LoRA read with
    the config's fan_in_fan_out is re-laid when the base's layer is the other kind
    (CONV1D_MODULES; ``w`` itself when it already fits or the model is not one with Conv1D
    layers). Conv1D stores (in, out): a (r, out) = B.T, b (in, r) = A.T."""
    from ..adapter import LoraWeight

    modules = CONV1D_MODULES.get(model_type)
    if modules is None or w.layer not in ("linear", "conv1d") or not name.endswith(".weight"):
        return w
    want = "conv1d" if name.rsplit(".", 2)[-2] in modules else "linear"
    if w.layer == want:
        return w
    if not isinstance(w, LoraWeight):
        from ..errors import UnsupportedError

        raise UnsupportedError(f"{name}: a {type(w).__name__} on a {model_type} Conv1D layer "
                               "(stored (in, out)); only LoRA knows that layout; merge a LoRA "
                               "adapter, or into a checkpoint with Linear layers")
    return replace(w, a=w.b.T.contiguous(), b=w.a.T.contiguous(), layer=want)
