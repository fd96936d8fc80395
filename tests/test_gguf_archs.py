"""GGUF adapters for the architectures of issue 19, against llama.cpp's own converter.

Per architecture (tests/helpers/models.MORE_GGUF_ARCHS: tiny transformers 5 models built in code,
an all-linear PEFT LoRA with random A and B): our ``convert --to gguf`` must write tensor for
tensor the bytes llama.cpp's ``convert_lora_to_gguf.py`` (llama-cpp-python 0.3.36 sdist) writes,
names and the factor transforms of each llama.cpp model class included (RoPE q/k row permutation
for olmo / granite / smollm3, the regrouped fused q/k/v rows of gptneox / falcon); our reading of
llama.cpp's file must give back PEFT's factors bit for bit. llama.cpp's converter runs once per
(architecture, outtype) per test session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers.models import MORE_GGUF_ARCHS, make_arch_model
from helpers.peft_adapters import perturb_trainables

import adaptertools as at
from adaptertools.adapter import first_difference
from adaptertools.errors import UnsupportedError
from adaptertools.formats.names import (
    HF_ARCHITECTURES,
    hf_to_gguf_name,
    load_base_info,
    qkv_row_order,
    rope_heads,
)

ARCHS = list(MORE_GGUF_ARCHS)
# llama.cpp architecture each one must be written as (conversion/*.py model_arch)
LLAMA_CPP_ARCH = {"gemma": "gemma", "starcoder2": "starcoder2", "olmo": "olmo", "olmo2": "olmo2",
                  "granite": "granite", "stablelm": "stablelm", "phi": "phi2",
                  "gpt_neox": "gptneox", "falcon": "falcon", "cohere": "command-r",
                  "smollm3": "smollm3", "exaone4": "exaone4", "qwen2_moe": "qwen2moe"}
# architectures whose B rows llama.cpp moves (so the byte comparison tests a transform)
TRANSFORMED = {"olmo", "granite", "smollm3", "gpt_neox", "falcon"}


# runs llama.cpp's converter once per job in one interpreter: its imports (torch, transformers,
# gguf-py) cost more than a tiny conversion, and there are 16 of them
DRIVER = """
import json, runpy, sys
script, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, script.rsplit("/", 1)[0])   # the script imports conversion/ beside it
for argv in jobs:
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
"""
CASES = [(a, "f32") for a in ARCHS] + [("falcon", "q8_0"), ("gpt_neox", "bf16"), ("olmo", "f16")]


@pytest.fixture(scope="session")
def arch_files(tmp_path_factory, llama_cpp_converter):
    """get(arch, outtype) -> (HF base folder, PEFT adapter folder, llama.cpp's GGUF): every
    model and adapter built, and every case of CASES converted, once per session on first use."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("gguf_archs")
    folders = {}
    for arch in ARCHS:
        model = make_arch_model(arch)
        model.save_pretrained(root / f"hf_{arch}")
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      init_lora_weights=False))
        perturb_trainables(peft_model)
        peft_model.save_pretrained(root / f"peft_{arch}")
        folders[arch] = (root / f"hf_{arch}", root / f"peft_{arch}")
    outputs = {case: root / f"llamacpp_{case[0]}_{case[1]}.gguf" for case in CASES}
    jobs = [["--base", str(folders[arch][0]), "--outtype", outtype, "--outfile", str(out),
             str(folders[arch][1])] for (arch, outtype), out in outputs.items()]
    run = subprocess.run([sys.executable, "-c", DRIVER, str(llama_cpp_converter), json.dumps(jobs)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]

    def get(arch: str, outtype: str = "f32") -> tuple[Path, Path, Path]:
        return (*folders[arch], outputs[arch, outtype])
    return get


def gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in gguf.GGUFReader(str(path)).tensors}


def saved_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")



@pytest.mark.parametrize("arch, outtype", CASES)
def test_same_bytes_as_llama_cpp_converter(arch, outtype, arch_files, tmp_path):
    base, adapter, theirs_path = arch_files(arch, outtype)
    dtype = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "q8_0": "q8_0"}[outtype]
    at.convert(adapter, tmp_path / "o.gguf", to="gguf", base=base, dtype=dtype)
    theirs, ours = gguf_tensors(theirs_path), gguf_tensors(tmp_path / "o.gguf")
    assert sorted(ours) == sorted(theirs)
    assert len(theirs) >= 2 * 2 * 4        # 2 blocks, >= 4 linear layers each, a and b
    for name, (kind, data) in theirs.items():
        assert ours[name][0] == kind, name
        assert ours[name][1].shape == data.shape and np.array_equal(ours[name][1], data), name
    arch_of = {f: gguf.GGUFReader(str(f)).get_field("general.architecture").contents()
               for f in (theirs_path, tmp_path / "o.gguf")}
    assert set(arch_of.values()) == {LLAMA_CPP_ARCH[arch]}


@pytest.mark.parametrize("arch", sorted(TRANSFORMED))
def test_transformed_rows_really_move(arch, arch_files):
    """The byte comparison above tests a transform here: llama.cpp's B of a permuted tensor
    is not PEFT's B (same values, other row order)."""
    base, adapter, theirs = arch_files(arch)
    info, state, stored = load_base_info(base), saved_state(adapter), gguf_tensors(theirs)
    moved = 0
    for key, lora_b in state.items():
        if not key.endswith("lora_B.weight"):
            continue
        name = key.removeprefix("base_model.model.").replace(".lora_B", "")
        if rope_heads(name, info) is None and qkv_row_order(name, info, lora_b.shape[0]) is None:
            continue
        theirs_b = torch.from_numpy(stored[hf_to_gguf_name(name, info) + ".lora_b"][1])
        assert not torch.equal(theirs_b, lora_b), name
        assert torch.equal(theirs_b.flatten().sort().values, lora_b.flatten().sort().values)
        moved += 1
    assert moved >= 2, f"{arch}: no permuted tensor in the adapter; the transform is untested"


@pytest.mark.parametrize("arch", ARCHS)
def test_reads_llama_cpp_converter_output_exactly(arch, arch_files, tmp_path):
    """GGUF -> PEFT on llama.cpp's file: PEFT's factors back bit for bit (names, inverse row
    transforms), and our own file needs no --base."""
    base, adapter, theirs = arch_files(arch)
    assert first_difference(at.load(adapter), at.load(theirs, base=base)) is None
    at.convert(theirs, tmp_path / "back", to="peft", base=base)
    original, back = saved_state(adapter), saved_state(tmp_path / "back")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    at.convert(adapter, tmp_path / "o.gguf", to="gguf", base=base)
    assert first_difference(at.load(adapter), at.load(tmp_path / "o.gguf")) is None


def test_every_arch_has_a_table_row():
    assert {MORE_GGUF_ARCHS[a][0] for a in ARCHS} <= set(HF_ARCHITECTURES)


# ----------------------------------------------------------------------------- refusals

def test_unsupported_architecture_is_named(tmp_path):
    """An HF base without a mapping: one line naming it and what is supported."""
    import transformers as tf

    model = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=1, n_head=2,
                                               vocab_size=64)).eval()
    model.save_pretrained(tmp_path / "hf")
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=2, target_modules=["query_key_value"])).save_pretrained(
        tmp_path / "peft")
    with pytest.raises(UnsupportedError, match=r"architecture BloomForCausalLM: no GGUF mapping; "
                                               r"supported: .*gptneox"):
        at.convert(tmp_path / "peft", tmp_path / "o.gguf", to="gguf", base=tmp_path / "hf")
    assert not (tmp_path / "o.gguf").exists()


def unsupported_gguf_base(path: Path) -> Path:
    """A minimal GGUF model of llama.cpp architecture ``bloom`` (no mapping here)."""
    writer = gguf.GGUFWriter(str(path), "bloom")
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
    writer.add_tensor("blk.0.attn_qkv.weight", np.zeros((96, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_merge_into_unsupported_gguf_base_names_the_architecture(arch_files, tmp_path):
    """Not "N adapter tensors do not fit the base": the architecture is what is missing."""
    _, adapter, _ = arch_files("olmo")
    base = unsupported_gguf_base(tmp_path / "bloom.gguf")
    with pytest.raises(UnsupportedError, match=r"architecture bloom: no GGUF mapping; supported"):
        at.merge(base, [adapter], tmp_path / "merged.gguf")
    assert not (tmp_path / "merged.gguf").exists()
