"""`validate ... --e2e`: merged vs unmerged logits, through transformers + PEFT (HF bases) and
llama.cpp with a runtime LoRA (GGUF bases); passes correct merges, fails a corrupted one."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch

import adaptertools as at
from adaptertools.errors import UnsupportedError
from adaptertools.validation.e2e import compare_logits, thresholds

from helpers.checkpoints import read, rewrite
from helpers.models import LLAMA_ALL, build_base
from helpers.peft_adapters import make_adapter
from helpers.validation import delta

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None
if not HAS_LLAMA and os.environ.get("CI"):
    raise RuntimeError("llama-cpp-python is missing; CI installs the `llama` extra")


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def hf_merge(request, tmp_path_factory):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[request.param]
    root = tmp_path_factory.mktemp(f"e2e_{request.param}")
    base = build_base("llama", dtype)
    base.save_pretrained(root / "base")
    make_adapter(base, root / "a0", 81, r=4, lora_alpha=8, target_modules=LLAMA_ALL)
    make_adapter(base, root / "a1", 82, r=2, lora_alpha=4, use_rslora=True,
                 target_modules=["q_proj", "o_proj"])
    folders = [root / "a0", root / "a1"]
    at.merge(root / "base", folders, root / "out", weights=[0.8, -0.5])
    return request.param, root, folders


def test_hf_e2e_passes_a_correct_merge(hf_merge):
    dtype, root, folders = hf_merge
    report = at.validate(root / "base", folders, root / "out", weights=[0.8, -0.5], e2e=True)
    e2e = report["e2e"]
    assert report["passed"] and e2e["passed"] and "PEFT" in e2e["runtime"]
    assert e2e["dtypes"] == ["F32" if dtype == "fp32" else "BF16"]
    l2 = e2e["metrics"]["relative_l2"]
    assert l2["value"] <= l2["threshold"]
    if dtype == "fp32":                     # FORMATS.md: the fp32 noise is ~1e-6
        assert l2["value"] < 1e-5 and e2e["metrics"]["top1_agreement"]["value"] == 1.0


def test_hf_e2e_fails_a_corrupted_merge(hf_merge, tmp_path):
    dtype, root, folders = hf_merge
    if dtype != "fp32":
        pytest.skip("bf16 logits carry 1e-2 of their own noise: the per-tensor check is the "
                    "sharp one there")
    shutil.copytree(root / "out", tmp_path / "bad")
    name = "model.layers.1.self_attn.v_proj.weight"
    rewrite(tmp_path / "bad", name, read(root / "base", name))          # its delta left out
    report = at.validate(root / "base", folders, tmp_path / "bad", weights=[0.8, -0.5], e2e=True)
    assert not report["e2e"]["passed"] and not report["passed"]
    l2 = report["e2e"]["metrics"]["relative_l2"]
    assert l2["value"] > 100 * l2["threshold"]


@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python not installed")
def test_gguf_e2e_through_llama_cpp(tmp_path):
    """A tiny Llama as an F32 GGUF: the runtime LoRA and the merged file agree; the merge without
    the RoPE permutation of q does not."""
    from helpers.gguf_base import make_base_model, write_gguf_base
    from helpers.peft_adapters import perturb_trainables
    from peft import LoraConfig, get_peft_model

    from adaptertools.formats.names import permute_rows

    model = make_base_model("llama")
    model.save_pretrained(tmp_path / "hf")
    base = write_gguf_base(model, tmp_path / "base.gguf", "llama")
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_ALL,
                                                  init_lora_weights=False))
    perturb_trainables(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    at.merge(base, [tmp_path / "peft"], tmp_path / "merged.gguf")
    report = at.validate(base, [tmp_path / "peft"], tmp_path / "merged.gguf", e2e=True)
    assert report["passed"] and "llama.cpp" in report["e2e"]["runtime"]
    assert report["e2e"]["metrics"]["relative_l2"]["value"] < 1e-5

    shutil.copy(tmp_path / "merged.gguf", tmp_path / "bad.gguf")
    d = delta(tmp_path / "peft", "model.layers.0.self_attn.q_proj.weight")
    good = read(tmp_path / "bad.gguf", "blk.0.attn_q.weight").double()
    rewrite(tmp_path / "bad.gguf", "blk.0.attn_q.weight", good - permute_rows(d, 4) + d)
    bad = at.validate(base, [tmp_path / "peft"], tmp_path / "bad.gguf", e2e=True)
    assert not bad["e2e"]["passed"]
    assert {r["name"] for r in bad["tensors"] if not r["passed"]} == {"blk.0.attn_q.weight"}


def test_e2e_without_the_libraries_names_the_extra(hf_merge, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "peft" else real(name, *a))
    _, root, folders = hf_merge
    with pytest.raises(UnsupportedError, match=r"peft.*adaptertools\[e2e\]"):
        at.validate(root / "base", folders, root / "out", weights=[0.8, -0.5], e2e=True)


def test_thresholds_follow_the_dtype():
    fp32, bf16 = thresholds({"F32"}, 2), thresholds({"F32", "BF16"}, 2)
    assert bf16["relative_l2"] / fp32["relative_l2"] == 2.0 ** 16
    ref = torch.randn(4, 10, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    close = compare_logits(ref, ref + 1e-9 * torch.randn(ref.shape, dtype=torch.float64), fp32)
    assert all(m["passed"] for m in close.values())
    far = compare_logits(ref, ref + 1e-3 * torch.randn(ref.shape, dtype=torch.float64), fp32)
    assert not far["relative_l2"]["passed"] and not far["max_abs"]["passed"]
