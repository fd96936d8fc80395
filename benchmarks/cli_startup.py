"""`adaptertools --help` wall time against a bare interpreter start, same run, best of N.

    python benchmarks/cli_startup.py [--runs 15]

Prints a Markdown row for benchmarks/RESULTS.md. Target (BENCHMARKS.md): --help <= 0.25 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workloads import best_wall  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    script = shutil.which("adaptertools") or sys.exit("adaptertools is not on PATH; pip install -e .")
    interpreter = best_wall([sys.executable, "-c", "pass"], args.runs)
    help_wall = best_wall([script, "--help"], args.runs)
    torch_import = best_wall([sys.executable, "-c", "import torch"], max(3, args.runs // 5))
    print(f"| `adaptertools --help` | {help_wall:.3f} s | python -c pass {interpreter:.3f} s "
          f"(ratio {help_wall / interpreter:.2f}) | import torch alone {torch_import:.3f} s | "
          f"{os.cpu_count()} cores | best of {args.runs} |")


if __name__ == "__main__":
    main()
