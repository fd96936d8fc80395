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

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers.gguf_base import (
    IDS,
    check_q8_0_keep_merge,
    gguf_tensors,
    llama_cpp_bases,
    llama_logits,
    llama_quantize,
    lora_folder,
    max_diff,
    run_llama_cpp_script,
    runtime_loras,
)
from helpers.models import ARCH_TARGETS, MORE_GGUF_ARCHS, make_arch_model
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
                  "smollm3": "smollm3", "exaone4": "exaone4", "qwen2_moe": "qwen2moe",
                  "granitemoe": "granitemoe", "glm4": "glm4", "nemotron": "nemotron",
                  "ernie4_5": "ernie4_5", "cohere2": "cohere2", "arcee": "arcee",
                  "seed_oss": "seed_oss", "olmo3": "olmo2", "apertus": "apertus",
                  "qwen3_moe": "qwen3moe", "olmoe": "olmoe", "mixtral": "llama",
                  "hunyuan_v1_dense": "hunyuan-dense", "minicpm3": "minicpm3",
                  "glm4_moe": "glm4moe", "dots1": "dots1", "ernie4_5_moe": "ernie4_5-moe",
                  "granitemoeshared": "granitemoe"}
# architectures whose B rows llama.cpp moves (so the byte comparison tests a transform)
TRANSFORMED = {"olmo", "granite", "granitemoe", "smollm3", "arcee", "gpt_neox", "falcon",
               "mixtral", "granitemoeshared"}


CASES = [(a, "f32") for a in ARCHS] + [("falcon", "q8_0"), ("gpt_neox", "bf16"), ("olmo", "f16")]
# the K-quant case: granite (RoPE-permuted q/k) with every row a multiple of Q4_K's 256
KQUANT, KQUANT_ARCH = "granite_256", "granite"
KQUANT_SIZES = {"hidden_size": 256, "intermediate_size": 512}


@dataclass(frozen=True)
class Built:
    hf_dir: Path              # save_pretrained of the float32 base
    peft_dir: Path            # all-linear PEFT LoRA (random A and B)
    base_logits: np.ndarray   # transformers' logits of the base on IDS, (len(IDS), vocab)
    peft_logits: np.ndarray   # the unmerged PeftModel's


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, Built]:
    """Every architecture's tiny base and adapter, built once per session."""
    from peft import LoraConfig, get_peft_model

    root, out = tmp_path_factory.mktemp("gguf_archs"), {}
    ids = torch.tensor([IDS])
    for arch in [*ARCHS, KQUANT]:
        model = make_arch_model(KQUANT_ARCH, **KQUANT_SIZES) if arch == KQUANT else \
            make_arch_model(arch)
        model.save_pretrained(root / f"hf_{arch}")
        with torch.no_grad():
            base_logits = model(ids).logits[0].double().numpy()
        peft_model = get_peft_model(model, LoraConfig(
            r=4, lora_alpha=8, target_modules=ARCH_TARGETS.get(arch, "all-linear"),
            init_lora_weights=False))
        perturb_trainables(peft_model)
        peft_model.save_pretrained(root / f"peft_{arch}")
        with torch.no_grad():
            peft_logits = peft_model.eval()(ids).logits[0].double().numpy()
        out[arch] = Built(root / f"hf_{arch}", root / f"peft_{arch}", base_logits, peft_logits)
    return out


# MiniCPM3's MLA projections: a LoRA there is refused for GGUF (names.NO_RUNTIME_LORA)
MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"]


@pytest.fixture(scope="session")
def minicpm3_mla(built) -> tuple[Path, np.ndarray]:
    """(a MiniCPM3 PEFT LoRA on the four MLA projections, PEFT's logits with it)."""
    folder = built["minicpm3"].hf_dir.parent / "mla_minicpm3"
    return folder, lora_folder(make_arch_model("minicpm3"), folder, MLA)


@pytest.fixture(scope="session")
def arch_files(built, llama_cpp_converter, minicpm3_mla):
    """get(arch, outtype) -> (HF base folder, PEFT adapter folder, llama.cpp's GGUF adapter):
    every case of CASES converted by convert_lora_to_gguf.py once per session, on first use;
    get("minicpm3", "mla"): minicpm3_mla's adapter, in the same converter run."""
    outputs = {(a, t): built[a].peft_dir.parent / f"llamacpp_{a}_{t}.gguf" for a, t in CASES}
    outputs["minicpm3", "mla"] = minicpm3_mla[0].parent / "llamacpp_minicpm3_mla.gguf"
    folders = {key: built[key[0]].peft_dir for key in outputs} | {("minicpm3", "mla"):
                                                                   minicpm3_mla[0]}
    failed = run_llama_cpp_script(llama_cpp_converter, [
        ["--base", str(built[a].hf_dir), "--outtype", "f32" if t == "mla" else t, "--outfile",
         str(out), str(folders[a, t])] for (a, t), out in outputs.items()])
    assert not failed, failed

    def get(arch: str, outtype: str = "f32") -> tuple[Path, Path, Path]:
        return built[arch].hf_dir, folders[arch, outtype], outputs[arch, outtype]
    return get


@pytest.fixture(scope="session")
def gguf_bases(built, llama_cpp_converter) -> dict[str, Path]:
    """arch -> the F32 GGUF model llama.cpp's convert_hf_to_gguf.py writes of the base (with the
    dummy vocabulary of helpers.gguf_base.run_llama_cpp_script), once per session."""
    return llama_cpp_bases(llama_cpp_converter, {a: b.hf_dir for a, b in built.items()})


@pytest.fixture(scope="session")
def merged_f32(built, gguf_bases, tmp_path_factory):
    """get(arch) -> the PEFT adapter merged (keep-type) into llama.cpp's F32 GGUF base, once."""
    root, done = tmp_path_factory.mktemp("gguf_archs_merged"), {}

    def get(arch: str) -> Path:
        if arch not in done:
            done[arch] = root / f"{arch}.gguf"
            at.merge(gguf_bases[arch], [built[arch].peft_dir], done[arch])
        return done[arch]
    return get


@pytest.fixture(scope="session")
def q8_0_bases(gguf_bases, tmp_path_factory):
    """get(arch) -> llama.cpp's F32 GGUF base quantized to Q8_0 by llama_model_quantize, once."""
    root, done = tmp_path_factory.mktemp("gguf_archs_q8_0"), {}

    def get(arch: str) -> Path:
        if arch not in done:
            done[arch] = llama_quantize(gguf_bases[arch], root / f"{arch}.gguf", "Q8_0")
        return done[arch]
    return get


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


# ----------------------------------------------------------------------------- llama.cpp logits

@pytest.fixture(scope="session")
def runtime(built, gguf_bases, tmp_path_factory):
    """arch -> (our GGUF adapter, llama.cpp's logits of the base with it as the runtime LoRA),
    computed once per session (each llama.cpp run is a child process)."""
    return runtime_loras(tmp_path_factory.mktemp("gguf_archs_ours"),
                         {a: (built[a].hf_dir, built[a].peft_dir) for a in ARCHS}, gguf_bases)


# SiLU architectures: the existing llama/qwen bound (tests/test_gguf_llamacpp.py, FORMATS.md
# "Noise floors": a few 1e-6 measured). GELU ones: ggml's CPU GELU reads an fp16 table, so each
# activation input is rounded to 2^-11 relative; with O(1) logits that gives 1e-4..3e-4 measured
# (gemma, starcoder2, falcon), so 1e-3.
GELU_ARCHS = {"gemma", "starcoder2", "phi", "gpt_neox", "falcon"}
LORA_MATTERS = 1e-2


def tolerance(arch: str) -> float:
    return 1e-3 if arch in GELU_ARCHS else 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_llamacpp_runtime_lora_matches_peft(arch, built, gguf_bases, runtime):
    """llama.cpp (llama-cpp-python, extra buffer types off, child process) on llama.cpp's own
    GGUF of the base with our adapter: PEFT's logits, as near as the base alone is to
    transformers' (both within tolerance(arch)); the adapter visibly matters."""
    case = built[arch]
    base_gap = max_diff(llama_logits(gguf_bases[arch]), case.base_logits)
    ours = max_diff(runtime(arch)[1], case.peft_logits)
    effect = max_diff(case.base_logits, case.peft_logits)
    print(f"{arch}: base gap {base_gap:.3g}, with our LoRA {ours:.3g}, LoRA effect {effect:.3g}")
    assert base_gap <= tolerance(arch), f"{arch}: llama.cpp's base alone is {base_gap:.3g} off"
    assert ours <= tolerance(arch), f"{arch}: llama.cpp with our LoRA is {ours:.3g} off PEFT"
    assert effect > LORA_MATTERS and ours < effect / 100


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_into_llama_cpp_base_matches_runtime_lora(arch, built, runtime, merged_f32):
    """The PEFT adapter merged into llama.cpp's GGUF base (keep-type, F32) gives the logits
    llama.cpp computes with the runtime LoRA."""
    case = built[arch]
    merged = llama_logits(merged_f32(arch))
    diff = max_diff(merged, runtime(arch)[1])
    print(f"{arch}: merged vs runtime LoRA {diff:.3g}, merged vs PEFT "
          f"{max_diff(merged, case.peft_logits):.3g}")
    assert diff <= tolerance(arch)
    assert max_diff(merged, case.peft_logits) <= tolerance(arch)


@pytest.mark.parametrize("arch", ["gpt_neox", "falcon", "olmo"])
def test_dora_merge_into_llama_cpp_base_moves_magnitudes_with_rows(arch, built, gguf_bases,
                                                                   tmp_path):
    """DoRA magnitudes (one per output row) follow the rows llama.cpp moved (fused q/k/v
    regrouped, RoPE permutation): the merged GGUF gives the DoRA PeftModel's logits."""
    from peft import LoraConfig, get_peft_model

    model = make_arch_model(arch)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False, use_dora=True))
    perturb_trainables(peft_model)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:    # not the base's own row norms
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=torch.Generator().manual_seed(3)))
        reference = peft_model.eval()(torch.tensor([IDS])).logits[0].double().numpy()
    peft_model.save_pretrained(tmp_path / "dora")
    at.merge(gguf_bases[arch], [tmp_path / "dora"], tmp_path / "merged.gguf")
    diff = max_diff(llama_logits(tmp_path / "merged.gguf"), reference)
    print(f"{arch} DoRA: merged vs PEFT {diff:.3g}")
    assert diff <= tolerance(arch)
    assert max_diff(built[arch].base_logits, reference) > LORA_MATTERS


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_adapter_merges_into_llama_cpp_base(arch, arch_files, gguf_bases, merged_f32,
                                                      tmp_path):
    """`merge base.gguf adapter.gguf` with both files from llama.cpp's converters (no HF folder
    at hand: names mapped back by the architecture's HF naming) writes the very tensors the
    PEFT adapter's merge writes."""
    _, _, theirs = arch_files(arch)
    at.merge(gguf_bases[arch], [theirs], tmp_path / "from_gguf.gguf")
    a, b = gguf_tensors(tmp_path / "from_gguf.gguf"), gguf_tensors(merged_f32(arch))
    base = gguf_tensors(gguf_bases[arch])
    assert a.keys() == b.keys() == base.keys()
    assert all(a[n][0] == b[n][0] and np.array_equal(a[n][1], b[n][1]) for n in a)
    changed = [n for n in a if not np.array_equal(a[n][1], base[n][1])]
    assert len(changed) == len(gguf_tensors(theirs)) // 2    # every adapted tensor, no other


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_type_merge_into_q8_0_base_is_one_rounding(arch, built, gguf_bases, merged_f32,
                                                         q8_0_bases, tmp_path):
    """Into llama.cpp's Q8_0 quantization of the base (llama_model_quantize), keep-type: every
    tensor keeps its type, untouched ones their bytes, and every adapted one holds the base's
    Q8_0 decoded + the delta our F32 merge adds (which the test above checks against llama.cpp's
    runtime LoRA and PEFT) to one Q8_0 rounding (helpers.gguf_base.check_q8_0_keep_merge)."""
    at.merge(q8_0_bases(arch), [built[arch].peft_dir], tmp_path / "ours.gguf")
    touched, worst = check_q8_0_keep_merge(gguf_bases[arch], merged_f32(arch), q8_0_bases(arch),
                                           tmp_path / "ours.gguf")
    print(f"{arch} Q8_0: {len(touched)} adapted tensors, worst error {worst:.3f} steps")


@pytest.mark.parametrize("arch", ["gpt_neox", "falcon", "olmo", "phi", "glm4_moe",
                                  "granitemoeshared"])
def test_keep_type_merge_into_q8_0_base(arch, built, q8_0_bases, runtime, tmp_path):
    """End to end, in llama.cpp: our keep-type merge into the Q8_0 base gives logits as near
    the runtime LoRA on that base as llama.cpp's own route (export-lora's F16 tensors
    requantized by llama_model_quantize), within 10%, the bound of
    tests/test_merge_gguf_quant.py."""
    base = q8_0_bases(arch)
    lora = runtime(arch)[0]
    at.merge(base, [built[arch].peft_dir], tmp_path / "ours.gguf")
    at.merge(base, [built[arch].peft_dir], tmp_path / "f16.gguf", requantize="f16")
    theirs = llama_quantize(tmp_path / "f16.gguf", tmp_path / "theirs.gguf", "Q8_0",
                            allow_requantize=True)
    on_base = llama_logits(base, lora)
    ours_err = max_diff(llama_logits(tmp_path / "ours.gguf"), on_base)
    theirs_err = max_diff(llama_logits(theirs), on_base)
    print(f"{arch} Q8_0: ours {ours_err:.3g}, llama.cpp's route {theirs_err:.3g}")
    assert max_diff(built[arch].base_logits, built[arch].peft_logits) > LORA_MATTERS
    assert ours_err <= 1.1 * theirs_err


def test_keep_type_merge_into_k_quant_base(built, gguf_bases, tmp_path):
    """One K-quant case: granite (RoPE-permuted q/k) with rows of 256 and 512, quantized to
    Q4_K_M by llama_model_quantize (Q4_K and Q6_K tensors); our keep-type merge keeps every
    type, and its logits are as near the runtime LoRA on that base as llama.cpp's route (the
    F16 merge requantized to Q4_K_M), within 10%. Measured as the RMS over all 12 x 128
    logits: the max of one tiny model's logits swings with single 4-bit outliers (ours 0.208
    vs 0.188 max, 0.0510 vs 0.0498 RMS); the LoRA moves them far more than 4-bit noise."""
    case = built[KQUANT]
    base = llama_quantize(gguf_bases[KQUANT], tmp_path / "q4_k_m.gguf", "Q4_K_M")
    kinds = {n: t for n, (t, _) in gguf_tensors(base).items()}
    assert {"Q4_K", "Q6_K"} <= set(kinds.values())
    at.convert(case.peft_dir, tmp_path / "lora.gguf", to="gguf", base=case.hf_dir)
    at.merge(base, [case.peft_dir], tmp_path / "ours.gguf")
    at.merge(base, [case.peft_dir], tmp_path / "f16.gguf", requantize="f16")
    theirs = llama_quantize(tmp_path / "f16.gguf", tmp_path / "theirs.gguf", "Q4_K_M",
                            allow_requantize=True)
    assert {n: t for n, (t, _) in gguf_tensors(tmp_path / "ours.gguf").items()} == kinds
    on_base = llama_logits(base, tmp_path / "lora.gguf")

    def rms(path: Path) -> float:
        return float(np.sqrt(np.mean((llama_logits(path) - on_base) ** 2)))

    ours_err, theirs_err, effect = rms(tmp_path / "ours.gguf"), rms(theirs), rms(base)
    print(f"{KQUANT} Q4_K_M (RMS): ours {ours_err:.3g}, llama.cpp's route {theirs_err:.3g}, "
          f"LoRA effect {effect:.3g}")
    assert effect > 3 * theirs_err
    assert ours_err <= 1.1 * theirs_err


# ----------------------------------------------------------------------------- MiniCPM3 MLA

def test_minicpm3_mla_lora_refused_by_name(built, minicpm3_mla, tmp_path):
    """A LoRA on MiniCPM3's MLA projections, which llama.cpp loads and never applies: refused
    in one line naming the tensor and why, nothing written."""
    with pytest.raises(UnsupportedError, match=r"self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa"
                                               r"|kv_b_proj)\.weight: llama.cpp's minicpm3 "
                                               r"applies no LoRA to this MLA projection.*silently "
                                               r"ignored; merge"):
        at.convert(minicpm3_mla[0], tmp_path / "o.gguf", to="gguf", base=built["minicpm3"].hf_dir)
    assert not (tmp_path / "o.gguf").exists()


def test_llama_cpp_drops_minicpm3_mla_lora_and_merges_apply_it(built, arch_files, gguf_bases,
                                                               minicpm3_mla, tmp_path):
    """Why: llama.cpp's own converter writes the MLA LoRA and llama.cpp's logits with it are
    the base's bit for bit, while PEFT's differ; merged into llama.cpp's GGUF base instead (no
    runtime hook needed; kv_b_proj is stored whole there), it gives PEFT's logits."""
    _, _, theirs = arch_files("minicpm3", "mla")
    assert any(n.endswith("attn_kv_b.weight.lora_a") for n in gguf_tensors(theirs))
    base = gguf_bases["minicpm3"]
    assert np.array_equal(llama_logits(base, theirs), llama_logits(base))
    effect = max_diff(minicpm3_mla[1], built["minicpm3"].base_logits)
    at.merge(base, [minicpm3_mla[0]], tmp_path / "merged.gguf")
    diff = max_diff(llama_logits(tmp_path / "merged.gguf"), minicpm3_mla[1])
    print(f"minicpm3 MLA LoRA: merged vs PEFT {diff:.3g}, effect {effect:.3g}")
    assert effect > LORA_MATTERS and diff <= tolerance("minicpm3")


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
