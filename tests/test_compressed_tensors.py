"""Merging into compressed-tensors checkpoints (codecs/compressed_tensors.py), checked against
compressed-tensors 0.20 itself and transformers' CompressedTensorsConfig loader.

Every base is a seeded tiny Llama (hidden 256, intermediate 320: down_proj (256, 320) and
gate/up (320, 256) have ragged 128-blocks) whose Linear weights compressed-tensors' own
``ModelCompressor.compress_model`` compresses, with scales from its ``calculate_qparams`` on
min-max statistics (what llm-compressor's memoryless observer feeds it): FP8 per tensor, per
channel and per 128x128 block ("float-quantized"), int8 per channel and asymmetric per tensor
("int-quantized"), int4 per group of 32 (symmetric and asymmetric), int8 per channel asymmetric
and int4 per channel ("pack-quantized"). Some bases are bf16 (scales bf16: dequantization rounds
to bf16), some fp32. The LoRA (r=8 on q_proj, v_proj, down_proj) has ||delta|| / ||W|| = 2%.

- decode equals compressed-tensors' own compressor ``decompress`` bit for bit; our packing equals
  its ``pack_to_int32`` (weights and zero points); decode -> encode of an untouched weight gives
  back its stored bytes;
- encode of a changed weight equals compressed-tensors' ``quantize`` with the stored scales and
  zero points (integer grids), or with ``calculate_qparams``' amax scale (FP8), byte for byte;
- through ``adaptertools.merge`` (float- and int-quantized): a zero adapter gives back the base
  file byte for byte; keep: same header, size and config, untouched tensors byte for byte, every
  adapted weight compressed-tensors' ``quantize`` of PEFT's own fp32 ``merge_and_unload`` of the
  decoded base; transformers (CompressedTensorsConfig(run_compressed=False) on the CPU) loads it
  with our decoded weights and the logits of a float Llama holding them; survival scores equal an
  independent cosine; --requantize bf16 is a plain model (scales, zero points and static
  input_scale dropped) within one bf16 spacing of the float64 reference W + delta (half a
  spacing from the rounding, plus the fp32 fold's error, ~eps32 * |delta|, which only shows
  where W + delta cancels: worst seen 0.72 of the bound);
- pack-quantized bases: merging an adapter is refused with one line until the planner routes
  ``X.weight`` to ``X.weight_packed`` (see Layout.logical);
- bad input (missing weight_scale, a weight_shape that does not fit weight_packed, a group_size
  that does not divide the columns, a missing zero point, an unsupported format): one line naming
  the tensor, nothing written, through the CLI.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.cli import assert_cli_error, assert_nothing_written, run_cli
from helpers.quantized_bases import (
    _ct_min_max,
    ct_base,
    ct_decompress,
    damaged_copy,
    logits,
    raw_tensors,
    rel_l2,
    scaled_lora,
    tiny_llama,
    within_one_rounding,
)
from safetensors.torch import load_file

import adaptertools as at
from adaptertools.codecs import compressed_tensors as ct
from adaptertools.tensor_index import read_entry, read_safetensors_header

pytest.importorskip("compressed_tensors")

HIDDEN, INTER = 256, 320
TARGETS = ["q_proj", "v_proj", "down_proj"]
REL = 0.02
FP32_LOGITS = 1e-5       # relative L2, fp32 compute of a 2-layer model (FORMATS.md: ~1e-6)
Q = "model.layers.0.self_attn.q_proj"
FP8_ACT = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
INT8_ACT = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def _w(bits, kind, strategy, symmetric=True, **extra):
    return {"num_bits": bits, "type": kind, "symmetric": symmetric, "strategy": strategy, **extra}


# name: (format, weights, input activations, model dtype)
CASES = {
    "fp8-tensor": ("float-quantized", _w(8, "float", "tensor"), FP8_ACT, torch.bfloat16),
    "fp8-channel": ("float-quantized", _w(8, "float", "channel"), FP8_ACT, torch.float32),
    "fp8-block": ("float-quantized", _w(8, "float", "block", block_structure=[128, 128]),
                  {**FP8_ACT, "strategy": "group", "group_size": 128}, torch.bfloat16),
    "int8-channel": ("int-quantized", _w(8, "int", "channel"), INT8_ACT, torch.bfloat16),
    "int8-tensor-asym": ("int-quantized", _w(8, "int", "tensor", False), INT8_ACT, torch.float32),
    "int8-static": ("int-quantized", _w(8, "int", "channel"),
                    {**INT8_ACT, "strategy": "tensor", "dynamic": False}, torch.float32),
    "w4-group": ("pack-quantized", _w(4, "int", "group", group_size=32), None, torch.float32),
    "w4-group-asym": ("pack-quantized", _w(4, "int", "group", False, group_size=32), None,
                      torch.bfloat16),
    "w8-channel-asym": ("pack-quantized", _w(8, "int", "channel", False), None, torch.float32),
    "w4-channel": ("pack-quantized", _w(4, "int", "channel"), None, torch.bfloat16),
}
MERGED = [k for k, v in CASES.items() if v[0] != "pack-quantized"]
PACKED = [k for k, v in CASES.items() if v[0] == "pack-quantized"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """{name: (base folder, compressed-tensors' decompressed weights, 2% deltas)}, LoRA folders."""
    root = tmp_path_factory.mktemp("ct")
    out = {"root": root}
    for name, (fmt, weights, act, dtype) in CASES.items():
        model = tiny_llama(hidden=HIDDEN, intermediate=INTER).to(dtype)
        decoded = ct_base(model, root / name, fmt, weights, act)
        deltas = scaled_lora(tiny_llama(hidden=HIDDEN, intermediate=INTER), decoded,
                             root / f"lora-{name}", targets=TARGETS, rel=REL)
        out[name] = (root / name, decoded, deltas)
    scaled_lora(tiny_llama(hidden=HIDDEN, intermediate=INTER), out["w4-group"][1], root / "zero",
                targets=TARGETS, rel=REL, zero=True)
    return out


def lora(case, name):
    return case["root"] / f"lora-{name}"


def encodings(folder):
    """Our codec's encodings of a checkpoint, and its stored tensors."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    entries = {t.name: t for t in read_safetensors_header(folder / "model.safetensors").tensors}
    found = ct.describe(entries, qc, lambda e: read_entry(folder / e.file, e), str(folder))
    return found, load_file(folder / "model.safetensors")


def scheme_of(folder):
    """compressed-tensors' own QuantizationConfig of a checkpoint and its one scheme."""
    from compressed_tensors.quantization import QuantizationConfig

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)
    (scheme,) = config.config_groups.values()
    return config, scheme


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and \
        torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def their_encoding(x: torch.Tensor, stored: dict, prefix: str, scheme) -> dict[str, torch.Tensor]:
    """compressed-tensors' own bytes for fp32 ``x`` as ``prefix``: its ``quantize`` with the
    stored scale and zero point (integer grids; then ``pack_to_int32``), or with
    ``calculate_qparams``' scale from x's min-max (FP8) in the stored scale dtype."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    scale = stored[prefix + ".weight_scale"]
    if args.type == "float":
        fresh, zero = calculate_qparams(*_ct_min_max(x, args), args)
        scale = fresh.to(scale.dtype).reshape(scale.shape)
        codes = quantize(x, scale, torch.zeros_like(scale), args, dtype=torch.float8_e4m3fn)
        return {prefix + ".weight": codes, prefix + ".weight_scale": scale}
    zero = stored.get(prefix + ".weight_zero_point")
    if zero is not None and zero.dtype == torch.int32:       # packed down the columns
        from compressed_tensors.compressors.pack_quantized.helpers import (
            unpack_from_int32,
        )

        zero = unpack_from_int32(zero, args.num_bits, (x.shape[0], scale.shape[-1]), packed_dim=0)
    codes = quantize(x, scale, zero, args, dtype=torch.int8)
    if prefix + ".weight_packed" in stored:
        return {prefix + ".weight_packed": pack_to_int32(codes, args.num_bits)}
    return {prefix + ".weight": codes}


# ----------------------------------------------------------------------------- the codec

@pytest.mark.parametrize("name", list(CASES))
def test_decode_is_compressed_tensors_and_encode_gives_back_stored_bytes(case, name):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    folder, decoded, _ = case[name]
    found, stored = encodings(folder)
    assert len(found) == 14                                 # 7 Linear per layer, lm_head ignored
    for enc in found:
        values, state = ct.decode(enc, {m: stored[m] for m in enc.members})
        assert torch.equal(values, decoded[ct.logical_name(enc)]), enc.name
        changed, realized = ct.encode(enc, values.clone(), state)
        assert torch.equal(realized, values)
        for member, data in changed.items():
            assert same_bytes(data, stored[member]), member
        if enc.params.format == "pack-quantized":            # our packing is theirs
            assert torch.equal(ct.pack(state[0], enc.params.bits), pack_to_int32(state[0], enc.params.bits))
            if state[2] is not None:
                theirs = pack_to_int32(state[2].to(torch.int8), enc.params.bits, packed_dim=0)
                assert torch.equal(ct.pack(state[2].T.to(torch.int8), enc.params.bits).T, theirs)


@pytest.mark.parametrize("name", list(CASES))
def test_encode_of_changed_weights_is_compressed_tensors_quantize(case, name):
    folder = case[name][0]
    found, stored = encodings(folder)
    _, scheme = scheme_of(folder)
    gen = torch.Generator().manual_seed(5)
    for enc in found[:3]:
        values, state = ct.decode(enc, {m: stored[m] for m in enc.members})
        moved = values + 0.05 * values.std() * torch.randn(values.shape, generator=gen)
        moved[0, 0] = values[0, 0] + 10 * values.abs().max()     # beyond the stored range
        changed, realized = ct.encode(enc, moved, state)
        prefix = enc.name.removesuffix("_packed").removesuffix(".weight")
        theirs = their_encoding(moved, stored, prefix, scheme)
        assert set(changed) == set(theirs), enc.name
        for member, data in theirs.items():
            assert same_bytes(changed[member], data), member
        again, _ = ct.decode(enc, {**{m: stored[m] for m in enc.members}, **changed})
        assert torch.equal(again, realized)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_is_compressed_tensors_for_every_width(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (37, 101), generator=gen,
                          dtype=torch.int8)                     # 101 columns: a ragged last word
    packed = ct.pack(codes, bits)
    assert torch.equal(packed, pack_to_int32(codes, bits))
    assert torch.equal(ct.unpack(packed, bits, 101), codes)
    assert torch.equal(unpack_from_int32(packed, bits, (37, 101)), codes)


# ----------------------------------------------------------------------------- merges

def test_zero_adapter_merge_is_a_byte_copy(case, tmp_path):
    for name in ("int8-tensor-asym", "fp8-block"):
        base = case[name][0]
        zero = tmp_path / f"zero-{name}"
        scaled_lora(tiny_llama(hidden=HIDDEN, intermediate=INTER), case[name][1], zero,
                    targets=TARGETS, rel=REL, zero=True)
        report = at.merge(base, [zero], tmp_path / name)
        assert (tmp_path / name / "model.safetensors").read_bytes() == \
            (base / "model.safetensors").read_bytes(), name
        assert json.loads((tmp_path / name / "config.json").read_text()) == \
            json.loads((base / "config.json").read_text())
        assert report["survival"]["tensors"] == 6


@pytest.fixture(scope="module")
def kept(case, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct_kept")
    return out, {name: at.merge(case[name][0], [lora(case, name)], out / name) for name in MERGED}


def float_llama(weights: dict[str, torch.Tensor]):
    model = tiny_llama(hidden=HIDDEN, intermediate=INTER)
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    return model


@pytest.mark.parametrize("name", MERGED)
def test_keep_same_layout_untouched_bytes_and_requantized_weights(case, kept, name):
    check_keep(case, name, kept[0] / name)


def check_keep(case, name, out):
    """Same size, config and header; untouched tensors byte for byte; each adapted weight
    compressed-tensors' own encoding of PEFT's fp32 merge of the decoded base."""
    from peft import PeftModel

    base, decoded, deltas = case[name]
    assert (out / "model.safetensors").stat().st_size == (base / "model.safetensors").stat().st_size
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    before, after = raw_tensors(base), raw_tensors(out)
    assert list(before) == list(after)
    adapted = {k.removesuffix(".weight") for k in deltas}
    assert len(adapted) == 2 * len(TARGETS)
    for key in before:
        if key.rsplit(".", 1)[0] not in adapted:
            assert before[key] == after[key], f"{key}: untouched, must be byte-identical"
    merged = PeftModel.from_pretrained(float_llama(decoded), lora(case, name)).merge_and_unload()
    merged = merged.state_dict()
    stored, (_, scheme) = load_file(out / "model.safetensors"), scheme_of(base)
    original = load_file(base / "model.safetensors")
    for prefix in adapted:
        theirs = their_encoding(merged[prefix + ".weight"].float(), original, prefix, scheme)
        for member, data in theirs.items():
            assert same_bytes(stored[member], data), member


def test_pack_quantized_merges(case, tmp_path):
    """Zero adapter: a byte copy; keep: as check_keep, and transformers loads it with our
    decoded weights; bf16: a plain model whose weights are named X.weight again."""
    at.merge(case["w4-group"][0], [case["root"] / "zero"], tmp_path / "zero")
    assert (tmp_path / "zero" / "model.safetensors").read_bytes() == \
        (case["w4-group"][0] / "model.safetensors").read_bytes()
    for name in PACKED:
        report = at.merge(case[name][0], [lora(case, name)], tmp_path / name)
        check_keep(case, name, tmp_path / name)
        assert report["survival"]["tensors"] == 6
    check_transformers_load(tmp_path / "w4-group-asym")
    check_bf16(case, "w4-group-asym", tmp_path / "plain")


def test_keep_loads_in_transformers_and_matches_dequantized_reference(kept):
    """transformers' compressed-tensors integration (CompressedTensorsConfig from config.json,
    decompressed on the CPU with run_compressed=False) holds our decoded weights and computes
    what a float Llama holding them computes."""
    for name in ("fp8-block", "int8-tensor-asym"):
        check_transformers_load(kept[0] / name)


def check_transformers_load(out):
    import transformers
    from transformers import CompressedTensorsConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False))
    ours = ct_decompress(load_file(out / "model.safetensors"), scheme_of(out)[0])
    loaded = model.state_dict()
    for key, t in ours.items():
        assert torch.equal(loaded[key], t), key
    assert not [k for k in loaded if "weight_scale" in k or "zero_point" in k]
    assert rel_l2(logits(model), logits(float_llama(ours))) < FP32_LOGITS


def test_keep_survival_scores(case, kept):
    medians = {}
    for name, report in kept[1].items():
        base, before, deltas = case[name]
        after = ct_decompress(load_file(kept[0] / name / "model.safetensors"), scheme_of(base)[0])
        rows = report["survival"]["rows"]
        assert len(rows) == 6
        assert {r["type"] for r in rows} == {"FP8_E4M3" if name.startswith("fp8") else "INT8"}
        for row in rows:
            realized = (after[row["name"]] - before[row["name"]]).double()
            intended = deltas[row["name"]]
            cosine = float((realized * intended).sum() / (realized.norm() * intended.norm()))
            assert row["cosine"] == pytest.approx(cosine, abs=1e-4), row["name"]
        medians[name] = report["survival"]["median_cosine"]
    # int8 per channel steps ~0.8% of a row's amax, a 2% change mostly survives; FP8's 3
    # mantissa bits round each weight by 2-3%: a 2% change partly
    assert medians["int8-channel"] > medians["fp8-channel"] > 0.3, medians


def test_validator_checks_compressed_tensors_weights(case, kept):
    for name in ("int8-tensor-asym", "fp8-block"):
        report = at.validate(case[name][0], [lora(case, name)], kept[0] / name)
        assert report["passed"], [r for r in report["tensors"] if not r["passed"]][:3]
        adapted = [r for r in report["tensors"] if r["kind"] == "adapted"]
        assert len(adapted) == 6, name


@pytest.mark.parametrize("name", ["int8-channel", "fp8-block", "int8-static"])
def test_requantize_bf16_is_a_plain_model(case, tmp_path, name):
    check_bf16(case, name, tmp_path / "plain")


def check_bf16(case, name, out):
    import transformers

    base, decoded, deltas = case[name]
    at.merge(base, [lora(case, name)], out, requantize="bf16")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    stored = load_file(out / "model.safetensors")
    assert set(stored) == set(decoded)            # no scales, zero points, input_scale
    for key, w in decoded.items():
        if not key.endswith("proj.weight"):
            continue
        assert stored[key].dtype == torch.bfloat16, key
        ref = w.double() + deltas.get(key, 0)
        assert within_one_rounding(stored[key], ref), key            # within one bf16 rounding
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None


# ----------------------------------------------------------------------------- refusals

def _split_groups(qc, mlp_weights=None):
    """group_0 split by re: targets into attention and MLP groups (the MLP one with
    ``mlp_weights`` when given)."""
    group = qc["config_groups"].pop("group_0")
    qc["config_groups"]["attention"] = {**group, "targets": ["re:.*self_attn[.].*"]}
    qc["config_groups"]["mlp"] = {**group, "targets": ["re:.*mlp[.].*"],
                                  "weights": {**group["weights"], **(mlp_weights or {})}}


def test_config_groups_are_matched_by_module_name(case, kept, tmp_path):
    """Two groups with re: targets give the same merge as the one group by class name."""
    base = damaged_copy(case["int8-channel"][0], tmp_path / "split", config=_split_groups)
    found, _ = encodings(base)
    assert len(found) == 14 and {e.params.strategy for e in found} == {"channel"}
    at.merge(base, [lora(case, "int8-channel")], tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (kept[0] / "int8-channel" / "model.safetensors").read_bytes()


def _group(qc):
    return qc["config_groups"]["group_0"]["weights"]


@pytest.mark.parametrize("name,change,config,fragments", [
    ("int8-channel", lambda sd: sd.pop(Q + ".weight_scale"), None,
     [Q + ".weight is I8 but", "weight_scale is missing", "download it again"]),
    ("w4-group", lambda sd: sd.__setitem__(Q + ".weight_shape", torch.tensor([256, 300])), None,
     [Q + ".weight_shape is [256, 300]", "weight_packed [256, 32]"]),
    ("w4-group", None, lambda qc: _group(qc).update(group_size=48),
     ["down_proj.weight has 320 columns, which group_size 48 does not divide",
      "set config.json's group_size"]),
    ("w4-group-asym", lambda sd: sd.pop(Q + ".weight_zero_point"), None,
     [Q + ".weight_zero_point is missing", "asymmetric"]),
    ("fp8-channel", lambda sd: sd.__setitem__(Q + ".weight_scale", sd[Q + ".weight_scale"][:7]), None,
     [Q + ".weight_scale is F32 [7, 1]", "channel strategy needs", "scale of [256, 1]"]),
    ("int8-channel", None, lambda qc: _split_groups(qc, {"strategy": "tensor"}),
     ["mlp.down_proj.weight_scale is BF16 [256, 1]", "in the tensor strategy needs",
      "scale of [1]"]),
    ("int8-channel", None, lambda qc: qc.update(ignore=["lm_head", "re:.*layers[.]0[.]mlp[.]up_proj"]),
     ["layers.0.mlp.up_proj.weight_scale is stored but no config group", "in ignore"]),
    ("int8-channel", None, lambda qc: qc["config_groups"]["group_0"].update(format="nvfp4-pack-quantized"),
     ["format 'nvfp4-pack-quantized' is not supported"]),
], ids=["missing-scale", "weight-shape", "group-size", "missing-zero-point", "scale-shape",
        "group-scheme", "ignored", "format"])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, name, change, config, fragments):
    base = damaged_copy(case[name][0], tmp_path / "base", change, config)
    out = tmp_path / "out"
    merged = "int8-channel" if name.startswith("w") else name
    outcome = run_cli("merge", base, lora(case, merged), "--out", out)
    assert_cli_error(outcome, fragments)
    assert_nothing_written(out)
