"""How much of a LoRA survives a merge into a bitsandbytes checkpoint: ours vs PEFT's.

A seeded Llama (hidden 256, intermediate 512, 2 layers, Llama's own N(0, 0.02) init) is
quantized by transformers + bitsandbytes on the CPU (NF4, FP4 with double quantization, LLM.int8)
and saved; one PEFT LoRA (r=16 on every linear layer) is scaled so that ||delta|| / ||W|| takes
each REL value, then merged (a) by ``adaptertools merge`` (``--requantize keep``) and (b) by PEFT
(``merge_and_unload`` on the bitsandbytes model, read from the loaded modules). Survival of each adapted weight: the cosine
between the intended change and deq(merged) - deq(base), every tensor dequantized by bitsandbytes
itself. Prints the median over the 14 adapted weights.

    /work/venv/bin/python benchmarks/bnb_survival.py [REL ...]      (default 0.005 0.02 0.1)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}


def dequantized(folder: Path) -> dict[str, torch.Tensor]:
    """Every quantized weight of a saved bnb checkpoint, dequantized by bitsandbytes."""
    from bitsandbytes.functional import (
        QuantState,
        dequantize_4bit,
        int8_vectorwise_dequant,
    )
    from safetensors.torch import load_file

    sd = load_file(folder / "model.safetensors")
    out = {}
    for name, t in sd.items():
        if t.dtype == torch.uint8 and name.endswith(".weight"):
            parts = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            out[name] = dequantize_4bit(t, QuantState.from_dict(parts, device=torch.device("cpu")))
        elif t.dtype == torch.int8:
            out[name] = int8_vectorwise_dequant(t, sd[name.removesuffix("weight") + "SCB"])
    return {k: v.double() for k, v in out.items()}


def modules_dequantized(model) -> dict[str, torch.Tensor]:
    """The quantized weights of a loaded model (transformers 5 cannot save a merged bnb model)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            out[name + ".weight"] = dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            out[name + ".weight"] = int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
    return {k: v.double() for k, v in out.items()}


def scale_lora(peft, base: dict[str, torch.Tensor], rel: float) -> dict[str, torch.Tensor]:
    """Random factors, B rescaled so each delta is ``rel`` of its weight; the deltas (float64)."""
    gen, deltas = torch.Generator().manual_seed(1), {}
    layers = [(n, m) for n, m in peft.named_modules() if "default" in getattr(m, "lora_A", {})]
    with torch.no_grad():
        for name, layer in layers:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            for factor in (a, b):
                factor.copy_(torch.randn(factor.shape, generator=gen))
            key = name.removeprefix("base_model.model.") + ".weight"
            delta = layer.scaling["default"] * (b.double() @ a.double())
            ratio = float(rel * base[key].norm() / delta.norm())
            b.mul_(ratio)
            deltas[key] = ratio * delta
    return deltas


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return float(a @ b / (a.norm() * b.norm()))


def main(rels: list[float]) -> None:
    import statistics

    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    import adaptertools as at

    root = Path(tempfile.mkdtemp(prefix="bnb_survival_"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "f32")
    for kind, options in KINDS.items():
        q = transformers.BitsAndBytesConfig(**options, bnb_4bit_compute_dtype=torch.float32)
        transformers.AutoModelForCausalLM.from_pretrained(
            root / "f32", quantization_config=q, device_map="cpu").save_pretrained(root / kind)
        base = dequantized(root / kind)
        for rel in rels:
            model = transformers.AutoModelForCausalLM.from_pretrained(root / kind, device_map="cpu")
            peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=ALL,
                                                    init_lora_weights=False))
            intended = scale_lora(peft, base, rel)
            peft.save_pretrained(root / f"lora-{kind}-{rel}")
            at.merge(root / kind, [root / f"lora-{kind}-{rel}"], root / f"ours-{kind}-{rel}",
                     force=True)
            reloaded = PeftModel.from_pretrained(
                transformers.AutoModelForCausalLM.from_pretrained(root / kind, device_map="cpu"),
                root / f"lora-{kind}-{rel}")
            peft_merged = modules_dequantized(reloaded.merge_and_unload())
            rows = []
            for merged in (dequantized(root / f"ours-{kind}-{rel}"), peft_merged):
                rows.append(statistics.median(cosine(intended[k], merged[k] - base[k])
                                              for k in intended))
            print(f"{kind:7s} ||delta||/||W|| = {rel:<6} median cosine: adaptertools {rows[0]:.3f}"
                  f"   PEFT merge_and_unload {rows[1]:.3f}", flush=True)


if __name__ == "__main__":
    main([float(x) for x in sys.argv[1:]] or [0.005, 0.02, 0.1])
