"""`adaptertools --help` wall time against a bare interpreter start, same run, best of N; and
`adaptertools inspect` of the W1 adapter (issue 20: whole command <= 0.5 s, no torch import),
median of 5 (with min and max) after a warm-up, and whether torch was imported.

    python benchmarks/cli_startup.py [--runs 15] [--work DIR]

Prints Markdown rows for benchmarks/RESULTS.md. Target (BENCHMARKS.md): --help <= 0.25 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from convert_gguf import imports_torch  # noqa: E402
from workloads import best_wall, w1_adapter  # noqa: E402


def walls(cmd: list[str], runs: int, env: dict | None = None) -> list[float]:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)       # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - start)
    return times


def inspect_rows(work: Path, runs: int) -> list[str]:
    """`inspect` of W1's adapter: the light path (default) and the torch path, same run."""
    script = shutil.which("adaptertools") or sys.exit("adaptertools is not on PATH")
    adapter = w1_adapter(work / "w1_adapter")
    imported = imports_torch(["inspect", str(adapter)])
    rows = []
    for label, env in (("light path (default)", None),
                       ("torch path (ADAPTERTOOLS_LIGHT=0)", {**os.environ,
                                                              "ADAPTERTOOLS_LIGHT": "0"})):
        t = walls([script, "inspect", str(adapter)], runs, env)
        torch_note = ("torch imported" if imported else "no torch import") if env is None \
            else "torch imported"
        rows.append(f"| `adaptertools inspect` W1 adapter, {label} | {statistics.median(t):.3f} s "
                    f"(min {min(t):.3f}, max {max(t):.3f}) | {torch_note} | median of {runs} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--inspect-runs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/adaptertools-bench"))
    args = parser.parse_args()
    script = shutil.which("adaptertools") or sys.exit("adaptertools is not on PATH; pip install -e .")
    interpreter = best_wall([sys.executable, "-c", "pass"], args.runs)
    help_wall = best_wall([script, "--help"], args.runs)
    torch_import = best_wall([sys.executable, "-c", "import torch"], max(3, args.runs // 5))
    print(f"| `adaptertools --help` | {help_wall:.3f} s | python -c pass {interpreter:.3f} s "
          f"(ratio {help_wall / interpreter:.2f}) | import torch alone {torch_import:.3f} s | "
          f"{os.cpu_count()} cores | best of {args.runs} |")
    load = os.getloadavg()
    print(f"\ninspect: {os.cpu_count()} cores, load average {load[0]:.2f} / {load[1]:.2f} / "
          f"{load[2]:.2f}, warm page cache\n")
    print("| command | wall | torch | runs |\n| --- | --- | --- | --- |")
    print("\n".join(inspect_rows(args.work, args.inspect_runs)))


if __name__ == "__main__":
    main()
