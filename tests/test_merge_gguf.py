"""Merging into GGUF F32/F16 model files, checked by llama.cpp itself: the merged file computes
what the base computes with the adapter applied at run time."""

from __future__ import annotations

import importlib.util
import os

import gguf
import numpy as np
import pytest

import adaptertools as at
from adaptertools.errors import UnsupportedError

from helpers.gguf_base import llama_logits, make_base_model, max_diff, write_gguf_base

if importlib.util.find_spec("llama_cpp") is None:
    if os.environ.get("CI"):
        raise RuntimeError("llama-cpp-python is missing; CI installs the `llama` extra")
    pytestmark = pytest.mark.skip(reason="llama-cpp-python not installed")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    """A tiny base as HF folder + F32 and F16 GGUF models, and a PEFT adapter (rsLoRA plus
    patterns, so the per-tensor scales matter) with its GGUF conversion."""
    from helpers.peft_adapters import perturb_trainables
    from peft import LoraConfig, get_peft_model

    kind = request.param
    root = tmp_path_factory.mktemp(f"merge_gguf_{kind}")
    model = make_base_model(kind)
    arch = "llama" if kind == "llama" else "qwen2"
    model.save_pretrained(root / "hf")
    f32 = write_gguf_base(model, root / "base-f32.gguf", arch)
    f16 = write_gguf_base(model, root / "base-f16.gguf", arch, f16=True)
    peft_model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, target_modules=ALL, init_lora_weights=False,
        rank_pattern={"v_proj": 4}, alpha_pattern={"layers.1.mlp.down_proj": 5}))
    perturb_trainables(peft_model)
    peft_model.save_pretrained(root / "peft")
    at.convert(root / "peft", root / "lora.gguf", to="gguf", base=root / "hf")
    return root, f32, f16


def test_merged_f32_gguf_matches_runtime_lora(setup, tmp_path):
    root, f32, _ = setup
    at.merge(f32, [root / "peft"], tmp_path / "merged.gguf")
    runtime = llama_logits(f32, root / "lora.gguf")
    merged = llama_logits(tmp_path / "merged.gguf")
    assert max_diff(merged, llama_logits(f32)) > 0.1          # the adapter matters
    assert max_diff(merged, runtime) <= 1e-4                  # f32: accumulation noise only


def test_merged_f16_gguf_keeps_layout_and_is_within_f16_noise(setup, tmp_path):
    """Keep-type merge: same size, same header, untouched tensors byte-identical; logits within
    the noise f16 storage itself adds (the F32 vs F16 base difference)."""
    root, f32, f16 = setup
    out = tmp_path / "merged.gguf"
    at.merge(f16, [root / "lora.gguf"], out)     # a GGUF adapter this time
    assert out.stat().st_size == f16.stat().st_size
    base, merged = gguf.GGUFReader(str(f16)), gguf.GGUFReader(str(out))
    changed = 0
    for a, b in zip(base.tensors, merged.tensors):
        assert (a.name, a.tensor_type, a.data_offset) == (b.name, b.tensor_type, b.data_offset)
        same = np.array_equal(np.array(a.data), np.array(b.data))
        adapted = a.name.endswith(".weight") and any(
            f".{t}." in a.name for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                         "ffn_up", "ffn_down"))
        assert same != adapted, a.name
        changed += not same
    assert changed == 7 * 2
    with open(f16, "rb") as x, open(out, "rb") as y:
        start = min(t.data_offset for t in base.tensors)
        assert x.read(start) == y.read(start)                 # header and metadata untouched
    runtime16 = llama_logits(f16, root / "lora.gguf")
    runtime32 = llama_logits(f32, root / "lora.gguf")
    noise = max_diff(runtime16, runtime32)                    # what f16 storage costs anyway
    assert max_diff(llama_logits(out), runtime16) <= 2 * noise + 1e-4


def test_gguf_base_refuses_dtype(setup, tmp_path):
    """--dtype is for HF checkpoints; a GGUF merge chooses types with --requantize (quantized
    bases: tests/test_merge_gguf_quant.py)."""
    root, f32, _ = setup
    with pytest.raises(UnsupportedError, match="--requantize bf16"):
        at.merge(f32, [root / "peft"], tmp_path / "x.gguf", dtype="bf16")
    assert not (tmp_path / "x.gguf").exists()
