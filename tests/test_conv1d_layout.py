"""A GPT-2 adapter whose adapter_config.json says fan_in_fan_out=false is still merged the way
PEFT merges it: PEFT decides the layout per layer (GPT-2 Conv1D on, Linear off) and saves
whichever value it set last, so targeting c_proj AND lm_head saves false. Before, a square
Conv1D (attn.c_proj) was then merged transposed with exit 0, and a non-square one was refused
as "for another model"; now every tensor is bit-identical to PEFT's merge_and_unload, with a
warning saying the config's flag was overridden."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import adaptertools as at


def gpt2(tmp_path):
    import transformers

    torch.manual_seed(3)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64,
                                     n_positions=32, bos_token_id=0, eos_token_id=0,
                                     tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "base")
    return model


@pytest.mark.parametrize("targets", [["attn.c_proj", "lm_head"], ["c_proj", "lm_head"],
                                     ["c_attn", "c_fc", "lm_head"], ["c_attn"]])
def test_layout_follows_the_base_layer_as_in_peft(tmp_path, targets):
    from peft import LoraConfig, get_peft_model

    model = gpt2(tmp_path)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets,
                                                  init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    saved_flag = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "fan_in_fan_out"]
    expected = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    report = at.merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    changed = [k for k in merged if not torch.equal(merged[k], expected[k])]
    assert changed == [], changed
    relaid = [w for w in report["warnings"] if "fan_in_fan_out" in w]
    assert bool(relaid) == ("lm_head" in targets and saved_flag is False), report["warnings"]
    assert at.validate(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "out")["passed"]


def test_gguf_conversion_lays_conv1d_out_as_peft_does(tmp_path):
    """The same adapter (fan_in_fan_out saved false) through GGUF and back, merged: PEFT's bits."""
    from peft import LoraConfig, get_peft_model

    model = gpt2(tmp_path)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["attn.c_proj", "c_fc"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = False           # as PEFT saves it when lm_head is targeted too
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    expected = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    at.convert(tmp_path / "adapter", tmp_path / "a.gguf", to="gguf", base=tmp_path / "base")
    at.merge(tmp_path / "base", [tmp_path / "a.gguf"], tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert [k for k in merged if not torch.equal(merged[k], expected[k])] == []
