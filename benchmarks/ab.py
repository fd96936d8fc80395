"""Two versions of `adaptertools merge` on W1/W2, run alternately: what a change is worth.

    python benchmarks/ab.py --before REV [--after REV] [--workloads W1,W2] [--runs 3]
                            [--cache warm,cold] [--work DIR]

This VM's speed drifts by 2x over minutes (how fast the host hands it fresh memory; see
RESULTS.md), so figures from two benchmark runs minutes apart do not compare. Here each version
runs right after the other, ``--runs`` times per cache mode, and the best and median of each are
printed side by side. ``--before`` and ``--after`` are git revisions (``--after`` defaults to the
working tree), checked out with ``git worktree`` into a temporary folder and imported from there
(the editable install is kept out of the way), with the same interpreter and packages. Workloads
come from benchmarks/merge.py (generated into --work on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from merge import W2_WEIGHTS, drop_caches, w1_base, warm_up
from workloads import w1_adapter

# Runs the CLI from ROOT: sys.path first, and the editable install's finder removed, so that
# `import adaptertools` cannot resolve to the working tree.
RUNNER = """
import sys
root = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()]
sys.path.insert(0, root)
import adaptertools
assert adaptertools.__file__.startswith(root), adaptertools.__file__
from adaptertools.cli import main
sys.argv = ["adaptertools"] + sys.argv[1:]
main()
"""


def checkout(rev: str, into: Path) -> Path:
    subprocess.run(["git", "-C", str(HERE.parent), "worktree", "add", "--detach", "-f", str(into),
                    rev], check=True, capture_output=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision of the baseline")
    parser.add_argument("--after", help="git revision to compare (default: the working tree)")
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", default="warm,cold")
    parser.add_argument("--work", type=Path, default=Path("/tmp/adaptertools-bench"))
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    base = w1_base(args.work / "w1_base")
    adapters = [w1_adapter(args.work / f"w1_adapter_s{seed}", seed=seed) for seed in range(4)]
    modes = args.cache.split(",")
    if "cold" in modes and not drop_caches():
        sys.exit("cold runs need root (echo 3 > /proc/sys/vm/drop_caches); use --cache warm")

    with tempfile.TemporaryDirectory(prefix="adaptertools-ab-") as tmp:
        tmp = Path(tmp)
        roots = {"before": checkout(args.before, tmp / "before"),
                 "after": checkout(args.after, tmp / "after") if args.after else HERE.parent}
        runner = tmp / "runner.py"
        runner.write_text(RUNNER)
        out = tmp / "out"
        results: dict[tuple, list[tuple[float, float]]] = {}
        try:
            for workload in args.workloads.split(","):
                inputs = [adapters[0]] if workload == "W1" else adapters
                extra = [] if workload == "W1" else ["--weights", W2_WEIGHTS]
                for mode in modes:
                    for _ in range(args.runs):
                        for name, root in roots.items():
                            subprocess.run(["rm", "-rf", str(out)], check=True)
                            os.sync()
                            drop_caches() if mode == "cold" else warm_up([base, *inputs])
                            cmd = [sys.executable, str(runner), str(root), "merge", str(base),
                                   *map(str, inputs), *extra, "--out", str(out), "--json"]
                            start = time.perf_counter()
                            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp,
                                                  check=False)
                            wall = time.perf_counter() - start
                            if proc.returncode != 0:
                                sys.exit(f"{name}: {proc.stderr.strip()[-500:]}")
                            engine = json.loads(proc.stdout)["wall_s"]
                            results.setdefault((workload, mode, name), []).append((wall, engine))
                            print(f"  {workload} {mode} {name}: {wall:.2f} s "
                                  f"(engine {engine:.2f} s)", flush=True)
        finally:
            subprocess.run(["rm", "-rf", str(out)], check=False)
            for name in ("before", "after"):
                if roots.get(name) and roots[name] != HERE.parent:
                    subprocess.run(["git", "-C", str(HERE.parent), "worktree", "remove", "--force",
                                    str(roots[name])], check=False, capture_output=True)

    after = args.after or "working tree"
    print()
    print(f"before = {args.before}, after = {after}; {args.runs} alternating runs per mode; "
          f"{os.cpu_count()} cores; load average now {os.getloadavg()[0]:.2f}")
    print()
    print("| workload | cache | before: best / median wall | after: best / median wall | "
          "speed-up (best) | engine's own wall, best: before / after |")
    print("| --- | --- | --- | --- | --- | --- |")
    for workload in args.workloads.split(","):
        for mode in modes:
            b, a = results[(workload, mode, "before")], results[(workload, mode, "after")]
            bw, aw = [w for w, _ in b], [w for w, _ in a]
            print(f"| {workload} | {mode} | {min(bw):.2f} / {statistics.median(bw):.2f} s | "
                  f"{min(aw):.2f} / {statistics.median(aw):.2f} s | {min(bw) / min(aw):.2f}x | "
                  f"{min(e for _, e in b):.2f} / {min(e for _, e in a):.2f} s |")


if __name__ == "__main__":
    main()
