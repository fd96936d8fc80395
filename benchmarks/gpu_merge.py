"""GPU merge (`--device cuda`) against the CPU reference path, same inputs, same run.

    python benchmarks/gpu_merge.py [--layers 8] [--work DIR]

On a machine without CUDA it says so and exits 0. Prints wall times of both devices and how far
the GPU result is from the CPU one (the CPU path is the reference; GPU matmuls may round
differently, so the figure is the fraction of elements that differ and the largest difference
in units of the output dtype's ulp).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from workloads import W1_CONFIG, w1_adapter  # noqa: E402


def make_base(folder: Path, layers: int) -> Path:
    """A W1-shaped bf16 base with ``layers`` blocks, one safetensors file."""
    import json

    from safetensors.torch import save_file

    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    c = dict(W1_CONFIG, num_hidden_layers=layers)
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for n in range(layers):
        p = f"model.layers.{n}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)),
                            ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, h)),
                            ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))):
            tensors[p + name + ".weight"] = (torch.randn(shape, generator=gen) * 0.02).bfloat16()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(c))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/adaptertools-gpu-bench"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: GPU merge not measured")
        return
    import adaptertools.api as at
    from safetensors.torch import load_file

    base = make_base(args.work / f"base{args.layers}", args.layers)
    adapter = w1_adapter(args.work / "adapter")  # covers 22 layers; keep only what the base has
    full = at.load(adapter)
    full.weights = {k: v for k, v in full.weights.items()
                    if int(k.split(".")[2]) < args.layers}
    at.save(full, args.work / "adapter_cut", format="peft", force=True)
    walls = {}
    for device in ("cpu", "cuda"):
        start = time.perf_counter()
        at.merge(base, [args.work / "adapter_cut"], args.work / f"out_{device}", device=device,
                 force=True)
        walls[device] = time.perf_counter() - start
    cpu, gpu = (load_file(args.work / f"out_{d}" / "model.safetensors") for d in ("cpu", "cuda"))
    differing = total = 0
    worst = 0.0
    for name, t in cpu.items():
        diff = (t.float() - gpu[name].float()).abs()
        ulp = torch.finfo(torch.bfloat16).eps * t.float().abs().clamp_min(1e-30)
        differing += int((diff > 0).sum())
        total += t.numel()
        worst = max(worst, float((diff / ulp).max()))
    print("| device | wall | note |\n| --- | --- | --- |")
    print(f"| cpu | {walls['cpu']:.2f} s | reference |")
    print(f"| cuda | {walls['cuda']:.2f} s | {differing / total:.2e} of elements differ from cpu, "
          f"at most {worst:.1f} ulp |")


if __name__ == "__main__":
    main()
