"""Fused Triton merge kernels against the unfused torch path, on an 8B model's weight shapes.

    python benchmarks/gpu_kernels.py            # CUDA: correctness, copy bandwidth, timings (< 5 min)
    python benchmarks/gpu_kernels.py --smoke    # CPU: the same code paths on tiny shapes under
                                                # TRITON_INTERPRET=1 (checks the script, times nothing useful)

For each kernel (fold BF16, fold F16, Q8_0, Q4_0, NF4) it first checks the fused result against the
torch path on fresh random data (float: within a bound of one output ulp plus the fp32 dot-product
term; quantized: the fraction of identical bytes and that decoded values are within one grid step),
then times both on the q/k/v/o/gate/up/down weights of a Llama-3-8B layer (hidden 4096,
intermediate 14336, 8 KV heads), rank 16. Bytes moved = the weight read once + written once (+ the
factors): what a fused kernel must move; achieved bytes/s is divided by the device's copy bandwidth
(a large ``torch.empty_like(x).copy_(x)``: read + write). The table is printed last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"        # before triton is imported

import torch

HIDDEN, INTER, KV = 4096, 14336, 1024
SHAPES = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
          "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}
SMOKE_SHAPES = {"q": (40, 128), "down": (24, 192)}
RANK = 16
KINDS = ("fold-bf16", "fold-f16", "Q8_0", "Q4_0", "NF4")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int) -> float:
    """bytes/s of a device-to-device copy, counting the read and the write."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), device, 10)
    return 2 * nbytes / t


def make_case(kind: str, shape, device, seed: int):
    """(inputs for the fused call, the fused call, the torch call, bytes the fused kernel moves)."""
    from adaptertools.kernels.quant import bnb
    from adaptertools.kernels.quant import gguf as codec
    from adaptertools.kernels.triton import blocks, fold

    rows, cols = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(rows, cols, generator=gen) * 0.02).to(device)
    a = (torch.randn(RANK, cols, generator=gen) * 0.01).to(device)
    b = (torch.randn(rows, RANK, generator=gen) * 0.01).to(device)
    s = 2.0
    factors = (a.numel() + b.numel()) * 4
    if kind.startswith("fold"):
        dt = torch.bfloat16 if kind == "fold-bf16" else torch.float16
        w = w.to(dt)
        return (lambda: fold.fold_float(w, a, b, s, dt),
                lambda: (w.float() + (b @ a) * s).to(dt),
                2 * w.numel() * w.element_size() + factors, (w, a, b, s))
    if kind in ("Q8_0", "Q4_0"):
        raw = codec.quantize(w, kind)
        return (lambda: blocks.fold_gguf(raw, kind, shape, a, b, s)[0],
                lambda: codec.quantize(codec.dequantize(raw, kind, shape) + (b @ a) * s, kind),
                2 * raw.numel() + factors, (raw, a, b, s))
    packed, state = bnb.quantize_4bit(w, quant_type="nf4", blocksize=64)
    return (lambda: blocks.fold_nf4(packed, state.absmax, shape, a, b, s)[0],
            lambda: bnb.quantize_4bit(bnb.dequantize_4bit(packed, state) + (b @ a) * s,
                                      quant_type="nf4", blocksize=64)[0],
            2 * (packed.numel() + state.absmax.numel() * 4) + factors, (packed, state, a, b, s))


def check(kind: str, shape, device) -> str:
    """Correctness of the fused kernel against the torch path on fresh data; raises on failure."""
    from adaptertools.kernels.quant import gguf as codec

    fused, unfused, _, inputs = make_case(kind, shape, device, seed=1234)
    got, want = fused(), unfused()
    if kind.startswith("fold"):
        w, a, b, s = inputs
        exact = w.double() + (b.double() @ a.double()) * s
        p = b.abs().double() @ a.abs().double()
        bound = torch.finfo(w.dtype).eps * exact.abs() + 4 * RANK * 2.0 ** -24 * abs(s) * p + 1e-30
        ok = bool(((got.double() - want.double()).abs() <= bound).all())
        same = float((got == want).float().mean())
        if not ok:
            raise AssertionError(f"{kind} {shape}: fused fold beyond the bound")
        return f"{same:.4%} identical"
    same = float((got == want).float().mean())
    if kind == "NF4":
        return f"{same:.4%} bytes identical"
    dec_got, dec_want = (codec.dequantize(x, kind, shape) for x in (got, want))
    raw = inputs[0]
    merged = codec.dequantize(raw, kind, shape)
    step = merged.reshape(shape[0], -1, 32).abs().amax(-1, keepdim=True) / (127 if kind == "Q8_0" else 7)
    if not bool(((dec_got - dec_want).reshape(shape[0], -1, 32).abs() <= 2 * step + 1e-12).all()):
        raise AssertionError(f"{kind} {shape}: decoded values further than two grid steps")
    return f"{same:.4%} bytes identical"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed: pip install -e '.[triton]'")
        return 1
    if args.smoke:
        device, shapes, reps, copy_bytes = torch.device("cpu"), SMOKE_SHAPES, args.reps or 1, 1 << 20
    else:
        if not torch.cuda.is_available():
            print("no CUDA device here; run with --smoke to check the script on the CPU")
            return 0
        device, shapes, reps, copy_bytes = torch.device("cuda"), SHAPES, args.reps or 10, 2 << 30
        print(f"device: {torch.cuda.get_device_name()}", flush=True)
    start = time.perf_counter()
    bw = copy_bandwidth(device, copy_bytes)
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s (read + write of {copy_bytes >> 20} MiB)", flush=True)
    rows = []
    for kind in KINDS:
        verdict = check(kind, next(iter(shapes.values())), device)
        print(f"{kind}: correct ({verdict})", flush=True)
        t_fused = t_torch = moved = 0.0
        for i, (name, shape) in enumerate(shapes.items()):
            fused, unfused, nbytes, _ = make_case(kind, shape, device, seed=i)
            tf, tt = timed(fused, device, reps), timed(unfused, device, max(1, reps // 2))
            t_fused, t_torch, moved = t_fused + tf, t_torch + tt, moved + nbytes
            print(f"  {kind:9s} {name:5s} {shape}: fused {tf * 1e3:8.3f} ms, torch {tt * 1e3:8.3f} ms",
                  flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append((kind, moved, t_fused, t_torch, verdict))
    print(f"\n{'kernel':10s} {'MB moved':>9s} {'fused ms':>9s} {'GB/s':>8s} {'/ copy':>7s} "
          f"{'torch ms':>9s} {'speedup':>8s}  check")
    for kind, moved, tf, tt, verdict in rows:
        print(f"{kind:10s} {moved / 1e6:9.1f} {tf * 1e3:9.3f} {moved / tf / 1e9:8.1f} {moved / tf / bw:7.2f} "
              f"{tt * 1e3:9.3f} {tt / tf:8.2f}  {verdict}")
    print(f"(one layer's q/k/v/o/gate/up/down, rank {RANK}; {'SMOKE: CPU interpreter, timings meaningless; ' if args.smoke else ''}"
          f"total {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
