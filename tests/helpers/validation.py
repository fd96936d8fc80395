"""The merges the validator is tried on: PEFT adapters on tiny bases saved to a folder, by case;
a tensor's float64 delta; the names a report failed."""

from __future__ import annotations

from pathlib import Path

import torch

import adaptertools as at
from helpers.models import LLAMA_ALL, build_base
from helpers.peft_adapters import make_adapter

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# case -> (architecture, [LoraConfig kwargs per adapter], weights, mode)
CASES = {
    "plain": ("llama", [{"r": 4, "lora_alpha": 8, "target_modules": LLAMA_ALL}], None, "weighted"),
    "rslora_patterns": ("llama", [{"r": 8, "lora_alpha": 6, "use_rslora": True,
                                       "target_modules": LLAMA_ALL, "rank_pattern": {"v_proj": 2},
                                       "alpha_pattern": {"k_proj": 5.5}}], None, "weighted"),
    "dora": ("llama", [{"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": LLAMA_ALL}], None,
             "weighted"),
    "embedding_modules_to_save": ("llama", [{"r": 4, "lora_alpha": 16,
                                                 "target_modules": ["embed_tokens", "q_proj"],
                                                 "modules_to_save": ["lm_head"]}], None, "weighted"),
    "gpt2_conv1d_lora_bias": ("gpt2", [{"r": 4, "lora_alpha": 8, "fan_in_fan_out": True,
                                            "lora_bias": True, "target_modules": ["c_attn", "c_proj"]}],
                              None, "weighted"),
    "gpt2_conv1d_dora": ("gpt2", [{"r": 4, "lora_alpha": 8, "fan_in_fan_out": True, "use_dora": True,
                                       "target_modules": ["c_attn", "c_fc"]}], None, "weighted"),
    "weighted_three": ("llama", [{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj",
                                                                          "embed_tokens"]},
                                 {"r": 2, "lora_alpha": 4, "use_rslora": True,
                                      "target_modules": ["q_proj", "o_proj"]},
                                 {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "up_proj"]}],
                       [0.7, -0.3, 1.5], "weighted"),
    "stacked_dora": ("llama", [{"r": 4, "lora_alpha": 8, "use_dora": True,
                                    "target_modules": ["q_proj", "v_proj", "embed_tokens"]},
                               {"r": 2, "lora_alpha": 4, "use_dora": True,
                                    "target_modules": ["q_proj", "o_proj", "embed_tokens"]}],
                     None, "stacked"),
}


def build_case(root: Path, arch: str, configs: list[dict], dtype: torch.dtype) -> list[Path]:
    base = build_base(arch, dtype)
    base.save_pretrained(root / "base")
    folders = []
    for i, config in enumerate(configs):
        make_adapter(base, root / f"a{i}", 70 + i, **config)
        folders.append(root / f"a{i}")
    return folders


def delta(adapter: Path, name: str, base=None) -> torch.Tensor:
    """scale * B @ A of one tensor, float64, in the HF stored layout."""
    w = at.load(adapter, base=base).weights[name]
    return w.scale * (w.b.double() @ w.a.double())


def failed(report: dict) -> set[str]:
    return {r["name"] for r in report["tensors"] if not r["passed"]}
