"""PEFT adapters made with the real PEFT on the tiny models of helpers.models: perturbed as
training would, saved, and the PEFT feature cases the suite runs through them."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers.models import LLAMA_ALL, make_model, model_output


@dataclass
class PeftCase:
    name: str
    kind: str
    folder: Path            # what save_pretrained wrote (the adapter folder itself)
    reference: torch.Tensor  # the PEFT model's output on model_input(kind)
    base_state: dict         # base model weights before PEFT wrapped it
    merged_state: dict       # PEFT's merge_and_unload() weights


def perturb_trainables(peft_model: torch.nn.Module, *, seed: int = 99, spread: float = 0.1,
                       modules_to_save: bool = True) -> None:
    """Make every LoRA tensor (and modules_to_save copy) non-trivial, as training would; DoRA
    magnitudes are scaled by up to ``1 + spread``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + spread * torch.rand(p.shape, generator=gen))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "modules_to_save" in name and modules_to_save:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def make_adapter(base: torch.nn.Module, folder: Path, seed: int | None = None, **config):
    """Wrap a COPY of ``base`` with PEFT, perturb it, save it; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    if seed is None:
        perturb_trainables(peft_model)
    else:   # a seed of its own so adapters differ
        perturb_trainables(peft_model, seed=seed, spread=0.3, modules_to_save=False)
    peft_model.eval().save_pretrained(folder)
    return peft_model


def build_peft_case(tmp_path: Path, name: str, kind: str, config_kwargs: dict, *,
                    adapter_name: str = "default", safe_serialization: bool = True) -> PeftCase:
    from peft import LoraConfig, get_peft_model

    model = make_model(kind)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(**config_kwargs), adapter_name=adapter_name)
    perturb_trainables(peft_model)
    peft_model.eval()
    reference = model_output(peft_model, kind)
    out = tmp_path / f"peft_{name}"
    peft_model.save_pretrained(out, safe_serialization=safe_serialization)
    folder = out if adapter_name == "default" else out / adapter_name
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged_state = {k: v.clone() for k, v in merged.state_dict().items()}
    return PeftCase(name, kind, folder, reference, base_state, merged_state)


def load_with_peft(folder: Path, kind: str) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(make_model(kind), folder).eval()


# One case per PEFT feature the foundation issue lists; (kind, LoraConfig kwargs, extra options).
PEFT_CASES = {
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL), {}),
    "rslora": ("llama", dict(r=8, lora_alpha=6, use_rslora=True, target_modules=LLAMA_ALL), {}),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL,
                               rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
                               alpha_pattern={"layers.1.self_attn.q_proj": 3, "k_proj": 5.5}), {}),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA_ALL), {}),
    "embedding_and_modules_to_save": (
        "llama", dict(r=4, lora_alpha=16, target_modules=["embed_tokens", "q_proj", "v_proj"],
                      modules_to_save=["lm_head"]), {}),
    "dora_embedding": ("llama", dict(r=4, lora_alpha=8, use_dora=True,
                                     target_modules=["embed_tokens", "o_proj"]), {}),
    "gpt2_conv1d_lora_bias": ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True, lora_bias=True,
                                           target_modules=["c_attn", "c_proj", "c_fc"]), {}),
    "gpt2_conv1d_dora": ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True,
                                      target_modules=["c_attn", "c_fc"]), {}),
    "conv": ("conv", dict(r=2, lora_alpha=4, target_modules=["conv2", "conv1", "head"]), {}),
    "conv_dora": ("conv", dict(r=3, lora_alpha=3, use_dora=True,
                               target_modules=["conv2", "conv1"]), {}),
    "named_subfolder": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                        {"adapter_name": "mine"}),
    "legacy_bin": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
                   {"safe_serialization": False}),
}
