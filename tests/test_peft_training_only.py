"""VeLoRA and MonteCLoRA adapters (formats/peft_training_only.py) with PEFT 0.21.2 as producer
and consumer: their training-only tensors set aside with a warning, the rest merged
bit-identical to PEFT's merge_and_unload and to its evaluation forward, and written back as a
plain LoRA that PEFT merges the same."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.models import make_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import adaptertools as at
from adaptertools.errors import AdapterToolsWarning

VARIANTS = {"velora": ("VeLoRA", {"velora_config": {"num_groups": 4}}),
            "monteclora": ("MonteCLoRA", {"monteclora_config": {}})}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_read_as_the_plain_lora_peft_merges(tmp_path, name):
    label, extra = VARIANTS[name]
    model = make_model("llama")
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj"], init_lora_weights=False, **extra)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" not in k and "lora_B" not in k for k in saved)   # the extra tensors
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        unmerged = peft_model(ids).logits
    theirs = peft_model.merge_and_unload().state_dict()

    with pytest.warns(AdapterToolsWarning, match=f"a {label} adapter.*plain LoRA"):
        at.merge(tmp_path / "base", tmp_path / "adapter", out=tmp_path / "merged")
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    merged_model = type(model).from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged_model(ids).logits - unmerged).abs().max() < 1e-5

    with pytest.warns(AdapterToolsWarning):
        at.convert(tmp_path / "adapter", tmp_path / "plain", to="peft")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config.get(next(iter(extra))) is None
    again = PeftModel.from_pretrained(type(model).from_pretrained(tmp_path / "base"),
                                      tmp_path / "plain").merge_and_unload().state_dict()
    assert all(torch.equal(again[k], theirs[k]) for k in theirs)
