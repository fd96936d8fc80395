"""Cold-cache merge of a w3.py base against `cp -r` + `sync`, with the disk's own O_DIRECT rates
as the floor (issue 20 item 1).

    python benchmarks/coldread.py [--work DIR] [--layers 12] [--runs 3] [--keep]
                                  [--before DIR]

Per run, alternating: cp, then merge (and, with ``--before DIR``, the merge of the adaptertools
package found in DIR, e.g. ``git archive REV adaptertools | tar -x -C DIR``, run as ab.py runs
it, right after); before each command the previous output is deleted,
``sync``, 2 s of rest and the page cache dropped (root). Before the pairs, ``dd`` reads the first
shard with ``iflag=direct`` and writes 2 GB with ``oflag=direct`` (8 MB blocks), so the table
carries the disk's rates of the same spell. Prints each pair, then the median ratio with min and
max and the merge's peak RSS (GNU time). The base (w3.py, ``--layers`` blocks: 12 is 5.8 GB, 36
16.2 GB) is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import w3
from ab import RUNNER
from merge import drop_caches, merge_cli, remove, run_measured
from sweep import REST_S, folder_bytes


def dd_rate(args: list[str]) -> float:
    """GB/s that ``dd`` reports for ``args``."""
    err = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    nbytes, seconds = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", err).groups()
    return int(nbytes) / float(seconds) / 1e9


def floor(base: Path, work: Path) -> tuple[float, float]:
    """(O_DIRECT read GB/s of the first shard, O_DIRECT write GB/s of 2 GB)."""
    shard = min(base.glob("*.safetensors"))
    drop_caches()
    read = dd_rate([f"if={shard}", "of=/dev/null", "bs=8M", "iflag=direct"])
    scratch = work / "dd-scratch"
    write = dd_rate(["if=/dev/zero", f"of={scratch}", "bs=8M", "count=256", "oflag=direct"])
    remove(scratch)
    return read, write


def settle(*outputs: Path) -> None:
    for out in outputs:
        remove(out)
    time.sleep(REST_S)
    drop_caches()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/adaptertools-coldread"))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--before", type=Path, help="a folder holding another adaptertools")
    args = parser.parse_args()
    base, adapter = args.work / "base", args.work / "adapter"
    size = w3.make_base(base, args.layers)
    w3.make_adapter(adapter, args.layers)
    dst, out, log = args.work / "cp-dst", args.work / "merged", args.work / "log"
    read, write = floor(base, args.work)
    print(f"base {size / 1e9:.2f} GB ({folder_bytes(base) / 1e9:.2f} GB on disk); dd O_DIRECT "
          f"8 MB: read {read:.2f} GB/s, write {write:.2f} GB/s", flush=True)
    # sync of the copy's own files: a bare sync also waits for the other work on this machine
    cp = ["sh", "-c", f"cp -r '{base}' '{dst}' && sync '{dst}'/*"]
    tail = ["merge", str(base), str(adapter), "--out", str(out), "--quiet"]
    merge = [*merge_cli(), *tail]
    runner = args.work / "runner.py"
    runner.write_text(RUNNER)
    before = [sys.executable, str(runner), str(args.before.resolve()), *tail] if args.before else None
    cps, merges, rss, befores = [], [], [], []
    for i in range(args.runs):
        settle(dst, out)
        cps.append(run_measured(cp, log)[0])
        settle(dst, out)
        wall, peak, _ = run_measured(merge, log)
        merges.append(wall)
        rss.append(peak)
        line = (f"run {i + 1}: cp+sync {cps[-1]:.1f} s, merge {wall:.1f} s "
                f"({wall / cps[-1]:.2f}x), peak RSS {peak / 1e9:.2f} GB")
        if before:
            settle(dst, out)
            wall, peak, _ = run_measured(before, log)
            befores.append(wall)
            line += f"; before: {wall:.1f} s ({wall / cps[-1]:.2f}x), peak RSS {peak / 1e9:.2f} GB"
        print(line, flush=True)
    settle(dst, out)
    ratios = [m / c for m, c in zip(merges, cps)]
    print(f"| {size / 1e9:.1f} GB cold | cp+sync {statistics.median(cps):.1f} s "
          f"({min(cps):.1f}-{max(cps):.1f}) | merge {statistics.median(merges):.1f} s "
          f"({min(merges):.1f}-{max(merges):.1f}) | ratio {statistics.median(ratios):.2f} "
          f"({min(ratios):.2f}-{max(ratios):.2f}) | peak RSS {max(rss) / 1e9:.2f} GB | "
          f"dd read {read:.2f} / write {write:.2f} GB/s |")
    if befores:
        ratios = [b / c for b, c in zip(befores, cps)]
        print(f"| before | merge {statistics.median(befores):.1f} s ({min(befores):.1f}-"
              f"{max(befores):.1f}) | ratio {statistics.median(ratios):.2f} ({min(ratios):.2f}-"
              f"{max(ratios):.2f}) |")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
