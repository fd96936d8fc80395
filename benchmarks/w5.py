"""W5 (BENCHMARKS.md): keep-type merges into GGUF models, against `cp` of the same file.

    python benchmarks/w5.py [--work DIR] [--types F16,Q8_0,Q4_K_M] [--runs N] [--cache warm|cold]

The W1 base (benchmarks/merge.py generates it) written as a GGUF F16 model by the tests' GGUF
writer (tests/helpers/gguf_base.py: llama.cpp's names, the q/k RoPE permutation, a dummy vocabulary),
then quantized by llama.cpp itself (``llama_model_quantize`` of llama-cpp-python) to Q8_0 and
Q4_K_M; the W1 adapter converted to a GGUF adapter. Measured in the same run, each in its own
process: `cp BASE OUT && sync`, and `adaptertools merge BASE lora.gguf --out OUT` (keep-type:
every adapted tensor dequantized, folded in fp32, requantized to its own type). Printed: wall,
ratio to cp, peak RSS, output size / base size, and the median survival cosine. A Markdown
table comes last.

Targets: merge wall <= 2x cp; output size / base size = 1.00.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from merge import (drop_caches, fmt_bytes, merge_cli, remove, run_measured,  # noqa: E402
                   w1_base, warm_up)
from workloads import W1_CONFIG, w1_adapter  # noqa: E402


class LlamaForCausalLM:
    """Just enough of a transformers model for tests/helpers/gguf_base.write_gguf_base: the config and
    a state dict whose tensors are read from the W1 shards as they are asked for."""

    def __init__(self, folder: Path) -> None:
        import transformers

        self.folder = folder
        self.config = transformers.LlamaConfig(**{k: v for k, v in W1_CONFIG.items()
                                                  if k not in ("architectures", "model_type")})

    def state_dict(self) -> LazyStateDict:
        return LazyStateDict(self.folder)


class LazyStateDict:
    """``items()`` of the W1 shards, one tensor read at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def items(self):
        from safetensors import safe_open

        for shard in sorted(self.folder.glob("*.safetensors")):
            with safe_open(shard, framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, fh.get_tensor(name)


def gguf_bases(work: Path, types: list[str]) -> dict[str, Path]:
    from helpers.gguf_base import llama_quantize, write_gguf_base

    bases = {}
    f16 = work / "w5_F16.gguf"
    if not f16.exists():
        print("  writing the W1 base as GGUF F16", flush=True)
        model = LlamaForCausalLM(w1_base(work / "w1_base"))
        write_gguf_base(model, work / "w5_F16.tmp", "llama", f16=True)
        os.replace(work / "w5_F16.tmp", f16)
    bases["F16"] = f16
    for ftype in types:
        if ftype == "F16":
            continue
        path = work / f"w5_{ftype}.gguf"
        if not path.exists():
            print(f"  quantizing to {ftype} with llama.cpp", flush=True)
            llama_quantize(f16, work / f"w5_{ftype}.tmp", ftype)
            os.replace(work / f"w5_{ftype}.tmp", path)
        bases[ftype] = path
    return {t: bases[t] for t in types}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/adaptertools-bench"))
    parser.add_argument("--types", default="F16,Q8_0,Q4_K_M")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    import adaptertools as at

    bases = gguf_bases(work, [t.strip() for t in args.types.split(",") if t.strip()])
    lora = work / "w5_lora.gguf"
    if not lora.exists():
        at.convert(w1_adapter(work / "w1_adapter_s0"), lora, to="gguf", base=work / "w1_base")
    if args.cache == "cold" and not drop_caches():
        sys.exit("cannot drop the page cache here (needs root)")
    cli, rows = merge_cli(), []
    load_before = os.getloadavg()
    for ftype, base in bases.items():
        out = work / f"w5_out_{ftype}.gguf"
        cp = ["sh", "-c", 'cp "$0" "$1" && sync', str(base), str(work / "w5_cp.gguf")]
        merge = cli + ["merge", str(base), str(lora), "--out", str(out), "--json", "--force"]
        best = {}
        for _ in range(args.runs):
            for what, cmd, target in (("cp", cp, work / "w5_cp.gguf"), ("merge", merge, out)):
                remove(target)
                drop_caches() if args.cache == "cold" else warm_up([base, lora])
                wall, rss, stdout = run_measured(cmd, work / f"log_w5_{what}")
                if what == "merge":
                    report = json.loads(stdout)
                    size_ratio = out.stat().st_size / base.stat().st_size
                if what not in best or wall < best[what][0]:
                    best[what] = (wall, rss)
        survival = (report.get("survival") or {}).get("median_cosine")
        quantize_wall = None
        if ftype != "F16":      # llama.cpp's route ends with this: llama-quantize of the model
            script = (f"import sys; sys.path.insert(0, {str(HERE.parent / 'tests')!r}); "
                      "from helpers.gguf_base import llama_quantize; "
                      "from pathlib import Path; llama_quantize(*map(Path, sys.argv[1:3]), sys.argv[3])")
            target = work / "w5_requant.gguf"
            remove(target)
            warm_up([bases["F16"]]) if args.cache == "warm" else drop_caches()
            quantize_wall, _, _ = run_measured([sys.executable, "-c", script, str(bases["F16"]),
                                                str(target), ftype], work / "log_w5_quantize")
            remove(target)
        rows.append((ftype, base.stat().st_size, best["cp"][0], best["merge"][0],
                     best["merge"][1], size_ratio, survival, quantize_wall))
        print(f"  {ftype}: cp {best['cp'][0]:.2f} s, merge {best['merge'][0]:.2f} s "
              f"({best['merge'][0] / best['cp'][0]:.2f}x), size ratio {size_ratio:.4f}", flush=True)
        remove(out)
        remove(work / "w5_cp.gguf")
    load_after = os.getloadavg()
    print()
    print(f"{os.cpu_count()} cores; load average before {load_before[0]:.2f}, after "
          f"{load_after[0]:.2f}; page cache {args.cache}; best wall of {args.runs}")
    print()
    print("| base | size | cp + sync | merge | ratio to cp | peak RSS | out size / base size "
          "| median survival cosine | llama.cpp quantizing F16 to this type |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for ftype, size, cp_wall, wall, rss, ratio, survival, quantize_wall in rows:
        print(f"| W5 {ftype} | {fmt_bytes(size)} | {cp_wall:.2f} s | {wall:.2f} s | "
              f"{wall / cp_wall:.2f} | {fmt_bytes(rss)} | {ratio:.4f} | "
              f"{'-' if survival is None else f'{survival:.3f}'} | "
              f"{'-' if quantize_wall is None else f'{quantize_wall:.2f} s'} |")


if __name__ == "__main__":
    main()
