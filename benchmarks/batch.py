"""Scale-out figures (issue 21), run by hand; each ratio is against a baseline in the same run.

    python benchmarks/batch.py shards [--layers 18] [--runs 2] [--work /tmp/adaptertools-par]
    python benchmarks/batch.py batch  [--adapters 4]  [--work /tmp/adaptertools-par]

``shards``: a W3-shaped bf16 base (benchmarks/w3.py's generator, ``--layers`` blocks in 2 GB
shards) merged by one process (``merge``) and as one Ray task per shard (``merge --executor
ray``) on a local cluster of a head without CPUs and two worker nodes of one CPU each
(``ray.cluster_utils.Cluster``), alternating, page cache dropped before each command where this
machine allows it (root). Prints walls, the ratio, and each shard task's wall (from the report),
from which a larger merge is estimated.

``batch``: ``--adapters`` W1 adapters merged into the W1 base: one ``adaptertools merge`` after
another, then one ``adaptertools batch`` file under ``--executor local`` and under ``--executor
ray`` on the same kind of local cluster. Outputs are removed between configurations (16 W1
outputs are 35 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from merge import drop_caches  # noqa: E402
from w3 import make_adapter as w3_adapter  # noqa: E402
from w3 import make_base as w3_base  # noqa: E402


def tool() -> str:
    return shutil.which("adaptertools") or sys.exit("adaptertools is not on PATH")


def local_cluster():
    from ray.cluster_utils import Cluster

    os.environ.pop("RAY_ADDRESS", None)
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster


def settle(paths, cold: bool) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    time.sleep(2)
    if cold:
        drop_caches()


def timed(cmd: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    try:
        return wall, json.loads(result.stdout)
    except ValueError:
        return wall, {}


def shards(args) -> None:
    work = args.work
    total = w3_base(work / "base", args.layers)
    w3_adapter(work / "adapter", args.layers)
    cold = drop_caches()
    files = len(list((work / "base").glob("*.safetensors")))
    print(f"base {total / 1e9:.1f} GB in {files} shards; cache {'cold' if cold else 'warm'}",
          flush=True)
    cluster = local_cluster()
    out = work / "out"
    base = [tool(), "merge", str(work / "base"), str(work / "adapter"), "--out", str(out),
            "--json", "-q"]
    single, parallel, pieces = [], [], []
    try:
        for _ in range(args.runs):
            settle([out], cold)
            single.append(timed(base)[0])
            settle([out], cold)
            wall, report = timed(base + ["--executor", "ray", "--address", cluster.address])
            parallel.append(wall)
            pieces.append(report.get("pieces", {}).get("wall_s", []))
            print(f"single {single[-1]:.1f} s, ray {parallel[-1]:.1f} s "
                  f"(shard tasks {pieces[-1]})", flush=True)
    finally:
        cluster.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    ratio = [p / s for p, s in zip(parallel, single)]
    each = [w for run in pieces for w in run]
    print(f"| W3-{args.layers} ({total / 1e9:.1f} GB, {files} shards) | single "
          f"{statistics.median(single):.1f} s | ray 2x1 CPU {statistics.median(parallel):.1f} s | "
          f"ray/single median {statistics.median(ratio):.2f} (min {min(ratio):.2f}, max "
          f"{max(ratio):.2f}) | shard task median {statistics.median(each):.1f} s |")
    per_gb = statistics.median(each) / (total / files / 1e9)
    print(f"per-shard rate {per_gb:.2f} s/GB on one CPU of this machine; a 700 GB base on 16 "
          f"nodes, one shard task per node at a time, each node reading its shards at this rate: "
          f"about {700 / 16 * per_gb / 60:.1f} min, if the shared storage serves 16 such readers")


def batch(args) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from workloads import w1_adapter

    work = args.work
    base = Path(args.w1_base)
    if not (base / "config.json").exists():
        sys.exit(f"{base}: no W1 base (make it with benchmarks/merge.py --work ...)")
    adapters = [w1_adapter(work / f"w1_adapter_s{i}", seed=i) for i in range(args.adapters)]
    outs = [work / f"merged_{i}" for i in range(args.adapters)]
    jobs = work / "jobs.json"
    jobs.write_text(json.dumps({"jobs": [{"merge": {"base": str(base), "adapters": [str(a)],
                                                     "out": str(o)}}
                                          for a, o in zip(adapters, outs)]}))
    manifest = jobs.with_name(jobs.name + ".manifest.json")
    settle(outs + [manifest], False)
    start = time.perf_counter()
    for a, o in zip(adapters, outs):
        timed([tool(), "merge", str(base), str(a), "--out", str(o), "-q"])
    one_by_one = time.perf_counter() - start
    print(f"one after another: {one_by_one:.1f} s", flush=True)
    settle(outs, False)
    manifest.unlink(missing_ok=True)
    local = timed([tool(), "batch", str(jobs), "--json"])[0]
    print(f"batch local: {local:.1f} s", flush=True)
    settle(outs, False)
    manifest.unlink(missing_ok=True)
    cluster = local_cluster()
    try:
        ray_wall = timed([tool(), "batch", str(jobs), "--executor", "ray", "--address",
                          cluster.address, "--json"])[0]
    finally:
        cluster.shutdown()
    settle(outs, False)
    print(f"| {args.adapters} W1 merges | one after another {one_by_one:.1f} s | batch local "
          f"{local:.1f} s ({local / one_by_one:.2f}x) | batch ray 2x1 CPU {ray_wall:.1f} s "
          f"({ray_wall / one_by_one:.2f}x) |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["shards", "batch"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/adaptertools-par"))
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--w1-base", default="/tmp/bench/w1_base")
    args = parser.parse_args()
    shards(args) if args.part == "shards" else batch(args)


if __name__ == "__main__":
    main()
