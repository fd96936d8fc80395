"""Conv LoRA merges: bit-identical to PEFT's ``merge_and_unload``, which builds a conv delta with a
convolution (``conv(A^T, B)^T``) and a 1x1 Conv2d delta with a matmul."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptertools as at

from helpers.peft_adapters import perturb_trainables


class PointwiseNet(torch.nn.Module):
    """A 1x1 Conv2d (PEFT's matmul branch) beside a 3x3 Conv2d and a Conv1d (its conv branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.point = torch.nn.Conv2d(3, 6, kernel_size=1)
        self.square = torch.nn.Conv2d(6, 8, kernel_size=3, padding=1)
        self.line = torch.nn.Conv1d(8, 5, kernel_size=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:    # x (batch, 3, 9, 9)
        return self.line(self.square(self.point(x)).mean(dim=-1))


CASES = {
    "lora": dict(r=3, lora_alpha=6, target_modules=["point", "square", "line"]),
    "rslora": dict(r=4, lora_alpha=3, use_rslora=True, target_modules=["point", "square", "line"]),
    "dora": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["point", "square", "line"]),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_conv_merge_is_bit_identical_to_peft(tmp_path, case, dtype):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = PointwiseNet().to(DTYPES[dtype]).eval()
    base = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    peft_model = get_peft_model(model, LoraConfig(**CASES[case]))
    perturb_trainables(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()

    report = at.merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "out")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    assert ours.keys() == expected.keys()
    for key, tensor in ours.items():
        assert tensor.dtype == expected[key].dtype, key
        assert torch.equal(tensor, expected[key]), \
            f"{key}: {int((tensor != expected[key]).sum())} of {tensor.numel()} elements differ"
    changed = {k for k in ours if not torch.equal(ours[k], base[k])}
    assert changed == {"point.weight", "square.weight", "line.weight"}
    assert changed == {c["name"] for c in report["changed"]}


def test_conv_delta_is_the_matmul_up_to_rounding():
    """The convolution route computes B @ A per kernel tap: equal to the float64 product."""
    from adaptertools.adapter import LoraWeight
    from adaptertools.kernels.reference import lora_delta

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 6 * 9, generator=gen), torch.randn(8, 3, generator=gen)
    w = LoraWeight(a=a, b=b, scale=0.5, layer="conv", weight_shape=(8, 6, 3, 3))
    exact = (b.double() @ a.double()) * 0.5
    assert torch.allclose(lora_delta(w).double(), exact, rtol=1e-5, atol=1e-6)
