"""Merges into block-FP8 checkpoints (codecs/fp8.py): peak memory on W1's shape, and how much of a
LoRA survives.

memory: the W1 base (benchmarks/merge.py's seeded bf16 N(0, 0.02) tensors, same shards) encoded
tensor by tensor with our FP8 encoder (``codecs.fp8.quantize``, 128 x 128 blocks) into WORK/w1_fp8
(about 1.3 GB), then ``adaptertools merge`` of the W1 adapter (r=16 on every linear) in a child
process; its own peak RSS (os.wait4).

survival: a seeded Llama (hidden 256, intermediate 512, 2 layers, N(0, 0.02) init), its bf16
weights W; the FP8 base is Q(W). One PEFT LoRA (r=16 on every linear) scaled to ||delta|| / ||W||
= REL, merged (a) by ``adaptertools merge`` into Q(W) (--requantize keep) and (b) into bf16 W and
quantized once afterwards, Q(bf16(W + delta)). Survival: the median over the 14 adapted weights of
cos(delta, deq(out) - deq(Q(W))).

    .venv/bin/python benchmarks/fp8_memory.py [--work /tmp/fp8-bench] [--skip-memory]
                                              [--skip-survival] [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
BLOCK = (128, 128)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- memory

def w1_fp8_base(folder: Path) -> Path:
    """W1 (merge.py's tensors and seeds) with every *_proj weight in block FP8."""
    from helpers.quantized_bases import FP8_CONFIG
    from merge import BASE_SEED, shard_groups, w1_tensors
    from workloads import W1_CONFIG

    from adaptertools.codecs import fp8

    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tensors = w1_tensors()
    seeds = {name: BASE_SEED + k for k, (name, _) in enumerate(tensors)}
    shards = shard_groups(tensors)          # the bf16 base's shards, as merge.py cuts them
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        stored = {}
        for name, shape in sorted(shard):
            if len(shape) == 1:
                stored[name] = torch.ones(shape, dtype=torch.bfloat16)
                continue
            gen = torch.Generator().manual_seed(seeds[name])
            t = torch.empty(shape).normal_(0, 0.02, generator=gen).to(torch.bfloat16)
            if name.endswith("proj.weight"):
                stored[name], stored[name + "_scale_inv"] = fp8.quantize(t.float(), BLOCK)
            else:
                stored[name] = t
        _write(folder / file, stored)
        weight_map.update(dict.fromkeys(stored, file))
        print(f"  wrote {file} ({(folder / file).stat().st_size / 1e9:.2f} GB)", flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}, indent=2))
    config = {**W1_CONFIG, "quantization_config": FP8_CONFIG}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / ".complete").write_text("w1-fp8-v1")
    return folder


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor (names sorted, as the writer stores them)."""
    from adaptertools.dtypes import STORED_TORCH_DTYPES

    names = {v: k for k, v in STORED_TORCH_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def memory(work: Path, root: Path | None = None) -> None:
    """``root``: run the adaptertools package found there instead (ab.py's runner)."""
    from ab import RUNNER
    from workloads import w1_adapter

    base = w1_fp8_base(work / "w1_fp8")
    adapter = w1_adapter(work / "w1_adapter")
    out = work / "w1_fp8_out"
    shutil.rmtree(out, ignore_errors=True)
    tail = ["merge", str(base), str(adapter), "--out", str(out), "--json"]
    cmd = [sys.executable, "-m", "adaptertools.cli", *tail]
    if root is not None:
        (work / "runner.py").write_text(RUNNER)
        cmd = [sys.executable, str(work / "runner.py"), str(root.resolve()), *tail]
    start = time.perf_counter()
    # the merge child's own peak (wait4): RUSAGE_CHILDREN's maxrss is the largest of every child
    # so far, which includes the PEFT child that w1_adapter runs the first time (0.95-1.3 GB)
    with tempfile.TemporaryFile("w+") as out_fh, tempfile.TemporaryFile("w+") as err_fh:
        proc = subprocess.Popen(cmd, stdout=out_fh, stderr=err_fh, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out_fh.seek(0)
        err_fh.seek(0)
        stdout, stderr = out_fh.read(), err_fh.read()
    peak = usage.ru_maxrss * 1024
    if proc.returncode:
        raise SystemExit(stderr)
    report = json.loads(stdout)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    out_size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"{root or 'this tree'}: W1 FP8 base {size / 1e9:.2f} GB -> out {out_size / 1e9:.2f} GB; merge wall {wall:.1f} s,"
          f" peak RSS {peak / 1e9:.3f} GB; {report['survival']['tensors']} adapted, median "
          f"survival {report['survival']['median_cosine']:.3f}", flush=True)
    shutil.rmtree(out, ignore_errors=True)


# ----------------------------------------------------------------------------- survival

def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b / (a.norm() * b.norm()))


def survival(work: Path, rels: list[float]) -> None:
    from helpers.quantized_bases import fp8_block_base, scaled_lora, tiny_llama

    import adaptertools as at
    from adaptertools.codecs import fp8

    root = work / "survival"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)

    def bf16_llama():
        model = tiny_llama(hidden=256, intermediate=512, seed=0)
        return model.to(torch.bfloat16).float()              # W: the bf16 weights

    model = bf16_llama()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = fp8_block_base(model, root / "fp8")               # deq(Q(W))
    print("| LoRA size | adapted | adaptertools merge into FP8 (keep) | merge into bf16, FP8 once |")
    print("| --- | --- | --- | --- |")
    for rel in rels:
        deltas = scaled_lora(bf16_llama(), base, root / f"lora-{rel}", targets=ALL, rel=rel, rank=16)
        at.merge(root / "fp8", [root / f"lora-{rel}"], root / f"out-{rel}")
        from safetensors.torch import load_file

        out = load_file(root / f"out-{rel}" / "model.safetensors")
        ours, once = [], []
        for name, delta in deltas.items():
            merged = fp8.dequantize(out[name], out[name + "_scale_inv"], BLOCK)
            ours.append(cosine(delta, merged - base[name]))
            plain = (weights[name].double() + delta).to(torch.bfloat16).float()
            requantized = fp8.dequantize(*fp8.quantize(plain, BLOCK), BLOCK)
            once.append(cosine(delta, requantized - base[name]))
        print(f"| {rel:.0%} | {len(deltas)} | {statistics.median(ours):.3f} (min {min(ours):.3f}) "
              f"| {statistics.median(once):.3f} (min {min(once):.3f}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/fp8-bench"))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-survival", action="store_true")
    parser.add_argument("--before", type=Path, help="also measure the package in this folder "
                        "(git archive REV adaptertools | tar -x -C DIR)")
    args = parser.parse_args()
    if not args.skip_survival:
        survival(args.work, [0.02, 0.1])
    if not args.skip_memory:
        memory(args.work)
        if args.before:
            memory(args.work, args.before)


if __name__ == "__main__":
    main()
