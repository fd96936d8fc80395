"""Quantized-weight codecs against their real references, byte for byte and bit for bit.

- GGUF dequantize vs gguf-py's ``gguf.quants.dequantize`` (every type we list, plus gguf-py fallbacks);
- GGUF legacy quantize vs gguf-py's ``gguf.quants.quantize``;
- GGUF K-quant quantize vs ggml's own ``ggml_quantize_chunk`` (libggml-base from llama-cpp-python,
  through ctypes, no imatrix);
- bitsandbytes NF4/FP4 (plain and double-quantized) and LLM.int8 vs bitsandbytes on the CPU.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os

import numpy as np
import pytest
import torch

from adaptertools.errors import FormatError, UnsupportedError
from adaptertools.kernels import quant
from adaptertools.kernels.quant import bnb as qb
from adaptertools.kernels.quant import gguf as qg

gguf = pytest.importorskip("gguf")
LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KTYPES = ["Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K"]
# byte offsets of fp16 fields in each block (kept finite in random-byte inputs)
F16_AT = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
          "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}


def _hard_weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Several rows with the cases codecs get wrong: zero, constant, negative-only, tiny, huge range."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    w[0] = 0                                               # all-zero blocks
    w[1, : cols // 2] = 0.5                                # constant blocks
    w[2] = -np.abs(w[2])                                   # negative-only
    w[3] *= np.exp(rng.standard_normal(cols) * 3)          # large dynamic range inside blocks
    w[4, : cols // 2] = 1e-20                              # below ggml's GROUP_MAX_EPS
    w[5, : cols // 3] = 0                                  # zero sub-blocks in a non-zero block
    w[6] = rng.standard_t(2, cols) * 1e3                   # heavy tail, big values
    w[7] = np.abs(w[7]) + 0.1                              # positive-only with an offset
    w[8, ::7] = 0
    return w


def _bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


# ---- GGUF legacy types: quantize vs gguf-py, dequantize vs gguf-py ----------------------------

@pytest.mark.parametrize("name", LEGACY)
def test_legacy_quantize_matches_gguf_py(name):
    w = _hard_weights(12, 32 * 7, seed=1)                  # odd number of blocks per row
    qt = gguf.GGMLQuantizationType[name]
    ref = gguf.quants.quantize(w, qt)
    ours = qg.quantize(torch.from_numpy(w), name)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == ref.shape
    assert np.array_equal(ours.numpy(), ref)
    # and back, bit for bit
    assert np.array_equal(_bits(qg.dequantize(ours, name, w.shape)), _bits(gguf.quants.dequantize(ref, qt)))


def _random_blocks(name: str, nblocks: int, seed: int) -> np.ndarray:
    _, nb = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    raw = np.random.default_rng(seed).integers(0, 256, (nblocks, nb), dtype=np.uint8)
    for off in F16_AT.get(name, []):
        raw[:, off + 1] &= 0xBF                            # exponent < 31: no inf/NaN scales
    return raw


@pytest.mark.parametrize("name", LEGACY + KTYPES)
def test_dequantize_matches_gguf_py_on_any_bytes(name):
    qt = gguf.GGMLQuantizationType[name]
    bs, nb = gguf.GGML_QUANT_SIZES[qt]
    raw = _random_blocks(name, 6 * 3, seed=2).reshape(6, 3 * nb)     # 6 rows of 3 blocks
    ref = gguf.quants.dequantize(raw, qt)
    ours = qg.dequantize(torch.from_numpy(raw), name, (6, 3 * bs))
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (6, 3 * bs)
    assert np.array_equal(_bits(ours), _bits(ref))
    # numpy input (a GGUFReader tensor's data) and a 3-D shape work too
    ours3 = qg.dequantize(raw.reshape(2, 3, 3 * nb), qt, (2, 3, 3 * bs))
    assert np.array_equal(_bits(ours3.reshape(6, -1)), _bits(ref))


@pytest.mark.parametrize("name", ["IQ4_XS", "IQ4_NL", "TQ2_0", "MXFP4"])
def test_other_types_dequantize_through_gguf_py_and_refuse_to_quantize(name):
    qt = gguf.GGMLQuantizationType[name]
    bs, _ = gguf.GGML_QUANT_SIZES[qt]
    w = _hard_weights(9, 2 * 256, seed=3)
    raw = _random_blocks(name, 9 * (512 // bs), seed=3).reshape(9, -1)
    if name in ("TQ2_0", "MXFP4"):
        raw = gguf.quants.quantize(w, qt)
    ref = gguf.quants.dequantize(raw, qt)
    assert np.array_equal(_bits(qg.dequantize(torch.from_numpy(raw), name, (9, 512))), _bits(ref))
    assert not quant.requantizable(name)
    with pytest.raises(UnsupportedError, match=r"q8_0.*f16") as e:
        qg.quantize(torch.from_numpy(w), name, name="blk.0.ffn_up.weight")
    assert "blk.0.ffn_up.weight" in str(e.value)


# ---- GGUF K types: quantize vs ggml's ggml_quantize_chunk ------------------------------------

@pytest.fixture(scope="module")
def ggml_quantize():
    llama_cpp = pytest.importorskip("llama_cpp")
    libs = glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so*"))
    if not libs:
        pytest.skip("libggml-base not found in the llama_cpp package")
    lib = ctypes.CDLL(libs[0])
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_void_p]

    def run(w: np.ndarray, name: str) -> np.ndarray:
        qt = gguf.GGMLQuantizationType[name]
        bs, nb = gguf.GGML_QUANT_SIZES[qt]
        w = np.ascontiguousarray(w, dtype=np.float32)
        out = np.zeros((w.shape[0], w.shape[1] // bs * nb), dtype=np.uint8)
        f(int(qt), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], None)
        return out

    return run


@pytest.mark.parametrize("name", KTYPES)
def test_kquant_quantize_matches_ggml(name, ggml_quantize):
    for seed, w in ((4, _hard_weights(12, 3 * 256, seed=4)),
                    (5, (np.random.default_rng(5).standard_t(3, (8, 1024)) * 1e-3).astype(np.float32))):
        ref = ggml_quantize(w, name)
        ours = qg.quantize(torch.from_numpy(w), name).numpy()
        bad = np.flatnonzero((ours.reshape(-1, ref.shape[1] // (w.shape[1] // 256)) !=
                              ref.reshape(-1, ref.shape[1] // (w.shape[1] // 256))).any(1))
        assert bad.size == 0, f"{name} seed {seed}: super-blocks {bad[:10]} differ from ggml"
        deq = qg.dequantize(torch.from_numpy(ours), name, w.shape)
        assert np.array_equal(_bits(deq), _bits(gguf.quants.dequantize(ref, gguf.GGMLQuantizationType[name])))


def test_legacy_quantize_matches_ggml_too(ggml_quantize):
    w = _hard_weights(10, 32 * 5, seed=6)
    for name in LEGACY:
        assert np.array_equal(qg.quantize(torch.from_numpy(w), name).numpy(), ggml_quantize(w, name)), name


# ---- GGUF API: plain floats, names, errors ------------------------------------------------------

def test_float_types_and_type_spellings():
    w = torch.from_numpy(_hard_weights(9, 64, seed=7))
    for name, dt in (("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16)):
        raw = qg.quantize(w, name)
        assert tuple(raw.shape) == (9, 64 * (4 if name == "F32" else 2))
        assert torch.equal(qg.dequantize(raw, name, (9, 64)), w.to(dt).float())
    a = qg.quantize(w, "q8_0")
    assert torch.equal(a, qg.quantize(w, gguf.GGMLQuantizationType.Q8_0)) and torch.equal(a, qg.quantize(w, 8))
    assert qg.row_bytes("Q4_K", 512) == 288 and quant.requantizable("Q6_K")


def test_row_length_not_a_multiple_of_the_block_is_a_clear_error():
    w = torch.zeros(4, 100)
    with pytest.raises(FormatError, match=r"100.*Q4_K block size 256.*'blk.3.attn_q.weight'"):
        qg.quantize(w, "Q4_K", name="blk.3.attn_q.weight")
    with pytest.raises(FormatError, match="block size 32"):
        qg.dequantize(torch.zeros(4 * 4 * 34, dtype=torch.uint8), "Q8_0", (4, 100), name="x")
    with pytest.raises(FormatError, match="needs 136 bytes, got 135"):
        qg.dequantize(torch.zeros(135, dtype=torch.uint8), "Q8_0", (4, 32), name="x")
    with pytest.raises(UnsupportedError, match="unknown GGUF tensor type"):
        qg.quantize(w, "Q9_K")


# ---- bitsandbytes ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bnbf():
    pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as F

    return F


def _bnb_weights(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.from_numpy(_hard_weights(rows, cols, seed=8))
    w[6] *= 1e-3                                           # keep fp16 finite
    w[9:] = torch.randn(rows - 9, cols) * 0.02
    return w.to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_4bit_matches_bitsandbytes(quant_type, double_quant, bnbf):
    for dtype, shape, blocksizes in ((torch.bfloat16, (40, 512), (64, 128, 256)),
                                     (torch.float16, (24, 4096), (64, 512, 4096)),
                                     (torch.float32, (33, 192), (64,))):
        w = _bnb_weights(*shape, dtype)
        for bs in blocksizes:
            q, st = bnbf.quantize_4bit(w, blocksize=bs, quant_type=quant_type, compress_statistics=double_quant)
            ours, state = qb.quantize_4bit(w, quant_type=quant_type, blocksize=bs, double_quant=double_quant)
            assert torch.equal(ours, q), (dtype, bs)
            ref_t = st.as_dict(packed=True)               # what a safetensors checkpoint holds
            our_t = qb.state_to_tensors(ours, state, "m.weight")
            assert set(our_t) == {"m.weight"} | {f"m.weight.{k}" for k in ref_t}
            for k, v in ref_t.items():
                assert our_t[f"m.weight.{k}"].dtype == v.dtype and torch.equal(our_t[f"m.weight.{k}"], v), k
            ref = bnbf.dequantize_4bit(q, st)             # in the weight's dtype
            packed, back = qb.state_from_tensors(our_t, "m.weight")
            deq = qb.dequantize_4bit(packed, back)
            assert deq.dtype == torch.float32
            assert torch.equal(deq.to(dtype).view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32),
                               ref.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32)), (dtype, bs)


def test_bnb_4bit_dequantize_rows_not_a_multiple_of_the_block(bnbf):
    # bnb 0.50's CPU dequantize kernel mis-indexes absmax when cols % blocksize != 0 (each absmax then
    # covers a row), so the reference here is bnb's own quantizer output decoded by its definition.
    w = _bnb_weights(33, 96, torch.float32)
    q, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours, state = qb.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    assert torch.equal(ours, q)
    absmax = bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset
    codes = torch.stack([q.view(-1) >> 4, q.view(-1) & 15], 1).view(-1).long()
    expect = (st.code[codes].view(-1) * absmax.repeat_interleave(64)[: w.numel()]).view(w.shape)
    assert torch.equal(qb.dequantize_4bit(ours, state), expect)


def test_bnb_all_zero_weight_and_state_errors(bnbf):
    w = torch.zeros(16, 256, dtype=torch.bfloat16)
    q, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours, state = qb.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    assert torch.equal(ours, q) and torch.equal(state.absmax, st.absmax)
    t = qb.state_to_tensors(ours, state, "w")
    for damage, match in (
        (lambda d: d.pop("w.absmax"), "'w.absmax' is missing"),
        (lambda d: d.__setitem__("w.quant_state.bitsandbytes__nf4", torch.tensor(list(b"{not json"), dtype=torch.uint8)),
         "corrupted quant state"),
        (lambda d: d.__setitem__("w.absmax", d["w.absmax"][:-1]), "absmax has 63 values, 64 expected"),
        (lambda d: d.__setitem__("w.quant_state.bitsandbytes__fp4", d["w.quant_state.bitsandbytes__nf4"]),
         "expected exactly one of"),
    ):
        bad = dict(t)
        damage(bad)
        with pytest.raises(FormatError, match=match):
            qb.state_from_tensors(bad, "w")
    with pytest.raises(UnsupportedError, match="blocksize"):
        qb.quantize_4bit(w, blocksize=48)


def test_bnb_int8_matches_bitsandbytes(bnbf):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = _bnb_weights(20, 96, dtype)
        cb, scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))   # what Int8Params does
        ours_cb, ours_scb = qb.quantize_int8(w)
        assert torch.equal(ours_cb, cb) and torch.equal(ours_scb, scb)
        assert torch.equal(qb.dequantize_int8(ours_cb, ours_scb), bnbf.int8_vectorwise_dequant(cb, scb))
    t = qb.int8_to_tensors(ours_cb, ours_scb, "m.up_proj.weight")
    assert set(t) == {"m.up_proj.weight", "m.up_proj.SCB", "m.up_proj.weight_format"}
    cb2, scb2 = qb.int8_from_tensors(t, "m.up_proj.weight")
    assert torch.equal(cb2, ours_cb) and torch.equal(scb2, ours_scb)
    with pytest.raises(FormatError, match="SCB"):
        qb.int8_from_tensors({"m.up_proj.weight": cb2}, "m.up_proj.weight")


# ---- the same bits on a GPU --------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_same_bytes():
    w = torch.from_numpy(_hard_weights(12, 3 * 256, seed=9))
    for name in LEGACY + KTYPES:
        raw = qg.quantize(w, name)
        assert torch.equal(qg.quantize(w.cuda(), name).cpu(), raw), name
        assert torch.equal(qg.dequantize(raw.cuda(), name, w.shape).cpu(), qg.dequantize(raw, name, w.shape)), name
    wb = w[9:].to(torch.bfloat16)
    for qt in ("nf4", "fp4"):
        q, st = qb.quantize_4bit(wb, quant_type=qt, double_quant=True)
        qc, stc = qb.quantize_4bit(wb.cuda(), quant_type=qt, double_quant=True)
        assert torch.equal(qc.cpu(), q) and torch.equal(stc.absmax.cpu(), st.absmax)
        assert torch.equal(qb.dequantize_4bit(qc, stc).cpu(), qb.dequantize_4bit(q, st))
