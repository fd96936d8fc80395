"""Tiny Llama-style checkpoints and adapters built in code, for the demo, tests and benchmarks.

Nothing is downloaded: weights are seeded random tensors in the HF Llama layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import Adapter, LoraWeight

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TinyLlama:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": "float32", "hidden_act": "silu",
        }

    def shapes(self) -> dict[str, tuple[int, int] | tuple[int]]:
        """Stored shape of every tensor, in checkpoint order."""
        h, i, head_dim = self.hidden, self.intermediate, self.hidden // self.heads
        kv = self.kv_heads * head_dim
        out: dict = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                        p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                        p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                        p + "mlp.down_proj.weight": (h, i),
                        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab, h)
        return out


def make_base(folder: Path, spec: TinyLlama = TinyLlama(), *, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> Path:
    """Write ``config.json`` and ``model.safetensors`` of a random tiny Llama into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in spec.shapes().items():
        if len(shape) == 1:
            tensors[name] = torch.ones(shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = spec.config() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def make_adapter(spec: TinyLlama = TinyLlama(), *, rank: int = 8, alpha: float = 16.0,
                 targets: tuple[str, ...] = ATTENTION + MLP, seed: int = 1,
                 dtype: torch.dtype = torch.float32, base_model: str | None = None) -> Adapter:
    """A trained-looking LoRA (B non-zero) on ``targets`` of every layer, scale alpha / rank."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in spec.shapes().items():
        if len(shape) == 2 and name.rsplit(".", 2)[-2] in targets:
            rows, cols = shape
            a = torch.randn(rank, cols, generator=gen) / cols ** 0.5
            b = torch.randn(rows, rank, generator=gen) * 0.01
            weights[name] = LoraWeight(a=a.to(dtype), b=b.to(dtype), scale=alpha / rank)
    return Adapter(weights=weights, base_model=base_model,
                   metadata={"source_format": "adaptertools.tiny"})
