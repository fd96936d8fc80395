"""PEFT LoRA on nn.MultiheadAttention (formats/peft_mha.py) with PEFT 0.21.2 as the producer:
in_proj's and out_proj's factors placed on the base's own ``in_proj_weight`` and
``out_proj.weight``; out_proj's delta counted twice, as PEFT's layer computes it; the merge
checked against PEFT's unmerged model and its merge_and_unload; writers refuse it."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers.cli import run_cli, stderr_lines
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.errors import AdapterToolsWarning


class AttentionNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(64, 4, batch_first=True)
        self.head = torch.nn.Linear(64, 8)

    def forward(self, x):                      # x (batch, seq, 64)
        return self.head(self.mha(x, x, x)[0])


def _case(tmp_path, dtype):
    torch.manual_seed(0)
    model = AttentionNet().to(dtype)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base / "model.safetensors")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["mha", "head"],
                                                  init_lora_weights=False)).eval()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        unmerged = peft_model(x)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return base, tmp_path / "adapter", x, unmerged, merged


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of ``t``'s dtype at each of its values."""
    exponent = torch.frexp(t.float().abs().clamp_min(torch.finfo(t.dtype).tiny))[1]
    # t = m 2^e with m in [0.5, 1): its spacing is eps 2^(e - 1)
    return torch.finfo(t.dtype).eps * torch.exp2((exponent - 1).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_computes_what_peft_computed(tmp_path, dtype):
    base, adapter, x, unmerged, peft_merged = _case(tmp_path, dtype)
    with pytest.warns(AdapterToolsWarning, match="applies out_proj's delta twice"):
        read = at.load(adapter)
    assert set(read.weights) == {"mha.in_proj_weight", "mha.out_proj.weight", "head.weight"}
    assert read.weights["mha.out_proj.weight"].scale == 2 * read.weights["mha.in_proj_weight"].scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdapterToolsWarning)
        at.merge(base, adapter, out=tmp_path / "merged")
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    # a plain Linear LoRA, and everything untouched: PEFT's bits
    for name in ("head.weight", "head.bias", "mha.in_proj_bias", "mha.out_proj.bias"):
        assert torch.equal(ours[name], peft_merged[name]), name
    # the attention weights: PEFT rounds its merge more than once (in_proj: the delta to the
    # stored dtype, then the sum; out_proj: that, twice), ours once. Each rounding errs by at
    # most half a unit in the last place of a value no larger than |W| + |D| (D the whole
    # delta), so the two differ by at most (4 + 1) / 2 such units
    stored = load_file(base / "model.safetensors")
    for name in ("mha.in_proj_weight", "mha.out_proj.weight"):
        w = stored[name].float()
        scale = w.abs() + (ours[name].float() - w).abs()
        gap = (ours[name].float() - peft_merged[name].float()).abs()
        assert bool((gap <= 2.5 * _ulp(scale.to(dtype))).all()), name
    if dtype == torch.float32:
        assert torch.equal(ours["mha.in_proj_weight"], peft_merged["mha.in_proj_weight"])
        model = AttentionNet()
        model.load_state_dict(ours)
        with torch.no_grad():
            # what PEFT's unmerged model computes (a single out_proj delta is 1.2 off here)
            assert (model(x) - unmerged).abs().max() < 1e-5


def test_writers_refuse_it(tmp_path):
    _, adapter, *_ = _case(tmp_path, torch.float32)
    out = tmp_path / "out"
    outcome = run_cli("convert", adapter, out, "--to", "peft")
    errors = [line for line in stderr_lines(outcome) if line.startswith("error:")]
    assert outcome.code == 1 and len(errors) == 1
    assert all(f in errors[0] for f in ("mha", "nn.MultiheadAttention", "merge the adapter"))
    assert not out.exists()
    shown = run_cli("inspect", adapter, expect=0).stdout
    assert "in_proj_weight" in shown or "mha" in shown
