"""W4 (BENCHMARKS.md, issue 20): convert the W1 adapter PEFT -> GGUF and back, whole command
(interpreter start included), against llama.cpp's own convert_lora_to_gguf.py in the same run.

    python benchmarks/convert_gguf.py [--runs 5] [--work DIR] [--converter PATH]

Paired, alternating runs after one warm-up of each command: each round runs ours, then
llama.cpp's converter, then ours back (GGUF -> PEFT), and the ratios are taken per round; the
table gives the medians with min and max. Both ends are warm (the adapter is in the page cache).
Also reports whether our commands imported torch (the light path, adaptertools/light/) and the
torch path's time (ADAPTERTOOLS_LIGHT=0) in the same rounds. Target: ours / llama.cpp <= 0.3.

The converter defaults to the copy the test-suite caches (~/.cache/adaptertools-tests/...); it
is skipped when absent.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workloads import w1_adapter, w1_base_config  # noqa: E402

# runs a CLI command in process and says whether torch was imported (the light path's claim)
PROBE = ("import sys\nfrom adaptertools.cli import _main\ntry:\n    _main()\n"
         "except SystemExit as e:\n    assert not e.code, e.code\n"
         "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)")


def default_converter() -> Path | None:
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = (Path.home() / ".cache" / "adaptertools-tests" / f"llama_cpp_python-{version}" /
            "vendor" / "llama.cpp" / "convert_lora_to_gguf.py")
    return path if path.exists() else None


def wall(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=env)
    return time.perf_counter() - start


def imports_torch(args: list[str]) -> bool:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          check=True)
    return "torch imported: True" in proc.stderr


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/adaptertools-bench"))
    parser.add_argument("--converter", type=Path, default=default_converter())
    args = parser.parse_args()
    adapter = w1_adapter(args.work / "w1_adapter")
    base = w1_base_config(args.work / "w1_base")
    tool = shutil.which("adaptertools") or sys.exit("adaptertools is not on PATH")
    out, back = args.work / "w1.gguf", args.work / "w1_back"
    to_gguf = ["convert", str(adapter), str(out), "--to", "gguf", "--base", str(base), "--force"]
    from_gguf = ["convert", str(out), str(back), "--to", "peft", "--force"]
    torch_env = {**os.environ, "ADAPTERTOOLS_LIGHT": "0"}
    commands = {"ours PEFT->GGUF": ([tool, *to_gguf], None),
                "ours GGUF->PEFT": ([tool, *from_gguf], None),
                "torch path PEFT->GGUF": ([tool, *to_gguf], torch_env),
                "torch path GGUF->PEFT": ([tool, *from_gguf], torch_env)}
    if args.converter:
        commands["llama.cpp convert_lora_to_gguf.py"] = (
            [sys.executable, str(args.converter), "--base", str(base), "--outtype", "f32",
             "--outfile", str(args.work / "llama.gguf"), str(adapter)], None)
    for cmd, env in commands.values():      # warm-up: page cache, .pyc files
        wall(cmd, env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, (cmd, env) in commands.items():
            times[name].append(wall(cmd, env))
    light = {name: not imports_torch(a) for name, a in (("PEFT->GGUF", to_gguf),
                                                         ("GGUF->PEFT", from_gguf))}
    load = os.getloadavg()
    print(f"W4: W1 adapter ({sum(f.stat().st_size for f in adapter.iterdir()) / 1e6:.0f} MB, "
          f"fp32, r=16, 154 tensors), {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
          f" UTC, {os.cpu_count()} cores, load average {load[0]:.2f} / {load[1]:.2f} / "
          f"{load[2]:.2f} (1/5/15 min), warm page cache, {args.runs} paired rounds "
          f"(median, min, max, seconds)\n")
    print("| command | wall s | torch imported | ratio to llama.cpp (per round) |")
    print("| --- | --- | --- | --- |")
    theirs = times.get("llama.cpp convert_lora_to_gguf.py")
    for name, values in times.items():
        direction = name.split()[-1]
        imported = ("no" if light.get(direction) and name.startswith("ours") else
                    "yes" if "->" in name else "yes (its own)")
        ratio = summary([v / t for v, t in zip(values, theirs)]) if theirs and "->" in name else ""
        print(f"| {name} | {summary(values)} | {imported} | {ratio} |")


if __name__ == "__main__":
    main()
