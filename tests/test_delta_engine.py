"""The adapter-side seam (kernels/deltas.py's protocol) in the engine: LoHa and LoKr deltas,
built from PEFT's own layers, are planned and merged by the streaming engine with no format
reading them yet (that is the formats issue), and the result is bit-identical to PEFT's
``merge_and_unload``; the validator checks them; a mix with plain LoRA on one tensor adds up;
adapter algebra refuses them by name instead of treating them as ``B @ A`` (GGUF bases too:
plan.gguf_target).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.models import TinyLinearConv
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors.torch import load_file, save_file

from adaptertools.adapter import Adapter, LoraWeight, map_tensors, tensor_fields
from adaptertools.errors import UnsupportedError
from adaptertools.kernels import deltas
from adaptertools.kernels.deltas import loha_weight, lokr_weight, peft_scale
from adaptertools.merging.bases import open_base
from adaptertools.merging.plan import plan_for
from adaptertools.merging.run import execute

TARGETS = ["lin", "c2", "out"]


def _peft(kind: str, dtype: torch.dtype, seed: int = 0):
    """(PEFT model with seeded random adapter tensors, its config, the base state)."""
    torch.manual_seed(0)
    model = TinyLinearConv().to(dtype)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = {"loha": LoHaConfig(r=3, alpha=5, target_modules=TARGETS, use_effective_conv2d=True),
              "lokr": LoKrConfig(r=2, alpha=3, target_modules=TARGETS, decompose_both=True),
              "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "out"])}[kind]
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if any(t in name for t in ("hada_", "lokr_", "lora_")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return peft_model, config, base


def _adapter(kind: str, peft_model, config) -> Adapter:
    """Our Adapter of the PEFT model's deltas, keyed by base tensor name."""
    weights = {}
    for name, layer in peft_model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if kind == "lora" and hasattr(layer, "lora_A") and "default" in layer.lora_A:
            weights[f"{short}.weight"] = LoraWeight(
                a=layer.lora_A["default"].weight.detach().float(),
                b=layer.lora_B["default"].weight.detach().float(),
                scale=layer.scaling["default"])
        elif isinstance(layer, LycorisLayer):
            tensors = {t: getattr(layer, t)["default"].detach() for t in layer.adapter_layer_names
                       if "default" in getattr(layer, t)}
            make = loha_weight if kind == "loha" else lokr_weight
            weights[f"{short}.weight"] = make(
                tensors, scale=peft_scale(config.alpha, config.r),
                weight_shape=tuple(layer.get_base_layer().weight.shape))
    return Adapter(weights)


def _base(folder, state) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    save_file(state, folder / "model.safetensors")


def _merge(base_folder, adapters, out, *, mode="weighted", factors=None):
    base = open_base(base_folder)
    plan = plan_for(base, adapters, [f"a{i}" for i in range(len(adapters))],
                    factors or [1.0] * len(adapters), mode=mode, dtype="keep")
    execute(plan, out)
    return plan, load_file(out / "model.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_engine_merge_equals_peft(kind, dtype, tmp_path):
    peft_model, config, state = _peft(kind, dtype)
    adapter = _adapter(kind, peft_model, config)
    assert set(adapter.weights) == {f"{t}.weight" for t in TARGETS}
    assert all(not deltas.exactly_low_rank(w) for w in adapter.weights.values())
    _base(tmp_path / "base", state)
    _, merged = _merge(tmp_path / "base", [adapter], tmp_path / "out")
    reference = peft_model.merge_and_unload().state_dict()
    for name, tensor in merged.items():
        assert tensor.dtype == dtype
        assert torch.equal(tensor, reference[name]), name       # bit for bit
    changed = [n for n in merged if not torch.equal(merged[n], state[n])]
    assert sorted(changed) == sorted(adapter.weights)


def test_weighted_mix_of_kinds_and_the_validator(tmp_path):
    """LoHa at 0.5 plus LoRA at -1.0 on the same tensors: W + 0.5 d1 - 1.0 d2 in fp32; the
    validator's float64 reference agrees and flags a wrong output."""
    from adaptertools.validation.merged import Settings, check_plan

    loha_model, loha_config, state = _peft("loha", torch.float32)
    lora_model, lora_config, _ = _peft("lora", torch.float32, seed=5)
    adapters = [_adapter("loha", loha_model, loha_config), _adapter("lora", lora_model, lora_config)]
    _base(tmp_path / "base", state)
    plan, merged = _merge(tmp_path / "base", adapters, tmp_path / "out", factors=[0.5, -1.0])
    for name in ("lin.weight", "out.weight"):
        expected = state[name].double() + 0.5 * deltas.delta(adapters[0].weights[name],
                                                              torch.float64) \
            - deltas.delta(adapters[1].weights[name], torch.float64)
        error = (merged[name].double() - expected).norm() / (expected - state[name]).norm()
        assert error < 1e-6, name
    report = check_plan(plan, open_base(tmp_path / "out"), stacked=False, settings=Settings())
    assert report["passed"], [r for r in report["tensors"] if not r["passed"]]
    assert report["adapted"] == 3
    merged["c2.weight"] = state["c2.weight"]          # the LoHa on the conv left out
    save_file(merged, tmp_path / "out" / "model.safetensors")
    report = check_plan(plan, open_base(tmp_path / "out"), stacked=False, settings=Settings())
    assert [r["name"] for r in report["tensors"] if not r["passed"]] == ["c2.weight"]


def test_protocol_norms_and_rows():
    loha_model, config, _ = _peft("loha", torch.float32)
    lokr_model, lokr_config, _ = _peft("lokr", torch.float32)
    lora_model, lora_config, _ = _peft("lora", torch.float32)
    for kind, model, cfg in (("loha", loha_model, config), ("lokr", lokr_model, lokr_config),
                             ("lora", lora_model, lora_config)):
        for name, w in _adapter(kind, model, cfg).weights.items():
            dense = deltas.delta(w, torch.float64, 0.5)
            assert dense.shape == w.shape
            assert deltas.norm(w, 0.5) == pytest.approx(float(dense.norm()), rel=1e-6), name
            rows = deltas.delta_rows(w, 3, 17, torch.float64, 0.5)
            assert torch.allclose(rows, dense[3:17], rtol=1e-12, atol=1e-12), name
            assert deltas.kind(w).name == kind
            assert deltas.exactly_low_rank(w) == (kind == "lora")
            # what a device move does (kernels/folding.py): every tensor of every kind mapped
            moved = map_tensors(w, lambda t: t.double())
            assert all(t.dtype == torch.float64 for t in tensor_fields(moved).values())
            assert torch.equal(deltas.delta(moved, torch.float64, 0.5), dense), name


def test_algebra_takes_other_kinds_by_svd_only():
    """combine: cat refuses a LoHa (not B @ A); svd at full rank gives a LoRA whose delta is the
    LoHa's to fp32 accuracy, and a lower rank keeps less, as reported."""
    from adaptertools.algebra.combine import Options, combine_adapters

    model, config, _ = _peft("loha", torch.float32)
    adapter = _adapter("loha", model, config)
    with pytest.raises(UnsupportedError, match=r"one is a loha delta .*--method svd"):
        combine_adapters([adapter], ["one"], Options(method="cat", weights=(1.0,)))
    full, results, _ = combine_adapters([adapter], ["one"],
                                        Options(method="svd", weights=(1.0,), rank=9))
    for name, w in adapter.weights.items():
        lora = full.weights[name]
        assert isinstance(lora, LoraWeight) and lora.stored_shape == w.stored_shape
        expected = deltas.delta(w, torch.float64)
        got = deltas.delta(lora, torch.float64)
        assert float((got - expected).norm() / expected.norm()) < 1e-5, name
    low, low_results, _ = combine_adapters([adapter], ["one"],
                                           Options(method="svd", weights=(1.0,), rank=2))
    for r_full, r_low in zip(results, low_results):
        assert r_low.rank == 2 and r_low.error > r_full.error
