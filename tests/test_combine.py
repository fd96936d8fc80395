"""`combine`: adapter algebra checked against independent references and the real PEFT.

The inputs are real PEFT adapters (plain, rsLoRA, rank/alpha patterns, DoRA, embedding LoRA with
modules_to_save, GPT-2 Conv1D with lora_bias) saved by ``save_pretrained``, some converted to our
safetensors file and to GGUF first. Each input's delta comes from PEFT itself (its loaded
``lora_A``/``lora_B`` and ``scaling``, in float64), never from our readers, and:

- ``cat`` equals ``sum(w * s * B @ A)`` to fp32 rounding;
- ``svd`` has the Eckart-Young error of ``torch.linalg.svd`` of the full weighted sum;
- ``ties``/``dare_*``/``magnitude_prune`` equal a direct implementation on full deltas written
  here (itself checked against ``peft.utils.merge_utils`` where that is deterministic);
- PEFT loads every output, and its outputs equal those of the base with the combined delta
  merged in; the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

import adaptertools as at
from adaptertools.tiny import TinyLlama, make_adapter

from helpers.cli import assert_cli_error, assert_nothing_written, run_cli
from helpers.models import LLAMA_ALL, make_model, model_output
from helpers.peft_adapters import PEFT_CASES, build_peft_case, load_with_peft

CASES = {
    "plain": PEFT_CASES["plain"],
    "rslora": PEFT_CASES["rslora"],
    "patterns": PEFT_CASES["patterns"],
    "dora": PEFT_CASES["dora"],
    "embed": PEFT_CASES["embedding_and_modules_to_save"],
    "gpt2_bias": PEFT_CASES["gpt2_conv1d_lora_bias"],
    "gpt2_plain": ("gpt2", {"r": 2, "lora_alpha": 3, "fan_in_fan_out": True,
                            "target_modules": ["c_attn", "c_proj", "c_fc"]}, {}),
}
FP32_TOLERANCE = 1e-6      # relative: a few fp32 roundings of the folded factors


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    built = {name: build_peft_case(root, name, kind, kwargs, **options)
             for name, (kind, kwargs, options) in CASES.items()}
    base = root / "llama_base"
    make_model("llama").save_pretrained(base)
    at.convert(built["plain"].folder, root / "plain.gguf", to="gguf", base=base)
    at.convert(built["patterns"].folder, root / "patterns.safetensors", to="safetensors")
    return root, built, base


# ----------------------------------------------------------------------------- references

def peft_deltas(folder: Path, kind: str) -> tuple[dict, dict]:
    """{weight name: float64 delta}, {bias name: float64 bias delta}, as PEFT holds them."""
    model = load_with_peft(folder, kind)
    deltas, biases = {}, {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if not isinstance(scaling, dict) or "default" not in scaling:
            continue
        scaling = scaling["default"]
        key = name.removeprefix("base_model.model.")
        if "default" in getattr(module, "lora_embedding_A", {}):
            a = module.lora_embedding_A["default"].double()
            b = module.lora_embedding_B["default"].double()
            deltas[key + ".weight"] = (b @ a).T * scaling
            continue
        a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
        delta = (b.flatten(1) @ a.flatten(1)) * scaling
        deltas[key + ".weight"] = delta.T if getattr(module, "fan_in_fan_out", False) else delta
        if module.lora_B["default"].bias is not None:
            biases[key + ".bias"] = module.lora_B["default"].bias.double() * scaling
    return deltas, biases


def weighted_sum(parts: list[tuple[float, dict]]) -> dict:
    out: dict = {}
    for w, deltas in parts:
        for name, d in deltas.items():
            out[name] = out.get(name, 0) + w * d
    return out


def merged_output(kind: str, deltas: dict, replacements: dict | None = None) -> torch.Tensor:
    """The base model's output with ``deltas`` added (float64, rounded once) and tensors replaced."""
    model = make_model(kind)
    state = model.state_dict()
    for name, d in deltas.items():
        state[name] = (state[name].double() + d.reshape(state[name].shape)).to(state[name].dtype)
    state.update(replacements or {})
    model.load_state_dict(state)
    return model_output(model, kind)


def assert_close(ours: dict, reference: dict, tolerance: float) -> None:
    assert ours.keys() == reference.keys()
    for name, ref in reference.items():
        error = float(torch.linalg.matrix_norm(ours[name].reshape(ref.shape) - ref))
        assert error <= tolerance * float(torch.linalg.matrix_norm(ref)), (name, error)


def assert_peft_matches_merge(folder: Path, kind: str, replacements: dict | None = None) -> dict:
    """PEFT's output with the adapter loaded equals the base with its delta merged in."""
    deltas, biases = peft_deltas(folder, kind)
    with torch.no_grad():
        loaded = model_output(load_with_peft(folder, kind), kind)
    merged = merged_output(kind, {**deltas, **biases}, replacements)
    assert torch.allclose(loaded, merged, rtol=0, atol=2e-5), (loaded - merged).abs().max()
    return deltas


def combine(*args, **kwargs) -> dict:
    report = at.combine(*args, **kwargs)
    assert report["tensors"] and all(r["rank"] is None or r["rank"] >= 1 for r in report["tensors"])
    return report


# ----------------------------------------------------------------------------- cat and svd

def test_cat_of_ranks_scales_and_formats_equals_float64_sum(cases, tmp_path):
    root, built, base = cases
    inputs = [(0.7, root / "plain.gguf", "plain"), (-0.4, built["rslora"].folder, "rslora"),
              (1.3, root / "patterns.safetensors", "patterns"), (0.5, built["embed"].folder, "embed")]
    out = tmp_path / "cat"
    report = combine([p for _, p, _ in inputs], out, weights=[w for w, _, _ in inputs],
                     base=base)
    reference = weighted_sum([(w, peft_deltas(built[c].folder, "llama")[0]) for w, _, c in inputs])
    lm_head = built["embed"].merged_state["lm_head.weight"]
    deltas = assert_peft_matches_merge(out, "llama", {"lm_head.weight": lm_head})
    assert_close(deltas, reference, FP32_TOLERANCE)
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config["use_rslora"] and config["modules_to_save"] == ["lm_head"]
    ranks = {r["name"]: r["rank"] for r in report["tensors"]}
    # q_proj of layer 0: plain 4 + rslora 8 + patterns 4 + embed 4
    assert ranks["model.layers.0.self_attn.q_proj.weight"] == 20
    assert ranks["model.layers.0.self_attn.v_proj.weight"] == 4 + 8 + 2 + 4   # v_proj pattern r=2
    assert ranks["model.embed_tokens.weight"] == 4
    assert report["total"]["energy_kept"] == pytest.approx(1.0, abs=1e-12)
    assert all(r["relative_error"] <= FP32_TOLERANCE for r in report["tensors"])


def eckart_young(delta: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(delta)
    return float((s[k:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())


def test_svd_rank_has_the_eckart_young_error(cases, tmp_path):
    _, built, _ = cases
    names, weights = ["plain", "rslora", "patterns"], [1.0, 0.5, -0.8]
    report = combine([built[n].folder for n in names], tmp_path / "svd", method="svd",
                     weights=weights, rank=3)
    reference = weighted_sum([(w, peft_deltas(built[n].folder, "llama")[0])
                              for w, n in zip(weights, names)])
    deltas = assert_peft_matches_merge(tmp_path / "svd", "llama")
    rows = {r["name"]: r for r in report["tensors"]}
    for name, ref in reference.items():
        optimum = eckart_young(ref, 3)
        actual = float(torch.linalg.matrix_norm(deltas[name] - ref) / torch.linalg.matrix_norm(ref))
        assert rows[name]["rank"] == 3
        assert rows[name]["relative_error"] == pytest.approx(optimum, rel=1e-5, abs=1e-7)
        assert actual == pytest.approx(optimum, rel=1e-5, abs=1e-7)


def test_svd_energy_keeps_the_fewest_ranks(cases, tmp_path):
    _, built, _ = cases
    report = combine([built["plain"].folder, built["rslora"].folder], tmp_path / "energy",
                     method="svd", energy=0.9)
    reference = weighted_sum([(1.0, peft_deltas(built[n].folder, "llama")[0])
                              for n in ("plain", "rslora")])
    for row in report["tensors"]:
        s2 = torch.linalg.svdvals(reference[row["name"]]) ** 2
        kept = torch.cumsum(s2, 0) / s2.sum()
        assert row["rank"] == int((kept < 0.9).sum()) + 1
        assert row["energy_kept"] >= 0.9 - 1e-6
    assert report["total"]["energy_kept"] >= 0.9 - 1e-6


# ----------------------------------------------------------------------------- TIES and DARE

def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The top ``int(density * n)`` entries by magnitude, the rest zero."""
    k = int(density * delta.numel())
    threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def drop(deltas: list[torch.Tensor], density: float, seed: int, name: str) -> list[torch.Tensor]:
    """DARE with the documented draws: one generator per tensor, one rand per adapter."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    out = []
    for d in deltas:
        keep = torch.rand(d.shape, generator=gen, dtype=torch.float64) < density
        out.append(torch.where(keep, d / density, torch.zeros_like(d)))
    return out


def elect_and_average(trimmed: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES: sign of the summed trimmed deltas; mean of the weighted entries of that sign."""
    sign = torch.sign(sum(trimmed))
    sign[sign == 0] = 1
    total, count = torch.zeros_like(trimmed[0]), torch.zeros_like(trimmed[0])
    for w, t in zip(weights, trimmed):
        agrees = (torch.sign(t) == sign) & (t != 0)
        total += torch.where(agrees, w * t, torch.zeros_like(t))
        count += agrees.double()
    return total / count.clamp(min=1)


def direct(method: str, deltas: list, weights: list, density: float, seed: int, name: str):
    if method in ("ties", "magnitude_prune"):
        pruned = [trim(d, density) for d in deltas]
    else:
        pruned = drop(deltas, density, seed, name)
    if method in ("ties", "dare_ties"):
        return elect_and_average(pruned, weights)
    return sum(w * p for w, p in zip(weights, pruned))


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_pruning_methods_equal_a_direct_implementation(cases, tmp_path, method):
    _, built, _ = cases
    names, weights, density, seed = ["plain", "rslora", "patterns"], [0.6, 0.9, -0.5], 0.3, 5
    report = combine([built[n].folder for n in names], tmp_path / method, method=method,
                     weights=weights, density=density, seed=seed, energy=1.0)
    inputs = [peft_deltas(built[n].folder, "llama")[0] for n in names]
    deltas = assert_peft_matches_merge(tmp_path / method, "llama")
    reference = {name: direct(method, [d[name] for d in inputs], weights, density, seed, name)
                 for name in inputs[0]}
    assert_close(deltas, reference, 1e-5)
    assert report["total"]["energy_kept"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_direct_implementation_agrees_with_peft_merge_utils(cases, method):
    from peft.utils import merge_utils

    _, built, _ = cases
    name = "model.layers.1.mlp.down_proj.weight"
    deltas = [peft_deltas(built[n].folder, "llama")[0][name] for n in ("plain", "rslora")]
    weights = [0.6, 1.4]
    theirs = getattr(merge_utils, method)(deltas, torch.tensor(weights, dtype=torch.float64), 0.3)
    assert torch.allclose(direct(method, deltas, weights, 0.3, 0, name), theirs, rtol=0,
                          atol=1e-15)


def test_same_seed_same_bytes_other_seed_differs(cases, tmp_path):
    _, built, _ = cases
    folders = [built["plain"].folder, built["rslora"].folder]

    def run(seed: int, out: str) -> bytes:
        combine(folders, tmp_path / out, method="dare_ties", density=0.5, seed=seed, rank=4)
        return (tmp_path / out / "adapter_model.safetensors").read_bytes()

    assert run(3, "a") == run(3, "b")
    assert run(4, "c") != run(3, "d")


# ----------------------------------------------------------------------------- DoRA, lora_bias

def test_dora_materialized_through_its_full_delta(cases, tmp_path):
    _root, built, base = cases
    dora = built["dora"]
    dora_delta = {n: dora.merged_state[n].double() - dora.base_state[n].double()
                  for n in peft_deltas(built["plain"].folder, "llama")[0]}
    report = combine([dora.folder, built["plain"].folder], tmp_path / "dora", method="svd",
                     weights=[0.8, 0.5], energy=1.0, materialize=True, base=base)
    reference = weighted_sum([(0.8, dora_delta), (0.5, peft_deltas(built["plain"].folder,
                                                                    "llama")[0])])
    deltas = assert_peft_matches_merge(tmp_path / "dora", "llama")
    assert_close(deltas, reference, 1e-5)
    assert report["total"]["relative_error"] < 1e-5


def test_gpt2_conv1d_with_lora_bias_is_combined(cases, tmp_path):
    _, built, _ = cases
    combine([built["gpt2_bias"].folder, built["gpt2_plain"].folder], tmp_path / "gpt2",
            weights=[0.5, 2.0])
    config = json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())
    assert config["lora_bias"] and config["fan_in_fan_out"]
    ours = peft_deltas(tmp_path / "gpt2", "gpt2")
    inputs = [peft_deltas(built[n].folder, "gpt2") for n in ("gpt2_bias", "gpt2_plain")]
    assert_close(ours[0], weighted_sum([(0.5, inputs[0][0]), (2.0, inputs[1][0])]),
                 FP32_TOLERANCE)
    for name, bias in inputs[0][1].items():
        assert torch.allclose(ours[1][name], 0.5 * bias, rtol=1e-6, atol=1e-9)
    assert_peft_matches_merge(tmp_path / "gpt2", "gpt2")


# ----------------------------------------------------------------------------- bad input

def test_bad_input_gives_one_line_errors(cases, tmp_path):
    _root, built, base = cases
    plain, dora = str(built["plain"].folder), str(built["dora"].folder)
    other = tmp_path / "other_model"
    at.save(make_adapter(TinyLlama(), rank=2), other, format="peft")    # hidden 64, not 32
    embed = at.load(built["embed"].folder)
    embed.replacements["lm_head.weight"] = embed.replacements["lm_head.weight"] + 1
    at.save(embed, tmp_path / "conflict", format="peft")
    out = tmp_path / "out"
    cases_ = [
        ([dora, plain], 1, ["dora", "DoRA", "--materialize"]),
        ([dora, plain, "--materialize", "--base", base], 1, ["--method svd"]),
        ([plain, str(other)], 1, ["down_proj.weight", "shape (32, 48)", "same base"]),
        ([plain, "--method", "svd", "--rank", "0"], 2, ["--rank 0"]),
        ([plain, "--method", "svd", "--energy", "1.5"], 2, ["--energy 1.5", "0 < E <= 1"]),
        ([plain, "--method", "svd", "--energy", "0"], 2, ["--energy 0"]),
        ([plain, "--method", "svd"], 2, ["--rank R or --energy E"]),
        ([plain, "--rank", "4"], 2, ["cat is exact"]),
        ([plain, "--method", "ties", "--rank", "4"], 2, ["--density"]),
        ([plain, plain, "--weights", "1"], 2, ["--weights has 1 value"]),
        ([str(built["embed"].folder), str(tmp_path / "conflict")], 1,
         ["lm_head.weight", "modules_to_save"]),
    ]
    for args, code, fragments in cases_:      # 2: misuse of the options, 1: bad input
        outcome = run_cli("combine", *args, "--out", out)
        assert_cli_error(outcome, fragments, code=code)
        assert_nothing_written(out)


def test_cli_json_report(cases, tmp_path):
    _, built, _ = cases
    outcome = run_cli("combine", built["plain"].folder, built["rslora"].folder, "--out",
                      tmp_path / "o", "--method", "svd", "--rank", "2", "--json")
    assert outcome.code == 0, outcome.stderr
    report = json.loads(outcome.stdout)
    assert report["method"] == "svd" and len(report["tensors"]) == 2 * len(LLAMA_ALL)
    assert 0 < report["total"]["energy_kept"] < 1
    text = run_cli("combine", built["plain"].folder, "--out", tmp_path / "t")
    assert text.code == 0 and "total: 1.000000 of the delta energy kept" in text.stdout
