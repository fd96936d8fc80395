"""Seeded synthetic workloads of BENCHMARKS.md, generated on demand into a cache folder.

W1 adapter: the TinyLlama-1.1B shape (hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 KV heads, vocab 32000), one PEFT LoRA r=16, alpha=32 on q,k,v,o,gate,up,down, fp32 factors,
B ~ N(0, 0.01): about 50 MB. The base is described by its config.json (no weights needed to
convert an adapter).
"""

from __future__ import annotations

import json
from pathlib import Path

W1_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "hidden_act": "silu",
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def w1_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of every targeted module of W1, by module name."""
    c = W1_CONFIG
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    per_layer = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
                 "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
                 "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return {f"model.layers.{n}.{m}": s for n in range(c["num_hidden_layers"])
            for m, s in per_layer.items()}


def w1_base_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(W1_CONFIG, indent=2))
    return folder


def w1_adapter(folder: Path, *, seed: int = 0, rank: int = 16, alpha: int = 32) -> Path:
    """A PEFT adapter folder for W1 (written directly, as PEFT would save it)."""
    import torch
    from safetensors.torch import save_file

    if (folder / "adapter_model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out, inp) in w1_shapes().items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) / inp ** 0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(TARGETS),
              "base_model_name_or_path": None, "task_type": "CAUSAL_LM", "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def best_wall(cmd: list[str], runs: int) -> float:
    """The best wall time of ``runs`` runs of a command (output discarded)."""
    import subprocess
    import time

    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)
