"""PEFT's BD-LoRA (use_bdlora, block-diagonal lora_A or lora_B) with PEFT 0.21.2 as producer and
consumer: read as the plain LoRA of its whole factors, merged bit-identical to PEFT's merge in
fp32 (and within one rounding of the stored dtype in bf16, where PEFT rounds the delta first),
converted to a plain PEFT LoRA that PEFT merges the same, and a factor that is not the config's
blocks refused."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.cli import assert_cli_error, run_cli
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import BdLoraConfig
from safetensors.torch import load_file, save_file

import adaptertools as at

transformers = pytest.importorskip("transformers")


def _case(tmp_path, dtype):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(dtype).save_pretrained(tmp_path / "base")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)
    bd = BdLoraConfig(target_modules_bd_a=["q_proj", "v_proj"], target_modules_bd_b=["o_proj"],
                      nblocks=2)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_bdlora=bd,
                                                  target_modules=["q_proj", "v_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_((torch.randn(p.shape, generator=gen) * 0.1).to(dtype))
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def _peft_merge(base, adapter, dtype):
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_and_plain_lora_match_peft(tmp_path, dtype):
    base, adapter = _case(tmp_path, dtype)
    read = at.load(adapter)
    q = read.weights["model.layers.0.self_attn.q_proj.weight"]
    assert q.a.shape == (4, 32) and torch.count_nonzero(q.a[:2, 16:]) == 0   # block-diagonal A
    o = read.weights["model.layers.0.self_attn.o_proj.weight"]
    assert o.b.shape == (32, 4) and torch.count_nonzero(o.b[:16, 2:]) == 0   # block-diagonal B
    at.merge(base, adapter, out=tmp_path / "merged")
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    theirs = _peft_merge(base, adapter, dtype)
    source = load_file(base / "model.safetensors")
    for name, tensor in ours.items():
        if dtype == torch.float32 or name not in read.weights:
            assert torch.equal(tensor, theirs[name]), name
        else:     # PEFT rounds the delta to bf16 before adding it: one more rounding than ours
            spacing = torch.finfo(dtype).eps * torch.maximum(tensor.abs(), source[name].abs())
            assert bool(((tensor.float() - theirs[name].float()).abs()
                         <= 1.5 * spacing.float() + 1e-30).all()), name
    # as a plain LoRA (use_bdlora dropped), PEFT merges our conversion as it merged the original
    at.convert(adapter, tmp_path / "plain", to="peft")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config.get("use_bdlora") is None
    again = _peft_merge(base, tmp_path / "plain", dtype)
    if dtype == torch.float32:
        assert all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_a_factor_that_is_not_the_configs_blocks_is_refused(tmp_path):
    _, adapter = _case(tmp_path, torch.float32)
    weights = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    weights[key] = weights[key][:3]                      # 3 rows: not 2 blocks
    save_file(weights, adapter / "adapter_model.safetensors")
    assert_cli_error(run_cli("inspect", adapter), ["q_proj.lora_A", "2 diagonal blocks",
                                                   "use_bdlora.nblocks"])
