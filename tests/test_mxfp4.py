"""Merging into gpt-oss MXFP4 checkpoints (codecs/mxfp4.py), checked against transformers' own
MXFP4 integration (``Mxfp4Config(dequantize=True)`` on the CPU, ``convert_moe_packed_tensors``)
and gguf-py's MXFP4 quantizer (ggml's).

The base is a seeded tiny gpt-oss (2 layers, 4 experts, hidden 64, intermediate 96) whose
expert parameters gate_up_proj (E, 64, 192) and down_proj (E, 96, 64) are stored as
``X_blocks`` / ``X_scales``, the rest bf16 as gpt-oss ships them. The expert blocks come from
our encoder with another quantizer's scales (the OCP exponent plus one where a block would
saturate, as triton_kernels' ROUND_UP mode does), so some blocks are not what a recomputed OCP
scale gives. The LoRA (r=8 on q_proj, v_proj, o_proj, bf16 weights) has ||delta|| / ||W|| = 2%.

- decode equals transformers' dequantization bit for bit (every byte under every e8m0 scale,
  255 = NaN included) in fp32 and, rounded, its bf16 one; transformers' loader gives our decode;
- encode is the OCP MX v1.0 conversion: equal to a float64 reference written here (scale
  floor(log2 amax) - 2 clamped to e8m0, nearest e2m1 value with ties to even, saturation at 6),
  constructed ties, zeros, saturating and clamped blocks included; and equal in scales and
  values to gguf-py's ``MXFP4.quantize_blocks`` (ggml's quantizer: same scale rule, nearest
  value) on tie-free data; ggml differs only on ties (toward zero) and the sign of zero (shown);
- decode -> encode gives back the stored bytes exactly, although the OCP rule alone re-encodes
  the round-up blocks differently; a changed block alone is requantized;
- a zero adapter gives back the base file byte for byte; keep: experts byte for byte, same size
  and config, transformers loads it with the logits of a float gpt-oss holding our weights;
- --requantize bf16: a plain model (quantization_config, blocks and scales gone; experts
  dequantized, exact in bf16: 3 significant bits times a power of two) that transformers loads;
  adapted attention weights within one bf16 rounding of the float64 reference W + delta;
- bad input (missing scales, scales whose shape is not the blocks', orphaned scales, blocks of
  another dtype, a parameter stored both as blocks and as floats): one line naming the tensor, exit 1, nothing written, through the CLI;
- a PEFT ``target_parameters`` LoRA on the experts (2%), merged keeping MXFP4: each expert
  tensor is our encoder's bytes of PEFT's own fp32 ``merge_and_unload`` of the decoded base,
  unchanged blocks kept; transformers loads it with the logits of a float gpt-oss holding our
  decoded weights; survival about 0.07 (10%: 0.63) and the warning names --requantize bf16;
  --requantize bf16 is PEFT's fp32 merge rounded once to bf16, exactly; an adapter for 8
  experts is refused with one line (skipped while adaptertools cannot read such adapters);
- adaptertools.validate passes every keep and bf16 merge above and names a flipped expert byte;
- a base sharded with the scales in the first file and the blocks in the second merges to the
  same tensors as the single file.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.cli import assert_cli_error, assert_nothing_written, run_cli
from helpers.quantized_bases import (
    damaged_copy,
    logits,
    mxfp4_base,
    raw_tensors,
    rel_l2,
    round_up_exponents,
    scaled_lora,
    tiny_gpt_oss,
    within_one_rounding,
)
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.codecs import mxfp4

pytest.importorskip("transformers.integrations.mxfp4")

TARGETS = ["q_proj", "v_proj", "o_proj"]
REL = 0.02
FP32_LOGITS = 1e-5       # relative L2, fp32 compute of a 2-layer model (FORMATS.md: ~1e-6)
GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    decoded = mxfp4_base(tiny_gpt_oss(), root / "base")
    deltas = scaled_lora(tiny_gpt_oss(), decoded, root / "lora", targets=TARGETS, rel=REL)
    scaled_lora(tiny_gpt_oss(), decoded, root / "zero", targets=TARGETS, rel=REL, zero=True)
    return root, decoded, deltas


def mxfp4_config():
    import transformers

    return transformers.Mxfp4Config(dequantize=True)


def load_transformers(folder, **kwargs):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)


def float_gpt_oss(weights: dict[str, torch.Tensor]):
    model = tiny_gpt_oss()
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    return model


def our_decode(folder) -> dict[str, torch.Tensor]:
    """Every weight of an MXFP4 checkpoint as fp32, experts decoded by our codec."""
    sd = load_file(folder / "model.safetensors")
    out = {k: v.float() for k, v in sd.items() if not k.endswith(("_blocks", "_scales"))}
    for name in (k for k in sd if k.endswith("_blocks")):
        out[name.removesuffix("_blocks")] = mxfp4.dequantize(sd[name], sd[mxfp4.scales_name(name)])
    return out


def reference_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The OCP MX conversion in float64, value by value: blocks (n, 32) -> (codes (n, 32) as
    sign << 3 | magnitude index, e8m0 scales (n,))."""
    codes = torch.empty(x.shape, dtype=torch.uint8)
    scales = torch.empty(x.shape[0], dtype=torch.uint8)
    for i, block in enumerate(x.double().tolist()):
        amax = max(abs(v) for v in block)
        s = -127 if amax == 0 else math.frexp(amax)[1] - 1 - 2
        s = min(max(s, -127), 127)
        scales[i] = s + 127
        for j, v in enumerate(block):
            y = abs(v) / 2.0 ** s
            dist = [abs(y - g) for g in GRID]
            best = min(range(8), key=lambda k: (dist[k], k % 2))       # nearest, ties to even
            codes[i, j] = best | (8 if math.copysign(1.0, v) < 0 else 0)
    return codes, scales


def unpack(blocks: torch.Tensor) -> torch.Tensor:
    """U8 (..., 16) -> codes (..., 32): element 2k in the low nibble, 2k + 1 in the high."""
    out = torch.empty(*blocks.shape[:-1], 32, dtype=torch.uint8)
    out[..., 0::2], out[..., 1::2] = blocks & 0x0F, blocks >> 4
    return out


# ----------------------------------------------------------------------------- the codec

def test_decode_is_transformers_bit_for_bit(case):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    # every byte (two codes) in each row of 16 blocks, row r under the e8m0 scale r (255: NaN)
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(16, 16).repeat(2, 256, 1, 1)
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(1, 256, 1).repeat(2, 1, 16)
    ours = mxfp4.dequantize(blocks, scales)
    assert ours.shape == (2, 512, 256)                                     # (E, cols, rows)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    theirs16 = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert torch.equal(ours.to(torch.bfloat16).view(torch.int16), theirs16.view(torch.int16))
    # transformers' own loader (dequantize=True, on the CPU) gives our decode of the base
    root = case[0]
    loaded = load_transformers(root / "base", quantization_config=mxfp4_config()).state_dict()
    ours = our_decode(root / "base")
    assert set(loaded) == set(ours)
    for name, t in ours.items():
        assert torch.equal(loaded[name], t), name


def test_encode_is_the_ocp_conversion():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, 24, generator=gen) * torch.logspace(-3, 1, 24)   # (E, cols, rows)
    x[0, :32, 0] = 0                                                   # all zero: scale 2^-127
    x[0, :32, 1] = -0.0
    x[0, :32, 2] = torch.tensor(GRID * 4) * 2.0 ** -5                  # the grid itself
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 4.0])  # ties (4.0 sets the scale)
    x[0, :32, 3] = torch.cat([mids, -mids, mids, -mids]) * 2.0 ** 3
    x[0, :32, 4] = torch.linspace(-7.9, 7.9, 32) * 2.0 ** 10           # (6, 8): saturates to 6
    x[0, :32, 5] = torch.randn(32, generator=gen) * 2.0 ** -135        # clamped at 2^-127
    x[0, :32, 6] = torch.randn(32, generator=gen) * 1e37
    blocks, scales = mxfp4.quantize(x)
    codes, want_scales = reference_quantize(mxfp4._as_blocks(x).reshape(-1, 32))
    assert torch.equal(scales.reshape(-1), want_scales)
    assert torch.equal(unpack(blocks).reshape(-1, 32), codes)
    assert scales[0, 0, 0] == 0 and scales[0, 5, 0] == 0                 # zero and clamped blocks
    assert set(unpack(blocks)[0, 3, 0].tolist()) >= {0, 2, 4, 6}         # ties went to even codes
    assert float(mxfp4.dequantize(blocks, scales)[0, :32, 4].abs().max()) == 6.0 * 2.0 ** 10


def test_encode_matches_ggml_quantizer_where_it_has_no_ties():
    """gguf-py's MXFP4.quantize_blocks (ggml's: the OCP scale, then the nearest of its 16
    values, first on a tie) stores (scale, 16 bytes: element j low, j + 16 high) per block."""
    import numpy as np
    from gguf.quants import MXFP4

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 256, 48, generator=gen) * 0.02
    blocks, scales = mxfp4.quantize(x)
    theirs = MXFP4.quantize_blocks(mxfp4._as_blocks(x).reshape(-1, 32).numpy())
    assert np.array_equal(scales.reshape(-1).numpy(), theirs[:, 0])
    ggml = torch.from_numpy(np.concatenate([theirs[:, 1:] & 0x0F, theirs[:, 1:] >> 4], axis=1))
    ours = unpack(blocks).reshape(-1, 32)
    lut = torch.tensor(GRID + tuple(-v for v in GRID))
    assert torch.equal(lut[ours.long()], lut[ggml.long()])              # every value equal
    differs = ours != ggml
    assert bool(differs.any()) and set(ours[differs].tolist()) == {8}    # -0 (ours) vs +0 (ggml)
    # on a tie ggml takes the smaller magnitude, OCP the even code: 0.75 -> 0.5 vs 1.0
    tie = torch.zeros(1, 32, 1)
    tie[0, :2, 0] = torch.tensor([4.0, 0.75])
    assert unpack(mxfp4.quantize(tie)[0])[0, 0, 0, 1] == 2
    assert MXFP4.quantize_blocks(tie.reshape(1, 32).numpy())[0, 2] & 0x0F == 1


def test_decode_encode_keeps_stored_bytes():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 64, 96, generator=gen) * 0.05
    blocks, scales = mxfp4.quantize(x, round_up_exponents(x))
    enc = mxfp4.Encoding(mxfp4.NAME, mxfp4.TYPE, "w_blocks", (3, 64, 96), ("w_blocks", "w_scales"))
    values, state = mxfp4.decode(enc, {"w_blocks": blocks, "w_scales": scales})
    moved = mxfp4.quantize(values)[1] != scales
    assert 0.1 < float(moved.double().mean()) < 0.9                    # the OCP rule differs there
    changed, realized = mxfp4.encode(enc, values.clone(), state)
    assert torch.equal(changed["w_blocks"], blocks) and torch.equal(changed["w_scales"], scales)
    assert torch.equal(realized, values)
    # one changed value: its block alone is requantized by the OCP rule
    e, row, col = 1, 10, 40                        # stored row 10, block 40 // 32 = 1
    moved = values.clone()
    moved[e, col, row] += 0.3
    changed, _ = mxfp4.encode(enc, moved, state)
    new_blocks, new_scales = mxfp4.quantize(moved)
    assert torch.equal(changed["w_blocks"][e, row, 1], new_blocks[e, row, 1])
    assert changed["w_scales"][e, row, 1] == new_scales[e, row, 1]
    keep = torch.ones_like(scales, dtype=torch.bool)
    keep[e, row, 1] = False
    assert torch.equal(changed["w_scales"][keep], scales[keep])
    assert torch.equal(changed["w_blocks"][keep], blocks[keep])


# ----------------------------------------------------------------------------- merges

def test_zero_adapter_merge_is_a_byte_copy(case, tmp_path):
    root = case[0]
    at.merge(root / "base", [root / "zero"], tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (root / "base" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == \
        json.loads((root / "base" / "config.json").read_text())


def test_keep_copies_the_experts_and_loads_in_transformers(case, tmp_path):
    root, _, deltas = case
    out = tmp_path / "out"
    at.merge(root / "base", [root / "lora"], out)
    base_file, out_file = root / "base" / "model.safetensors", out / "model.safetensors"
    assert out_file.stat().st_size == base_file.stat().st_size
    assert json.loads((out / "config.json").read_text()) == json.loads((root / "base" / "config.json").read_text())
    before, after = raw_tensors(root / "base"), raw_tensors(out)
    assert list(before) == list(after)
    assert {n for n in before if before[n] != after[n]} == set(deltas)   # 6 attention weights
    model = load_transformers(out, quantization_config=mxfp4_config())
    ours = our_decode(out)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ours.items())
    assert rel_l2(logits(model), logits(float_gpt_oss(ours))) < FP32_LOGITS


def test_requantize_bf16_is_a_plain_model(case, tmp_path):
    root, decoded, deltas = case
    out = tmp_path / "plain"
    at.merge(root / "base", [root / "lora"], out, requantize="bf16")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    stored = load_file(out / "model.safetensors")
    assert set(stored) == set(decoded)                                 # no _blocks / _scales
    for name, w in decoded.items():
        assert stored[name].dtype == torch.bfloat16, name
        if name not in deltas:                 # experts: exact; the rest: copied
            assert torch.equal(stored[name].float(), w), name
            continue
        ref = w.double() + deltas[name]
        assert within_one_rounding(stored[name], ref), name          # within one bf16 rounding
    assert stored[GATE_UP].shape == (4, 64, 192)
    model = load_transformers(out)
    assert getattr(model.config, "quantization_config", None) is None
    weights = {k: v.float() for k, v in stored.items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert rel_l2(logits(model), logits(float_gpt_oss(weights))) < FP32_LOGITS


# ----------------------------------------------------------------------------- bad input

B, S = GATE_UP + "_blocks", GATE_UP + "_scales"


@pytest.mark.parametrize("change,fragments", [
    (lambda sd: sd.pop(S), [B, S + " is missing", "download it again"]),
    (lambda sd: sd.__setitem__(S, sd[S][:, :-1].clone()),
     [S + " is U8 [4, 191, 2]", B + " [4, 192, 2, 16] needs U8 [4, 192, 2]"]),
    (lambda sd: sd.pop(B), [S + " has no " + B]),
    (lambda sd: sd.__setitem__(B, sd[B].to(torch.int16)), [B + " is I16", "U8 (experts, rows"]),
    (lambda sd: sd.__setitem__(GATE_UP, torch.zeros(4, 64, 192, dtype=torch.bfloat16)),
     [B + " and " + GATE_UP + " are both stored", "keep one of them"]),
], ids=["missing-scales", "scales-shape", "orphan-scales", "blocks-dtype", "both"])
def test_bad_mxfp4_input_is_one_line_and_writes_nothing(case, tmp_path, change, fragments):
    root = case[0]
    base = damaged_copy(root / "base", tmp_path / "base", change)
    out = tmp_path / "out"
    outcome = run_cli("merge", base, root / "lora", "--out", out)
    assert_cli_error(outcome, fragments)
    assert_nothing_written(out)


# ----------------------------------------------------------------------------- expert LoRA

def expert_lora(model, folder, rel: float):
    """A PEFT target_parameters LoRA (r=4) on gate_up_proj and down_proj of every layer of
    ``model``, each delta scaled to ||delta|| / ||W|| = ``rel``, saved in ``folder``."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        for module in peft.modules():
            if type(module).__name__ == "ParamWrapper":
                ratio = module.get_delta_weight("default").norm() / module.get_param().norm()
                module.lora_B["default"].weight.mul_(rel / ratio)
    peft.save_pretrained(folder)


@pytest.fixture(scope="module")
def experts(case, tmp_path_factory):
    """The folder of a 2% target_parameters LoRA on the experts (skips while adaptertools
    cannot read one)."""
    from adaptertools.errors import AdapterToolsError

    folder = tmp_path_factory.mktemp("mxfp4_experts") / "experts"
    expert_lora(float_gpt_oss(case[1]), folder, REL)
    try:
        at.load(folder)
    except AdapterToolsError as e:
        pytest.skip(f"target_parameters adapters are not read yet: {e}")
    return folder


def test_expert_lora_merge_keeps_mxfp4(case, experts, tmp_path):
    """A PEFT target_parameters LoRA on the fused experts (gate_up_proj, down_proj): the merged
    experts are our encoder's bytes of PEFT's fp32 merge_and_unload of the decoded base."""
    from peft import PeftModel

    root, decoded, _ = case
    report = at.merge(root / "base", [experts], tmp_path / "out")
    rows = report["survival"]["rows"]
    assert len(rows) == 4 and {r["type"] for r in rows} == {"MXFP4"}
    merged = PeftModel.from_pretrained(float_gpt_oss(decoded), experts) \
        .merge_and_unload().state_dict()
    stored = load_file(tmp_path / "out" / "model.safetensors")
    before = load_file(root / "base" / "model.safetensors")
    for name in (k for k in stored if k.endswith("_blocks")):
        param = name.removesuffix("_blocks")
        blocks, scales = mxfp4.quantize(merged[param].float())
        same = (mxfp4._as_blocks(merged[param].float()) == mxfp4._as_blocks(decoded[param])).all(-1)
        blocks = torch.where(same.unsqueeze(-1), before[name], blocks)
        scales = torch.where(same, before[mxfp4.scales_name(name)], scales)
        assert torch.equal(stored[name], blocks), name
        assert torch.equal(stored[mxfp4.scales_name(name)], scales), name
    assert (tmp_path / "out" / "model.safetensors").stat().st_size == \
        (root / "base" / "model.safetensors").stat().st_size
    # --requantize bf16: PEFT's fp32 merge rounded once to bf16, exactly
    at.merge(root / "base", [experts], tmp_path / "plain", requantize="bf16")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    for name in (k.removesuffix("_blocks") for k in stored if k.endswith("_blocks")):
        assert torch.equal(plain[name], merged[name].float().to(torch.bfloat16)), name
    # transformers runs it as a float gpt-oss holding our decoded merged weights would
    model = load_transformers(tmp_path / "out", quantization_config=mxfp4_config())
    ours = our_decode(tmp_path / "out")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ours.items())
    assert rel_l2(logits(model), logits(float_gpt_oss(ours))) < FP32_LOGITS
    # 4-bit e2m1 keeps little of a 2%-sized change: the warning names the better routes
    assert report["survival"]["median_cosine"] < 0.2                   # 0.07 seen (10%: 0.63)
    assert any("--requantize bf16" in w for w in report["warnings"]), report["warnings"]


def test_validator_checks_mxfp4_merges(case, experts, tmp_path):
    """adaptertools.validate on keep and --requantize bf16 outputs (attention and expert LoRAs),
    and on a keep output with one expert byte flipped."""
    root = case[0]
    for adapter, requantize in ((root / "lora", "keep"), (experts, "keep"), (experts, "bf16")):
        out = tmp_path / f"{adapter.name}-{requantize}"
        at.merge(root / "base", [adapter], out, requantize=requantize)
        report = at.validate(root / "base", [adapter], out)
        assert report["passed"], [r for r in report["tensors"] if not r["passed"]][:3]
        adapted = [r for r in report["tensors"] if r["kind"] == "adapted"]
        want = "BF16" if adapter.name == "lora" or requantize == "bf16" else "MXFP4"
        assert len(adapted) == (6 if adapter.name == "lora" else 4)
        assert {r["dtype"] for r in adapted} == {want}
    out = tmp_path / "lora-keep"
    sd = load_file(out / "model.safetensors")
    sd["model.layers.1.mlp.experts.down_proj_blocks"][0, 0, 0, 0] ^= 0x11
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    report = at.validate(root / "base", [root / "lora"], out)
    assert [r["name"] for r in report["tensors"] if not r["passed"]] == \
        ["model.layers.1.mlp.experts.down_proj_blocks"]


def test_expert_count_mismatch_is_one_line_and_writes_nothing(case, experts, tmp_path):
    expert_lora(tiny_gpt_oss(experts=8), tmp_path / "eight", REL)
    out = tmp_path / "out"
    outcome = run_cli("merge", case[0] / "base", tmp_path / "eight", "--out", out)
    assert_cli_error(outcome, [GATE_UP, "adapter delta (8, 64, 192), base (4, 64, 192)"])
    assert_nothing_written(out)


def test_sharded_base_patches_scales_in_an_earlier_shard(case, experts, tmp_path):
    """gpt-oss ships sharded: with every ``X_scales`` in the first shard and every ``X_blocks``
    in the second, the new scales are written into the finished first shard (apply_left); the
    output equals the single-file merge tensor for tensor."""
    root = case[0]
    stored = load_file(root / "base" / "model.safetensors")
    base = tmp_path / "sharded"
    base.mkdir()
    (base / "config.json").write_text((root / "base" / "config.json").read_text())
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    parts = [{k: v for k, v in stored.items() if k.endswith("_blocks") == second}
             for second in (False, True)]
    for name, part in zip(names, parts):
        save_file(part, base / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, p in zip(names, parts) for k in p}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    at.merge(root / "base", [experts], tmp_path / "one")
    at.merge(base, [experts], tmp_path / "two")
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = {k: v for n in names for k, v in load_file(tmp_path / "two" / n).items()}
    assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(two[S], stored[S])                         # the patch mattered
    assert at.validate(base, [experts], tmp_path / "two")["passed"]
