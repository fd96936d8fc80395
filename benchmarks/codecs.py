"""Codec throughput: adaptertools' torch codecs against the reference implementations, same run.

    python benchmarks/codecs.py [--rows 4096] [--cols 4096] [--threads 1] [--types Q8_0,Q4_K,...]

One float32 tensor N(0, 0.02) of rows x cols (default 4096 x 4096, 16.8 M values). For every GGUF type:
quantize and dequantize with ours and with gguf-py's numpy codecs (``gguf.quants``); gguf-py has no
K-quant quantizer, so K types are quantized against ggml's C ``ggml_quantize_chunk`` (libggml-base
from llama-cpp-python, one thread, through ctypes) instead. NF4 (blocksize 64, double quantization)
against bitsandbytes on the CPU. Each timing is the best of --runs; outputs are checked equal to the
reference's before timing. torch runs with --threads threads (default 1: numpy and ggml's chunk call
are single-threaded too). A Markdown table is printed.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import logging
import os
import time

import numpy as np
import torch

from adaptertools.kernels.quant import bnb as qb
from adaptertools.kernels.quant import gguf as qg

ALL = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def best(fn, runs: int) -> tuple[float, object]:
    out, t = None, float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    return t, out


def ggml_chunk():
    import llama_cpp

    lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so*"))[0])
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]

    def run(w: np.ndarray, qt, row_bytes: int) -> np.ndarray:
        out = np.zeros((w.shape[0], row_bytes), dtype=np.uint8)
        f(int(qt), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], None)
        return out

    return run


def bench_gguf(name: str, w: torch.Tensor, chunk, runs: int) -> tuple:
    import gguf

    qt = gguf.GGMLQuantizationType[name]
    wn = w.numpy()
    kq = name.endswith("_K")
    ref_name = "ggml C" if kq else "gguf-py"
    if kq:
        t_rq, ref = best(lambda: chunk(wn, qt, qg.row_bytes(name, w.shape[1])), 1)
    else:
        t_rq, ref = best(lambda: gguf.quants.quantize(wn, qt), runs)
    t_q, ours = best(lambda: qg.quantize(w, name), 1 if kq else runs)
    assert np.array_equal(ours.numpy(), ref), f"{name}: quantized bytes differ from {ref_name}"
    t_rd, dref = best(lambda: gguf.quants.dequantize(ref, qt), runs)
    t_d, deq = best(lambda: qg.dequantize(ours, name, w.shape), runs)
    assert np.array_equal(deq.numpy().view(np.uint32), dref.view(np.uint32)), f"{name}: dequantize differs"
    return name, ref_name, t_q, t_rq, "gguf-py", t_d, t_rd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--types", default=",".join(ALL))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w = (torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)) * 0.02).contiguous()
    chunk = ggml_chunk()
    rows = []
    for name in args.types.split(","):
        rows.append(bench_gguf(name, w, chunk, args.runs))
        print(rows[-1], flush=True)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as F

    wb = w.to(torch.bfloat16)
    t_rq, (q, st) = best(lambda: F.quantize_4bit(wb, blocksize=64, quant_type="nf4", compress_statistics=True),
                         args.runs)
    t_q, (ours, state) = best(lambda: qb.quantize_4bit(wb, quant_type="nf4", blocksize=64, double_quant=True),
                              args.runs)
    assert torch.equal(ours, q) and torch.equal(state.absmax, st.absmax)
    t_rd, _ = best(lambda: F.dequantize_4bit(q, st), args.runs)
    t_d, _ = best(lambda: qb.dequantize_4bit(ours, state), args.runs)
    rows.append(("NF4 (bs 64, double quant, bf16 in)", "bitsandbytes CPU", t_q, t_rq, "bitsandbytes CPU", t_d, t_rd))
    mb = w.numel() / 1e6
    print(f"\n{args.rows} x {args.cols} float32, torch threads {args.threads}, best of {args.runs} "
          f"(K quantize: 1 run)\n")
    print("| type | quantize: ours | reference | ref / ours | dequantize: ours | reference | ref / ours |")
    print("|---|---|---|---|---|---|---|")
    for name, rq, tq, trq, rd, td, trd in rows:
        print(f"| {name} | {tq:.3f} s ({mb / tq:.0f} M/s) | {rq} {trq:.3f} s | {trq / tq:.2f} "
              f"| {td:.3f} s | {rd} {trd:.3f} s | {trd / td:.2f} |")


if __name__ == "__main__":
    main()
