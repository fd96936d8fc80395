"""W3 (BENCHMARKS.md, run by hand): merge into a base larger than this machine's RAM.

    python benchmarks/w3.py [--work DIR] [--layers 60] [--keep]

Base: Llama shape, hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 32000, bf16,
``--layers`` blocks (60: 26.7 GB, more than the 24 GiB of RAM here), written shard by shard at
2 GB. The weights are a cheap deterministic pattern, not random numbers: only completion and
peak memory are measured. Adapter: r=16 on every linear layer. Needs about 2x the base in free
disk. Prints wall, peak RSS (GNU time) and the base size; the target is peak RSS <= 1.5 GB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HIDDEN, INTER, HEADS, KV, VOCAB = 4096, 14336, 32, 8, 32000
SHARD_BYTES = 2 << 30


def layer_shapes(n: int) -> dict[str, tuple[int, ...]]:
    kv = KV * HIDDEN // HEADS
    p = f"model.layers.{n}."
    return {p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,)}


def make_base(folder: Path, layers: int) -> int:
    from safetensors.torch import save_file

    if (folder / "model.safetensors.index.json").exists():
        return json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for n in range(layers):
        shapes.update(layer_shapes(n))
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    row = (torch.arange(HIDDEN * 4, dtype=torch.float32) % 97 - 48) * 4e-4     # a cheap pattern
    groups, current, size = [], [], 0           # tensor names per shard, by size
    for name, shape in shapes.items():
        current.append(name)
        size += 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        if size >= SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
    groups += [current] if current else []
    weight_map, total = {}, 0
    for i, names in enumerate(groups):          # one shard in memory at a time
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in names:
            shape = shapes[name]
            numel = shape[0] * (shape[1] if len(shape) > 1 else 1)
            shard[name] = row.repeat(numel // row.numel() + 1)[:numel].reshape(shape).bfloat16()
            total += numel * 2
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in names})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": KV, "vocab_size": VOCAB, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    return total


def make_adapter(folder: Path, layers: int) -> None:
    from safetensors.torch import save_file

    if (folder / "adapter_model.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for n in range(layers):
        for name, shape in layer_shapes(n).items():
            if len(shape) == 2:
                key = "base_model.model." + name[: -len(".weight")]
                tensors[key + ".lora_A.weight"] = torch.randn(16, shape[1], generator=gen) * 0.01
                tensors[key + ".lora_B.weight"] = torch.randn(shape[0], 16, generator=gen) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 16, "lora_alpha": 32,
         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/adaptertools-w3"))
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    total = make_base(args.work / "base", args.layers)
    make_adapter(args.work / "adapter", args.layers)
    print(f"base {total / 1e9:.1f} GB ready in {time.perf_counter() - start:.0f} s", flush=True)
    tool = shutil.which("adaptertools") or sys.exit("adaptertools is not on PATH")
    out = args.work / "out"
    cmd = ["/usr/bin/time", "-f", "%e %M", tool, "merge", str(args.work / "base"),
           str(args.work / "adapter"), "--out", str(out), "--force"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall, rss_kb = result.stderr.strip().splitlines()[-1].split()
    print(f"| W3 merge, base {total / 1e9:.1f} GB (RAM 24 GiB) | exit {result.returncode} | "
          f"{float(wall):.1f} s | peak RSS {int(rss_kb) / 1e6:.2f} GB | target <= 1.5 GB |")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
