"""How much of a LoRA survives a merge into GPTQ and AWQ checkpoints (codecs/gptq.py), printed
as a markdown table.

The seeded bf16 Llama of ct_survival.py (hidden 256, intermediate 512, 2 layers), its weights W;
each base is Q(W) as GPTQModel 7.7 quantizes it on the CPU (tests/helpers/gptqmodel_env.py: its
own cached venv; 8 seeded random calibration sequences of 32 ids): GPTQ 4-bit symmetric groups
of 128, GPTQ 4-bit asymmetric groups of 128 with act-order, AWQ gemm 4-bit groups of 128. One
PEFT LoRA (r=16 on every linear) scaled to ||delta|| / ||W|| = REL, then

(a) ``adaptertools.merge`` into Q(W) with --requantize keep: deq(Q(W)) + delta rounded onto the
    stored grid;
(b) merged into bf16 W and rounded once afterwards onto the same grid (scales, zeros, g_idx
    kept): Q_grid(bf16(W + delta)), the codec's own rounding from the float weights;
(c) merged into bf16 W and quantized once afterwards by GPTQModel itself (new scales and zeros
    from the same calibration): Q(bf16(W + delta)).

Survival: the median (min) over the 14 adapted weights of cos(delta, deq(out) - deq(Q(W))), deq
being our decode (bit-exact with GPTQModel's dequantization, tests/test_gptq.py).

    .venv/bin/python benchmarks/gptq_survival.py [--work /tmp/gptq-bench]
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

from ct_survival import ALL, bf16_llama, cosine

# label: GPTQModel quantize job (tests/helpers/gptqmodel_oracle.py)
ENCODINGS = {
    "GPTQ int4 groups of 128, symmetric": {"method": "gptq", "bits": 4, "group_size": 128,
                                           "desc_act": False, "sym": True, "format": "gptq"},
    "GPTQ int4 groups of 128, asymmetric, act-order": {"method": "gptq", "bits": 4,
                                                       "group_size": 128, "desc_act": True,
                                                       "sym": False, "format": "gptq"},
    "AWQ gemm int4 groups of 128": {"method": "awq", "bits": 4, "group_size": 128},
}


def on_grid(states: dict, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each weight rounded onto its base's stored grid (codecs.gptq.encode with no value taken
    as unchanged), decoded."""
    from adaptertools.codecs import gptq

    out = {}
    for key, w in weights.items():
        enc, (codes, zeros, scales, _) = states[key]
        untouched = torch.full_like(w, float("nan"))              # no value equals NaN
        out[key] = gptq.encode(enc, w.float(), (codes, zeros, scales, untouched))[1]
    return out


def survival(work: Path, rels: list[float]) -> None:
    from helpers import gptqmodel_env
    from helpers.quantized_bases import scaled_lora

    import adaptertools as at

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    weights = {k: v.detach().float() for k, v in bf16_llama().state_dict().items()}   # W
    gptqmodel_env.hf_folder(bf16_llama(), work / "float")
    bases = gptqmodel_env.run([{"op": "quantize", "float": str(work / "float"), **job}
                               for job in ENCODINGS.values()])
    plans = []                        # (label, rel, base folder, deltas, once's float folder)
    for k, (label, base_folder) in enumerate(zip(ENCODINGS, bases)):
        base, _ = gptqmodel_env.decodings(base_folder)
        for rel in rels:
            deltas = scaled_lora(bf16_llama().float(), base, work / f"lora-{k}-{rel}",
                                 targets=ALL, rel=rel, rank=16)
            plain = {n: (w.double() + deltas[n]).to(torch.bfloat16) if n in deltas else w
                     for n, w in weights.items()}
            gptqmodel_env.hf_folder(bf16_llama(plain), work / f"plain-{k}-{rel}")
            plans.append((label, rel, k, base_folder, deltas))
    once = gptqmodel_env.run([{"op": "quantize", "float": str(work / f"plain-{k}-{rel}"),
                               **ENCODINGS[label]} for label, rel, k, _, _ in plans])
    print("| encoding | LoRA size | adapted | adaptertools merge (keep) | merge into bf16, rounded "
          "onto the same grid | merge into bf16, GPTQModel once |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (label, rel, k, base_folder, deltas), once_folder in zip(plans, once):
        base, states = gptqmodel_env.decodings(base_folder)
        out = work / f"out-{k}-{rel}"
        at.merge(base_folder, [work / f"lora-{k}-{rel}"], out)
        merged, _ = gptqmodel_env.decodings(out)
        plain = {n: (weights[n].double() + d).to(torch.bfloat16) for n, d in deltas.items()}
        grid = on_grid(states, plain)
        requantized, _ = gptqmodel_env.decodings(once_folder)
        row = []
        for result in (merged, grid, requantized):
            scores = [cosine(d, result[n] - base[n]) for n, d in deltas.items()]
            row.append(f"{statistics.median(scores):.3f} (min {min(scores):.3f})")
        print(f"| {label} | {rel:.0%} | {len(deltas)} | {' | '.join(row)} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptq-bench"))
    survival(parser.parse_args().work, [0.02, 0.1])
