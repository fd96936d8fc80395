"""The base-side seam (codecs/): a codec written here, in the test, plugs into the registry and a
LoRA merges into a checkpoint it encodes end to end, with no change to the planner or the
engine. This module is itself the codec: "int8 with one fp32 scale per row".

Stored per quantized linear weight ``X.weight`` (rows, cols):
  ``X.weight``        I8 (rows, cols)   q = round(w / s) clamped to [-127, 127]
  ``X.weight_scale``  F32 (rows,)       s = max|w_row| / 127 (1 for an all-zero row)
and config.json's ``quantization_config = {"quant_method": "int8-row-test"}``.

Checked: the merge keeps the header (names, dtypes, shapes) and every untouched tensor's bytes;
each adapted weight's bytes are exactly this codec's encoding of PEFT's own fp32
``merge_and_unload`` of the decoded base, its scale companion patched in place; the survival
score is reported under the codec's type name; the validator passes the result; ``--requantize
bf16`` writes a plain model; without the codec registered the base is refused by name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools import codecs
from adaptertools.codecs import Encoding
from adaptertools.errors import UnsupportedError

# ----------------------------------------------------------------------------- the codec

NAME = "int8-row-test"
QUANT_METHODS = ("int8-row-test",)
DAMAGED = "the test checkpoint is damaged"
SCALE = "_scale"          # X.weight -> X.weight_scale


def describe(entries, config, read, where):
    out = []
    for name, entry in entries.items():
        if name.endswith(SCALE):
            continue
        if entry.dtype == "I8":
            scale = entries.get(name + SCALE)
            if scale is None or scale.dtype != "F32" or tuple(scale.shape) != entry.shape[:1]:
                raise UnsupportedError(f"{where}: {name} has no F32 {name + SCALE} of "
                                       f"{entry.shape[0]} rows")
            out.append(Encoding(NAME, "INT8ROW", name, tuple(entry.shape), (name, name + SCALE)))
    return out


def decode(encoding, tensors):
    q, s = tensors[encoding.name], tensors[encoding.name + SCALE]
    return q.to(torch.float32) * s.view(-1, 1), None


def quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (rows, cols) -> (I8 codes, F32 row scales)."""
    peak = values.abs().amax(dim=1)
    s = torch.where(peak > 0, peak / 127, torch.ones_like(peak))
    q = torch.round(values / s.view(-1, 1)).clamp(-127, 127).to(torch.int8)
    return q, s


def encode(encoding, values, state):
    q, s = quantize(values)
    return {encoding.name: q, encoding.name + SCALE: s}, q.to(torch.float32) * s.view(-1, 1)


THIS = sys.modules[__name__]

# ----------------------------------------------------------------------------- fixtures

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _llama():
    import transformers

    torch.manual_seed(7)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=128, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def _quantized(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and name.endswith("proj.weight")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(int8-row base folder, PEFT adapter folder, the decoded base's state, PEFT's merge)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("codec")
    model = _llama()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stored, decoded = {}, {}
    for name, t in state.items():
        if _quantized(name, t):
            q, s = quantize(t.float())
            stored[name], stored[name + SCALE] = q, s
            decoded[name] = q.float() * s.view(-1, 1)
        else:
            stored[name] = decoded[name] = t
    base = root / "base"
    model.config.save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": NAME}
    (base / "config.json").write_text(json.dumps(config, indent=2))
    save_file(stored, base / "model.safetensors", metadata={"format": "pt"})

    model.load_state_dict(decoded)            # the float model the codec's weights stand for
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    adapter = root / "adapter"
    peft_model.save_pretrained(adapter)
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return base, adapter, decoded, merged


@pytest.fixture
def registered():
    codecs.register(THIS)
    yield
    codecs.unregister(NAME)


# ----------------------------------------------------------------------------- tests

def test_registered_codec_merges_end_to_end(case, registered, tmp_path):
    base, adapter, decoded, reference = case
    report = at.merge(base, [adapter], tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    src = load_file(base / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == \
        {k: (v.dtype, v.shape) for k, v in src.items()}
    adapted = {n for n in src if any(t in n for t in TARGETS) and not n.endswith(SCALE)}
    assert len(adapted) == 2 * len(TARGETS)
    for name in src:
        weight = name.removesuffix(SCALE)
        if weight in adapted:
            q, s = quantize(reference[weight].float())
            expected = q if name == weight else s
            assert torch.equal(out[name], expected), name     # bit for bit, scale patched too
        else:
            assert torch.equal(out[name], src[name]), name     # untouched: the base's bytes
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == \
        {"quant_method": NAME}
    rows = report["survival"]["rows"]
    assert sorted(r["name"] for r in rows) == sorted(adapted)
    assert {r["type"] for r in rows} == {"INT8ROW"}
    # an independent score: cos(intended, realized) of the decoded tensors
    for r in rows:
        intended = (reference[r["name"]] - decoded[r["name"]]).double().reshape(-1)
        realized = (out[r["name"]].double() * out[r["name"] + SCALE].double().view(-1, 1)
                    - decoded[r["name"]].double()).reshape(-1)
        cosine = float(intended @ realized / (intended.norm() * realized.norm()))
        assert r["cosine"] == pytest.approx(cosine, abs=1e-4)


def test_validator_checks_codec_weights(case, registered, tmp_path):
    base, adapter, _, _ = case
    at.merge(base, [adapter], tmp_path / "out")
    report = at.validate(base, [adapter], tmp_path / "out")
    assert report["passed"], [r for r in report["tensors"] if not r["passed"]]
    adapted = [r for r in report["tensors"] if r["kind"] == "adapted"]
    assert len(adapted) == 2 * len(TARGETS) and {r["dtype"] for r in adapted} == {"INT8ROW"}
    # a damaged merge (one adapted weight's codes left as the base's) fails
    out = load_file(tmp_path / "out" / "model.safetensors")
    src = load_file(base / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    out[name], out[name + SCALE] = src[name], src[name + SCALE]
    save_file(out, tmp_path / "out" / "model.safetensors", metadata={"format": "pt"})
    report = at.validate(base, [adapter], tmp_path / "out")
    assert not report["passed"]
    assert [r["name"] for r in report["tensors"] if not r["passed"]] == [name]


def test_requantize_bf16_writes_a_plain_model(case, registered, tmp_path):
    base, adapter, _, reference = case
    at.merge(base, [adapter], tmp_path / "out", requantize="bf16")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert not any(n.endswith(SCALE) for n in out)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    for name, t in out.items():
        if name.endswith("proj.weight"):
            assert t.dtype == torch.bfloat16
            if any(x in name for x in TARGETS):
                assert torch.equal(t, reference[name].to(torch.bfloat16)), name


def test_unregistered_codec_is_refused_by_name(case, tmp_path):
    base, adapter, _, _ = case
    with pytest.raises(UnsupportedError, match="quant_method 'int8-row-test' is not supported.*"
                                                "bitsandbytes"):
        at.merge(base, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_planner_and_engine_name_no_codec():
    """The seam is real: the planner and the engine ask the registry, never a codec by name."""
    root = Path(at.__file__).parent / "merging"
    for module in ("plan.py", "run.py", "jobs.py", "encoded.py", "streams.py"):
        text = (root / module).read_text().lower()
        assert "bitsandbytes" not in text and "bnb" not in text, module


def test_gguf_types_speak_the_same_contract():
    """The GGUF codec (codecs/gguf.py, what the GGUF merge path uses) under the registry's
    contract: encode gives kernels/quant's bytes, decode gives back what encode realized, and a
    Q8_0 round trip keeps the values to its grid (8-bit codes, one fp16 scale per 32: relative
    error well under 1%); float types are exact casts."""
    from adaptertools.kernels.quant.codec import quantize as block_quantize

    gguf = codecs.by_name("gguf")
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))   # Q4_K: blocks of 256
    for type_name in ("Q8_0", "Q4_K", "F16", "F32"):
        enc = gguf.encoding("t", type_name, (4, 256))
        changed, realized = gguf.encode(enc, x, None)
        values, _ = gguf.decode(enc, changed)
        assert torch.equal(values, realized), type_name
        if type_name in ("Q8_0", "Q4_K"):
            assert torch.equal(changed["t"], block_quantize(x, type_name)), type_name
        else:
            assert torch.equal(values, x.to(changed["t"].dtype).float()), type_name
    q8 = gguf.roundtrip(x, "Q8_0")
    assert float((q8 - x).norm() / x.norm()) < 0.01
    entries = {"a": type("E", (), {"dtype": "Q8_0", "shape": (4, 256)})(),
               "b": type("E", (), {"dtype": "F16", "shape": (4, 256)})()}
    assert [e.name for e in gguf.describe(entries, None, None, "")] == ["a"]
