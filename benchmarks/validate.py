"""Per-tensor validation of the W1 merge (BENCHMARKS.md), timed against the merge itself.

    python benchmarks/validate.py [--work DIR] [--runs N] [--probes K]

W1 (the TinyLlama-1.1B-shaped bf16 base, 2.2 GB in 1 GB shards, and one r=16 LoRA on every
linear layer) is generated once into --work (default /tmp/adaptertools-bench, shared with
benchmarks/merge.py). In one process, after one warm-up read of the inputs, each run times
``adaptertools.merge`` (engine wall, the report's ``wall_s``) and then ``adaptertools.validate`` on
its output (the report's ``wall_s``: planning excluded, every tensor read from base and output,
154 adapted tensors probed, 47 untouched ones compared byte for byte). Target: validation wall <=
merge wall. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from merge import w1_base
from workloads import w1_adapter


def warm(paths: list[Path]) -> None:
    for path in paths:
        for f in sorted(path.rglob("*") if path.is_dir() else [path]):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/adaptertools-bench"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--probes", type=int, default=16)
    args = parser.parse_args()

    import torch

    import adaptertools as at

    base = w1_base(args.work / "w1_base")
    adapter = w1_adapter(args.work / "w1_adapter_s0", seed=0)
    out = args.work / "validate_out"
    warm([base, adapter])
    rows = []
    for run in range(args.runs):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        merged = at.merge(base, [adapter], out)
        merge_call = time.perf_counter() - start
        start = time.perf_counter()
        report = at.validate(base, [adapter], out, probes=args.probes)
        validate_call = time.perf_counter() - start
        assert report["passed"], [r for r in report["tensors"] if not r["passed"]][:3]
        rows.append((merged["wall_s"], merge_call, report["wall_s"], validate_call, report))
        print(f"run {run}: merge {merged['wall_s']:.2f} s (call {merge_call:.2f} s), validate "
              f"{report['wall_s']:.2f} s (call {validate_call:.2f} s)", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    best_merge = min(r[0] for r in rows)
    best_validate = min(r[2] for r in rows)
    report = rows[-1][4]
    margins = [t["margin_db"] for t in report["tensors"] if t.get("margin_db") is not None]
    floors = [t["floor_db"] for t in report["tensors"] if t.get("floor_db") is not None]
    identical = sum(bool(t.get("identical_to_floor")) for t in report["tensors"])
    print(f"machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
          f"best of {args.runs}, warm page cache, probes {args.probes}\n")
    print("| what | wall | ratio to merge | target |")
    print("| --- | --- | --- | --- |")
    print(f"| W1 merge (engine, `merge()` report wall_s) | {best_merge:.2f} s | 1.00 | |")
    verdict = "met" if best_validate <= best_merge else "**not met**"
    print(f"| W1 per-tensor validation (`validate()` report wall_s) | {best_validate:.2f} s | "
          f"{best_validate / best_merge:.2f} | <= 1.00: {verdict} |")
    print(f"\n{report['adapted']} adapted tensors, {report['untouched']} untouched (bytes); "
          f"passed: {report['passed']}; margins {min(margins):+.3f}..{max(margins):+.3f} dB; "
          f"floors {min(floors):.1f}..{max(floors):.1f} dB; {identical} bit-identical to the floor")


if __name__ == "__main__":
    main()
