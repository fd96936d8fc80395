"""Merging into quantized GGUF models (Q8_0, Q4_K_M), checked by llama.cpp itself.

The bases are quantized by llama.cpp's own ``llama_model_quantize``; the reference is llama.cpp
running the quantized base with the adapter applied at run time (what the user would get by not
merging). llama.cpp's own route to a merged quantized file, ``llama-export-lora`` (adapted
tensors written as F16) followed by ``llama-quantize`` back to the type, is reproduced with
``--requantize f16`` (export-lora's output) and ``llama_model_quantize``.
"""

from __future__ import annotations

import importlib.util
import json
import os

import gguf
import numpy as np
import pytest

import adaptertools as at
from adaptertools.errors import UnsupportedError

from helpers.gguf_base import (llama_logits, llama_quantize, make_base_model, max_diff,
                               rewrite_gguf, write_gguf_base)

if importlib.util.find_spec("llama_cpp") is None:
    if os.environ.get("CI"):
        raise RuntimeError("llama-cpp-python is missing; CI installs the `llama` extra")
    pytestmark = pytest.mark.skip(reason="llama-cpp-python not installed")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTED = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def quant(tmp_path_factory):
    """A Llama with rows of 256 (K-quant blocks), as F16 GGUF and quantized by llama.cpp to Q8_0
    and Q4_K_M; a PEFT LoRA (large enough to survive 4-bit) and its GGUF conversion."""
    from helpers.peft_adapters import perturb_trainables
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("merge_gguf_quant")
    model = make_base_model("llama", hidden=256, intermediate=512)
    model.save_pretrained(root / "hf")
    f16 = write_gguf_base(model, root / "base-f16.gguf", "llama", f16=True)
    bases = {"F16": f16}
    for ftype in ("Q8_0", "Q4_K_M"):
        bases[ftype] = llama_quantize(f16, root / f"base-{ftype}.gguf", ftype)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ALL,
                                                  init_lora_weights=False))
    perturb_trainables(peft_model, spread=0.1)
    peft_model.save_pretrained(root / "peft")
    at.convert(root / "peft", root / "lora.gguf", to="gguf", base=root / "hf")
    return root, bases


def tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def is_adapted(name: str) -> bool:
    return name.endswith(".weight") and any(f".{t}." in name for t in ADAPTED)


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M"])
def test_keep_type_merge_keeps_size_types_and_untouched_bytes(quant, tmp_path, ftype):
    root, bases = quant
    base, out = bases[ftype], tmp_path / "merged.gguf"
    report = at.merge(base, [root / "peft"], out)
    assert out.stat().st_size == base.stat().st_size
    before, after = tensors(base), tensors(out)
    assert list(before) == list(after)
    for name, t in before.items():
        u = after[name]
        assert (t.tensor_type, t.data_offset) == (u.tensor_type, u.data_offset), name
        same = np.array_equal(np.array(t.data), np.array(u.data))
        assert same != is_adapted(name), name
    with open(base, "rb") as x, open(out, "rb") as y:     # header and metadata untouched
        start = min(t.data_offset for t in before.values())
        assert x.read(start) == y.read(start)
    survival = report["survival"]
    assert survival["tensors"] == 7 * 2
    assert {r["type"] for r in survival["rows"]} <= {"Q8_0", "Q4_K", "Q6_K"}
    saved = json.loads((tmp_path / "merged.gguf.survival.json").read_text())
    assert saved["median_cosine"] == pytest.approx(survival["median_cosine"])
    # Q8_0 keeps nearly all of the change; 4-bit less, but this adapter is large enough
    assert survival["median_cosine"] > (0.99 if ftype == "Q8_0" else 0.7)


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M"])
def test_keep_type_merge_is_as_close_as_llama_cpps_route(quant, tmp_path, ftype):
    """Logits against the quantized base with the LoRA at run time: ours (dequantize, fold in
    fp32, requantize) against export-lora's F16 tensors requantized by llama_model_quantize."""
    root, bases = quant
    base = bases[ftype]
    ours = tmp_path / "ours.gguf"
    at.merge(base, [root / "lora.gguf"], ours)
    exported = tmp_path / "export-lora.gguf"
    at.merge(base, [root / "lora.gguf"], exported, requantize="f16")
    assert all(t.tensor_type.name == "F16" for n, t in tensors(exported).items() if is_adapted(n))
    theirs = llama_quantize(exported, tmp_path / "theirs.gguf", ftype, allow_requantize=True)
    runtime = llama_logits(base, root / "lora.gguf")
    assert max_diff(runtime, llama_logits(base)) > 0.1            # the adapter matters
    ours_err = max_diff(llama_logits(ours), runtime)
    theirs_err = max_diff(llama_logits(theirs), runtime)
    exported_err = max_diff(llama_logits(exported), runtime)       # F16 tensors: tiny
    print(f"{ftype}: max |logit - runtime LoRA|: ours {ours_err:.4f}, export-lora + quantize "
          f"{theirs_err:.4f}, export-lora F16 {exported_err:.4f}")
    assert exported_err < ours_err
    assert ours_err <= 1.1 * theirs_err


def test_quantize_like_gives_every_tensor_the_reference_type(quant, tmp_path):
    """F16 base + Q4_K_M reference: one quantization; types follow the reference; untouched
    tensors get exactly llama.cpp's bytes when the quantizer is ggml's."""
    root, bases = quant
    out = tmp_path / "like.gguf"
    report = at.merge(bases["F16"], [root / "peft"], out, quantize_like=bases["Q4_K_M"])
    ref, got = tensors(bases["Q4_K_M"]), tensors(out)
    assert {n: t.tensor_type for n, t in got.items()} == {n: t.tensor_type for n, t in ref.items()}
    for name, t in ref.items():
        if not is_adapted(name):
            assert np.array_equal(np.array(t.data), np.array(got[name].data)), name
    assert report["survival"]["tensors"] == 14
    runtime = llama_logits(bases["F16"], root / "lora.gguf")
    like_err = max_diff(llama_logits(out), runtime)
    keep = tmp_path / "keep.gguf"
    at.merge(bases["Q4_K_M"], [root / "peft"], keep)
    keep_err = max_diff(llama_logits(keep), runtime)
    print(f"quantize-like error {like_err:.4f}, merge into Q4_K_M {keep_err:.4f}")
    assert like_err <= 1.1 * keep_err


def test_requantize_to_another_type_lays_the_file_out_anew(quant, tmp_path):
    root, bases = quant
    out = tmp_path / "q8.gguf"
    at.merge(bases["Q4_K_M"], [root / "peft"], out, requantize="q8_0")
    before, after = tensors(bases["Q4_K_M"]), tensors(out)
    for name, t in before.items():
        want = "Q8_0" if is_adapted(name) else t.tensor_type.name
        assert after[name].tensor_type.name == want, name
        if not is_adapted(name):
            assert np.array_equal(np.array(t.data), np.array(after[name].data)), name
    assert out.stat().st_size > bases["Q4_K_M"].stat().st_size
    runtime = llama_logits(bases["Q4_K_M"], root / "lora.gguf")
    assert max_diff(llama_logits(out), runtime) < 0.5 * max_diff(runtime, llama_logits(bases["Q4_K_M"]))


def test_untouchable_types_and_bad_rows_are_refused(quant, tmp_path):
    root, bases = quant
    T = gguf.GGMLQuantizationType
    block, nbytes = gguf.GGML_QUANT_SIZES[T.IQ4_NL]

    def iq4_q(t):       # any bytes: the plan refuses before reading them
        data = np.array(t.data)
        if t.name != "blk.0.attn_q.weight":
            return data, t.tensor_type
        return np.zeros((data.shape[0], data.shape[1] // block * nbytes), np.uint8), T.IQ4_NL

    iq = rewrite_gguf(bases["F16"], tmp_path / "iq.gguf", iq4_q)
    with pytest.raises(UnsupportedError, match=r"blk\.0\.attn_q\.weight is IQ4_NL.*--requantize q8_0"):
        at.merge(iq, [root / "peft"], tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    at.merge(iq, [root / "peft"], tmp_path / "y.gguf", requantize="q8_0")   # the suggested fix
    assert tensors(tmp_path / "y.gguf")["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"


def test_rows_that_do_not_fit_the_blocks_are_refused(tmp_path):
    model = make_base_model("llama")            # hidden 64: no room for 256-value K blocks
    base = write_gguf_base(model, tmp_path / "small.gguf", "llama", f16=True)
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"],
                                     init_lora_weights=False)).save_pretrained(adapter)
    with pytest.raises(UnsupportedError, match="not a multiple of Q4_K's blocks of 256"):
        at.merge(base, [adapter], tmp_path / "x.gguf", requantize="q4_k")
    assert not (tmp_path / "x.gguf").exists()


def test_split_gguf_is_refused_with_the_join_command(quant, tmp_path):
    """A shard of llama.cpp's gguf-split (split.count > 1 in its metadata)."""
    root, bases = quant
    names = [t.name for t in gguf.GGUFReader(str(bases["Q8_0"])).tensors[:3]]

    def split_keys(writer):
        writer.add_uint16("split.no", 0)
        writer.add_uint16("split.count", 2)
        writer.add_int32("split.tensors.count", len(names) * 2)

    shard = rewrite_gguf(bases["Q8_0"], tmp_path / "model-00001-of-00002.gguf",
                         lambda t: (np.array(t.data), t.tensor_type) if t.name in names else None,
                         split_keys)
    with pytest.raises(UnsupportedError, match="part 1 of a GGUF split into 2 files.*llama-gguf-split --merge"):
        at.merge(shard, [root / "peft"], tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_ggml_fast_path_writes_the_torch_codecs_bytes(qtype):
    """The engine quantizes and dequantizes on the CPU through ggml's own functions when it can;
    the torch codecs are the reference (exact vs ggml and gguf-py, tests/test_quant_codecs.py):
    same bytes, same floats, many threads."""
    import torch

    from adaptertools.kernels.quant import ggml
    from adaptertools.kernels.quant import gguf as codec

    assert ggml.available(qtype)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(200, 512, generator=gen) * 0.02           # 4 chunks of rows, the last short
    w[3] = 0                                                   # an all-zero row
    w[7] *= 1e3                                                # a row of large values
    raw = codec.quantize(w, qtype)
    assert torch.equal(ggml.quantize(w, qtype, threads=2), raw)
    assert ggml.dequantizable(qtype)
    assert torch.equal(ggml.dequantize(raw, qtype, (200, 512), threads=2),
                       codec.dequantize(raw, qtype, (200, 512)))


def test_merge_files_identical_with_and_without_ggml(quant, tmp_path, monkeypatch):
    root, bases = quant
    at.merge(bases["Q4_K_M"], [root / "peft"], tmp_path / "fast.gguf")
    from adaptertools.kernels.quant import ggml

    monkeypatch.setattr(ggml, "available", lambda qtype: False)
    at.merge(bases["Q4_K_M"], [root / "peft"], tmp_path / "torch.gguf")
    assert (tmp_path / "fast.gguf").read_bytes() == (tmp_path / "torch.gguf").read_bytes()


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M"])
def test_validation_of_quantized_merges(quant, tmp_path, ftype):
    """merge --validate on a keep-type quantized merge: every adapted tensor within 1 dB of its
    floor (the float64 reference quantized by the output type's codec), survival reported; the
    unmerged base given as the "merge" fails, naming the adapted tensors."""
    root, bases = quant
    out = tmp_path / "merged.gguf"
    report = at.merge(bases[ftype], [root / "peft"], out, validate=True)
    validation = report["validation"]
    assert validation["passed"], [r for r in validation.get("tensors", []) if not r["passed"]]
    assert validation["adapted"] == 14
    saved = json.loads((tmp_path / "merged.gguf.validation.json").read_text())
    rows = [r for r in saved["tensors"] if r["kind"] == "adapted"]
    assert len(rows) == 14 and all(r["survival"] > 0.5 for r in rows)
    wrong = at.validate(bases[ftype], [root / "peft"], bases[ftype])     # nothing merged
    failed = {r["name"] for r in wrong["tensors"] if not r["passed"]}
    assert failed == {n for n in tensors(bases[ftype]) if is_adapted(n)}


def test_validation_of_a_requantized_merge(quant, tmp_path):
    root, bases = quant
    out = tmp_path / "q8.gguf"
    at.merge(bases["Q4_K_M"], [root / "peft"], out, requantize="q8_0")
    report = at.validate(bases["Q4_K_M"], [root / "peft"], out)
    assert report["passed"] and report["adapted"] == 14
    assert all(r["dtype"] == "Q8_0" for r in report["tensors"] if r["kind"] == "adapted")


@pytest.mark.parametrize("target", ["f32", "f16"])
def test_requantize_to_float_from_a_quantized_base(quant, tmp_path, target):
    """export-lora's layout (adapted tensors as floats), each tensor W + delta exactly as the
    validator's float64 reference rounds it; the file is laid out anew, tensors written by the
    writer thread while the next ones are folded in reused buffers."""
    root, bases = quant
    out = tmp_path / "float.gguf"
    at.merge(bases["Q8_0"], [root / "peft"], out, requantize=target)
    types = {n: t.tensor_type.name for n, t in tensors(out).items() if is_adapted(n)}
    assert set(types.values()) == {target.upper()} and len(types) == 14
    report = at.validate(bases["Q8_0"], [root / "peft"], out)
    assert report["passed"], [r for r in report["tensors"] if not r["passed"]][:3]
    assert all(r["identical_to_floor"] for r in report["tensors"] if r["kind"] == "adapted")
