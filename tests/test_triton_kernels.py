"""The Triton merge kernels (adaptertools/kernels/triton) under triton's CPU interpreter.

Checked against the torch reference and codecs:

- float fold: within the fp32 accumulation-order bound of ``reference.merge_weighted`` (derived in
  ``fold_bound``), for F32/F16/BF16 in and out, ragged shapes, ranks 1..20 (K padded to 16 or 32);
- Q8_0, Q4_0, NF4: the fused dequantize -> fold -> requantize writes the codecs' bytes, given the same
  fp32 merged values (dyadic factors make the rank-K product exact in any order); with random factors
  the outputs decode within one quantization step of the torch path's;
- the engine: ``kernels="triton"`` gives byte-identical GGUF Q8_0/Q4_0 files and float files within
  the bound; the report says which kernels ran; ``auto`` on the CPU is torch.

Shapes are small: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# must be on before triton is imported: tl.max, tl.sum... are built at import (conftest.py sets it
# too, since bitsandbytes imports triton while other test modules are collected)
INTERPRETED = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytestmark = pytest.mark.skip(reason="triton is not installed (pip install -e '.[triton]'); "
                                         "the kernels run here under TRITON_INTERPRET=1")
elif not INTERPRETED:
    pytestmark = pytest.mark.skip(reason="triton was imported before TRITON_INTERPRET=1 was set "
                                         "(TRITON_INTERPRET=0 in the environment?); these tests need "
                                         "triton's CPU interpreter from the start")

U = 2.0 ** -24        # fp32 unit roundoff

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# (rows, cols, rank): ragged against the 64 x 128 tile, one element, exactly one tile, rank > 16
FOLD_SHAPES = [(70, 200, 5), (1, 1, 1), (64, 128, 16), (129, 131, 20)]


def fold_bound(weight, a, b, scale, ref32, out_dtype):
    """|kernel - reference| allowed per element.

    Both compute the K-term dot product p = sum_k b_ik a_kj in fp32, in different orders; each is
    within gamma_K * P of the exact sum, P = (|B| @ |A|)_ij, gamma_K = K u / (1 - K u) (Higham 3.1), so
    they differ by at most 2 gamma_K P. Times s (rounded: 2 u |s| P(1 + gamma_K) more), plus W
    (rounded: u per side of |merged|), each step also scaling the earlier error by (1 + u). Rounding
    to a 16-bit output can then put the two on neighbouring values: one spacing of that dtype.
    """
    k = a.shape[0]
    gamma = k * U / (1 - k * U)
    p = b.abs().double() @ a.abs().double()
    merged = ref32.abs().double()
    err = abs(scale) * p * (2 * gamma + 2 * U * (1 + gamma)) * (1 + U) ** 3 + 2 * U * merged * (1 + 1e-6)
    if out_dtype != torch.float32:
        info = torch.finfo(out_dtype)
        err = err + info.eps * (merged + err) + info.smallest_normal * info.eps
    return err


def _case(rows, cols, r, wdtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen).to(wdtype)
    a = torch.randn(r, cols, generator=gen) * 0.5
    b = torch.randn(rows, r, generator=gen) * 0.5
    return w, a, b


@pytest.mark.parametrize("wdtype", FLOATS)
@pytest.mark.parametrize("rows,cols,r", FOLD_SHAPES)
def test_fold_float_within_bound(rows, cols, r, wdtype):
    from adaptertools.kernels.triton.fold import fold_float

    w, a, b = _case(rows, cols, r, wdtype)
    scale = 0.75
    ref32 = w.float() + (b @ a) * scale                       # reference.lora_delta's order
    for out_dtype in FLOATS:
        out = fold_float(w, a, b, scale, out_dtype)
        assert out.dtype == out_dtype and out.shape == (rows, cols)
        diff = (out.double() - ref32.to(out_dtype).double()).abs()
        bound = fold_bound(w, a, b, scale, ref32, out_dtype)
        worst = (diff - bound).max().item()
        assert worst <= 0, f"{out_dtype}: {int((diff > bound).sum())} elements beyond the bound"


def test_fold_float_matches_merge_weighted_several_adapters():
    from adaptertools.adapter import LoraWeight
    from adaptertools.kernels.reference import (
        Contribution,
        combined_weight,
        merge_weighted,
    )
    from adaptertools.kernels.triton.fold import fold_float

    w, _, _ = _case(33, 97, 1, torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    cs = [Contribution(LoraWeight(a=torch.randn(r, 97, generator=gen), b=torch.randn(33, r, generator=gen),
                                  scale=s), factor=f) for r, s, f in ((4, 2.0, 0.5), (8, 0.25, 1.5))]
    ref = merge_weighted(w, cs, torch.bfloat16)
    comb = combined_weight(cs)
    out = fold_float(w, comb.a, comb.b, 1.0, torch.bfloat16)
    ref32 = w.float() + comb.b @ comb.a
    bound = fold_bound(w, comb.a, comb.b, 1.0, ref32, torch.bfloat16)
    assert ((out.double() - ref.double()).abs() <= bound).all()


def _dyadic(rows, cols, r, seed=1):
    """Factors whose products and K-term sums are exact in fp32 in any order."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(-4, 5, (r, cols), generator=gen).float() / 8
    b = torch.randint(-4, 5, (rows, r), generator=gen).float() / 64
    return a, b


GGUF_SHAPES = [(37, 32 * 7), (16, 128), (1, 32), (50, 32 * 9)]     # rows ragged against 16, blocks against 4


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("rows,cols", GGUF_SHAPES)
def test_gguf_bytes_identical(qtype, rows, cols):
    from adaptertools.kernels.quant import gguf as codec
    from adaptertools.kernels.triton.blocks import fold_gguf

    gen = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=gen)
    w[0, :32] = 0.0                                       # an all-zero block: d = 0, id = 0
    if rows > 1:
        w[1, :32] = w[1, :32].abs()
        w[1, 5] = -w[1, :32].max()                        # signed-max ties: the first one wins
    raw = codec.quantize(w, qtype)
    a, b = _dyadic(rows, cols, 3)
    b[0] = 0.0                                            # keep the zero block zero
    out, _ = fold_gguf(raw, qtype, (rows, cols), a, b, 0.5)
    merged = codec.dequantize(raw, qtype, (rows, cols)) + (b @ a) * 0.5
    ref = codec.quantize(merged, qtype)
    assert out.shape == ref.shape
    bad = (out != ref).nonzero()
    assert bad.numel() == 0, f"{len(bad)} bytes differ, first at (row, byte) {bad[0].tolist()}"


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_random_factors_within_a_step(qtype):
    """Random factors: the merged values differ from torch's by dot-product order only, so a few
    values may land on the neighbouring grid point, never further."""
    from adaptertools.kernels.quant import gguf as codec
    from adaptertools.kernels.triton.blocks import fold_gguf

    rows, cols = 40, 32 * 6
    w, a, b = _case(rows, cols, 7, torch.float32, seed=3)
    raw = codec.quantize(w, qtype)
    out, stats = fold_gguf(raw, qtype, (rows, cols), a, b * 0.1, 0.5)
    merged = codec.dequantize(raw, qtype, (rows, cols)) + ((b * 0.1) @ a) * 0.5
    new = codec.dequantize(out, qtype, (rows, cols))
    ref = codec.dequantize(codec.quantize(merged, qtype), qtype, (rows, cols))
    step = merged.reshape(rows, -1, 32).abs().amax(-1, keepdim=True) / (127 if qtype == "Q8_0" else 7)
    assert ((new - ref).reshape(rows, -1, 32).abs() <= step * 1.01).all()
    assert (out == codec.quantize(merged, qtype)).float().mean() > 0.99
    ir, ii, rr, _ = stats.double().sum(0).tolist()
    assert 0 < ir / (ii * rr) ** 0.5 <= 1 + 1e-6           # survival cosine is a cosine


@pytest.mark.parametrize("rows,cols", [(37, 64 * 5), (16, 64 * 4), (3, 64)])
def test_nf4_bytes_identical(rows, cols):
    from adaptertools.kernels.quant import bnb
    from adaptertools.kernels.triton.blocks import fold_nf4

    gen = torch.Generator().manual_seed(cols)
    w = torch.randn(rows, cols, generator=gen)
    packed, state = bnb.quantize_4bit(w, quant_type="nf4", blocksize=64)
    a, b = _dyadic(rows, cols, 5)
    out, absmax, _ = fold_nf4(packed, state.absmax, (rows, cols), a, b, 0.25)
    merged = bnb.dequantize_4bit(packed, state) + (b @ a) * 0.25
    ref, ref_state = bnb.quantize_4bit(merged, quant_type="nf4", blocksize=64)
    assert torch.equal(absmax, ref_state.absmax)
    assert torch.equal(out, ref)


# ---- the engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama (hidden 64, intermediate 96) as HF bf16 and as GGUF Q8_0 / Q4_0 (2-D weights
    quantized by the torch codec), and a PEFT LoRA with dyadic factors, also as GGUF."""
    pytest.importorskip("peft")
    from helpers.gguf_base import make_base_model, rewrite_gguf, write_gguf_base
    from peft import LoraConfig, get_peft_model

    import adaptertools as at
    from adaptertools.kernels.quant import gguf as codec

    root = tmp_path_factory.mktemp("triton_engine")
    model = make_base_model("llama", hidden=64, intermediate=96)
    model.to(torch.bfloat16).save_pretrained(root / "hf")
    model.float()
    f16 = write_gguf_base(model, root / "base-f16.gguf", "llama", f16=True)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randint(-4, 5, p.shape, generator=gen).float() / 16)
    peft_model.save_pretrained(root / "peft")
    at.convert(root / "peft", root / "lora.gguf", to="gguf", base=root / "hf")
    import gguf
    import numpy as np

    def quantize_to(qtype):
        def tensor(t):
            data = np.array(t.data)
            if data.ndim != 2 or data.shape[-1] % 32:
                return data, t.tensor_type
            raw = codec.quantize(torch.from_numpy(data.astype(np.float32)), qtype).numpy()
            return raw, gguf.GGMLQuantizationType[qtype]
        return tensor

    bases = {q: rewrite_gguf(f16, root / f"base-{q}.gguf", quantize_to(q)) for q in ("Q8_0", "Q4_0")}
    return root, bases


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_engine_gguf_files_identical(tiny, qtype):
    import adaptertools as at

    root, bases = tiny
    reports = {k: at.merge(bases[qtype], [root / "lora.gguf"], root / f"out-{qtype}-{k}.gguf", kernels=k)
               for k in ("torch", "triton")}
    assert reports["torch"]["kernels"] == "torch" and reports["triton"]["kernels"] == "triton"
    torch_bytes = (root / f"out-{qtype}-torch.gguf").read_bytes()
    assert torch_bytes == (root / f"out-{qtype}-triton.gguf").read_bytes()
    s_t, s_k = reports["torch"]["survival"], reports["triton"]["survival"]
    assert s_t["tensors"] == s_k["tensors"] > 0
    assert abs(s_t["median_cosine"] - s_k["median_cosine"]) < 1e-4


def test_engine_float_identical_with_exact_products(tiny, monkeypatch):
    """bf16 HF base, one adapter (PEFT's stacked order): the fused path runs for every adapted
    tensor; with dyadic factors the product is exact in any order, so the files are identical."""
    from safetensors.torch import load_file

    import adaptertools as at
    from adaptertools.kernels.triton import fold

    root, _ = tiny
    auto = at.merge(root / "hf", [root / "peft"], root / "out-auto", kernels="auto")
    assert auto["kernels"] == "torch"
    calls = []
    real = fold.fold_float
    monkeypatch.setattr(fold, "fold_float", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    fused = at.merge(root / "hf", [root / "peft"], root / "out-triton", kernels="triton")
    assert fused["kernels"] == "triton"
    assert len(calls) == 2 * 4                  # 2 layers x q, v, up, down
    ref = load_file(root / "out-auto" / "model.safetensors")
    out = load_file(root / "out-triton" / "model.safetensors")
    assert ref.keys() == out.keys()
    for name, t in ref.items():
        assert torch.equal(out[name], t), name


def test_explicit_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from adaptertools.errors import UnsupportedError
    from adaptertools.kernels.triton.engine import resolve_kernels

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UnsupportedError, match="--device cuda"):
        resolve_kernels("triton", torch.device("cpu"))
    assert resolve_kernels("auto", torch.device("cpu")) == "torch"
    with pytest.raises(UnsupportedError, match="--kernels must be"):
        resolve_kernels("cuda", torch.device("cpu"))
