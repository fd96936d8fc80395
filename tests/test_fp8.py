"""Merging into fine-grained block FP8 checkpoints (DeepSeek-V3 / Qwen3-FP8 style, codecs/fp8.py),
checked by transformers' own FP8 integration.

The base is a seeded tiny Llama (hidden 256, intermediate 384: every ``*_proj`` weight a whole
number of 128 x 128 blocks) whose ``*_proj`` weights transformers' ``Fp8Quantize`` stores as
F8_E4M3 codes + F32 ``weight_scale_inv`` per block; a second base (hidden 192, intermediate 320)
has ragged edge blocks, which transformers does not quantize, encoded by our quantizer (the same
arithmetic). The LoRA (r=8 on q_proj, v_proj, down_proj) has ||delta|| / ||W|| = 2% per weight.

- decode equals transformers' CPU dequantization bit for bit (``Fp8Dequantize`` for whole blocks,
  ``_dequantize_fp8_weight`` for ragged ones; ``Fp8Dequantize`` misreads ragged grids: shown);
  encode equals transformers' ``Fp8Quantize`` byte for byte;
- a zero adapter (lora_B = 0) gives back the base file byte for byte (decode -> encode keeps every
  unchanged block's bytes, although our quantizer alone changes 5% of the scales by one ulp);
- keep: same header, size and config; untouched tensors byte for byte; each adapted weight and
  its scales are the quantizer's encoding of PEFT's own fp32 ``merge_and_unload`` of the decoded
  base; transformers (FineGrainedFP8Config, dequantize on the CPU) loads it, its weights equal our
  decode and its logits those of a float Llama holding our dequantized merged weights (fp32);
- survival per adapted weight equals an independent cosine; a 2% LoRA keeps about 0.7 of its
  change in FP8 (the warning names --requantize bf16 and the unquantized route), a 10% one more;
- --requantize bf16: a plain model within one bf16 rounding of the float64 reference;
- bad input (missing weight_scale_inv, a scale grid that is not the weight's block grid, an
  orphaned scale, a wrong weight_block_size, F8_E5M2): one line naming the tensor, exit 1,
  nothing written, through the CLI.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.cli import assert_cli_error, assert_nothing_written, run_cli
from helpers.quantized_bases import (
    damaged_copy,
    fp8_block_base,
    logits,
    raw_tensors,
    rel_l2,
    scaled_lora,
    tiny_llama,
    transformers_fp8_dequantize,
    transformers_fp8_quantize,
    within_one_rounding,
)
from safetensors.torch import load_file

import adaptertools as at
from adaptertools.codecs import fp8

pytest.importorskip("transformers.integrations.finegrained_fp8")

TARGETS = ["q_proj", "v_proj", "down_proj"]
REL = 0.02
BLOCK = (128, 128)
FP32_LOGITS = 1e-5       # relative L2, fp32 compute of a 2-layer model (FORMATS.md: ~1e-6)
Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """{"whole" | "ragged": (base folder, decoded base weights)}, the LoRA folders and deltas."""
    root = tmp_path_factory.mktemp("fp8")
    bases = {"whole": (256, 384), "ragged": (192, 320)}
    out = {"root": root}
    for kind, (hidden, inter) in bases.items():
        decoded = fp8_block_base(tiny_llama(hidden=hidden, intermediate=inter), root / kind)
        deltas = {rel: scaled_lora(tiny_llama(hidden=hidden, intermediate=inter), decoded,
                                   root / f"lora-{kind}-{rel}", targets=TARGETS, rel=rel)
                  for rel in (REL, 0.1)}
        out[kind] = (root / kind, decoded, deltas)
    scaled_lora(tiny_llama(), out["whole"][1], root / "zero", targets=TARGETS, rel=REL, zero=True)
    return out


def lora(case, kind: str, rel: float = REL):
    return case["root"] / f"lora-{kind}-{rel}"


def float_llama(weights: dict[str, torch.Tensor], hidden: int = 256, intermediate: int = 384):
    model = tiny_llama(hidden=hidden, intermediate=intermediate)
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    return model


def decoded_file(folder) -> dict[str, torch.Tensor]:
    """Every weight of an FP8 checkpoint as fp32, quantized ones decoded by transformers'
    arithmetic (``_dequantize_fp8_weight``, right for ragged blocks too)."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    sd = load_file(folder / "model.safetensors")
    out = {}
    for name, t in sd.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            out[name] = _dequantize_fp8_weight(t, sd[name + "_scale_inv"], list(BLOCK), torch.float32)
        else:
            out[name] = t
    return out


# ----------------------------------------------------------------------------- the codec

def test_decode_and_encode_are_transformers_bit_for_bit():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(384, 256, generator=gen) * 0.02
    x[:128, :128] = 0                                       # an all-zero block: scale 1
    theirs = transformers_fp8_quantize(x, BLOCK)
    q, s = fp8.quantize(x, BLOCK)
    assert s.shape == (3, 2) and s[0, 0] == 1
    assert torch.equal(q.view(torch.uint8), theirs["weight"].view(torch.uint8))
    assert torch.equal(s, theirs["weight_scale_inv"])
    assert torch.equal(fp8.dequantize(q, s, BLOCK), transformers_fp8_dequantize(q, s))
    # ragged edge blocks: (200, 300) in 128-blocks is a (2, 3) grid of 128/72 x 128/128/44
    x = torch.randn(200, 300, generator=gen)
    q, s = fp8.quantize(x, BLOCK)
    assert s.shape == (2, 3)
    ours = fp8.dequantize(q, s, BLOCK)
    assert torch.equal(ours, _dequantize_fp8_weight(q, s, list(BLOCK), torch.float32))
    # transformers' loader takes the block from the grid (200 // 2 = 100 rows): wrong here
    assert not torch.equal(ours, transformers_fp8_dequantize(q, s))
    # 3-D fused experts (E, rows, cols), transformers' FP8Experts layout
    x = torch.randn(3, 256, 128, generator=gen)
    q, s = fp8.quantize(x, BLOCK)
    assert s.shape == (3, 2, 1)
    for e in range(3):
        theirs = transformers_fp8_quantize(x[e], BLOCK)
        assert torch.equal(q[e].view(torch.uint8), theirs["weight"].view(torch.uint8))
        assert torch.equal(s[e], theirs["weight_scale_inv"])


def test_decode_encode_keeps_stored_bytes():
    """Our quantizer alone is not idempotent on the scales (448 * s / 448 != s in fp32 for some
    s); encode keeps the stored bytes of every block whose values are unchanged."""
    gen = torch.Generator().manual_seed(1)
    q, s = fp8.quantize(torch.randn(1024, 1024, generator=gen), BLOCK)
    enc = fp8.Encoding(fp8.NAME, fp8.TYPE, "w", (1024, 1024), ("w", "w_scale_inv"), BLOCK)
    values, state = fp8.decode(enc, {"w": q, "w_scale_inv": s})
    q2, s2 = fp8.quantize(values, BLOCK)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and not torch.equal(s2, s)
    changed, realized = fp8.encode(enc, values.clone(), state)
    assert torch.equal(changed["w"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(changed["w_scale_inv"], s) and torch.equal(realized, values)
    # one changed block is requantized, the others keep their bytes
    moved = values.clone()
    moved[130, 260] += 0.5
    changed, _ = fp8.encode(enc, moved, state)
    new_q, new_s = fp8.quantize(moved, BLOCK)
    assert torch.equal(changed["w_scale_inv"][1, 2], new_s[1, 2])
    same = torch.ones(8, 8, dtype=torch.bool)
    same[1, 2] = False
    assert torch.equal(changed["w_scale_inv"][same], s[same])
    codes, new_codes, old_codes = (t.view(torch.uint8) for t in (changed["w"], new_q, q))
    assert torch.equal(codes[128:256, 256:384], new_codes[128:256, 256:384])
    codes[128:256, 256:384] = old_codes[128:256, 256:384]
    assert torch.equal(codes, old_codes)


def test_zero_adapter_merge_is_a_byte_copy(case, tmp_path):
    base = case["whole"][0]
    report = at.merge(base, [case["root"] / "zero"], tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (base / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == \
        json.loads((base / "config.json").read_text())
    assert report["survival"]["tensors"] == 6


# ----------------------------------------------------------------------------- keep

@pytest.fixture(scope="module")
def kept(case, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8_kept")
    reports = {kind: at.merge(case[kind][0], [lora(case, kind)], out / kind)
               for kind in ("whole", "ragged")}
    return out, reports


@pytest.mark.parametrize("kind", ["whole", "ragged"])
def test_keep_same_layout_untouched_bytes_and_requantized_weights(case, kept, kind):
    base, decoded, deltas = case[kind]
    out = kept[0] / kind
    assert (out / "model.safetensors").stat().st_size == (base / "model.safetensors").stat().st_size
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    before, after = raw_tensors(base), raw_tensors(out)
    assert list(before) == list(after)
    adapted = set(deltas[REL])
    assert len(adapted) == 2 * len(TARGETS)
    for name in before:
        if name.removesuffix("_scale_inv") not in adapted:
            assert before[name] == after[name], f"{name}: untouched, must be byte-identical"
    # each adapted weight: the quantizer's bytes of PEFT's fp32 merge of the decoded base
    hidden, inter = (256, 384) if kind == "whole" else (192, 320)
    from peft import PeftModel

    peft = PeftModel.from_pretrained(float_llama(decoded, hidden, inter), lora(case, kind))
    merged = peft.merge_and_unload().state_dict()
    stored = load_file(out / "model.safetensors")
    for name in adapted:
        q, s = fp8.quantize(merged[name].float(), BLOCK)
        assert torch.equal(stored[name].view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(stored[name + "_scale_inv"], s), name
        if kind == "whole":              # and transformers' Fp8Quantize of it, byte for byte
            theirs = transformers_fp8_quantize(merged[name].float(), BLOCK)
            assert torch.equal(stored[name].view(torch.uint8), theirs["weight"].view(torch.uint8))


def test_keep_loads_in_transformers_and_matches_dequantized_reference(kept):
    """transformers' FP8 integration (FineGrainedFP8Config from config.json, dequantized on the
    CPU) runs our merged checkpoint as a float model holding our dequantized weights would."""
    import transformers

    out = kept[0] / "whole"
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # (dequantize=True drops the quantizer after loading: its weights are the evidence)
    ours = {}
    sd = load_file(out / "model.safetensors")
    for name, t in sd.items():
        if t.dtype == torch.float8_e4m3fn:
            ours[name] = fp8.dequantize(t, sd[name + "_scale_inv"], BLOCK)
        elif not name.endswith("_scale_inv"):
            ours[name] = t
    loaded = model.state_dict()
    for name, t in ours.items():
        assert torch.equal(loaded[name], t), name           # transformers' decode = ours
    assert not [k for k in loaded if k.endswith("_scale_inv")]
    assert rel_l2(logits(model), logits(float_llama(ours))) < FP32_LOGITS


def test_keep_survival_scores_and_warning(case, kept, tmp_path):
    medians = {}
    for kind, report in kept[1].items():
        base, _, deltas = case[kind]
        before, after = decoded_file(base), decoded_file(kept[0] / kind)
        rows = report["survival"]["rows"]
        assert len(rows) == 6 and {r["type"] for r in rows} == {"FP8_E4M3"}
        for row in rows:
            realized = (after[row["name"]] - before[row["name"]]).double()
            intended = deltas[REL][row["name"]]
            cosine = float((realized * intended).sum() / (realized.norm() * intended.norm()))
            assert row["cosine"] == pytest.approx(cosine, abs=1e-4), row["name"]
        medians[kind] = report["survival"]["median_cosine"]
    # FP8 e4m3 (3 mantissa bits) rounds each weight by ~2-3% rms: a 2% change is partly lost
    assert 0.5 < medians["whole"] < 0.7, medians
    warnings = kept[1]["whole"]["warnings"]
    assert any("only part of the adapter survived" in w and "--requantize bf16" in w
               and "merging into the unquantized model" in w for w in warnings), warnings
    ten = at.merge(case["whole"][0], [lora(case, "whole", 0.1)], tmp_path / "ten")
    assert ten["survival"]["median_cosine"] > 0.9
    assert not any("only part of the adapter survived" in w for w in ten["warnings"])


def test_validator_checks_fp8_weights(case, kept):
    report = at.validate(case["whole"][0], [lora(case, "whole")], kept[0] / "whole")
    assert report["passed"], [r for r in report["tensors"] if not r["passed"]][:3]
    adapted = [r for r in report["tensors"] if r["kind"] == "adapted"]
    assert len(adapted) == 6 and {r["dtype"] for r in adapted} == {"FP8_E4M3"}


# ----------------------------------------------------------------------------- 16-bit output

def test_requantize_bf16_is_a_plain_model(case, tmp_path):
    import transformers

    base, decoded, deltas = case["whole"]
    out = tmp_path / "plain"
    report = at.merge(base, [lora(case, "whole")], out, requantize="bf16")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    stored = load_file(out / "model.safetensors")
    assert not [k for k in stored if k.endswith("_scale_inv")]
    for name, w in decoded.items():
        if not name.endswith("proj.weight"):
            assert torch.equal(stored[name], w), name
            continue
        assert stored[name].dtype == torch.bfloat16, name
        ref = w.double() + deltas[REL].get(name, 0)
        assert within_one_rounding(stored[name], ref), name          # within one bf16 rounding
        assert float((stored[name] != ref.to(torch.bfloat16)).double().mean()) < 1e-3, name
    assert report["survival"]["median_cosine"] > 0.98
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    weights = {k: stored[k].float() for k in decoded}
    assert rel_l2(logits(model), logits(float_llama(weights))) < FP32_LOGITS


# ----------------------------------------------------------------------------- through the CLI

def test_cli_merge_reports_fp8_survival(case, tmp_path):
    outcome = run_cli("merge", case["whole"][0], lora(case, "whole"), "--out", tmp_path / "out",
                      "--json", expect=0)
    report = json.loads(outcome.stdout)
    assert report["survival"]["tensors"] == 6
    assert any("only part of the adapter survived" in w for w in report["warnings"])
    outcome = run_cli("merge", case["whole"][0], lora(case, "whole"), "--out", tmp_path / "o2",
                      expect=0)
    assert "only part of the adapter survived" in outcome.stderr
    assert "FP8_E4M3" in outcome.stdout + outcome.stderr


def _as_e5m2(sd):
    sd[Q] = sd[Q].float().to(torch.float8_e5m2)


@pytest.mark.parametrize("change,config,fragments", [
    (lambda sd: sd.pop(Q + "_scale_inv"), None,
     [Q, "weight_scale_inv is missing", "download it again"]),
    (lambda sd: sd.__setitem__(Q + "_scale_inv", sd[Q + "_scale_inv"][:1].clone()), None,
     [Q + "_scale_inv has shape [1, 2]", "needs [2, 2]", "weight_block_size"]),
    (None, lambda qc: qc.update(weight_block_size=[64, 64]),
     ["model.layers.0.mlp.down_proj.weight_scale_inv has shape [2, 3]",
      "[256, 384] in weight_block_size [64, 64] blocks needs [4, 6]", "set config.json's"]),
    (lambda sd: sd.__setitem__(Q, sd[Q].float().to(torch.bfloat16)), None,
     [Q + "_scale_inv has no F8_E4M3 weight"]),
    (_as_e5m2, None, [Q, "F8_E5M2", "merge into the BF16 model"]),
    (None, lambda qc: qc.update(weight_block_size=[128]), ["weight_block_size [128]", "config.json"]),
    (None, lambda qc: qc.update(scale_fmt="ue8m0"), ["scale_fmt 'ue8m0' is not supported"]),
], ids=["missing-scale", "scale-grid", "block-size", "orphan-scale", "e5m2", "bad-block",
        "ue8m0"])
def test_bad_fp8_input_is_one_line_and_writes_nothing(case, tmp_path, change, config, fragments):
    base = damaged_copy(case["whole"][0], tmp_path / "base", change, config)
    out = tmp_path / "out"
    outcome = run_cli("merge", base, lora(case, "whole"), "--out", out)
    assert_cli_error(outcome, fragments)
    assert_nothing_written(out)


def test_fp8_weights_without_quantization_config_are_refused_with_the_fix(case, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(case["whole"][0], base)
    config = json.loads((base / "config.json").read_text())
    del config["quantization_config"]
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    outcome = run_cli("merge", base, lora(case, "whole"), "--out", out)
    assert_cli_error(outcome, ["is F8_E4M3 (float8_e4m3fn)", "restore the quantization_config",
                               "quant_method fp8"])
    assert_nothing_written(out)
