"""Rewrite tests/golden/hashes.json: the input and output hashes of every golden case.

When: only when the code's output is MEANT to change (a deliberate format or numeric change,
said in the commit), or when the recorded inputs no longer match what the pinned test
dependencies build (test_golden then skips cases saying so). Never to make a refactor's test pass:
the point of the corpus is that a refactor leaves every output byte as it was.

How (from the repository root), against the code the hashes must come from, e.g. the commit
before a refactor::

    git worktree add /tmp/golden-base <commit>
    PYTHONPATH=/tmp/golden-base .venv/bin/python tests/golden/regenerate.py
    git worktree remove /tmp/golden-base

``adaptertools`` is imported from PYTHONPATH (the script prints which file and refuses to run if
it is not under PYTHONPATH's first entry, when PYTHONPATH is set); the case builders come from
this checkout's tests/. Options: ``--only SUBSTRING`` rewrites the matching cases only, keeping
the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRITON_INTERPRET", "1")

HASHES = HERE / "hashes.json"


def _commit(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="rewrite only the cases whose name contains it")
    args = parser.parse_args()

    import adaptertools
    import peft
    import safetensors
    import torch
    import transformers

    source = Path(adaptertools.__file__).resolve().parent
    print(f"adaptertools from {source}", file=sys.stderr)
    first = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    if first and not str(source).startswith(str(Path(first).resolve())):
        sys.exit(f"adaptertools was imported from {source}, not from PYTHONPATH {first}")

    from cases import all_cases
    from runner import run_case

    recorded = json.loads(HASHES.read_text()) if HASHES.exists() and args.only else {"cases": {}}
    start = time.perf_counter()
    for case in all_cases():
        if args.only not in case.name:
            continue
        t = time.perf_counter()
        result = run_case(case)
        recorded["cases"][case.name] = result
        print(f"{case.name:50s} {time.perf_counter() - t:5.2f}s", file=sys.stderr)
    recorded["generated_with"] = {
        "adaptertools_commit": _commit(source.parent), "adaptertools_file": str(source),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "safetensors": safetensors.__version__,
        "python": sys.version.split()[0]}
    recorded["cases"] = dict(sorted(recorded["cases"].items()))
    HASHES.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    print(f"{len(recorded['cases'])} cases written to {HASHES} in "
          f"{time.perf_counter() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
