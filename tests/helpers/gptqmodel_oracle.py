"""Run by the GPTQModel oracle environment's own python (helpers/gptqmodel_env.py), not imported
by the tests: quantizes tiny HF folders with GPTQModel 7.7 and reads checkpoints back with its
own loader, on the CPU.

    python gptqmodel_oracle.py SPECS.json

SPECS.json is a list of jobs, each one of

  {"op": "quantize", "float": DIR, "out": DIR, "method": "gptq" | "awq", "bits": 4,
   "group_size": 32, "desc_act": false, "sym": true, "format": "gptq" | "gptq_v2" | "gemm"}
      GPTQModel.load(float, QuantizeConfig(...)).quantize(8 seeded random sequences of 32
      ids).save(out): GPTQ (Hessian-based, act-order when desc_act) or AWQ, as the library does.
  {"op": "dequantize", "folder": DIR, "out": FILE}
      GPTQModel.load(folder, backend=TORCH / AWQ_TORCH, device="cpu") (its v1 -> v2 zero
      conversion included); every quantized module's weight as the library dequantizes it
      (GPTQ: ``dequantize_weight()``, AWQ: ``dequantize_gemm``), transposed to (out, in) and
      saved to FILE under ``X.weight``: loaded in the scales' dtype, which it computes in.
  {"op": "logits", "folder": DIR, "ids": [[...]], "out": FILE}
      the loaded model's logits (float32) on ``ids``, saved to FILE as "logits".
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def quantize(job: dict) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    args = {"bits": job["bits"], "group_size": job["group_size"]}
    if job["method"] == "awq":
        config = QuantizeConfig(**args, quant_method=METHOD.AWQ, format=FORMAT.GEMM)
    else:
        # act_group_aware (GAR) off: plain GPTQ (it needs groups, and desc_act turns it off)
        config = QuantizeConfig(**args, desc_act=job["desc_act"], sym=job["sym"],
                                format=FORMAT(job["format"]), act_group_aware=False)
    gen = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": torch.randint(0, 128, (1, 32), generator=gen),
                    "attention_mask": torch.ones(1, 32, dtype=torch.long)} for _ in range(8)]
    model = GPTQModel.load(job["float"], config, device="cpu")
    model.quantize(calibration, batch_size=1)
    model.save(job["out"])


def load(folder: str):
    from gptqmodel import BACKEND, GPTQModel
    from safetensors import safe_open

    method = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]["quant_method"]
    backend = BACKEND.AWQ_TORCH if method == "awq" else BACKEND.TORCH
    # in the scales' dtype (GPTQ F16, GPTQModel's AWQ BF16): loaded in another dtype (the
    # other tensors' BF16, say) the modules cast their scales to it
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        scales = next(k for k in f.keys() if k.endswith(".scales"))  # noqa: SIM118 (no __iter__)
        dtype = f.get_slice(scales).get_dtype()
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[dtype]
    return GPTQModel.load(folder, backend=backend, device="cpu", dtype=dtype), method


def dequantize(job: dict) -> None:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    model, method = load(job["folder"])
    out = {}
    for name, module in model.model.named_modules():
        if not isinstance(module, BaseQuantLinear):
            continue
        with torch.no_grad():
            if method == "awq":
                weight = dequantize_gemm(module.qweight, module.qzeros, module.scales,
                                         module.bits, module.group_size)
            else:
                weight = module.dequantize_weight()
        out[name + ".weight"] = weight.T.contiguous()
    assert out, f"no quantized modules in {job['folder']}"
    save_file(out, job["out"])


def logits(job: dict) -> None:
    model, _ = load(job["folder"])
    with torch.no_grad():
        result = model.model(torch.tensor(job["ids"])).logits.float()
    save_file({"logits": result.contiguous()}, job["out"])


if __name__ == "__main__":
    torch.manual_seed(0)
    for spec in json.loads(Path(sys.argv[1]).read_text()):
        {"quantize": quantize, "dequantize": dequantize, "logits": logits}[spec["op"]](spec)
