"""Against the real PEFT: what we read means what PEFT means, and PEFT loads what we write."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

import adaptertools as at
from adaptertools.adapter import Adapter, LoraWeight
from adaptertools.errors import AdapterToolsWarning, UnsupportedError
from adaptertools.formats.peft import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from adaptertools.kernels.reference import apply_lora, apply_lora_bias
from adaptertools.tiny import TinyLlama, make_adapter

from helpers.models import make_model, model_output
from helpers.peft_adapters import PEFT_CASES, load_with_peft

CASES = sorted(PEFT_CASES)


def saved_state(folder):
    if (folder / WEIGHTS_NAME).exists():
        return load_file(folder / WEIGHTS_NAME)
    return torch.load(folder / LEGACY_WEIGHTS_NAME, weights_only=True)


@pytest.mark.parametrize("name", CASES)
def test_read_delta_matches_peft_merge(peft_cases, name):
    """Our LoraWeight applied by the reference fold gives PEFT's own merge_and_unload weights."""
    case = peft_cases[name]
    adapter = at.load(case.folder)
    assert adapter.weights, "no LoRA tensors read"
    for tensor_name, w in adapter.weights.items():
        original = adapter.replacements.get(tensor_name, case.base_state[tensor_name])
        ours = apply_lora(original, w)
        # fp32 on both sides; only the accumulation order may differ
        torch.testing.assert_close(ours, case.merged_state[tensor_name], rtol=1e-5, atol=1e-6)
        assert not torch.equal(ours, original), f"{tensor_name}: delta is zero"
        if w.bias is not None:
            bias_name = tensor_name[: -len("weight")] + "bias"
            torch.testing.assert_close(apply_lora_bias(case.base_state[bias_name], w),
                                       case.merged_state[bias_name], rtol=1e-6, atol=1e-7)
    for tensor_name, tensor in adapter.replacements.items():
        if tensor_name not in adapter.weights:  # modules_to_save: merging replaces the tensor
            assert torch.equal(tensor, case.merged_state[tensor_name])


@pytest.mark.parametrize("via", ["peft", "safetensors"])
@pytest.mark.parametrize("name", CASES)
def test_peft_loads_what_we_write(peft_cases, name, via, tmp_path):
    """PEFT -> ours (-> raw safetensors) -> PEFT: bit-exact tensors and identical outputs."""
    case = peft_cases[name]
    out = tmp_path / "out"
    if via == "peft":
        at.convert(case.folder, out, to="peft")
    else:
        at.convert(case.folder, tmp_path / "adapter.safetensors", to="safetensors")
        at.convert(tmp_path / "adapter.safetensors", out, to="peft")

    original, written = saved_state(case.folder), load_file(out / WEIGHTS_NAME)
    assert written.keys() == original.keys()
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    assert json.loads((out / CONFIG_NAME).read_text()) == \
        json.loads((case.folder / CONFIG_NAME).read_text())

    reloaded = model_output(load_with_peft(out, case.kind), case.kind)
    assert torch.equal(reloaded, case.reference)


def test_named_subfolder_is_found_from_parent(peft_cases):
    case = peft_cases["named_subfolder"]
    assert case.folder.name == "mine"
    from_parent, direct = at.load(case.folder.parent), at.load(case.folder)
    assert from_parent.weights.keys() == direct.weights.keys()


def test_base_modifying_init_warns_loudly(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"],
                                                           init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "pissa")
    with pytest.warns(AdapterToolsWarning, match="pissa"):
        at.load(tmp_path / "pissa")
    with pytest.warns(AdapterToolsWarning):
        report = at.inspect(tmp_path / "pissa")
    assert any("pissa" in p for p in report["problems"])


def _other_peft_configs():
    from peft import (AdaLoraConfig, IA3Config, OFTConfig,
                      VeraConfig)

    targets = ["q_proj", "o_proj"]
    return {
        "IA3": IA3Config(target_modules=targets, feedforward_modules=[]),
        "VERA": VeraConfig(r=2, target_modules=targets),
        "OFT": OFTConfig(r=4, oft_block_size=0, target_modules=targets),
        "ADALORA": AdaLoraConfig(init_r=2, target_r=1, total_step=10, target_modules=targets),
    }


@pytest.mark.parametrize("peft_type", ["IA3", "VERA", "OFT", "ADALORA"])    # LoHa, LoKr: read
def test_other_peft_types_are_refused_clearly(peft_type, tmp_path):
    from peft import get_peft_model

    config = _other_peft_configs()[peft_type]
    get_peft_model(make_model("llama"), config).save_pretrained(tmp_path / "a")
    with pytest.raises(UnsupportedError, match=f"not supported yet: {peft_type}"):
        at.load(tmp_path / "a")


def test_written_config_resolves_to_our_exact_scales(tmp_path):
    """Mixed ranks and awkward per-tensor scales: PEFT's own resolution gives them back exactly."""
    import transformers
    from peft import PeftModel

    spec = TinyLlama(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=96)
    adapter = make_adapter(spec, rank=4, alpha=8)
    rng = random.Random(5)
    weights = {}
    for i, (name, w) in enumerate(sorted(adapter.weights.items())):
        rank = (2, 4, 6)[i % 3]
        weights[name] = LoraWeight(a=torch.randn(rank, w.a.shape[1]) * 0.1,
                                   b=torch.randn(w.b.shape[0], rank) * 0.1,
                                   scale=rng.choice([2.0, 0.1 * (i + 1), rng.uniform(0.01, 9)]))
    ours = Adapter(weights=weights)
    at.save(ours, tmp_path / "a", format="peft")

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec.config())).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    seen = 0
    for module_name, module in peft_model.base_model.model.named_modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            assert module.scaling["default"] == weights[module_name + ".weight"].scale, module_name
            seen += 1
    assert seen == len(weights)

    ids = torch.randint(0, spec.vocab, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unmerged = peft_model(ids).logits
    merged_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec.config())).eval()
    merged_state = dict(base_state)
    for name, w in weights.items():
        merged_state[name] = apply_lora(base_state[name], w)
    merged_model.load_state_dict(merged_state)
    with torch.no_grad():
        merged = merged_model(ids).logits
    # fp32 merged vs unmerged: relative L2 at the fp32 noise floor (FORMATS.md: ~1e-6)
    assert (merged - unmerged).norm() / unmerged.norm() < 1e-5
