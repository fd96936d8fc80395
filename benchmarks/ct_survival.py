"""How much of a LoRA survives a merge into compressed-tensors checkpoints
(codecs/compressed_tensors.py), per encoding, printed as a markdown table.

A seeded Llama (hidden 256, intermediate 512, 2 layers, N(0, 0.02) init), its bf16 weights W;
each base is Q(W) as compressed-tensors 0.20 compresses it (tests/helpers/quantized_bases.ct_base:
min-max statistics through its calculate_qparams, ModelCompressor.compress_model). One PEFT LoRA
(r=16 on every linear) scaled to ||delta|| / ||W|| = REL, merged (a) into Q(W) with --requantize
keep and (b) into bf16 W and quantized once afterwards by compressed-tensors itself,
Q(bf16(W + delta)). Survival: the median (min) over the 14 adapted weights of
cos(delta, deq(out) - deq(Q(W))), deq being compressed-tensors' own decompression.

(a) is ``adaptertools.merge`` for every encoding (pack-quantized weights are routed from
``X.weight`` to ``X.weight_packed`` by Layout.target_name).

    .venv/bin/python benchmarks/ct_survival.py [--work /tmp/ct-bench]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FP8_ACT = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
INT8_ACT = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def _w(bits, kind, strategy, symmetric=True, **extra):
    return {"num_bits": bits, "type": kind, "symmetric": symmetric, "strategy": strategy, **extra}


# label: (format, weights, input activations)
ENCODINGS = {
    "FP8 per tensor (float-quantized)": ("float-quantized", _w(8, "float", "tensor"), FP8_ACT),
    "FP8 per channel (float-quantized, W8A8-FP8)": ("float-quantized", _w(8, "float", "channel"), FP8_ACT),
    "FP8 128x128 blocks (float-quantized)": ("float-quantized", _w(8, "float", "block", block_structure=[128, 128]),
                                             {**FP8_ACT, "strategy": "group", "group_size": 128}),
    "int8 per channel (int-quantized, W8A8)": ("int-quantized", _w(8, "int", "channel"), INT8_ACT),
    "int8 per channel (pack-quantized, W8A16)": ("pack-quantized", _w(8, "int", "channel"), None),
    "int4 groups of 128 (pack-quantized, W4A16)": ("pack-quantized", _w(4, "int", "group", group_size=128), None),
    "int4 groups of 128, asymmetric (pack-quantized)": ("pack-quantized", _w(4, "int", "group", False, group_size=128), None),
}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """0 where nothing moved (every value rounded back to its stored code)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    norms = float(a.norm() * b.norm())
    return float(a @ b) / norms if norms > 0 else 0.0


def bf16_llama(weights: dict | None = None):
    from helpers.quantized_bases import tiny_llama

    model = tiny_llama(hidden=256, intermediate=512, seed=0).to(torch.bfloat16)
    if weights is not None:
        model.load_state_dict({k: v.to(torch.bfloat16) for k, v in weights.items()})
    return model


def survival(work: Path, rels: list[float]) -> None:
    from helpers.quantized_bases import ct_base, ct_decompress, scaled_lora
    from safetensors.torch import load_file

    import adaptertools as at

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    weights = {k: v.detach().float() for k, v in bf16_llama().state_dict().items()}   # W
    print("| encoding | LoRA size | adapted | adaptertools merge (keep) | merge into bf16, "
          "compressed-tensors once |")
    print("| --- | --- | --- | --- | --- |")
    for k, (label, (fmt, wargs, act)) in enumerate(ENCODINGS.items()):
        folder = work / f"base-{k}"
        base = ct_base(bf16_llama(), folder, fmt, wargs, act)          # deq(Q(W))
        for rel in rels:
            deltas = scaled_lora(bf16_llama().float(), base, work / f"lora-{k}-{rel}", targets=ALL,
                                 rel=rel, rank=16)
            out = work / f"out-{k}-{rel}"
            at.merge(folder, [work / f"lora-{k}-{rel}"], out)
            config = ct_decompress_config(folder)
            merged = ct_decompress(load_file(out / "model.safetensors"), config)
            plain = {n: (w.double() + deltas[n]).to(torch.bfloat16) if n in deltas else w
                     for n, w in weights.items()}
            once = ct_base(bf16_llama(plain), work / f"once-{k}-{rel}", fmt, wargs, act)
            ours = [cosine(d, merged[n] - base[n]) for n, d in deltas.items()]
            theirs = [cosine(d, once[n] - base[n]) for n, d in deltas.items()]
            print(f"| {label} | {rel:.0%} | {len(deltas)} | {statistics.median(ours):.3f} (min "
                  f"{min(ours):.3f}) | {statistics.median(theirs):.3f} (min "
                  f"{min(theirs):.3f}) |", flush=True)


def ct_decompress_config(folder: Path):
    import json

    from compressed_tensors.quantization import QuantizationConfig

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    return QuantizationConfig.model_validate(qc)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/ct-bench"))
    args = parser.parse_args()
    survival(args.work, [0.02, 0.1])


if __name__ == "__main__":
    main()
