"""W1 extract (BENCHMARKS.md): `adaptertools extract BASE FINETUNED --rank 16` against `cp -r`.

    python benchmarks/extract.py [--work DIR] [--runs N] [--rank R] [--svd auto|exact|randomized]

Inputs, generated once into --work (default /tmp/adaptertools-bench): the W1 base (merge.py's
w1_base: TinyLlama-1.1B shape, bf16, 1 GB shards) and a synthetic "fine-tune" of it, written
shard by shard with the base's own headers: every q,k,v,o,gate,up,down weight becomes
``bf16(W + U @ V + noise)`` with U (out, 16), V (16, in) seeded N(0, 1) scaled so that the
low-rank part's entries have standard deviation 1e-3 (W's is 0.02), and noise N(0, 1e-4); every
other tensor is copied. So a rank-16 LoRA should keep the low-rank part, and lose the noise and
the bf16 rounding of the sum.

Measured in the same run, each command in its own process (wall from here, peak RSS by GNU time
or a wait4 wrapper: merge.py's run_measured): `cp -r BASE DST && sync` (the floor: read and write
every byte once; extract reads two checkpoints and writes ~50 MB), and the extract CLI with
--json (its report gives the energy kept and the relative error). CPU time (user + sys, from
getrusage of the waited children) is printed too: on a shared machine it varies less than wall. The cache is warm (inputs read
once before each command) unless --cold, which drops it (root only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from merge import (
    INDEX,
    drop_caches,
    fmt_bytes,
    merge_cli,
    remove,
    run_measured,
    w1_base,
    warm_up,
)
from workloads import TARGETS

TUNED_VERSION = "w1-tuned-v1"    # bump when the generated fine-tune changes
LOW_RANK, LOW_RANK_STD, NOISE_STD, SEED = 16, 1e-3, 1e-4, 77


def is_target(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in TARGETS


def w1_tuned(base: Path, folder: Path) -> Path:
    """The synthetic fine-tune of ``base``: same shards, headers and order; targets changed."""
    import torch

    from adaptertools.tensor_index import read_entry, read_safetensors_header

    done = folder / ".complete"
    if done.is_file() and done.read_text() == TUNED_VERSION:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    for k, file in enumerate(sorted(base.glob("*.safetensors"))):
        header = read_safetensors_header(file)
        with open(folder / file.name, "wb") as fh:
            fh.write(header.header)
            for n, entry in enumerate(header.tensors):        # data order
                tensor = read_entry(file, entry)
                if is_target(entry.name):
                    gen = torch.Generator().manual_seed(SEED + 1000 * k + n)
                    rows, cols = entry.shape
                    u = torch.randn(rows, LOW_RANK, generator=gen)
                    v = torch.randn(LOW_RANK, cols, generator=gen) * (LOW_RANK_STD / LOW_RANK ** 0.5)
                    noise = torch.randn(rows, cols, generator=gen) * NOISE_STD
                    tensor = (tensor.float() + u @ v + noise).to(tensor.dtype)
                fh.write(tensor.reshape(-1).view(torch.uint8).numpy())
    for extra in ("config.json", INDEX):
        shutil.copy(base / extra, folder / extra)
    os.sync()
    done.write_text(TUNED_VERSION)
    print(f"  fine-tune generated in {time.perf_counter() - start:.1f} s", flush=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/adaptertools-bench"))
    parser.add_argument("--runs", type=int, default=1, help="repeats; the best wall is kept")
    parser.add_argument("--rank", type=int, default=LOW_RANK)
    parser.add_argument("--svd", default="auto", choices=["auto", "exact", "randomized"])
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    print("generating (cached) inputs", flush=True)
    base = w1_base(work / "w1_base")
    tuned = w1_tuned(base, work / "w1_tuned")
    if args.cold and not drop_caches():
        sys.exit("cannot drop the page cache here (needs root and /proc/sys/vm/drop_caches)")
    out = work / "extract_out"
    commands = [
        ("cp -r + sync", ["sh", "-c", 'cp -r "$0" "$1" && sync', str(base), str(work / "cp_out")],
         work / "cp_out", [base]),
        (f"W1 adaptertools extract --rank {args.rank}",
         merge_cli() + ["extract", str(base), str(tuned), "--out", str(out), "--rank",
                        str(args.rank), "--svd", args.svd, "--json"], out, [base, tuned]),
    ]
    load_before = os.getloadavg()
    best: dict[str, tuple[float, int, float]] = {}
    report = {}
    for run in range(args.runs):
        for what, cmd, dst, inputs in commands:
            remove(dst)
            drop_caches() if args.cold else warm_up(inputs)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall, rss, stdout = run_measured(cmd, work / f"log_{what.split()[0]}")
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            if "--json" in cmd:
                report = json.loads(stdout)
            old = best.get(what, (float("inf"), 0, float("inf")))
            best[what] = (min(old[0], wall), max(old[1], rss), min(old[2], cpu))
            print(f"  run {run + 1} {what}: {wall:.2f} s (CPU {cpu:.2f} s), peak RSS "
                  f"{fmt_bytes(rss)}", flush=True)
    load_after = os.getloadavg()
    adapter_bytes = sum(p.stat().st_size for p in out.iterdir())
    for _, _, dst, _ in commands:
        remove(dst)
    base_bytes = sum(p.stat().st_size for p in base.iterdir() if p.is_file())
    cp_wall = best["cp -r + sync"][0]
    print()
    print(f"W1 base {fmt_bytes(base_bytes)}; {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; best wall of "
          f"{args.runs}; page cache {'cold' if args.cold else 'warm'}")
    lora = [r for r in report["tensors"] if r["rank"]]
    print(f"extract: {len(lora)} LoRA tensors of rank {args.rank}, adapter "
          f"{fmt_bytes(adapter_bytes)}, total energy kept {report['total']['energy_kept']:.5f}, "
          f"relative error {report['total']['relative_error']:.4f} (worst tensor "
          f"{max(r['relative_error'] for r in lora):.4f}); own wall {report['wall_s']:.2f} s")
    print()
    print("| what | wall | ratio to cp | CPU time (user + sys) | peak RSS |")
    print("| --- | --- | --- | --- | --- |")
    for what, (wall, rss, cpu) in best.items():
        print(f"| {what} | {wall:.2f} s | {wall / cp_wall:.2f} | {cpu:.2f} s | {fmt_bytes(rss)} |")


if __name__ == "__main__":
    main()
