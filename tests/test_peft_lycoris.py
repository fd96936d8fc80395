"""PEFT's own LoHa and LoKr adapters (formats/peft_lycoris.py), as PEFT's save_pretrained writes
them, read and merged by the streaming engine: bit-identical to PEFT's merge_and_unload, for
Linear and Conv2d layers in the flat and the CP form, rank/alpha patterns, fp32 and bf16 bases.
A file missing a factor is refused naming it; converting one to a LoRA-only format is refused
with the route that works.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.cli import run_cli
from helpers.models import TinyLinearConv
from peft import LoHaConfig, LoKrConfig, get_peft_model
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.errors import FormatError, UnsupportedError

TARGETS = ["lin", "c2", "out"]
CASES = {
    "loha-flat": lambda: LoHaConfig(r=3, alpha=5, target_modules=TARGETS,
                                    rank_pattern={"out": 2}, alpha_pattern={"c2": 7}),
    "loha-cp": lambda: LoHaConfig(r=2, alpha=4, target_modules=TARGETS, use_effective_conv2d=True),
    "lokr-both": lambda: LoKrConfig(r=2, alpha=3, target_modules=TARGETS, decompose_both=True),
    "lokr-cp-full": lambda: LoKrConfig(r=8, alpha=2, target_modules=TARGETS,
                                       use_effective_conv2d=True),
}


def _case(tmp_path, name: str, dtype: torch.dtype):
    """(base folder, PEFT adapter folder, PEFT's merged state) for one case."""
    torch.manual_seed(0)
    model = TinyLinearConv().to(dtype)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              base / "model.safetensors")
    peft_model = get_peft_model(model, CASES[name]())
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.no_grad():
        for pname, p in sorted(peft_model.named_parameters()):
            if "hada_" in pname or "lokr_" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return base, adapter, merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_merge_equals_peft(name, dtype, tmp_path):
    base, adapter, reference = _case(tmp_path, name, dtype)
    loaded = at.load(adapter)
    assert sorted(loaded.weights) == sorted(f"{t}.weight" for t in TARGETS)
    at.merge(base, [adapter], tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for key, tensor in merged.items():
        assert torch.equal(tensor, reference[key]), key            # bit for bit
    outcome = run_cli("validate", base, adapter, "--merged", tmp_path / "out", "--json")
    assert outcome.code == 0, outcome.stderr
    assert json.loads(outcome.stdout)["passed"]


def test_missing_factor_is_named(tmp_path):
    base, adapter, _ = _case(tmp_path, "loha-flat", torch.float32)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lin.hada_w2_b"))
    del tensors[key]
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(FormatError, match=r"lin has .* but no w2_b: an incomplete LoHa layer"):
        at.load(adapter)
    outcome = run_cli("merge", base, adapter, "--out", tmp_path / "out")
    assert outcome.code == 1 and "no w2_b" in outcome.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_tensor_is_named(tmp_path):
    _, adapter, _ = _case(tmp_path, "lokr-both", torch.float32)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.lin.lokr_w3"] = torch.zeros(2)
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(FormatError, match=r"not LOKR tensors .*lin\.lokr_w3"):
        at.load(adapter)


@pytest.mark.parametrize("to", ["peft", "safetensors", "gguf"])
def test_convert_to_a_lora_format_is_refused_with_the_route(to, tmp_path):
    _, adapter, _ = _case(tmp_path, "loha-cp", torch.float32)
    dst = tmp_path / ("out.gguf" if to == "gguf" else "out")
    with pytest.raises(UnsupportedError, match=r"loha delta.*combine ADAPTER --method svd --rank R"):
        at.convert(adapter, dst, to=to)
    assert not dst.exists()


def test_inspect_names_the_kind(tmp_path):
    _, adapter, _ = _case(tmp_path, "lokr-both", torch.float32)
    report = at.inspect(adapter, layers=True)
    assert report["delta_kinds"] == {"lokr": 3}
    loaded = at.load(adapter)
    from adaptertools.kernels.deltas import delta

    for row in report["layers"]:
        assert row["kind"] == "lokr" and row["rank"] is None
        dense = delta(loaded.weights[row["name"]], torch.float64)
        assert row["delta_norm"] == pytest.approx(float(dense.norm()), rel=1e-6)
        assert int(torch.linalg.matrix_rank(dense)) <= row["rank_bound"]


def test_combine_svd_takes_a_lora_of_it(tmp_path):
    """The route to a LoRA format: combine --method svd. At full rank the LoRA's merge is PEFT's
    LoHa merge to fp32 accuracy (one rounding of W + delta, the delta through an SVD)."""
    base, adapter, reference = _case(tmp_path, "loha-cp", torch.float32)
    report = at.combine([adapter], tmp_path / "lora", method="svd", rank=16)
    assert all(r["rank"] <= 16 for r in report["tensors"])
    at.merge(base, [tmp_path / "lora"], tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    for name in (f"{t}.weight" for t in TARGETS):
        change = (reference[name] - original[name]).double()
        error = (merged[name].double() - reference[name].double()).norm() / change.norm()
        assert error < 1e-5, name
