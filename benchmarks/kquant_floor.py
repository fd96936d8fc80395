"""W5 Q4_K_M (issue 20 item 4): the least a keep-type merge can take, against llama.cpp's own
quantizing of the same model, when the bytes must be ggml's.

    python benchmarks/kquant_floor.py GGUF_FILE [--threads N]

GGUF_FILE: a quantized model (benchmarks/w5.py leaves ``w5_Q4_K_M.gguf`` in its --work folder).
For every quantized tensor, seeded N(0, 0.02) float32 values of its shape are quantized to its
own type with ggml's ``ggml_quantize_chunk`` (kernels/quant/ggml.py: the function
llama-quantize calls, on N threads). Printed: the time for all of them (what llama-quantize
spends quantizing the model) and for the ``blk.*`` tensors alone (what a merge of an all-linear
LoRA has to requantize; token_embd and output are untouched). Their ratio is the floor of
merge wall / llama-quantize wall for a merge that writes ggml's bytes: the quantizer is the same
C function on the same cores, and a merge has to run it on that share of the model.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    import gguf
    import torch

    from adaptertools.kernels.quant import ggml

    parser = argparse.ArgumentParser()
    parser.add_argument("gguf_file")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if not ggml.available("Q4_K"):
        raise SystemExit("needs llama-cpp-python (ggml's quantizer)")
    reader = gguf.GGUFReader(args.gguf_file)
    gen = torch.Generator().manual_seed(0)
    values: dict[tuple[int, ...], torch.Tensor] = {}
    spent = {"all": 0.0, "blk": 0.0}
    params = {"all": 0, "blk": 0}
    for tensor in reader.tensors:
        qtype = tensor.tensor_type.name
        if qtype in ("F32", "F16", "BF16"):
            continue
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))   # ggml order -> rows, cols
        x = values.get(shape)
        if x is None:
            x = values[shape] = torch.randn(shape, generator=gen) * 0.02
        start = time.perf_counter()
        ggml.quantize(x, qtype, threads=args.threads)
        took = time.perf_counter() - start
        for part in ("all", "blk") if tensor.name.startswith("blk.") else ("all",):
            spent[part] += took
            params[part] += x.numel()
    print(f"load {os.getloadavg()[0]:.2f}, {args.threads} threads")
    print("| tensors | parameters | ggml quantize wall | share |")
    print("| --- | --- | --- | --- |")
    for part, label in (("all", "every quantized tensor (llama-quantize)"),
                        ("blk", "blk.* only (a merge of an all-linear LoRA)")):
        print(f"| {label} | {params[part] / 1e9:.3f} B | {spent[part]:.2f} s | "
              f"{spent[part] / spent['all']:.3f} |")


if __name__ == "__main__":
    main()
