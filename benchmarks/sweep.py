"""Size sweep (issue 20 item 5): `adaptertools merge` against `cp -r` + `sync` of the same base,
from a 1B to a larger-than-RAM base, warm and cold, in one run; PEFT where it fits.

    python benchmarks/sweep.py [--work DIR] [--sizes 1b,7b,16g,27g] [--runs 2]
                               [--cache cold,warm] [--peft] [--plot FILE.png]

Bases: ``1b`` is W1 (merge.py's TinyLlama-1.1B shape, 2.2 GB, 1 GB shards); ``7b``, ``16g``,
``27g`` are w3.py's Llama-7B-width base (hidden 4096, intermediate 14336, 2 GB shards) with 32,
36 and 60 blocks (14.6, 16.2 and 26.7 GB; the last is larger than this machine's 24 GiB of RAM).
Adapters: r=16 on every linear layer (W1's for 1b, w3.py's for the others). Each base is made,
measured and deleted before the next (the largest needs about 2x its size of free disk).

Method (issue 20): per size and cache state, ``--runs`` pairs of commands, alternating cp and
merge; before each command the previous output is deleted, ``sync``, 2 s of rest, then the page
cache is dropped (cold; root only) or the inputs are read once (warm; skipped for bases larger
than 40% of RAM, where warm cannot hold). The ratio of each pair (merge wall / cp wall) is
reported as median with min and max, with the merge's peak RSS (GNU time). With --peft, PEFT's
from_pretrained + merge_and_unload + save_pretrained runs once per cache state at the sizes whose
bf16 model fits twice in RAM. A Markdown table is printed last; --plot draws wall / cp against
base size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import w3  # noqa: E402
from merge import (PEFT_SCRIPT, drop_caches, merge_cli, remove, run_measured,  # noqa: E402
                   w1_base, warm_up)
from workloads import w1_adapter  # noqa: E402

SIZES = {"1b": None, "7b": 32, "16g": 36, "27g": 60}    # w3.py blocks (None: W1)
REST_S = 2.0


@dataclass
class Row:
    size: str
    cache: str
    base_bytes: int
    cp: list[float] = field(default_factory=list)
    merge: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    peft: float | None = None
    peft_rss: int | None = None

    def ratios(self) -> list[float]:
        return [m / c for m, c in zip(self.merge, self.cp)]


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def make_inputs(work: Path, size: str) -> tuple[Path, Path]:
    layers = SIZES[size]
    if layers is None:
        return w1_base(work / "w1_base"), w1_adapter(work / "w1_adapter_s0")   # merge.py's names
    folder = work / f"l{layers}"
    w3.make_base(folder / "base", layers)
    w3.make_adapter(folder / "adapter", layers)
    return folder / "base", folder / "adapter"


def settle(outputs: list[Path], inputs: list[Path], cache: str) -> None:
    for out in outputs:
        remove(out)
    time.sleep(REST_S)
    if cache == "cold":
        drop_caches()
    else:
        warm_up(inputs)


def measure(work: Path, size: str, cache: str, runs: int, peft: bool) -> Row:
    base, adapter = make_inputs(work, size)
    row = Row(size, cache, folder_bytes(base))
    dst, out, log = work / "cp-dst", work / "merged", work / "log"
    # sync of the copy's own files (as coldread.py): a bare sync also waits for other writers
    cp = ["sh", "-c", f"cp -r '{base}' '{dst}' && find '{dst}' -type f -exec sync {{}} +"]
    merge = [*merge_cli(), "merge", str(base), str(adapter), "--out", str(out), "--quiet"]
    for _ in range(runs):
        settle([dst, out], [base, adapter], cache)
        row.cp.append(run_measured(cp, log)[0])
        settle([dst, out], [base, adapter], cache)
        wall, rss, _ = run_measured(merge, log)
        row.merge.append(wall)
        row.rss.append(rss)
    if peft and 2 * row.base_bytes < 0.8 * total_memory():
        settle([dst, out], [base, adapter], cache)
        row.peft, row.peft_rss, _ = run_measured(
            [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)], log)
    settle([dst, out], [], "cold")
    return row


def table(rows: list[Row]) -> str:
    lines = ["| base | size | cache | cp + sync (median) | merge (median) | merge / cp: median "
             "(min-max) | merge peak RSS | PEFT | PEFT / cp |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratios, cp = r.ratios(), statistics.median(r.cp)
        peft = ("- | -" if r.peft is None else
                f"{r.peft:.1f} s ({r.peft_rss / 1e9:.2f} GB) | {r.peft / cp:.1f}x")
        lines.append(f"| {r.size} | {r.base_bytes / 1e9:.1f} GB | {r.cache} | {cp:.1f} s | "
                     f"{statistics.median(r.merge):.1f} s | {statistics.median(ratios):.2f} "
                     f"({min(ratios):.2f}-{max(ratios):.2f}) | {max(r.rss) / 1e9:.2f} GB | "
                     f"{peft} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for cache, marker in (("cold", "o"), ("warm", "s")):
        mine = [r for r in rows if r.cache == cache]
        if not mine:
            continue
        x = [r.base_bytes / 1e9 for r in mine]
        med = [statistics.median(r.ratios()) for r in mine]
        lo = [m - min(r.ratios()) for m, r in zip(med, mine)]
        hi = [max(r.ratios()) - m for m, r in zip(med, mine)]
        ax.errorbar(x, med, yerr=[lo, hi], marker=marker, capsize=3, label=f"merge, {cache}")
    ax.axhline(1.15, color="grey", linestyle="--", linewidth=1, label="target 1.15")
    ax.axvline(total_memory() / 1e9, color="grey", linestyle=":", linewidth=1, label="RAM")
    ax.set_xscale("log")
    ax.set_xlabel("base size (GB, bf16)")
    ax.set_ylabel("merge wall / (cp -r + sync) wall")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/adaptertools-sweep"))
    parser.add_argument("--sizes", default="1b,7b,16g,27g")
    parser.add_argument("--cache", default="cold,warm")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--peft", action="store_true")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the generated bases")
    args = parser.parse_args()
    sizes, caches = args.sizes.split(","), args.cache.split(",")
    if unknown := [s for s in sizes if s not in SIZES] + [c for c in caches
                                                           if c not in ("cold", "warm")]:
        parser.error(f"unknown size or cache: {unknown}; sizes {list(SIZES)}, caches cold,warm")
    if "cold" in caches and os.geteuid() != 0:
        parser.error("cold runs drop the page cache: run as root")
    rows = []
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"{total_memory() / 2**30:.0f} GiB RAM, load {os.getloadavg()[0]:.2f}", flush=True)
    for size in sizes:
        for cache in caches:
            base, _ = make_inputs(args.work, size)
            if cache == "warm" and folder_bytes(base) > 0.4 * total_memory():
                continue
            rows.append(measure(args.work, size, cache, args.runs, args.peft))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        if not args.keep and SIZES[size] is not None:
            shutil.rmtree(args.work / f"l{SIZES[size]}", ignore_errors=True)
    print(f"load after {os.getloadavg()[0]:.2f}\n")
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
