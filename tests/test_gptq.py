"""Merging into GPTQ and AWQ checkpoints (codecs/gptq.py), checked against GPTQModel 7.7 itself.

The float model is a seeded tiny Llama (hidden 128, intermediate 256). GPTQModel quantizes it on
the CPU in its own environment (helpers/gptqmodel_env.py: torch 2.14.1, cached) with 8 seeded
random calibration sequences: GPTQ asymmetric groups of 32 with act-order (desc_act: g_idx
permuted) in checkpoint_format gptq (v1, zeros minus one), GPTQ symmetric per channel
(group_size -1), GPTQ asymmetric groups of 32 in gptq_v2, GPTQ 8-bit symmetric and 2-bit
asymmetric groups of 32, and AWQ gemm groups of 32 (GPTQModel stores its scales in bf16).
Without that environment those tests are skipped with its reason; the rest run on synthetic
checkpoints written to the same layout by the codec's own packing (round to nearest on min-max
grids, act-order by a seeded permutation), which the oracle tests tie to GPTQModel's files.

- decode equals GPTQModel's own dequantization bit for bit (its loader with the TORCH /
  AWQ_TORCH kernels in float16, v1 -> v2 zero conversion included: ``dequantize_weight()``,
  AWQ's ``dequantize_gemm``); decode -> encode gives back every stored qweight;
- a zero adapter merges to a byte copy of the whole model.safetensors (and config.json); a 2%
  LoRA on a 4-bit grid mostly rounds back to the stored codes: a low survival score and the
  warning that names the better routes;
- keep: same size, header and config; only the adapted qweights change (qzeros, scales, g_idx
  byte for byte); the validator passes it (and fails the base given as the output);
  GPTQModel loads the output on the CPU and its logits match a float32 Llama holding our
  dequantized merged weights within relative L2 ``KERNEL_NOISE`` (8 roundings of
  the kernel's dtype; seen 6.4e-4 for GPTQ in fp16, 5.1e-3 for AWQ in bf16), for a 25% LoRA (a
  2% one moves almost no 4-bit code);
- --requantize bf16: a plain model (no qweight / qzeros / scales / g_idx, no
  quantization_config) within one bf16 rounding of the float64 reference decode + delta;
- bad input (a g_idx entry out of range, scales that disagree with qweight, bits 3): one line
  naming the tensor or setting, nothing written, through the CLI.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import gptqmodel_env
from helpers import quantized_bases as qb
from helpers.cli import assert_cli_error, assert_nothing_written, run_cli
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.codecs import gptq
from adaptertools.codecs.compressed_tensors import pack
from adaptertools.tensor_index import read_entry, read_safetensors_header

HIDDEN, INTER = 128, 256
TARGETS = ["q_proj", "v_proj", "down_proj"]
REL = 0.02
# a keep merge into a 4-bit grid: 2% moves almost no code (every value rounds back); 25% moves
# about a third of them, so the loaded model sees the change
REL_KEEP = 0.25
# GPTQModel's CPU forward runs in the scales' dtype (GPTQ fp16, GPTQModel's AWQ bf16: weights
# dequantized to it, matmuls and norms in it): each of the ~10 roundings on the way through 2
# layers is within u = 2^-11 (fp16) or 2^-8 (bf16) relative and they add up as a random walk,
# so a relative L2 of the logits within 8 u of the float32 model (seen: 1.3 u for both)
KERNEL_NOISE = {torch.float16: 8 * 2.0 ** -11, torch.bfloat16: 8 * 2.0 ** -8}
Q = "model.layers.0.self_attn.q_proj"
ORACLE = {
    "gptq-act": {"method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False,
                 "format": "gptq"},
    "gptq-channel": {"method": "gptq", "bits": 4, "group_size": -1, "desc_act": False,
                     "sym": True, "format": "gptq"},
    "gptq-v2": {"method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
                "format": "gptq_v2"},
    "gptq-int8": {"method": "gptq", "bits": 8, "group_size": 32, "desc_act": False, "sym": True,
                  "format": "gptq"},
    "gptq-int2": {"method": "gptq", "bits": 2, "group_size": 32, "desc_act": False,
                  "sym": False, "format": "gptq"},
    "awq": {"method": "awq", "bits": 4, "group_size": 32},
}
SYNTHETIC = ("synthetic-gptq", "synthetic-awq")


def float_folder(folder):
    """The seeded float Llama as an HF folder with a word-level tokenizer (GPTQModel loads one)."""
    return gptqmodel_env.hf_folder(qb.tiny_llama(hidden=HIDDEN, intermediate=INTER, seed=0), folder)


def synthetic_base(source, folder, method: str):
    """``source``'s proj weights quantized to 4 bits in groups of 32 on min-max grids and
    written as GPTQ (v1 zeros, act-order g_idx) or AWQ gemm stores them."""
    folder.mkdir()
    out, gen = {}, torch.Generator().manual_seed(5)
    for key, w in load_file(source / "model.safetensors").items():
        if not key.endswith("proj.weight"):
            out[key] = w.to(torch.float16)
            continue
        rows, cols = w.shape
        prefix, groups = key.removesuffix(".weight"), cols // 32
        g_idx = torch.randperm(cols, generator=gen) % groups if method == "gptq" else \
            torch.arange(cols) // 32
        # per group g: the columns k with g_idx[k] == g, min-max over them
        cells = torch.stack([w[:, g_idx == g] for g in range(groups)])          # (G, rows, 32)
        lo, hi = cells.amin(dim=2).clamp(max=0), cells.amax(dim=2).clamp(min=0)
        scales = ((hi - lo) / 15).clamp(min=1e-8).to(torch.float16)             # (G, rows)
        zeros = torch.round(-lo / scales.float()).clamp(0, 15).to(torch.int8) - 8
        q = (torch.round(w / scales.float()[g_idx].T) + zeros[g_idx].T).clamp(-8, 7).to(torch.int8)
        if method == "gptq":
            out[prefix + ".qweight"] = pack(q, 4).T.contiguous()
            out[prefix + ".qzeros"] = pack(zeros, 4) - 0x11111111                   # v1
            out[prefix + ".g_idx"] = g_idx.to(torch.int32)
        else:
            order = gptq._columns(rows, gptq.ORDER)
            out[prefix + ".qweight"] = pack(q.T[:, order], 4)
            out[prefix + ".qzeros"] = pack(zeros[:, order], 4)
        out[prefix + ".scales"] = scales
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                     "desc_act": True, "sym": False, "checkpoint_format": "gptq"} \
        if method == "gptq" else {"quant_method": "awq", "bits": 4, "group_size": 32,
                                  "zero_point": True, "version": "gemm"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


decodings = gptqmodel_env.decodings


def decoded(folder) -> dict[str, torch.Tensor]:
    return decodings(folder)[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    float_folder(root / "float")
    return root


@pytest.fixture(scope="module")
def oracle(root):
    """{name: (GPTQModel's checkpoint folder, its dequantized weights)}; skipped without the
    oracle environment."""
    try:
        gptqmodel_env.oracle_python()
    except RuntimeError as e:
        pytest.skip(str(e))
    jobs = [{"op": "quantize", "float": str(root / "float"), **spec} for spec in ORACLE.values()]
    folders = gptqmodel_env.run(jobs)
    deq = gptqmodel_env.run([{"op": "dequantize", "folder": str(f)} for f in folders])
    return {name: (f, load_file(d / "out.safetensors")) for name, f, d in zip(ORACLE, folders, deq)}


@pytest.fixture(scope="module")
def synthetic(root):
    return {f"synthetic-{m}": synthetic_base(root / "float", root / f"synthetic-{m}", m)
            for m in ("gptq", "awq")}


def base_of(name, request):
    if name in SYNTHETIC:
        return request.getfixturevalue("synthetic")[name]
    return request.getfixturevalue("oracle")[name][0]


def lora(root, folder, name, *, zero=False, rel=REL):
    out = root / f"lora-{name}-{rel}{'-zero' if zero else ''}"
    deltas = qb.scaled_lora(qb.tiny_llama(hidden=HIDDEN, intermediate=INTER, seed=0),
                            decoded(folder), out, targets=TARGETS, rel=rel, zero=zero)
    return out, deltas


# ----------------------------------------------------------------------------- codec

@pytest.mark.parametrize("name", list(ORACLE))
def test_decode_is_gptqmodels_dequantization(oracle, name):
    folder, theirs = oracle[name]
    ours = decoded(folder)
    assert len(theirs) == 14
    stored = load_file(folder / "model.safetensors")
    for key, w in theirs.items():
        assert w.dtype == stored[key.removesuffix("weight") + "scales"].dtype, key
        assert torch.equal(ours[key], w.float()), key
    if name == "gptq-act":                               # act-order: a permuted g_idx
        g_idx = stored[Q + ".g_idx"]
        assert not bool((g_idx[1:] >= g_idx[:-1]).all())
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc.get("checkpoint_format", qc.get("format")) == ORACLE[name].get("format", "gemm")


@pytest.mark.parametrize("name", list(ORACLE) + list(SYNTHETIC))
def test_decode_encode_gives_back_stored_qweight(request, name):
    folder = base_of(name, request)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    entries = {t.name: t for t in read_safetensors_header(folder / "model.safetensors").tensors}
    stored = load_file(folder / "model.safetensors")
    found = gptq.describe(entries, qc, lambda e: read_entry(folder / e.file, e), str(folder))
    assert len(found) == 14
    for enc in found:
        tensors = {m: stored[m] for m in enc.members}
        values, state = gptq.decode(enc, tensors)
        changed, realized = gptq.encode(enc, values.clone(), state)
        assert list(changed) == [enc.name] and torch.equal(changed[enc.name], stored[enc.name])
        # forced through the rounding (no value counts as unchanged): the same codes again
        changed, realized = gptq.encode(enc, values.clone(), state[:3] + (values + 1,))
        assert torch.equal(changed[enc.name], stored[enc.name]) and torch.equal(realized, values)


# ----------------------------------------------------------------------------- merges

@pytest.mark.parametrize("name", list(ORACLE) + list(SYNTHETIC))
def test_zero_adapter_merge_is_a_byte_copy(request, root, tmp_path, name):
    folder = base_of(name, request)
    zero, _ = lora(root, folder, name, zero=True)
    report = at.merge(folder, [zero], tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (folder / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == \
        json.loads((folder / "config.json").read_text())
    assert report["survival"]["tensors"] == 2 * len(TARGETS)


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_a_small_lora_on_a_4_bit_grid_is_reported_lost(synthetic, root, tmp_path, name):
    """2%: almost every value rounds back to its stored code: a low survival score, and the
    report's warning names the better routes."""
    from adaptertools.merging.quantized import LOW_SURVIVAL

    adapter, _ = lora(root, synthetic[name], name)
    report = at.merge(synthetic[name], [adapter], tmp_path / "out")
    survival = report["survival"]
    assert survival["tensors"] == 2 * len(TARGETS) and survival["median_cosine"] < LOW_SURVIVAL
    assert {r["type"] for r in survival["rows"]} == {f"{name.split('-')[1].upper()}-INT4"}
    assert "merging into the unquantized model" in survival["warning"]


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_validator_checks_gptq_weights(synthetic, root, tmp_path, name):
    """validate decodes the base and the output with the codec: a keep merge passes; the base
    itself given as the output (the adapter left out) fails on the adapted weights."""
    adapter, _ = lora(root, synthetic[name], name, rel=REL_KEEP)
    at.merge(synthetic[name], [adapter], tmp_path / "out")
    report = at.validate(synthetic[name], [adapter], tmp_path / "out")
    assert report["passed"], [r for r in report["tensors"] if not r["passed"]][:3]
    assert len([r for r in report["tensors"] if r["kind"] == "adapted"]) == 2 * len(TARGETS)
    report = at.validate(synthetic[name], [adapter], synthetic[name])
    failed = {r["name"] for r in report["tensors"] if not r["passed"]}
    assert not report["passed"] and len(failed) == 2 * len(TARGETS), failed


def check_keep(folder, out, deltas, bits=4):
    """Same size, header and config; only adapted qweights change; each adapted value is the
    nearest point of its stored grid to decode + delta (codes off the clamp bounds)."""
    assert (out / "model.safetensors").stat().st_size == (folder / "model.safetensors").stat().st_size
    assert json.loads((out / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    before, after = qb.raw_tensors(folder), qb.raw_tensors(out)
    assert list(before) == list(after)
    adapted = {k.removesuffix(".weight") + ".qweight" for k in deltas}
    for key in before:
        if key not in adapted:
            assert before[key] == after[key], f"{key}: untouched, must be byte-identical"
    assert all(before[k] != after[k] for k in adapted)
    (base, _), (merged, states) = decodings(folder), decodings(out)
    for key, delta in deltas.items():
        codes, _, scales, _ = states[key][1]
        inside = (codes > -(1 << (bits - 1))) & (codes < (1 << (bits - 1)) - 1)
        # half a grid step (with room for the fp32 fold's error), plus the rounding of
        # (q - z) * s to the scales' dtype (half its ulp: 2^-11 relative for fp16, 2^-8 bf16)
        unit = torch.finfo(scales.dtype).eps / 2
        bound = scales.double().abs() / 2 * (1 + 2.0 ** -9) + merged[key].double().abs() * unit
        err = (merged[key].double() - (base[key].double() + delta)).abs()
        assert bool((err <= bound)[inside].all()), key
    return merged


@pytest.mark.parametrize("name", ["gptq-act", "awq"])
def test_keep_merge_loads_in_gptqmodel_and_matches_the_float_model(oracle, root, tmp_path, name):
    folder = oracle[name][0]
    adapter, deltas = lora(root, folder, name, rel=REL_KEEP)
    report = at.merge(folder, [adapter], tmp_path / "out")
    assert report["survival"]["tensors"] == 2 * len(TARGETS)
    merged = check_keep(folder, tmp_path / "out", deltas)
    model = qb.tiny_llama(hidden=HIDDEN, intermediate=INTER, seed=0)
    model.load_state_dict(merged)
    ref = qb.logits(model)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))  # as qb.logits
    (run,) = gptqmodel_env.run([{"op": "logits", "folder": str(tmp_path / "out"),
                                 "ids": ids.tolist()}])
    theirs = load_file(run / "out.safetensors")["logits"].double()
    dtype = load_file(folder / "model.safetensors")[Q + ".scales"].dtype
    assert qb.rel_l2(theirs, ref) <= KERNEL_NOISE[dtype], qb.rel_l2(theirs, ref)


@pytest.mark.parametrize("name", ["synthetic-gptq", "synthetic-awq", "gptq-act", "awq"])
def test_requantize_bf16_is_a_plain_model(request, root, tmp_path, name):
    import transformers

    folder = base_of(name, request)
    adapter, deltas = lora(root, folder, name)
    at.merge(folder, [adapter], tmp_path / "out", requantize="bf16")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    stored = load_file(tmp_path / "out" / "model.safetensors")
    base = decoded(folder)
    assert set(stored) == set(base)              # no qweight, qzeros, scales, g_idx
    for key, w in base.items():
        if not key.endswith("proj.weight"):
            continue
        assert stored[key].dtype == torch.bfloat16, key
        assert qb.within_one_rounding(stored[key], w.double() + deltas.get(key, 0)), key
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None


# ----------------------------------------------------------------------------- refusals

def _g_idx_out_of_range(sd):
    sd[Q + ".g_idx"] = sd[Q + ".g_idx"].clone()
    sd[Q + ".g_idx"][5] = 4


@pytest.mark.parametrize("name,change,config,fragments", [
    ("synthetic-gptq", _g_idx_out_of_range, None,
     [Q + ".g_idx[5] is 4", "outside the 4 groups", "download it again"]),
    ("synthetic-awq", lambda sd: sd.__setitem__(Q + ".scales", sd[Q + ".scales"][:2]), None,
     [Q + ".scales is F16 [2, 128]", "qweight [128, 16]", "needs F16/BF16/F32 [4, 128]"]),
    ("synthetic-gptq", None, lambda qc: qc.update(bits=3),
     ["gptq with bits=3 is not supported", "2, 4, 8 are"]),
    ("synthetic-gptq", lambda sd: sd.pop(Q + ".qzeros"), None,
     [Q + ".qweight has no " + Q + ".qzeros"]),
], ids=["g_idx-range", "scales-shape", "bits", "missing-qzeros"])
def test_bad_input_is_one_line_and_writes_nothing(synthetic, root, tmp_path, name, change, config,
                                                   fragments):
    base = qb.damaged_copy(synthetic[name], tmp_path / "base", change, config)
    adapter = root / "lora-bad"
    if not adapter.exists():
        qb.scaled_lora(qb.tiny_llama(hidden=HIDDEN, intermediate=INTER, seed=0),
                    decoded(synthetic["synthetic-gptq"]), adapter, targets=TARGETS, rel=REL)
    out = tmp_path / "out"
    outcome = run_cli("merge", base, adapter, "--out", out)
    assert_cli_error(outcome, fragments)
    assert_nothing_written(out)

