"""torchtune 0.6.1's PEFT-form export (adapter_config.json + adapter_model.safetensors written
by its checkpointer through ``convert_weights.tune_to_peft_adapter_weights``): how to recognise
it and how to repair its two bugs. Apart from formats/torchtune.py (its native checkpoints) so
that the PEFT reader can use it without importing the GGUF code torchtune.py needs.
"""

from __future__ import annotations

from ..errors import OptionError, UnsupportedError
from .names import BaseInfo, permute_rows, unpermute_rows

# Does torchtune's FullModelHFCheckpointer.load_checkpoint (0.6.1) permute q/k rows, by the
# base's architecture (BaseInfo.arch, names.HF_ARCHITECTURES; "llama" covers Mistral too):
# QWEN2 -> qwen2_hf_to_tune (no permutation); GEMMA2 -> gemma2_hf_to_tune (``_permute``);
# LLAMA2 / LLAMA3 / LLAMA3_2 / MISTRAL / GEMMA -> convert_weights.hf_to_tune (``_permute``).
TUNE_PERMUTES_QK = {"llama": True, "gemma2": True, "qwen2": False}
# HF config.json model_type -> the same question (for callers that hold a model_type)
MODEL_TYPE_ARCH = {"llama": "llama", "mistral": "llama", "gemma": "llama", "gemma2": "gemma2",
                   "qwen2": "qwen2"}

# ----------------------------------------------------------------------------- PEFT export

# What torchtune's checkpointer writes as adapter_config.json: the recipe's adapter config
# (recipes/lora_finetune_*.py: r, lora_alpha, target_modules, peft_type "LORA") through
# convert_weights.tune_to_peft_adapter_config (+ base_model_name_or_path when the base folder
# has torchtune's repo_id.json). PEFT's own save_pretrained writes a dozen more fields.
EXPORT_FIELDS = frozenset({"r", "lora_alpha", "target_modules", "peft_type"})
EXPORT_OPTIONAL = frozenset({"base_model_name_or_path"})


def is_torchtune_export(config: dict) -> bool:
    """Is this adapter_config.json torchtune's PEFT-form export? Its fields are exactly
    ``EXPORT_FIELDS``, or those and ``base_model_name_or_path``, with peft_type LORA (an
    adapter_model.pt beside it confirms it, but copies of the export often lack it)."""
    fields = set(config)
    return EXPORT_FIELDS <= fields <= EXPORT_FIELDS | EXPORT_OPTIONAL and \
        config.get("peft_type") == "LORA"


def _arch(base_model_type) -> str:
    if isinstance(base_model_type, BaseInfo):
        return base_model_type.arch
    return MODEL_TYPE_ARCH.get(base_model_type, base_model_type)


def peft_export_fix(config: dict, state_dict: dict, base_model_type, *,
                    n_head: int | None = None, n_head_kv: int | None = None):
    """Repair torchtune 0.6.1's PEFT-form export (convert_weights.tune_to_peft_adapter_weights).

    Args:
        config: the export's adapter_config.json.
        state_dict: its adapter_model.safetensors (``base_model.model.model.layers.N.self_attn.
            q_proj.lora_B.weight`` ...).
        base_model_type: the HF base's model_type (``llama``, ``mistral``, ``qwen2``, ``gemma2``)
            or its BaseInfo (which also gives the head counts).
        n_head, n_head_kv: the base's head counts (not needed with a BaseInfo).

    Returns:
        (the fixed state dict (a new dict, same keys), warnings: one line per fix made).

    The export applies ``_permute_lora_matrix`` (tune -> HF row order) to every q/k lora_B,
    whatever the model type, and never to a DoRA magnitude:
    - Qwen2 (its checkpoints are not permuted): lora_B of q/k was permuted wrongly; undone
      here with ``permute_rows`` (the exact inverse).
    - Llama family (permuted): lora_B is right, but q/k ``lora_magnitude_vector`` is still in
      torchtune's order; ``unpermute_rows`` puts it in HF's.
    - DoRA: the config has no ``use_dora``: a warning says so (read it as DoRA).
    """
    arch = _arch(base_model_type)
    if isinstance(base_model_type, BaseInfo):
        n_head, n_head_kv = base_model_type.n_head, base_model_type.n_head_kv
    if arch not in TUNE_PERMUTES_QK:
        raise UnsupportedError(f"torchtune export: base model type {base_model_type!r} has no "
                               f"torchtune 0.6.1 rule; supported: {', '.join(MODEL_TYPE_ARCH)}")
    permuted = TUNE_PERMUTES_QK[arch]
    fixed, notes, counts = dict(state_dict), [], {"lora_B": 0, "lora_magnitude_vector": 0}
    for key, tensor in state_dict.items():
        leaf = "lora_B" if ".lora_B." in key else \
            "lora_magnitude_vector" if key.endswith("lora_magnitude_vector") else None
        proj = "q_proj" if ".q_proj." in key else "k_proj" if ".k_proj." in key else None
        if leaf is None or proj is None or permuted == (leaf == "lora_B"):
            continue       # right as exported
        heads = n_head if proj == "q_proj" else n_head_kv
        if heads is None:
            raise OptionError(f"torchtune export: {key} needs the base's head counts to be "
                              "fixed; pass n_head and n_head_kv (or a BaseInfo)")
        fixed[key] = permute_rows(tensor, heads) if leaf == "lora_B" else \
            unpermute_rows(tensor, heads)
        counts[leaf] += 1
    if counts["lora_B"]:
        notes.append(f"torchtune export for {arch}: {counts['lora_B']} q/k lora_B tensor(s) "
                     "were RoPE-permuted as for Llama (torchtune 0.6.1 bug); un-permuted")
    if counts["lora_magnitude_vector"]:
        notes.append(f"torchtune export: {counts['lora_magnitude_vector']} q/k DoRA magnitude(s)"
                     " were left in torchtune's RoPE row order (torchtune 0.6.1 bug); permuted "
                     "to HF's")
    if any(k.endswith("lora_magnitude_vector") for k in state_dict) and \
            not config.get("use_dora"):
        notes.append("torchtune export: DoRA magnitudes but no use_dora in adapter_config.json "
                     "(torchtune 0.6.1 omits it); read as DoRA")
    return fixed, notes
