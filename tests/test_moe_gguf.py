"""MoE expert LoRAs in GGUF (formats/gguf_experts.py): PEFT ``target_parameters`` LoRAs on the
fused 3-D experts of transformers-5 Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral, DeepSeek-V3, GLM-4.5
(glm4_moe), dots.llm1 and ERNIE-4.5-MoE (and on their 2-D router), written as llama.cpp's 3-D ``ffn_{gate,up,down}_exps`` LoRA tensors.

Oracles: llama.cpp itself (llama-cpp-python, child process, extra buffer types off) running
llama.cpp's own GGUF of the base (convert_hf_to_gguf.py) with our adapter as a runtime LoRA,
against transformers + PEFT; PEFT loading our GGUF -> PEFT folder. llama.cpp's
convert_lora_to_gguf.py refuses these adapters, so there are no bytes of its to compare with;
the layout is checked against PEFT's factors sliced by hand instead.
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
from helpers.models import MOE_GGUF_ARCHS, make_arch_model
from helpers.peft_adapters import perturb_trainables
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.adapter import first_difference
from adaptertools.errors import FormatError, UnsupportedError

ARCHS = list(MOE_GGUF_ARCHS)
FIRST_DENSE = {"deepseek_v3", "glm4_moe", "dots1", "ernie4_5_moe"}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# SiLU architectures: the bound of tests/test_gguf_archs.py (a few 1e-6 measured there)
TOLERANCE = 1e-4
LORA_MATTERS = 1e-2


def lora_config(arch: str):
    """PEFT's all-linear (transformers 5: attention as modules; experts and router as
    target_parameters) where PEFT maps the architecture; Qwen2-MoE's experts and router named
    (PEFT 0.21.2's all-linear leaves them out), and DeepSeek-V3's with its o_proj. Qwen3-MoE gets a rank pattern, so one expert
    tensor's rank and alpha differ from the file's (the scale folded into B, undone on reading)."""
    from peft import LoraConfig

    extra, targets = {}, "all-linear"
    if arch == "qwen2_moe":
        extra["target_parameters"] = [*EXPERTS, "mlp.gate.weight"]
    if arch == "deepseek_v3":     # llama.cpp applies no LoRA to MLA (names.NO_RUNTIME_LORA)
        targets, extra["target_parameters"] = ["o_proj"], [*EXPERTS, "mlp.gate.weight"]
    if arch == "qwen3_moe":
        extra["rank_pattern"] = {"layers.1.mlp.experts.down_proj": 2}
        extra["alpha_pattern"] = {"layers.1.mlp.experts.down_proj": 4}
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                      **extra)


def moe_layers(arch: str) -> tuple[int, ...]:
    """The blocks with routed experts (the first is dense in deepseek_v3, glm4_moe and dots1:
    first_k_dense_replace; in ernie4_5_moe: moe_layer_start_index)."""
    return (1,) if arch in FIRST_DENSE else (0, 1)


@dataclass(frozen=True)
class Built:
    hf_dir: Path
    peft_dir: Path
    base_logits: np.ndarray          # transformers, (len(IDS), vocab)
    peft_logits: np.ndarray          # the unmerged PeftModel's
    no_expert_logits: np.ndarray     # the same PeftModel with the expert LoRAs zeroed


def _expert_lora_params(peft_model):
    return [p for n, p in peft_model.named_parameters()
            if "lora_B" in n and ".experts." in n]


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, Built]:
    from peft import get_peft_model

    root, out, ids = tmp_path_factory.mktemp("moe_gguf"), {}, torch.tensor([IDS])
    for arch in ARCHS:
        model = make_arch_model(arch)
        model.save_pretrained(root / f"hf_{arch}")
        with torch.no_grad():
            base_logits = model(ids).logits[0].double().numpy()
        peft_model = get_peft_model(model, lora_config(arch))
        perturb_trainables(peft_model, spread=0.1)
        with torch.no_grad():   # larger expert LoRAs, so that they visibly matter
            for p in _expert_lora_params(peft_model):
                p.mul_(4)
        peft_model.save_pretrained(root / f"peft_{arch}")
        peft_model.eval()
        with torch.no_grad():
            peft_logits = peft_model(ids).logits[0].double().numpy()
            for p in _expert_lora_params(peft_model):
                p.zero_()
            no_experts = peft_model(ids).logits[0].double().numpy()
        out[arch] = Built(root / f"hf_{arch}", root / f"peft_{arch}", base_logits, peft_logits,
                          no_experts)
    return out


@pytest.fixture(scope="session")
def gguf_bases(built, llama_cpp_converter) -> dict[str, Path]:
    """arch -> llama.cpp's own F32 GGUF of the tiny base (convert_hf_to_gguf.py)."""
    return llama_cpp_bases(llama_cpp_converter, {a: built[a].hf_dir for a in ARCHS})


@pytest.fixture(scope="session")
def runtime(built, gguf_bases, tmp_path_factory):
    """arch -> (our GGUF adapter, llama.cpp's logits of the base with it as runtime LoRA)."""
    return runtime_loras(tmp_path_factory.mktemp("moe_gguf_ours"),
                         {a: (built[a].hf_dir, built[a].peft_dir) for a in ARCHS}, gguf_bases)


# ----------------------------------------------------------------------------- layout

@pytest.mark.parametrize("arch", ARCHS)
def test_expert_factors_are_peft_factors_sliced_per_expert(arch, built, runtime):
    """ffn_gate_exps / ffn_up_exps / ffn_down_exps carry lora_a (E, r, in) = PEFT's A rows
    e*r.. e*r+r-1 and lora_b (E, out, r) = PEFT's B columns e, e+E, ... (gate rows to
    ffn_gate_exps, up rows to ffn_up_exps), bit for bit where no scale is folded into B."""
    state = load_file(built[arch].peft_dir / "adapter_model.safetensors")
    stored = gguf_tensors(runtime(arch)[0])
    alpha = gguf.GGUFReader(str(runtime(arch)[0])).get_field("adapter.lora.alpha").contents()
    scales = {n: w.scale for n, w in at.load(built[arch].peft_dir).weights.items()}
    checked = 0
    for layer in moe_layers(arch):
        stem = f"base_model.model.model.layers.{layer}.mlp.experts"
        parts = {"gate_up_proj": (f"{stem}.base_layer", ("gate", "up")),
                 "down_proj": (stem, ("down",))}
        for key, names in parts.values():
            a, b = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]   # (r*E, in), (out, r*E)
            experts = 4
            r = a.shape[0] // experts
            rows = b.shape[0] // len(names)
            for i, part in enumerate(names):
                kind_a, lora_a = stored[f"blk.{layer}.ffn_{part}_exps.weight.lora_a"]
                kind_b, lora_b = stored[f"blk.{layer}.ffn_{part}_exps.weight.lora_b"]
                assert (kind_a, kind_b) == ("F32", "F32")
                assert lora_a.shape == (experts, r, a.shape[1])
                assert lora_b.shape == (experts, rows, r)
                # this tensor's scale * r (its alpha) over the file's alpha (PEFT's all-linear
                # gives gate_up_proj twice the rank and alpha; the rank pattern one down_proj)
                name = key.removeprefix("base_model.model.").replace(".base_layer", "")
                fold = scales[f"{name}.{'down_proj' if part == 'down' else 'gate_up_proj'}"] \
                    * r / alpha
                for e in range(experts):
                    assert np.array_equal(lora_a[e], a[e * r:(e + 1) * r].numpy())
                    want = b[i * rows:(i + 1) * rows, e::experts]
                    if fold == 1:
                        assert np.array_equal(lora_b[e], want.numpy())
                    else:
                        assert np.allclose(lora_b[e], want.double().numpy() * fold, rtol=1e-6)
                checked += 1
    assert checked == 3 * len(moe_layers(arch))
    # the router (E, hidden): a plain 2-D LoRA on ffn_gate_inp, a (r, hidden), b (E, r)
    first = moe_layers(arch)[0]
    assert stored[f"blk.{first}.ffn_gate_inp.weight.lora_a"][1].shape == (4, 64)
    assert stored[f"blk.{first}.ffn_gate_inp.weight.lora_b"][1].shape == (4, 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_to_peft_round_trip_is_exact(arch, built, runtime, tmp_path):
    """GGUF -> PEFT gives PEFT's saved factors back bit for bit (the rank pattern's fold
    undone), and PEFT loads the written folder to the original adapter's logits."""
    from peft import PeftModel

    ours = runtime(arch)[0]
    assert first_difference(at.load(built[arch].peft_dir), at.load(ours)) is None
    at.convert(ours, tmp_path / "back", to="peft")
    original = load_file(built[arch].peft_dir / "adapter_model.safetensors")
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    model = PeftModel.from_pretrained(make_arch_model(arch), tmp_path / "back").eval()
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0].double().numpy()
    assert np.array_equal(logits, built[arch].peft_logits)


# ----------------------------------------------------------------------------- llama.cpp

@pytest.mark.parametrize("arch", ARCHS)
def test_llamacpp_runtime_expert_lora_matches_peft(arch, built, gguf_bases, runtime):
    """llama.cpp with our adapter gives PEFT's logits as near as its base alone is to
    transformers' (both within TOLERANCE), and the expert LoRAs are visibly applied: without
    them PEFT's logits are more than LORA_MATTERS away."""
    case = built[arch]
    base_gap = max_diff(llama_logits(gguf_bases[arch]), case.base_logits)
    ours = max_diff(runtime(arch)[1], case.peft_logits)
    experts = max_diff(case.no_expert_logits, case.peft_logits)
    print(f"{arch}: base gap {base_gap:.3g}, with our LoRA {ours:.3g}, expert LoRAs' effect "
          f"{experts:.3g}")
    assert base_gap <= TOLERANCE
    assert ours <= TOLERANCE
    assert experts > LORA_MATTERS and ours < experts / 100


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_into_llama_cpp_base_matches_runtime_lora(arch, built, gguf_bases, runtime,
                                                        tmp_path):
    """The PEFT adapter merged into llama.cpp's F32 GGUF base (keep-type): the runtime LoRA's
    logits; the GGUF adapter merged writes the very same tensors."""
    at.merge(gguf_bases[arch], [built[arch].peft_dir], tmp_path / "merged.gguf")
    merged = llama_logits(tmp_path / "merged.gguf")
    diff = max_diff(merged, runtime(arch)[1])
    print(f"{arch}: merged vs runtime LoRA {diff:.3g}, vs PEFT "
          f"{max_diff(merged, built[arch].peft_logits):.3g}")
    assert diff <= TOLERANCE
    assert max_diff(merged, built[arch].peft_logits) <= TOLERANCE
    at.merge(gguf_bases[arch], [runtime(arch)[0]], tmp_path / "from_gguf.gguf")
    a, b = gguf_tensors(tmp_path / "merged.gguf"), gguf_tensors(tmp_path / "from_gguf.gguf")
    assert a.keys() == b.keys() and all(np.array_equal(a[n][1], b[n][1]) for n in a)
    base = gguf_tensors(gguf_bases[arch])
    changed = {n for n in a if not np.array_equal(a[n][1], base[n][1])}
    assert {f"blk.{i}.ffn_{p}_exps.weight" for i in moe_layers(arch)
                                 for p in ("gate", "up", "down")} \
        <= changed


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_keep_type_merge_into_q8_0_base_is_one_rounding(arch, built, gguf_bases,
                                                               tmp_path):
    """Into llama.cpp's Q8_0 quantization of the base, keep-type: the 3-D expert tensors (and
    every other adapted one) hold the Q8_0 base decoded + the delta of the F32 merge (the
    test above: runtime LoRA and PEFT logits) to one Q8_0 rounding, every type kept
    (helpers.gguf_base.check_q8_0_keep_merge)."""
    base = llama_quantize(gguf_bases[arch], tmp_path / "q8_0.gguf", "Q8_0")
    at.merge(gguf_bases[arch], [built[arch].peft_dir], tmp_path / "f32.gguf")
    at.merge(base, [built[arch].peft_dir], tmp_path / "ours.gguf")
    touched, worst = check_q8_0_keep_merge(gguf_bases[arch], tmp_path / "f32.gguf", base,
                                           tmp_path / "ours.gguf")
    experts = {f"blk.{i}.ffn_{p}_exps.weight" for i in moe_layers(arch)
               for p in ("gate", "up", "down")}
    kinds = {n: t for n, (t, _) in gguf_tensors(base).items()}
    assert experts <= touched and "Q8_0" in {kinds[n] for n in experts}
    print(f"{arch} Q8_0: {len(touched)} adapted tensors ({sorted({kinds[n] for n in experts})} "
          f"experts), worst error {worst:.3f} steps")


@pytest.mark.parametrize("arch", ["mixtral"])
def test_keep_type_merge_into_q8_0_base(arch, built, gguf_bases, runtime, tmp_path):
    """Into llama.cpp's Q8_0 quantization of the base: every tensor keeps its type (the 3-D
    experts too), and the logits are as near the runtime LoRA on that base as llama.cpp's own
    route (export-lora's F16 tensors requantized by llama_model_quantize), within 10% (the
    bound of tests/test_gguf_archs.py)."""
    base = llama_quantize(gguf_bases[arch], tmp_path / "q8_0.gguf", "Q8_0")
    kinds = {n: t for n, (t, _) in gguf_tensors(base).items()}
    assert kinds["blk.0.ffn_gate_exps.weight"] == "Q8_0"
    at.merge(base, [built[arch].peft_dir], tmp_path / "ours.gguf")
    at.merge(base, [built[arch].peft_dir], tmp_path / "f16.gguf", requantize="f16")
    theirs = llama_quantize(tmp_path / "f16.gguf", tmp_path / "theirs.gguf", "Q8_0",
                            allow_requantize=True)
    assert {n: t for n, (t, _) in gguf_tensors(tmp_path / "ours.gguf").items()} == kinds
    on_base = llama_logits(base, runtime(arch)[0])
    ours_err = max_diff(llama_logits(tmp_path / "ours.gguf"), on_base)
    theirs_err = max_diff(llama_logits(theirs), on_base)
    print(f"{arch} Q8_0: ours {ours_err:.3g}, llama.cpp's route {theirs_err:.3g}")
    assert max_diff(llama_logits(base), on_base) > LORA_MATTERS
    assert ours_err <= 1.1 * theirs_err


# ----------------------------------------------------------------------------- refusals

def test_expert_count_that_differs_from_the_base_is_refused(built, tmp_path):
    """An adapter for 3 experts against a base of 4: one line naming the tensor, nothing
    written."""
    import shutil

    folder = tmp_path / "three"
    shutil.copytree(built["qwen3_moe"].peft_dir, folder)
    state = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"       # down_proj, r=4
    b_key = key.replace("lora_A", "lora_B")
    state[key] = state[key][:12].clone()                                    # (r*3, in)
    state[b_key] = state[b_key].reshape(64, 4, 4)[:, :, :3].reshape(64, 12).clone()
    save_file(state, folder / "adapter_model.safetensors")
    with pytest.raises(FormatError, match=r"layers\.0\.mlp\.experts\.down_proj: the adapter's "
                                          r"delta is \(3, 64, 32\) but the base .* \(4, 64, 32\)"):
        at.convert(folder, tmp_path / "o.gguf", to="gguf", base=built["qwen3_moe"].hf_dir)
    assert not (tmp_path / "o.gguf").exists()


# ----------------------------------------------------------------------------- per-expert LoRAs

def per_expert_folder(arch: str, hf_dir: Path, folder: Path) -> Path:
    """A PEFT adapter in the transformers-4 layout (one LoRA per expert and projection:
    ``mlp.experts.{e}.gate_proj`` / Mixtral's ``block_sparse_moe.experts.{e}.w1``), on the
    per-expert tensors transformers 5 saves the experts back as; seeded random factors."""
    import json

    shapes = {k: tuple(t.shape) for k, t in load_file(hf_dir / "model.safetensors").items()
              if ".experts." in k}
    gen, state = torch.Generator().manual_seed(17), {}
    for name, (out, inp) in sorted(shapes.items()):
        stem = "base_model.model." + name.removesuffix(".weight")
        state[f"{stem}.lora_A.weight"] = torch.randn(4, inp, generator=gen) * 0.3
        state[f"{stem}.lora_B.weight"] = torch.randn(out, 4, generator=gen) * 0.3
    folder.mkdir()
    save_file(state, folder / "adapter_model.safetensors")
    projections = ["w1", "w2", "w3"] if arch == "mixtral" else ["gate_proj", "up_proj",
                                                                 "down_proj"]
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": projections,
        "base_model_name_or_path": None, "task_type": "CAUSAL_LM", "bias": "none",
        "fan_in_fan_out": False}))
    return folder


PER_EXPERT_CASES = [(a, "f32") for a in ARCHS] + [("mixtral", "q8_0"), ("qwen3_moe", "f16")]


def mla_folder(folder: Path) -> np.ndarray:
    """A DeepSeek-V3 PEFT LoRA on the MLA projections q_a_proj, q_b_proj and kv_a_proj_with_mqa
    saved to ``folder``; returns PEFT's logits with it."""
    return lora_folder(make_arch_model("deepseek_v3"), folder,
                       ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa"])


@pytest.fixture(scope="session")
def per_expert(built, llama_cpp_converter, tmp_path_factory):
    """(arch, outtype) -> (per-expert PEFT folder, llama.cpp's convert_lora_to_gguf.py output
    of it), for PER_EXPERT_CASES; and ("deepseek_v3", "mla") -> (mla_folder, llama.cpp's
    output), the converter run once for all."""
    root = tmp_path_factory.mktemp("moe_gguf_per_expert")
    folders = {a: per_expert_folder(a, built[a].hf_dir, root / a) for a in ARCHS}
    folders["mla"] = root / "mla"
    mla_logits = mla_folder(folders["mla"])
    outputs = {(a, t): root / f"llamacpp_{a}_{t}.gguf" for a, t in PER_EXPERT_CASES}
    outputs["deepseek_v3", "mla"] = root / "llamacpp_mla.gguf"
    failed = run_llama_cpp_script(llama_cpp_converter, [
        ["--base", str(built[a].hf_dir), "--outtype", "f32" if t == "mla" else t, "--outfile",
         str(out), str(folders[t if t == "mla" else a])] for (a, t), out in outputs.items()])
    assert not failed, failed
    cases = {(a, t): (folders[t if t == "mla" else a], out) for (a, t), out in outputs.items()}
    cases["mla logits"] = mla_logits
    return cases


@pytest.mark.parametrize("arch, outtype", PER_EXPERT_CASES)
def test_per_expert_loras_same_bytes_as_llama_cpp_converter(arch, outtype, built, per_expert,
                                                            tmp_path):
    """llama.cpp's own converter stacks per-expert LoRAs into 3-D ffn_*_exps factors: ours
    are the same tensors, byte for byte, types included (Q8_0 blocks of the 3-D lora_a; lora_b
    rows of r = 4 values stay F16), the layout our target_parameters LoRAs use too."""
    folder, theirs = per_expert[arch, outtype]
    dtype = {"f32": "fp32", "f16": "fp16", "q8_0": "q8_0"}[outtype]
    at.convert(folder, tmp_path / "o.gguf", to="gguf", base=built[arch].hf_dir, dtype=dtype)
    ours, want = gguf_tensors(tmp_path / "o.gguf"), gguf_tensors(theirs)
    assert sorted(ours) == sorted(want)
    assert len(want) == len(moe_layers(arch)) * 3 * 2     # MoE blocks, gate/up/down, a and b
    for name, (kind, data) in want.items():
        assert ours[name][0] == kind, name
        assert np.array_equal(ours[name][1], data), name
    kinds = {kind for kind, _ in want.values()}
    assert kinds == {"F32": {"F32"}, "F16": {"F16"}, "Q8_0": {"Q8_0", "F16"}}[outtype.upper()]


@pytest.mark.parametrize("arch", ARCHS)
def test_reads_llama_cpp_per_expert_file_exactly(arch, built, per_expert, tmp_path):
    """GGUF -> PEFT of llama.cpp's file (names from the base) and of ours (no --base): the
    per-expert factors back bit for bit."""
    folder, theirs = per_expert[arch, "f32"]
    original = at.load(folder)
    assert first_difference(original, at.load(theirs, base=built[arch].hf_dir)) is None
    at.convert(folder, tmp_path / "o.gguf", to="gguf", base=built[arch].hf_dir)
    assert first_difference(original, at.load(tmp_path / "o.gguf")) is None
    at.convert(theirs, tmp_path / "back", to="peft", base=built[arch].hf_dir)
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    state = load_file(folder / "adapter_model.safetensors")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_per_expert_merge_into_gguf_base_matches_llama_cpp_runtime(arch, gguf_bases, per_expert,
                                                                   tmp_path):
    """The per-expert PEFT adapter merged into llama.cpp's GGUF base: the logits llama.cpp
    computes with its own converter's adapter as the runtime LoRA."""
    folder, theirs = per_expert[arch, "f32"]
    at.merge(gguf_bases[arch], [folder], tmp_path / "merged.gguf")
    runtime_logits = llama_logits(gguf_bases[arch], theirs)
    diff = max_diff(llama_logits(tmp_path / "merged.gguf"), runtime_logits)
    effect = max_diff(llama_logits(gguf_bases[arch]), runtime_logits)
    print(f"{arch} per-expert: merged vs llama.cpp's runtime LoRA {diff:.3g}, effect {effect:.3g}")
    assert diff <= TOLERANCE and effect > LORA_MATTERS
    # llama.cpp's adapter into llama.cpp's base, no HF folder at hand (per-expert names from
    # the architecture's naming): the very tensors the PEFT folder's merge writes
    at.merge(gguf_bases[arch], [theirs], tmp_path / "from_gguf.gguf")
    a, b = gguf_tensors(tmp_path / "merged.gguf"), gguf_tensors(tmp_path / "from_gguf.gguf")
    assert a.keys() == b.keys() and all(np.array_equal(a[n][1], b[n][1]) for n in a)


# ----------------------------------------------------------------------------- DeepSeek MLA

def test_mla_projections_refused_by_name(built, tmp_path):
    """DeepSeek-V3's all-linear LoRA reaches its MLA projections, which llama.cpp multiplies
    without its LoRA hook: refused in one line naming the tensor and why, nothing written."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_arch_model("deepseek_v3"), LoraConfig(
        r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path / "all")
    with pytest.raises(UnsupportedError, match=r"self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa"
                                               r"|kv_b_proj)\.weight: llama.cpp's deepseek2 "
                                               r"multiplies this MLA projection with a plain "
                                               r"ggml_mul_mat.*silently ignored"):
        at.convert(tmp_path / "all", tmp_path / "o.gguf", to="gguf",
                   base=built["deepseek_v3"].hf_dir)
    assert not (tmp_path / "o.gguf").exists()


def test_llama_cpp_drops_an_mla_lora_silently(built, gguf_bases, per_expert):
    """Why: llama.cpp's own converter writes a q_a_proj / q_b_proj / kv_a_proj_with_mqa LoRA,
    llama.cpp loads it, and its logits are the base's bit for bit, while PEFT's differ."""
    _, theirs = per_expert["deepseek_v3", "mla"]
    assert any(n.endswith("attn_q_a.weight.lora_a") for n in gguf_tensors(theirs))
    base = gguf_bases["deepseek_v3"]
    assert np.array_equal(llama_logits(base, theirs), llama_logits(base))
    assert max_diff(per_expert["mla logits"], built["deepseek_v3"].base_logits) > LORA_MATTERS


def test_all_linear_lora_merges_into_deepseek_gguf_base(built, gguf_bases, tmp_path):
    """Merges need no runtime hook: DeepSeek-V3's all-linear LoRA (MLA projections, kv_b_proj
    re-laid on llama.cpp's per-head attn_k_b (transposed) and attn_v_b, o_proj, experts and
    router) merged into llama.cpp's GGUF base gives PEFT's logits."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_arch_model("deepseek_v3"), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    perturb_trainables(model)
    model.save_pretrained(tmp_path / "all")
    with torch.no_grad():
        peft_logits = model.eval()(torch.tensor([IDS])).logits[0].double().numpy()
        for name, p in model.named_parameters():       # how much kv_b_proj's LoRA alone does
            if "kv_b_proj.lora_B" in name:
                p.zero_()
        without_kv_b = model(torch.tensor([IDS])).logits[0].double().numpy()
    at.merge(gguf_bases["deepseek_v3"], [tmp_path / "all"], tmp_path / "merged.gguf")
    merged, base = gguf_tensors(tmp_path / "merged.gguf"), gguf_tensors(gguf_bases["deepseek_v3"])
    changed = {n for n in merged if not np.array_equal(merged[n][1], base[n][1])}
    assert {f"blk.{i}.attn_{t}.weight" for i in (0, 1) for t in ("q_a", "q_b", "kv_a_mqa", "k_b",
                                                                 "v_b")} <= changed
    diff = max_diff(llama_logits(tmp_path / "merged.gguf"), peft_logits)
    effect = max_diff(peft_logits, built["deepseek_v3"].base_logits)
    kv_b = max_diff(peft_logits, without_kv_b)
    print(f"deepseek_v3 all-linear merged vs PEFT {diff:.3g}, LoRA effect {effect:.3g}, "
          f"kv_b_proj's {kv_b:.3g}")
    assert diff <= TOLERANCE and effect > LORA_MATTERS and kv_b > LORA_MATTERS


# ----------------------------------------------------------------------------- HF, saved per expert

@pytest.mark.parametrize("arch, dtype", [("qwen3_moe", torch.float32), ("mixtral", torch.float32),
                                         ("qwen3_moe", torch.bfloat16)])
def test_fused_lora_merges_into_checkpoint_saved_per_expert(arch, dtype, built, tmp_path):
    """transformers 5 saves the fused experts back per expert (the Hub's layout); a fused
    target_parameters LoRA merged into such a folder (merging/expert_slices.split_fused) writes
    what PEFT's merge_and_unload saves, bit for bit, every other tensor untouched."""
    from peft import PeftModel

    make_arch_model(arch).to(dtype).save_pretrained(tmp_path / "base")
    model = PeftModel.from_pretrained(make_arch_model(arch).to(dtype), built[arch].peft_dir)
    model.merge_and_unload().save_pretrained(tmp_path / "peft_merged")
    at.merge(tmp_path / "base", [built[arch].peft_dir], tmp_path / "ours")
    want = load_file(tmp_path / "peft_merged" / "model.safetensors")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    base = load_file(tmp_path / "base" / "model.safetensors")
    assert ours.keys() == want.keys()
    assert [k for k in want if not torch.equal(ours[k], want[k])] == []
    assert any(".experts.3." in k and not torch.equal(ours[k], base[k]) for k in ours)
