"""W1 and W2 (BENCHMARKS.md): `adaptertools merge` against `cp -r` of the base (and PEFT).

    python benchmarks/merge.py [--work DIR] [--workloads W1,W2] [--peft] [--runs N]
                               [--cache auto|cold|warm|both] [--phases]

W1: the TinyLlama-1.1B-shaped base (bf16, N(0, 0.02), norms 1, HF safetensors in 1 GB shards
with model.safetensors.index.json) and one W1 LoRA (workloads.w1_adapter, seed 0). W2: the same
base and four such LoRAs (seeds 0..3), weights 0.25 each. Both are generated once into --work
(default /tmp/adaptertools-bench); the base is written tensor by tensor with a streaming
safetensors writer (no transformers model, one tensor in memory at a time).

Measured in the same run, each command in its own process (wall time from this process, peak
RSS from wait4 in a small wrapper that forks it, GNU time or a few lines of Python: the maximum
over the command and whatever it waited for): `cp -r BASE DST && sync` (the floor), the merge
CLI for W1 and W2 (it fsyncs its output itself), and with --peft, PEFT's from_pretrained + merge_and_unload + save_pretrained.
The cache is dropped before every command (``echo 3 > /proc/sys/vm/drop_caches``, root only) for
"cold" runs; "warm" runs read the inputs once beforehand. With --peft, the W1 output is compared
tensor by tensor (bit patterns) with PEFT's. With --phases, each merge is also run once in a
child that times the engine's steps (fold, write, read, copy, fsync: the functions of
adaptertools.merging.run and .streams wrapped with timers). A Markdown table is printed last.

Targets: W1 merge wall <= 1.3x cp and peak RSS <= 0.8 GB; W2 <= 1.5x cp.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workloads import W1_CONFIG, w1_adapter

INDEX = "model.safetensors.index.json"
SHARD_BYTES = 10**9            # save_pretrained(max_shard_size="1GB")
BASE_SEED = 1234
BASE_VERSION = "w1-base-v1"    # bump when the generated layout changes
W2_WEIGHTS = "0.25,0.25,0.25,0.25"
TARGETS = {"W1": 1.3, "W2": 1.5}
RSS_TARGET = 0.8e9

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="1GB")
"""

# Times the steps of adaptertools.merging.run by wrapping its module-level functions.
PHASES_SCRIPT = """
import collections, json, os, sys, threading, time
import adaptertools as at
import adaptertools.merging.run as run
import adaptertools.merging.streams as streams
spent, calls = collections.defaultdict(float), collections.Counter()

def timed(module, name):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            key = name + ("" if threading.current_thread() is threading.main_thread()
                          else " (" + threading.current_thread().name + ")")
            spent[key] += time.perf_counter() - start
            calls[key] += 1
    setattr(module, name, wrapper)

timed(run, "fold")
timed(run, "write_all")            # bitsandbytes quant-state patches
timed(streams, "write_all")        # page-cache writes, and O_DIRECT writes of full staging buffers
timed(streams, "copy_range")       # untouched tensors, page-cache outputs
timed(streams.DirectSink, "copy")  # untouched tensors into the staging buffer, O_DIRECT outputs
timed(streams.Reads, "read")       # faulting a tensor's pages in (or pread)
timed(run.os, "fsync")
base, out, weights, *adapters = sys.argv[1:]
start = time.perf_counter()
report = at.merge(base, adapters, out, weights=weights or None)
total = time.perf_counter() - start
print(json.dumps({"merge() call": total, "execute": report["wall_s"],
                  **{f"{k} ({calls[k]} calls)": v for k, v in spent.items()}}))
"""

# ----------------------------------------------------------------------------- workloads

def w1_tensors() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every W1 base tensor, in LlamaForCausalLM's state_dict order."""
    c = W1_CONFIG
    h, i, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    out = [("model.embed_tokens.weight", (vocab, h))]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def shard_groups(tensors) -> list[list[tuple[str, tuple[int, ...]]]]:
    """(name, shape) pairs cut into the bf16 base's shards, as save_pretrained cuts them: a new
    shard when the next tensor would pass SHARD_BYTES."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def w1_base(folder: Path) -> Path:
    """The W1 base, generated once: shards as save_pretrained cuts them (state_dict order, a new
    shard when the next tensor would pass 1 GB), tensors inside a shard sorted by name as the
    safetensors writer stores them, bf16 N(0, 0.02) from a seeded generator per tensor."""
    import torch

    done = folder / ".complete"
    if done.is_file() and done.read_text() == BASE_VERSION:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tensors = w1_tensors()
    seeds = {name: BASE_SEED + k for k, (name, _) in enumerate(tensors)}
    shards = shard_groups(tensors)
    weight_map = {}
    start = time.perf_counter()
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        shard = sorted(shard)
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape),
                            "data_offsets": [offset, offset + 2 * _numel(shape)]}
            offset += 2 * _numel(shape)
            weight_map[name] = file
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / file, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in shard:
                if len(shape) == 1:
                    t = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    gen = torch.Generator().manual_seed(seeds[name])
                    t = torch.empty(shape).normal_(0, 0.02, generator=gen).to(torch.bfloat16)
                fh.write(t.reshape(-1).view(torch.uint8).numpy())
                del t
        print(f"  wrote {file} ({(folder / file).stat().st_size / 1e9:.2f} GB)", flush=True)
    total = sum(2 * _numel(shape) for _, shape in tensors)
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                            "weight_map": weight_map}, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(W1_CONFIG, indent=2) + "\n")
    os.sync()
    done.write_text(BASE_VERSION)
    print(f"  W1 base generated in {time.perf_counter() - start:.1f} s", flush=True)
    return folder


# ----------------------------------------------------------------------------- measuring

@dataclass
class Result:
    what: str
    cache: str
    walls: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    inner: list[float] = field(default_factory=list)     # the merge's own wall_s (no start-up)

    @property
    def wall(self) -> float:
        return min(self.walls)


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def warm_up(paths: list[Path]) -> None:
    """Read every file under ``paths`` once (in this process), so they sit in the page cache."""
    buffer = bytearray(1 << 20)      # one reused buffer: no 64 MB allocations handed back to
    for path in paths:               # the OS just before the measured command starts
        for p in ([path] if path.is_file() else sorted(path.rglob("*"))):
            if p.is_file():
                with open(p, "rb", buffering=0) as fh:
                    while fh.readinto(buffer):
                        pass


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()


# A tiny wrapper between this process and the measured command: a child forked from this
# (large) process inherits its resident-set high-water mark into ru_maxrss, so the command is
# forked from the wrapper instead (GNU time when installed does the same thing).
WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str], log: Path) -> tuple[float, int, str]:
    """Wall seconds, peak RSS bytes and stdout of ``cmd`` run as a grandchild of this process."""
    out_log, err_log, rss_file = (log.with_suffix(s) for s in (".out", ".err", ".rss"))
    rss_file.unlink(missing_ok=True)
    gnu_time = Path("/usr/bin/time")
    if gnu_time.exists():
        wrapped = [str(gnu_time), "-q", "-f", "%M", "-o", str(rss_file), *cmd]
    else:
        wrapped = [sys.executable, "-c", WRAPPER, str(rss_file), *cmd]
    with open(out_log, "w") as out, open(err_log, "w") as err:
        start = time.perf_counter()
        proc = subprocess.run(wrapped, check=False, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=err)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err_log.read_text()[-2000:]}")
    rss_kb = int(rss_file.read_text().split()[-1])          # Linux reports kilobytes
    return wall, rss_kb * 1024, out_log.read_text()


def merge_cli() -> list[str]:
    script = Path(sys.executable).with_name("adaptertools")
    if script.exists():
        return [str(script)]
    found = shutil.which("adaptertools")
    return [found] if found else [sys.executable, "-m", "adaptertools.cli"]


# ----------------------------------------------------------------------------- comparing

def compare_with_peft(ours: Path, theirs: Path) -> str:
    """Tensor-by-tensor bit comparison of two HF folders, one tensor in memory at a time."""
    import torch
    from safetensors import safe_open

    def locations(folder: Path) -> dict[str, Path]:
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            return {name: folder / file for name, file in weight_map.items()}
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as fh:
                found.update(dict.fromkeys(fh.keys(), file))
        return found

    mine, peft = locations(ours), locations(theirs)
    if set(mine) != set(peft):
        return (f"different tensor names: only ours {sorted(set(mine) - set(peft))[:3]}, "
                f"only PEFT {sorted(set(peft) - set(mine))[:3]}")
    differ, worst = [], 0.0
    for file in sorted(set(mine.values())):
        names = sorted(n for n, f in mine.items() if f == file)
        with safe_open(str(file), framework="pt") as fh:
            for name in names:
                a = fh.get_tensor(name)
                with safe_open(str(peft[name]), framework="pt") as other:
                    b = other.get_tensor(name)
                same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(
                    a.view(torch.int16) if a.element_size() == 2 else a,
                    b.view(torch.int16) if b.element_size() == 2 else b)
                if not same:
                    differ.append(name)
                    if a.shape == b.shape:
                        worst = max(worst, (a.float() - b.float()).abs().max().item())
    if differ:
        return (f"NOT bit-identical: {len(differ)} of {len(mine)} tensors differ (first "
                f"{differ[0]}), max |diff| {worst:.3g}")
    return f"bit-identical to PEFT: all {len(mine)} tensors"


# ----------------------------------------------------------------------------- main

def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/adaptertools-bench"))
    parser.add_argument("--workloads", default="W1,W2", help="comma separated: W1, W2")
    parser.add_argument("--peft", action="store_true", help="also PEFT (about 3 GB of RAM)")
    parser.add_argument("--runs", type=int, default=1, help="repeats; the best wall is kept")
    parser.add_argument("--keep", action="store_true",
                        help="keep the outputs (about 2.2 GB each) in --work afterwards")
    parser.add_argument("--phases", action="store_true",
                        help="also time the engine's steps (fold, write, read) in one more run")
    parser.add_argument("--cache", choices=["auto", "cold", "warm", "both"], default="auto",
                        help="auto: cold and warm where the page cache can be dropped, else warm")
    args = parser.parse_args()
    workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    print("generating (cached) workloads", flush=True)
    base = w1_base(work / "w1_base")
    adapters = [w1_adapter(work / f"w1_adapter_s{seed}", seed=seed) for seed in range(4)]
    base_bytes = sum(p.stat().st_size for p in base.iterdir() if p.is_file())

    can_drop = drop_caches()
    if args.cache == "auto":
        modes = ["cold", "warm"] if can_drop else ["warm"]
    else:
        modes = ["cold", "warm"] if args.cache == "both" else [args.cache]
    if "cold" in modes and not can_drop:
        sys.exit("cannot drop the page cache here (needs root and /proc/sys/vm/drop_caches)")

    cli = merge_cli()
    commands: list[tuple[str, list[str], Path, list[Path]]] = [
        ("cp -r + sync", ["sh", "-c", 'cp -r "$0" "$1" && sync', str(base), str(work / "cp_out")],
         work / "cp_out", [base])]
    if "W1" in workloads:
        commands.append(("W1 adaptertools merge", cli + ["merge", str(base), str(adapters[0]),
                                                         "--out", str(work / "w1_out"), "--json"],
                         work / "w1_out", [base, adapters[0]]))
    if "W2" in workloads:
        commands.append(("W2 adaptertools merge (4 adapters x 0.25)",
                         cli + ["merge", str(base), *map(str, adapters), "--weights", W2_WEIGHTS,
                                "--out", str(work / "w2_out"), "--json"],
                         work / "w2_out", [base, *adapters]))
    if args.peft:
        script = work / "peft_merge.py"
        script.write_text(PEFT_SCRIPT)
        commands.append(("W1 PEFT merge_and_unload", [sys.executable, str(script), str(base),
                                                      str(adapters[0]), str(work / "peft_out")],
                         work / "peft_out", [base, adapters[0]]))

    load_before = os.getloadavg()
    results = {(what, mode): Result(what, mode) for what, *_ in commands for mode in modes}
    # PEFT's runs come after all the others: right after its 2.9 GB process, this VM was slow to
    # hand out fresh memory (perf: the time goes to copying into new page-cache pages), and the
    # next commands paid for it (warm cp 2.8-3.4 s and W1 8.1 s, against 1.4 s and 4.5 s).
    ours = [c for c in commands if "PEFT" not in c[0]]
    theirs = [c for c in commands if "PEFT" in c[0]]
    schedule = [(run, mode, c) for group in (ours, theirs) for run in range(args.runs)
                for mode in modes for c in group]
    for run, mode, (what, cmd, out, inputs) in schedule:
        remove(out)
        if mode == "cold":
            drop_caches()
        else:
            warm_up(inputs)
        log = work / f"log_{what.split()[0]}_{what.split()[1]}"
        wall, rss, stdout = run_measured(cmd, log)
        result = results[(what, mode)]
        result.walls.append(wall)
        result.rss.append(rss)
        if "--json" in cmd:
            result.inner.append(json.loads(stdout)["wall_s"])
        print(f"  run {run + 1} {mode:4} {what}: {wall:.2f} s, peak RSS {fmt_bytes(rss)}",
              flush=True)
    load_after = os.getloadavg()

    phases = {}
    if args.phases:
        script = work / "merge_phases.py"
        script.write_text(PHASES_SCRIPT)
        for what, cmd, out, inputs in commands:
            if "adaptertools" not in what:
                continue
            remove(out)
            warm_up(inputs)
            weights = W2_WEIGHTS if what.startswith("W2") else ""
            paths = [str(p) for p in inputs[1:]]
            _, _, stdout = run_measured([sys.executable, str(script), str(base), str(out),
                                         weights, *paths], work / "log_phases")
            phases[what] = json.loads(stdout)
            print(f"  phases of {what} (warm): " + ", ".join(
                f"{k} {v:.2f} s" for k, v in phases[what].items()), flush=True)

    verdict = None
    if args.peft and "W1" in workloads:
        print("comparing the W1 output with PEFT's, tensor by tensor", flush=True)
        verdict = compare_with_peft(work / "w1_out", work / "peft_out")
        print(f"  {verdict}", flush=True)
    if not args.keep:
        for _, _, out, _ in commands:
            remove(out)

    for what, spent in phases.items():
        print()
        print(f"{what}, one more warm run in-process, seconds spent in each step "
              "(the reader thread overlaps the main thread):")
        print()
        print("| step | seconds |")
        print("| --- | --- |")
        for key, seconds in spent.items():
            print(f"| {key} | {seconds:.2f} |")

    print()
    print(f"W1 base {fmt_bytes(base_bytes)} in "
          f"{len(list(base.glob('*.safetensors')))} shards; {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
          f"best wall of {args.runs}, peak RSS max of {args.runs}; "
          f"page cache: {', '.join(modes)}{'' if can_drop else ' (could not drop it)'}")
    if verdict:
        print(f"W1 output vs PEFT: {verdict}")
    print()
    print("| what | cache | wall | ratio to cp | peak RSS | merge's own wall (no start-up) "
          "| target |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode in modes:
        cp = results[("cp -r + sync", mode)].wall
        for what, *_ in commands:
            r = results[(what, mode)]
            target = ""
            for w, limit in TARGETS.items():
                if what.startswith(w) and "adaptertools" in what:
                    met = lambda ok: "met" if ok else "**not met**"
                    target = f"<= {limit}x cp: {met(r.wall / cp <= limit)}"
                    if w == "W1":
                        target += f"; <= 0.8 GB: {met(max(r.rss) <= RSS_TARGET)}"
            inner = f"{statistics.median(r.inner):.2f} s" if r.inner else ""
            print(f"| {what} | {mode} | {r.wall:.2f} s | {r.wall / cp:.2f} | "
                  f"{fmt_bytes(max(r.rss))} | "
                  f"{inner} | {target} |")


if __name__ == "__main__":
    main()
