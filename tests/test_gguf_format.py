"""GGUF adapters: llama.cpp's own converter as the oracle for names and transforms, exact round
trips for every supported architecture, clear refusals and bad-input handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import adaptertools as at
from adaptertools.adapter import first_difference
from adaptertools.errors import FormatError, UnsupportedError
from adaptertools.formats.names import load_base_info

from helpers.cli import assert_cli_error, assert_nothing_written, run_cli
from helpers.models import GGUF_ARCHS, GGUF_TARGETS, make_causal_lm
from helpers.peft_adapters import perturb_trainables

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(model, folder: Path, **config) -> Path:
    """A PEFT adapter as training leaves it: random factors, modules_to_save copies changed."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    perturb_trainables(peft_model)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    """Per architecture: the HF base folder (config + weights) and a PEFT adapter on every
    linear layer of its blocks."""
    root = tmp_path_factory.mktemp("archs")
    dirs = {}
    for arch in GGUF_ARCHS:
        model = make_causal_lm(arch)
        model.save_pretrained(root / f"hf_{arch}")
        peft_adapter(model, root / f"peft_{arch}", r=4, lora_alpha=8,
                     target_modules=GGUF_TARGETS.get(arch, LLAMA_LINEAR))
        dirs[arch] = (root / f"hf_{arch}", root / f"peft_{arch}")
    return dirs


def run_converter(script: Path, base: Path, adapter: Path, out: Path, outtype: str = "f32"):
    result = subprocess.run([sys.executable, str(script), "--base", str(base), "--outtype", outtype,
                             "--outfile", str(out), str(adapter)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in reader.tensors}


def saved_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


# ----------------------------------------------------------------------------- llama.cpp's converter

LLAMA_CPP_CONVERTS = [a for a in GGUF_ARCHS if a != "gpt2"]


# every architecture in f32; the dtypes (arch-independent) on two of them
CONVERTER_CASES = [(a, "f32") for a in LLAMA_CPP_CONVERTS] + \
    [(a, t) for a in ("llama", "qwen2") for t in ("f16", "bf16", "q8_0")]


@pytest.mark.parametrize("arch, outtype", CONVERTER_CASES)
def test_same_bytes_as_llama_cpp_converter(arch, outtype, arch_dirs, llama_cpp_converter, tmp_path):
    """Names, RoPE permutation, dtypes and the q8_0 fallback: tensor for tensor what llama.cpp's
    own convert_lora_to_gguf.py writes for a plain adapter."""
    base, adapter = arch_dirs[arch]
    theirs = gguf_tensors(run_converter(llama_cpp_converter, base, adapter, tmp_path / "t.gguf",
                                        outtype))
    dtype = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "q8_0": "q8_0"}[outtype]
    at.convert(adapter, tmp_path / "o.gguf", to="gguf", base=base, dtype=dtype)
    ours = gguf_tensors(tmp_path / "o.gguf")
    assert sorted(ours) == sorted(theirs)
    for name, (kind, data) in theirs.items():
        assert ours[name][0] == kind, name
        assert ours[name][1].shape == data.shape and np.array_equal(ours[name][1], data), name
    reader = gguf.GGUFReader(str(tmp_path / "o.gguf"))
    assert reader.get_field("general.architecture").contents() == \
        gguf.GGUFReader(str(tmp_path / "t.gguf")).get_field("general.architecture").contents()
    assert reader.get_field("adapter.lora.alpha").contents() == 8.0


@pytest.mark.parametrize("arch", LLAMA_CPP_CONVERTS)
def test_reads_llama_cpp_converter_output_exactly(arch, arch_dirs, llama_cpp_converter, tmp_path):
    base, adapter = arch_dirs[arch]
    theirs = run_converter(llama_cpp_converter, base, adapter, tmp_path / "t.gguf")
    assert first_difference(at.load(adapter), at.load(theirs, base=base)) is None
    at.convert(theirs, tmp_path / "back", to="peft", base=base)
    original, back = saved_state(adapter), saved_state(tmp_path / "back")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_gpt2_conv1d_transposed_by_llama_cpp_but_not_by_us(arch_dirs, llama_cpp_converter, tmp_path):
    """llama.cpp's converter transposes GPT-2 Conv1D LoRAs wrongly; ours fit the GGUF weights,
    (out, in) = the transpose of HF's Conv1D (in, out)."""
    base, adapter = arch_dirs["gpt2"]
    theirs = gguf_tensors(run_converter(llama_cpp_converter, base, adapter, tmp_path / "t.gguf"))
    at.convert(adapter, tmp_path / "o.gguf", to="gguf", base=base)
    ours = gguf_tensors(tmp_path / "o.gguf")
    # c_attn: HF weight (64, 192) -> GGUF attn_qkv (192, 64): lora_b rows must be 192
    assert ours["blk.0.attn_qkv.weight.lora_b"][1].shape == (192, 4)
    assert ours["blk.0.attn_qkv.weight.lora_a"][1].shape == (4, 64)
    assert theirs["blk.0.attn_qkv.weight.lora_b"][1].shape == (64, 4)
    with pytest.raises(FormatError, match="known llama.cpp bug"):
        at.load(tmp_path / "t.gguf", base=base)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_peft_gguf_peft_is_bit_exact(arch, arch_dirs, tmp_path):
    base, adapter = arch_dirs[arch]
    at.convert(adapter, tmp_path / "a.gguf", to="gguf", base=base)
    at.convert(tmp_path / "a.gguf", tmp_path / "back", to="peft")          # our file: no --base
    at.convert(tmp_path / "a.gguf", tmp_path / "raw.safetensors", to="safetensors")
    original = saved_state(adapter)
    for folder in (tmp_path / "back",):
        back = saved_state(folder)
        assert back.keys() == original.keys()
        for key, tensor in original.items():
            assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    assert first_difference(at.load(adapter), at.load(tmp_path / "raw.safetensors")) is None
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config == json.loads((adapter / "adapter_config.json").read_text())


FEATURES = {
    "rslora": dict(r=8, lora_alpha=6, use_rslora=True, target_modules=LLAMA_LINEAR),
    "patterns": dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR,
                     rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
                     alpha_pattern={"k_proj": 3.3, "layers.1.self_attn.q_proj": 7}),
    "embedding_and_lm_head": dict(r=4, lora_alpha=8,
                                  target_modules=["embed_tokens", "lm_head", "q_proj"]),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_feature_round_trip_and_peft_outputs(feature, arch_dirs, tmp_path):
    """rsLoRA, rank/alpha patterns (folded into B for llama.cpp, restored exactly on the way
    back), embedding and lm_head LoRA: PEFT -> GGUF -> PEFT bit-exact, PEFT outputs identical."""
    from peft import PeftModel

    base, _ = arch_dirs["llama"]
    adapter = peft_adapter(make_causal_lm("llama"), tmp_path / "peft", **FEATURES[feature])
    at.convert(adapter, tmp_path / "a.gguf", to="gguf", base=base)
    at.convert(tmp_path / "a.gguf", tmp_path / "back", to="peft")
    original, back = saved_state(adapter), saved_state(tmp_path / "back")
    # PEFT also saved the targeted embeddings' unchanged base weights (``base_layer``): equal
    # to the base, so the GGUF drops them and PEFT falls back to the base's own
    copies = {k for k in original if ".base_layer." in k}
    assert copies == ({"base_model.model.model.embed_tokens.base_layer.weight",
                       "base_model.model.lm_head.base_layer.weight"}
                      if feature == "embedding_and_lm_head" else set())
    assert back.keys() == original.keys() - copies
    assert all(torch.equal(back[k], original[k]) for k in back)
    ids = torch.arange(3, 17).reshape(1, -1)
    outputs = []
    for folder in (adapter, tmp_path / "back"):
        model = PeftModel.from_pretrained(make_causal_lm("llama"), folder).eval()
        with torch.no_grad():
            outputs.append(model(ids).logits)
    assert torch.equal(outputs[0], outputs[1])


def test_scales_reach_llama_cpp_through_alpha_and_folds(arch_dirs, tmp_path):
    """What llama.cpp computes per tensor, alpha / rank times B, equals our scale times B."""
    base, _ = arch_dirs["llama"]
    adapter = peft_adapter(make_causal_lm("llama"), tmp_path / "peft", **FEATURES["patterns"])
    at.convert(adapter, tmp_path / "a.gguf", to="gguf", base=base)
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    alpha = float(reader.get_field("adapter.lora.alpha").contents())
    tensors = gguf_tensors(tmp_path / "a.gguf")
    ours = at.load(adapter)
    info = json.loads(reader.get_field("adaptertools.lora").contents())["tensors"]
    assert any(entry["fold"] != 1.0 for entry in info.values()), "the case must need folds"
    for gguf_name, entry in info.items():
        w = ours.weights[entry["name"]]
        lora_b = torch.from_numpy(tensors[gguf_name + ".lora_b"][1]).double()
        llama_scale = float(np.float32(alpha) / np.float32(lora_b.shape[1]))  # llama.cpp, in f32
        # the RoPE permutation reorders rows only: compare the sorted scaled values
        got = (llama_scale * lora_b).flatten().sort().values
        want = (w.scale * w.b.double()).flatten().sort().values
        torch.testing.assert_close(got, want, rtol=2e-7, atol=0), entry["name"]


# ----------------------------------------------------------------------------- --base from a GGUF model

def write_gguf_model_stub(path: Path, arch: str = "llama", *, n_blocks: int = 2, heads: int = 4,
                          kv_heads: int = 2, tied: bool = False) -> Path:
    """Just enough of a GGUF model for --base: its metadata and tensor names."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(n_blocks)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_base_from_gguf_model_maps_back_to_hf(arch_dirs, llama_cpp_converter, tmp_path):
    base, adapter = arch_dirs["llama"]
    theirs = run_converter(llama_cpp_converter, base, adapter, tmp_path / "t.gguf")
    model = write_gguf_model_stub(tmp_path / "base.gguf")
    info = load_base_info(model)
    assert (info.arch, info.n_blocks, info.n_head, info.n_head_kv, info.tied_embeddings) == \
        ("llama", 2, 4, 2, False)
    assert first_difference(at.load(adapter), at.load(theirs, base=model)) is None


def test_base_from_config_json_alone(arch_dirs, tmp_path):
    base, adapter = arch_dirs["qwen2"]
    at.convert(adapter, tmp_path / "a.gguf", to="gguf", base=base / "config.json")
    assert first_difference(at.load(adapter), at.load(tmp_path / "a.gguf")) is None


# ----------------------------------------------------------------------------- what GGUF cannot hold

@pytest.mark.parametrize("what, arch, config, fragment", [
    ("dora", "llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]), "DoRA"),
    ("modules_to_save", "llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                      modules_to_save=["lm_head"]), "modules_to_save"),
    ("lora_bias", "llama", dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj"]),
     "lora_bias"),
    ("tied_lm_head", "gemma2", dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]),
     "ties lm_head"),
])
def test_refuses_what_gguf_cannot_express(what, arch, config, fragment, arch_dirs, tmp_path):
    base, _ = arch_dirs[arch]
    adapter = peft_adapter(make_causal_lm(arch), tmp_path / "peft", **config)
    dst = tmp_path / "a.gguf"
    with pytest.raises(UnsupportedError, match=fragment) as info:
        at.convert(adapter, dst, to="gguf", base=base)
    assert "adaptertools merge" in str(info.value)
    assert_nothing_written(dst)


# ----------------------------------------------------------------------------- bad input

def _not_an_adapter(tmp: Path, arch_dirs) -> tuple[list, type, list[str]]:
    model = write_gguf_model_stub(tmp / "model.gguf")
    return [model, tmp / "out", "--to", "peft"], FormatError, [str(model), "not a GGUF LoRA adapter"]


def _unknown_arch(tmp: Path, arch_dirs):
    base = tmp / "hf"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"],
                                                  "model_type": "foo"}))
    _, adapter = arch_dirs["llama"]
    return ([adapter, tmp / "out.gguf", "--to", "gguf", "--base", base], UnsupportedError,
            ["architecture FooForCausalLM: no GGUF mapping; supported:"])


def _gguf_with(tmp: Path, arch_dirs, edit) -> Path:
    base, adapter = arch_dirs["llama"]
    good = tmp / "good.gguf"
    at.convert(adapter, good, to="gguf", base=base)
    reader = gguf.GGUFReader(str(good))
    writer = gguf.GGUFWriter(str(tmp / "bad.gguf"), "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 8.0)
    for t in reader.tensors:
        name, data = edit(t.name, np.array(t.data))
        if name is not None:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp / "bad.gguf"


def _missing_pair(tmp: Path, arch_dirs):
    bad = _gguf_with(tmp, arch_dirs, lambda n, d: (None, d) if n == "blk.1.attn_v.weight.lora_b"
                     else (n, d))
    return ([bad, tmp / "out", "--to", "peft", "--base", arch_dirs["llama"][0]], FormatError,
            [str(bad), "blk.1.attn_v.weight.lora_a has no matching blk.1.attn_v.weight.lora_b"])


def _wrong_shape(tmp: Path, arch_dirs):
    # the llama adapter against a base whose layers are wider: q_proj (64, 64) vs (96, 96)
    other = tmp / "other"
    model = make_causal_lm("llama")
    model.config.hidden_size = 96
    type(model)(model.config).save_pretrained(other)
    bad = _gguf_with(tmp, arch_dirs, lambda n, d: (n, d))
    return ([bad, tmp / "out", "--to", "peft", "--base", other], FormatError,
            [str(bad), "this adapter is for another model"])


def _truncated(tmp: Path, arch_dirs):
    base, adapter = arch_dirs["llama"]
    path = tmp / "cut.gguf"
    at.convert(adapter, path, to="gguf", base=base)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return [path, tmp / "out", "--to", "peft"], FormatError, [str(path), "not a readable GGUF"]


def _garbage(tmp: Path, arch_dirs):
    path = tmp / "junk.gguf"
    path.write_bytes(b"GGUF" + bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8)))
    return [path, tmp / "out", "--to", "peft"], FormatError, [str(path), "not a readable GGUF"]


def _no_base_for_writing(tmp: Path, arch_dirs):
    _, adapter = arch_dirs["llama"]
    return [adapter, tmp / "out.gguf", "--to", "gguf"], FormatError, ["pass --base"]


def _no_base_for_foreign_file(tmp: Path, arch_dirs):
    bad = _gguf_with(tmp, arch_dirs, lambda n, d: (n, d))   # no adaptertools metadata
    return [bad, tmp / "out", "--to", "peft"], FormatError, [str(bad), "pass --base"]


BAD = {"not_an_adapter": _not_an_adapter, "unknown_arch": _unknown_arch,
       "missing_pair": _missing_pair, "wrong_shape": _wrong_shape, "truncated": _truncated,
       "garbage": _garbage, "no_base_for_writing": _no_base_for_writing,
       "no_base_for_foreign_file": _no_base_for_foreign_file}


@pytest.mark.parametrize("case", BAD)
def test_bad_gguf_input(case, arch_dirs, tmp_path):
    args, error, fragments = BAD[case](tmp_path, arch_dirs)
    src, dst, to, base = args[0], args[1], args[3], (args[5] if len(args) > 5 else None)
    with pytest.raises(error) as info:
        at.convert(src, dst, to=to, base=base)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert_nothing_written(Path(dst))
    run = run_cli if case in ("garbage", "missing_pair") else run_cli
    assert_cli_error(run("convert", *args), fragments)
    assert_nothing_written(Path(dst))


def test_inspect_reports_q8_0_fallback(arch_dirs, tmp_path):
    base, adapter = arch_dirs["llama"]
    at.convert(adapter, tmp_path / "q.gguf", to="gguf", base=base, dtype="q8_0")
    report = at.inspect(tmp_path / "q.gguf")
    storage = report["storage"]
    # lora_a rows are 64 (= hidden) or 96 long: Q8_0; lora_b rows are r = 4 long: F16
    assert storage["tensor_types"] == {"Q8_0": 14, "F16": 14}
    assert any("not a multiple of 32" in note for note in storage["notes"])
    outcome = run_cli("inspect", tmp_path / "q.gguf")
    assert "not a multiple of 32" in outcome.stderr and outcome.code == 0
