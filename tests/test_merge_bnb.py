"""Merging into bitsandbytes checkpoints (NF4, FP4 with double quantization, NF4 with blocksize
32, LLM.int8), checked by bitsandbytes and transformers themselves.

The bases are a seeded tiny Llama quantized by transformers + bitsandbytes on the CPU and saved
with ``save_pretrained`` (the blocksize-32 one is re-quantized with ``bitsandbytes.functional``,
which transformers does not expose; not 128: bitsandbytes 0.50.2's CPU ``dequantize_4bit`` kernel
is wrong when a block is longer than a row, and this model's rows have 64 values); the adapter is a PEFT LoRA on q_proj, v_proj and down_proj
scaled to ||delta|| / ||W|| = 2% (a typical fine-tune), read back from PEFT's own files for the
float64 reference ``deq(W) + scale * B @ A``, where ``deq`` is bitsandbytes' own dequantization.

- keep: same header, size and config; every tensor outside the adapted groups (and the quant
  maps, JSON quant states, weight_format) byte for byte; each adapted weight is what
  bitsandbytes' own quantizer makes of the fp32 merge (all bytes for NF4 and int8; FP4 with
  double quantization keeps the stored nested offset, so there the check is the dequantized
  weight); loaded by transformers with bitsandbytes on the CPU, its logits equal those of a float
  Llama holding the bitsandbytes-dequantized merged weights to fp32 accuracy (bitsandbytes'
  fp32 path; its bf16 AVX512 kernel, where the CPU has it, is switched off for this);
- --requantize bf16/fp16: a plain model (no quant state, no quantization_config) that loads
  without bitsandbytes, each weight within one 16-bit ulp of the float64 reference;
- survival: the report's cosines equal an independent float64 computation; NF4 keeps little of a
  2% adapter (the warning says so), int8 keeps most of it, bf16 all of it;
- a group split across shards; damaged quant states and unsupported configs are refused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.quantized_bases import logits, raw_tensors, rel_l2
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.errors import FormatError, UnsupportedError

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import (
    QuantState,
    dequantize_4bit,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    quantize_4bit,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]
REL = 0.02                                      # ||delta|| / ||W|| of each adapted weight
KINDS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}
FP32_LOGITS = 1e-5       # relative L2, fp32 compute of a 2-layer model (FORMATS.md: ~1e-6)
BF16_ULP = 2.0 ** -7     # spacing of bf16 values in [1, 2); fp16: 2 ** -10
COMPANION = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB",
             ".weight_format", ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


# ----------------------------------------------------------------------------- fixtures

def _llama():
    import transformers

    torch.manual_seed(2024)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def _reblock(src: Path, dst: Path, blocksize: int) -> None:
    """The NF4 checkpoint re-quantized by bitsandbytes with another blocksize."""
    shutil.copytree(src, dst)
    sd = load_file(src / "model.safetensors")
    out = {k: v for k, v in sd.items() if not _companion_of_4bit(k, sd)}
    for name in [k for k, v in sd.items() if v.dtype == torch.uint8 and k.endswith(".weight")]:
        weight = _deq_4bit(sd, name)
        packed, state = quantize_4bit(weight, blocksize=blocksize, quant_type="nf4")
        out[name] = packed
        out.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


def _companion_of_4bit(key: str, sd) -> bool:
    return any(key.startswith(n + ".") for n, v in sd.items()
               if v.dtype == torch.uint8 and n.endswith(".weight"))


@pytest.fixture(scope="module")
def bnb_case(tmp_path_factory):
    """The float base, its bitsandbytes checkpoints and one PEFT LoRA (2% of each weight)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("merge_bnb")
    _llama().save_pretrained(root / "f32")
    bases = {}
    for kind, options in KINDS.items():
        q = transformers.BitsAndBytesConfig(**options, bnb_4bit_compute_dtype=torch.float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            root / "f32", quantization_config=q, device_map="cpu", dtype=torch.float32)
        model.save_pretrained(root / kind)
        bases[kind] = root / kind
    _reblock(root / "nf4", root / "nf4b32", 32)
    bases["nf4b32"] = root / "nf4b32"
    base = dequantized(bases["nf4"])     # the LoRA's size is set against the NF4 weights
    peft_model = get_peft_model(_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                     init_lora_weights=False))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=gen))
                b.copy_(torch.randn(b.shape, generator=gen))
                key = name.removeprefix("base_model.model.") + ".weight"
                delta = (b.double() @ a.double()) * module.scaling["default"]
                b.mul_(float(REL * base[key].norm() / delta.norm()))
    peft_model.save_pretrained(root / "lora")
    return root, bases


def read_lora(folder: Path) -> dict[str, torch.Tensor]:
    """float64 deltas from PEFT's files: scale * B @ A, by base tensor name."""
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    sd = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key, a in sd.items():
        if ".lora_A." in key:
            b = sd[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            out[name] = scale * (b.double() @ a.double())
    return out


def _deq_4bit(sd: dict, name: str) -> torch.Tensor:
    parts = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
    return dequantize_4bit(sd[name], QuantState.from_dict(parts, device=torch.device("cpu")))


def dequantized(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint as float64, quantized ones dequantized by bitsandbytes."""
    sd = load_file(folder / "model.safetensors")
    out = {}
    for name, t in sd.items():
        if name.endswith(COMPANION):
            continue
        if t.dtype == torch.uint8:
            out[name] = _deq_4bit(sd, name)
        elif t.dtype == torch.int8:
            out[name] = int8_vectorwise_dequant(t, sd[name.removesuffix("weight") + "SCB"])
        else:
            out[name] = t
    return {k: v.double() for k, v in out.items()}


def float_llama(weights: dict[str, torch.Tensor]):
    model = _llama()
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    return model


def in_group(name: str, adapted: set[str]) -> bool:
    module = name.split(".weight")[0] if ".weight" in name else name.removesuffix(".SCB")
    return any(a.removesuffix(".weight") == module for a in adapted)


def quantized_like_bnb(kind: str, merged: torch.Tensor, stored: dict, name: str) -> dict[str, bytes]:
    """What bitsandbytes' own quantizer stores for the fp32 weight ``merged``."""
    if kind == "int8":
        cb, scb, _ = int8_vectorwise_quant(merged.half())
        return {name: cb.numpy().tobytes(), name.removesuffix("weight") + "SCB": scb.numpy().tobytes()}
    blocksize = json.loads(bytes(stored[f"{name}.quant_state.bitsandbytes__nf4"].tolist()))["blocksize"]
    packed, state = quantize_4bit(merged, blocksize=blocksize, quant_type="nf4")
    return {name: packed.numpy().tobytes(), f"{name}.absmax": state.absmax.numpy().tobytes()}


# ----------------------------------------------------------------------------- keep

@pytest.fixture(scope="module")
def kept(bnb_case, tmp_path_factory):
    root, bases = bnb_case
    out = tmp_path_factory.mktemp("merge_bnb_kept")
    reports = {kind: at.merge(base, [root / "lora"], out / kind) for kind, base in bases.items()}
    return out, reports


@pytest.mark.parametrize("kind", ["nf4", "fp4dq", "nf4b32", "int8"])
def test_keep_same_layout_untouched_bytes_and_bnb_quantization(bnb_case, kept, kind):
    root, bases = bnb_case
    base, out = bases[kind], kept[0] / kind
    assert (out / "model.safetensors").stat().st_size == (base / "model.safetensors").stat().st_size
    before, after = raw_tensors(base), raw_tensors(out)
    assert (out / "model.safetensors").read_bytes()[:64] == (base / "model.safetensors").read_bytes()[:64]
    assert list(before) == list(after)
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    deltas = read_lora(root / "lora")
    assert len(deltas) == 6
    for name in before:
        grouped = in_group(name, set(deltas))
        kept_as_is = name.endswith((".quant_map", ".nested_quant_map", ".weight_format")) or \
            ".quant_state." in name
        if not grouped or kept_as_is:
            assert before[name] == after[name], f"{name}: untouched, must be byte-identical"
    # each adapted weight is what bitsandbytes makes of the fp32 merge
    base_w, merged_w = dequantized(base), dequantized(out)
    stored = load_file(base / "model.safetensors")
    for name, delta in deltas.items():
        target = (base_w[name] + delta).float()
        if kind == "fp4dq":     # nested offset kept: compare dequantized, within the 4-bit grid
            ref = dequantized_fp4dq(target, stored, name)
            assert rel_l2(merged_w[name], ref) < 1e-2, name
            continue
        expected = quantized_like_bnb(kind, target, stored, name)
        for key, data in expected.items():
            mismatch = _mismatch(after[key], data, kind, key)
            assert mismatch <= 0.002, f"{key}: {mismatch:.4f} of its values differ from bitsandbytes'"


def dequantized_fp4dq(target: torch.Tensor, stored: dict, name: str) -> torch.Tensor:
    packed, state = quantize_4bit(target, blocksize=64, quant_type="fp4", compress_statistics=True)
    return dequantize_4bit(packed, state).double()


def _mismatch(ours: bytes, theirs: bytes, kind: str, key: str) -> float:
    """Fraction of differing values: the fp32 merge is ours (fp32 ops in our order), bnb's input
    is the float64 reference rounded to fp32, so a value on a rounding boundary may flip."""
    assert len(ours) == len(theirs), key
    if key.endswith(("SCB", "absmax")):
        a = torch.frombuffer(bytearray(ours), dtype=torch.float32)
        b = torch.frombuffer(bytearray(theirs), dtype=torch.float32)
        return float(((a - b).abs() > 1e-6 * b.abs()).double().mean())
    a, b = bytearray(ours), bytearray(theirs)
    return sum(x != y for x, y in zip(a, b)) / len(a)


@pytest.mark.parametrize("kind", ["nf4", "fp4dq", "nf4b32", "int8"])
def test_keep_loads_in_transformers_and_matches_dequantized_reference(kept, kind):
    """transformers + bitsandbytes run the merged checkpoint as a float model holding the
    bitsandbytes-dequantized merged weights would."""
    import transformers

    out = kept[0] / kind
    model = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    linear = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    quantized = [m for m in model.modules() if isinstance(m, linear)]
    assert len(quantized) == 14
    reference = logits(float_llama(dequantized(out)))
    if kind == "int8":
        # LLM.int8 quantizes the activations too (row-wise int8): the tolerance is that noise,
        # measured on the base through the same kernel, with a margin
        base = kept[1][kind]["base"]
        base_model = transformers.AutoModelForCausalLM.from_pretrained(base, device_map="cpu")
        base_noise = rel_l2(logits(base_model), logits(float_llama(dequantized(Path(base)))))
        assert rel_l2(logits(model), reference) < 3 * base_noise + FP32_LOGITS
        return
    for m in quantized:     # bitsandbytes' fp32 path: dequantize to compute dtype, then linear
        m.support_avx512bf16_for_cpu = False
    assert rel_l2(logits(model), reference) < FP32_LOGITS


def test_keep_survival_scores_are_the_realized_change(bnb_case, kept):
    root, bases = bnb_case
    deltas = read_lora(root / "lora")
    medians = {}
    for kind, report in kept[1].items():
        survival = report["survival"]
        assert survival["report"] == str(kept[0] / kind / "survival.json")
        saved = json.loads((kept[0] / kind / "survival.json").read_text())
        assert saved["rows"] == survival["rows"] and len(saved["rows"]) == 6
        before, after = dequantized(bases[kind]), dequantized(kept[0] / kind)
        for row in survival["rows"]:
            name = row["name"]
            realized, intended = after[name] - before[name], deltas[name]
            cosine = float((realized * intended).sum() / (realized.norm() * intended.norm()))
            assert row["cosine"] == pytest.approx(cosine, abs=1e-4), name
            assert row["type"] == ("INT8" if kind == "int8" else kind[:3].upper())
        medians[kind] = survival["median_cosine"]
    print("median survival cosine at ||delta||/||W|| = 2%:", medians)
    # 4-bit grids erase most of a 2% change (PEFT's merge_and_unload: the same, see README)
    for kind in ("nf4", "nf4b32", "fp4dq"):
        assert 0 < medians[kind] < 0.7
        assert any("only part of the adapter survived" in w and "--requantize bf16" in w
                   for w in kept[1][kind]["warnings"])
    assert medians["int8"] > 0.9


# ----------------------------------------------------------------------------- 16-bit output

@pytest.mark.parametrize("kind,requantize", [("nf4", "bf16"), ("fp4dq", "fp16"), ("int8", "bf16")])
def test_requantize_16bit_is_a_plain_model(bnb_case, tmp_path, kind, requantize):
    import transformers

    root, bases = bnb_case
    out = tmp_path / "plain"
    report = at.merge(bases[kind], [root / "lora"], out, requantize=requantize)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[requantize]
    ulp = BF16_ULP if requantize == "bf16" else 2.0 ** -10
    stored = load_file(out / "model.safetensors")
    assert not [k for k in stored if k.endswith(COMPANION)]
    base = dequantized(bases[kind])
    deltas = read_lora(root / "lora")
    with safe_open(bases[kind] / "model.safetensors", "pt") as f:
        quantized = {k for k in f.keys() if f.get_slice(k).get_dtype() in ("U8", "I8")}  # noqa: SIM118
    for name, ref64 in base.items():
        if name not in quantized:
            assert torch.equal(stored[name], load_file(bases[kind] / "model.safetensors")[name])
            continue
        assert stored[name].dtype == dtype and stored[name].shape == ref64.shape, name
        if name not in deltas:      # unadapted: bitsandbytes' dequantization, rounded once
            assert torch.equal(stored[name], ref64.to(dtype)), name
            continue
        ref = ref64 + deltas[name]
        # the fp32 fold rounded to 16 bits: within one ulp of the float64 reference, and equal
        # to the reference rounded once except where the fp32 step lands on a rounding tie
        err = (stored[name].double() - ref).abs()
        binade = torch.exp2(torch.floor(torch.log2(ref.abs().clamp(min=torch.finfo(dtype).tiny))))
        assert bool((err <= ulp * binade).all()), name
        assert float((stored[name] != ref.to(dtype)).double().mean()) < 1e-3, name
    # 16-bit rounding noise (unit roundoff u, ~u/sqrt(3) rms of |W|) next to a 2% delta: bf16
    # (u = 2^-9) leaves rel. error ~0.11, cosine ~0.994; fp16 (u = 2^-12) ~0.9999
    print(kind, requantize, "median survival cosine", report["survival"]["median_cosine"])
    assert report["survival"]["median_cosine"] > (0.98 if requantize == "bf16" else 0.999)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
    weights = {k: (v.to(dtype) if k in quantized else v) for k, v in base.items()}
    weights.update({k: (base[k] + d).to(dtype) for k, d in deltas.items()})
    assert rel_l2(logits(model.float()), logits(float_llama(weights))) < 1e-3


def test_requantize_output_loads_without_bitsandbytes(bnb_case, tmp_path):
    root, bases = bnb_case
    out = tmp_path / "plain"
    at.merge(bases["nf4"], [root / "lora"], out, requantize="bf16")
    script = ("import sys; sys.modules['bitsandbytes'] = None\n"
              "import transformers, torch\n"
              f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
              "print(type(m.model.layers[0].self_attn.q_proj).__name__)\n"
              "print(m(torch.tensor([[1, 2, 3]])).logits.isfinite().all().item())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["Linear", "True"]


# ----------------------------------------------------------------------------- shards

def test_group_split_across_shards(bnb_case, kept, tmp_path):
    """A weight in one shard and its absmax in the other (both orders): same tensors as the
    single-file merge."""
    root, bases = bnb_case
    sd = load_file(bases["nf4"] / "model.safetensors")
    first = {k: v for k, v in sd.items()
             if ("layers.0." in k and not k.endswith("q_proj.weight")) or k.endswith("layers.1.self_attn.v_proj.weight")}
    second = {k: v for k, v in sd.items() if k not in first}
    base = tmp_path / "sharded"
    base.mkdir()
    shutil.copy(bases["nf4"] / "config.json", base / "config.json")
    weight_map = {}
    for i, part in enumerate((first, second)):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file(part, base / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    at.merge(base, [root / "lora"], tmp_path / "out")
    merged = {}
    for i in (1, 2):
        merged.update(load_file(tmp_path / "out" / f"model-0000{i}-of-00002.safetensors"))
    single = load_file(kept[0] / "nf4" / "model.safetensors")
    assert merged.keys() == single.keys()
    for k in single:
        assert torch.equal(merged[k], single[k]), k


# ----------------------------------------------------------------------------- bad input

def _damaged(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(src / "model.safetensors")
    change(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("change,message", [
    (lambda sd: sd.pop(f"{Q}.absmax"), rf"{Q}.*'{Q}.absmax' is missing"),
    (lambda sd: sd.__setitem__(f"{Q}.absmax", sd[f"{Q}.absmax"][:-3].clone()),
     rf"{Q}.*absmax has 61 values, 64 expected"),
    (lambda sd: sd.__setitem__(f"{Q}.quant_state.bitsandbytes__nf4",
                               torch.tensor(list(b"{not json"), dtype=torch.uint8)),
     rf"{Q}.*corrupted quant state"),
    (lambda sd: sd.pop(f"{Q}.quant_state.bitsandbytes__nf4"), rf"{Q}.*found none"),
], ids=["missing-absmax", "absmax-size", "bad-json", "missing-quant-state"])
def test_damaged_quant_state_is_one_line_format_error(bnb_case, tmp_path, change, message):
    root, bases = bnb_case
    base = _damaged(bases["nf4"], tmp_path / "base", change)
    with pytest.raises(FormatError, match=message) as err:
        at.merge(base, [root / "lora"], tmp_path / "out")
    assert "\n" not in str(err.value) and "download it again" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_scb_is_format_error(bnb_case, tmp_path):
    root, bases = bnb_case
    scb = Q.removesuffix("weight") + "SCB"
    base = _damaged(bases["int8"], tmp_path / "base", lambda sd: sd.pop(scb))
    with pytest.raises(FormatError, match=rf"{Q}.*needs.*SCB"):
        at.merge(base, [root / "lora"], tmp_path / "out")


@pytest.mark.parametrize("edit,message", [
    (lambda q: q.update(bnb_4bit_quant_storage="bfloat16"), "bnb_4bit_quant_storage 'bfloat16'"),
    (lambda q: q.update(quant_method="hqq"), "quant_method 'hqq' is not supported"),
    (lambda q: q.update(load_in_8bit=True, _load_in_8bit=True), "exactly one of load_in_4bit"),
])
def test_unsupported_bnb_config(bnb_case, tmp_path, edit, message):
    root, bases = bnb_case
    base = tmp_path / "base"
    shutil.copytree(bases["nf4"], base)
    config = json.loads((base / "config.json").read_text())
    edit(config["quantization_config"])
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match=message):
        at.merge(base, [root / "lora"], tmp_path / "out")


def test_requantize_choices(bnb_case, tmp_path):
    root, bases = bnb_case
    with pytest.raises(UnsupportedError, match="keep.*bf16, fp16 or fp32"):
        at.merge(bases["nf4"], [root / "lora"], tmp_path / "out", requantize="q4_0")
    with pytest.raises(UnsupportedError, match="use --dtype"):
        at.merge(root / "f32", [root / "lora"], tmp_path / "out", requantize="bf16")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["nf4", "fp4dq", "nf4b32", "int8"])
def test_merge_validate_on_bitsandbytes_bases(bnb_case, tmp_path, kind):
    """merge --validate: each adapted weight dequantized with its quant state, within 1 dB of
    the floor (the fp32 merge quantized the way the base is); its quant-state tensors are
    checked through it. A 4-bit grid hides a 2% change (survival ~0.04: a merge that left the
    adapter out is within the floor's noise there, which is what survival says); a merge checked
    against ten times the adapter fails on exactly the adapted weights, and for int8 so does a
    merge that left the adapter out."""
    root, bases = bnb_case
    out = tmp_path / "out"
    report = at.merge(bases[kind], [root / "lora"], out, validate=True)
    validation = json.loads((out / "validation.json").read_text())
    assert report["validation"]["passed"] == validation["passed"]
    assert validation["passed"], [r for r in validation["tensors"] if not r["passed"]][:3]
    adapted = [r for r in validation["tensors"] if r["kind"] == "adapted"]
    assert adapted and all(r["identical_to_floor"] for r in adapted)
    assert all(0 < r["survival"] <= 1 for r in adapted)
    names = {r["name"] for r in adapted}
    wrong = at.validate(bases[kind], [root / "lora"], out, weights=[10.0])
    assert {r["name"] for r in wrong["tensors"] if not r["passed"]} == names
    if kind == "int8":
        missing = at.validate(bases[kind], [root / "lora"], bases[kind])      # nothing merged
        assert {r["name"] for r in missing["tensors"] if not r["passed"]} == names


def test_merge_validate_on_a_16bit_requantized_bitsandbytes_merge(bnb_case, tmp_path):
    root, bases = bnb_case
    report = at.merge(bases["nf4"], [root / "lora"], tmp_path / "out", requantize="bf16",
                      validate=True)
    validation = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert report["validation"]["passed"] == validation["passed"]
    assert validation["passed"], [r for r in validation["tensors"] if not r["passed"]][:3]
    kinds = {r["kind"] for r in validation["tensors"]}
    assert "adapted" in kinds and "untouched" in kinds
