"""Tiny quantized HF checkpoints built in code by the quantization libraries themselves, and the
float64 references a merge into them is checked against.

``fp8_block_base``: a seeded Llama whose ``*_proj`` weights are stored as DeepSeek-V3-style block
FP8 (F8_E4M3 ``weight`` + F32 ``weight_scale_inv`` per block), quantized by transformers' own
``Fp8Quantize`` where the block size divides the weight and by ``codecs.fp8.quantize`` (the same
arithmetic, extended to ragged edge blocks) where it does not, which transformers leaves
unquantized.
"""

from __future__ import annotations

import json
import struct
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

PROJ = "proj.weight"
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [128, 128]}


def tiny_llama(*, hidden: int = 256, intermediate: int = 384, seed: int = 2025):
    """A 2-layer Llama, float32, eval mode (head dim 64, 2 KV heads)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=2, num_attention_heads=hidden // 64,
                                      num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def transformers_fp8_quantize(weight: torch.Tensor, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """transformers' ``Fp8Quantize`` of one weight: {"weight": F8_E4M3, "weight_scale_inv": F32},
    or {"weight": unchanged} where ``block`` does not divide it."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    hq = types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=block))
    return Fp8Quantize(hq)._quantize_one("weight", weight)


def transformers_fp8_dequantize(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """transformers' CPU dequantization (``Fp8Dequantize``, what ``dequantize=True`` loads), fp32."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    hq = types.SimpleNamespace(quantization_config=FineGrainedFP8Config())
    return Fp8Dequantize(hq)._dequantize_one(q, scale_inv, output_dtype=torch.float32)


def fp8_block_base(model, folder: Path, *, block: tuple[int, int] = (128, 128)) -> dict[str, torch.Tensor]:
    """``model`` saved as a block-FP8 checkpoint in ``folder``; returns its weights as the
    checkpoint stands for them (quantized ones dequantized), float32, by name."""
    from adaptertools.codecs import fp8

    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {**FP8_CONFIG, "weight_block_size": list(block)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    stored, decoded = {}, {}
    for name, t in model.state_dict().items():
        t = t.detach().float().contiguous()
        if not name.endswith(PROJ):
            stored[name] = decoded[name] = t
            continue
        parts = transformers_fp8_quantize(t, block)
        if "weight_scale_inv" not in parts:            # ragged: transformers leaves it as is
            q, s = fp8.quantize(t, block)
            parts = {"weight": q, "weight_scale_inv": s}
        stored[name], stored[name + "_scale_inv"] = parts["weight"], parts["weight_scale_inv"]
        decoded[name] = fp8.dequantize(parts["weight"], parts["weight_scale_inv"], block)
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    return decoded


def raw_tensors(folder: Path) -> dict[str, bytes]:
    """Each stored tensor's bytes, read from ``folder``'s model.safetensors itself (header
    order)."""
    data = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return {k: data[8 + n + v["data_offsets"][0]: 8 + n + v["data_offsets"][1]]
            for k, v in header.items()}


def damaged_copy(src: Path, dst: Path, change=None, config=None) -> Path:
    """A copy of the checkpoint folder ``src`` in ``dst``: ``change(state_dict)`` edits its
    tensors, ``config(quantization_config)`` its config.json's quantization_config."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    if change is not None:
        sd = load_file(src / "model.safetensors")
        change(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        config(data["quantization_config"])
        (dst / "config.json").write_text(json.dumps(data))
    return dst


def logits(model) -> torch.Tensor:
    """float64 logits of a tiny (vocabulary 128) model on two seeded sequences of 11 ids."""
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits.double()


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def within_one_rounding(stored: torch.Tensor, ref: torch.Tensor, ulp: float = 2.0 ** -7) -> bool:
    """Every value of ``stored`` within one spacing of its format (``ulp`` in [1, 2): bf16's
    2^-7) of the float64 ``ref``, the spacing taken at ref's binade."""
    err = (stored.double() - ref).abs()
    binade = torch.exp2(torch.floor(torch.log2(ref.abs().clamp(min=2.0 ** -126))))
    return bool((err <= ulp * binade).all())


def scaled_lora(model, base: dict[str, torch.Tensor], folder: Path, *, targets, rel: float,
                rank: int = 8, seed: int = 7, zero: bool = False) -> dict[str, torch.Tensor]:
    """A PEFT LoRA on ``model`` whose every delta has ||delta|| / ||W|| = ``rel`` against
    ``base`` (``zero``: lora_B = 0), saved in ``folder``; the float64 deltas by base tensor name."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                  target_modules=list(targets),
                                                  init_lora_weights=False))
    gen, deltas = torch.Generator().manual_seed(seed), {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not (hasattr(module, "lora_A") and "default" in module.lora_A):
                continue
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=gen))
            b.copy_(torch.randn(b.shape, generator=gen))
            key = name.removeprefix("base_model.model.") + ".weight"
            delta = module.scaling["default"] * (b.double() @ a.double())
            ratio = 0.0 if zero else float(rel * base[key].double().norm() / delta.norm())
            b.mul_(ratio)
            deltas[key] = module.scaling["default"] * (b.double() @ a.double())
    peft_model.save_pretrained(folder)
    return deltas


# ----------------------------------------------------------------------------- compressed-tensors

def _ct_min_max(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scale min and max of ``w`` (rows, cols), as llm-compressor's memoryless min-max
    observer reduces them for each strategy."""
    strategy = args.strategy.value if hasattr(args.strategy, "value") else args.strategy
    if strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if strategy == "channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if strategy == "group":
        g = w.unflatten(-1, (w.shape[1] // args.group_size, args.group_size))
        return g.amin(dim=-1), g.amax(dim=-1)
    bh, bw = args.block_structure
    rows, cols = -(-w.shape[0] // bh), -(-w.shape[1] // bw)
    p = torch.nn.functional.pad(w, (0, cols * bw - w.shape[1], 0, rows * bh - w.shape[0]))
    b = p.reshape(rows, bh, cols, bw)
    return b.amin(dim=(1, 3)), b.amax(dim=(1, 3))


def ct_base(model, folder: Path, fmt: str, weights: dict, activations: dict | None = None,
            targets=("Linear",)) -> dict[str, torch.Tensor]:
    """``model`` compressed by compressed-tensors itself (scales from a min-max observer via its
    ``calculate_qparams``, then ``ModelCompressor.compress_model`` and its ``update_config``)
    and saved in ``folder``; returns the checkpoint's weights as compressed-tensors decompresses
    them (its own compressor's ``decompress``), float32, by name."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    act = QuantizationArgs(**activations) if activations else None
    scheme = QuantizationScheme(targets=list(targets), weights=QuantizationArgs(**weights),
                                input_activations=act)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format=fmt)
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                args = module.quantization_scheme.weights
                scale, zero = calculate_qparams(*_ct_min_max(module.weight.detach(), args), args)
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.copy_(zero.reshape(module.weight_zero_point.shape))
                if hasattr(module, "input_scale"):            # static activations: a fixed one
                    module.input_scale.fill_(0.02)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.config.save_pretrained(folder)
    compressor.update_config(folder)
    stored = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    return ct_decompress(stored, compressor.quantization_config)


def ct_decompress(stored: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Every weight of a compressed state dict as compressed-tensors' own compressor for the
    config group's format decompresses it (fp32); other tensors as stored (fp32)."""
    from compressed_tensors.compressors import BaseCompressor

    (scheme,) = config.config_groups.values()
    fmt = scheme.format.value if hasattr(scheme.format, "value") else (scheme.format or config.format)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    prefixes = {k.removesuffix(".weight_scale") for k in stored if k.endswith(".weight_scale")}
    out = {}
    for name, t in stored.items():
        prefix = name.rsplit(".", 1)[0]
        if prefix not in prefixes:
            out[name] = t.float()
    for prefix in prefixes:
        local = {k[len(prefix) + 1:]: v for k, v in stored.items() if k.startswith(prefix + ".")}
        out[prefix + ".weight"] = compressor.decompress(local, scheme)["weight"].float()
    return out


# ----------------------------------------------------------------------------- MXFP4 (gpt-oss)

MXFP4_CONFIG = {"quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"]}
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def tiny_gpt_oss(*, hidden: int = 64, intermediate: int = 96, experts: int = 4, seed: int = 2025):
    """A 2-layer gpt-oss (sliding + full attention, 4 experts, top 2), float32, eval mode: expert
    parameters gate_up_proj (E, 64, 192) and down_proj (E, 96, 64), both blocked by 32 along
    their input features (transformers' MXFP4 layout)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GptOssConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=experts,
        num_experts_per_tok=2, vocab_size=128, max_position_embeddings=64, sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():                 # transformers leaves the experts at torch.empty
        for name, p in model.named_parameters():
            if name.endswith(EXPERTS) or name.endswith(tuple(e + "_bias" for e in EXPERTS)):
                p.normal_(0.0, 0.05)
    return model


def round_up_exponents(values: torch.Tensor) -> torch.Tensor:
    """Another quantizer's scales: the OCP exponent, plus one where the block's amax would
    saturate e2m1 (amax / 2^s > 6), as triton_kernels' ROUND_UP scale mode avoids clipping;
    (E, rows, G) int32 for ``values`` (E, cols, rows)."""
    from adaptertools.codecs import mxfp4

    amax = mxfp4._as_blocks(values).abs().amax(dim=-1)
    exponent = mxfp4.ocp_exponents(amax)
    return exponent + (torch.ldexp(amax, -exponent) > 6).to(torch.int32)


def mxfp4_base(model, folder: Path, *, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """``model`` saved as a gpt-oss MXFP4 checkpoint in ``folder``: expert parameters as
    ``X_blocks`` / ``X_scales`` (our encoder with ``round_up_exponents``' scales: blocks a
    recomputed OCP scale would encode differently), the rest in ``dtype`` as gpt-oss ships
    them; returns the checkpoint's weights as transformers dequantizes them (float32, experts
    under their float names)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from adaptertools.codecs import mxfp4

    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = dict(MXFP4_CONFIG)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    stored, decoded = {}, {}
    for name, t in model.state_dict().items():
        t = t.detach().float().contiguous()
        if not name.endswith(EXPERTS):
            stored[name] = t.to(dtype)
            decoded[name] = stored[name].float()
            continue
        blocks, scales = mxfp4.quantize(t, round_up_exponents(t))
        stored[name + "_blocks"], stored[name + "_scales"] = blocks, scales
        decoded[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    return decoded
