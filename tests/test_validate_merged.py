"""`validate BASE ADAPTER... --merged MERGED`: per-tensor SQNR against the dtype's floor.

1. Every correct merge the engine makes passes (fp32, fp16, bf16; HF and GGUF bases; weighted
   and stacked; DoRA, embedding, GPT-2 Conv1D, lora_bias, modules_to_save; a --dtype cast), for
   20 probe seeds.
2. Each mistake of the issue, made on purpose in a merged checkpoint, fails and names exactly
   the tensors it touched: a delta left out, a scale off by 2x, a transposed delta, the Llama q/k
   RoPE permutation missing in a GGUF merge, rsLoRA read as plain LoRA, one adapter's weight
   applied twice, an untouched tensor changed by one ulp.
3. The report, merge --validate (validation.json), the CLI forms, --plot, the helpers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import adaptertools as at
from adaptertools.errors import UnsupportedError
from adaptertools.validation.merged import floor_for, survival

from helpers.checkpoints import read, rewrite
from helpers.cli import assert_cli_error, run_cli
from helpers.models import LLAMA_ALL
from helpers.validation import CASES, DTYPES, build_case, delta, failed


# ----------------------------------------------------------------------------- helpers

def adapted(report: dict) -> set[str]:
    return {r["name"] for r in report["tensors"] if r["kind"] != "untouched"}


def assert_clean_pass(report: dict) -> None:
    assert report["passed"], [(r["name"], r["problem"]) for r in report["tensors"]
                              if not r["passed"]][:5]
    for row in report["tensors"]:
        if row.get("margin_db") is not None:
            # a 16-bit correct CPU merge is the floor itself, bit for bit or to rare one-ulp
            # flips; in fp32 the engine sums several adapters in one product of the stacked
            # factors (fewer roundings than the floor's one product per adapter): above it
            if row["dtype"] == "F32":
                assert row["margin_db"] > -0.5, row
            else:
                assert abs(row["margin_db"]) < 0.05, row


# ----------------------------------------------------------------------------- 1. correct merges

# fp16 costs the most noise per element: the cases that round differently
FP16_CASES = ("plain", "dora", "embedding_modules_to_save", "weighted_three")


@pytest.mark.parametrize("case,dtype", [(c, d) for c in CASES for d in ("fp32", "bf16")]
                         + [(c, "fp16") for c in FP16_CASES])
def test_correct_merge_passes(case, dtype, tmp_path):
    arch, configs, weights, mode = CASES[case]
    folders = build_case(tmp_path, arch, configs, DTYPES[dtype])
    at.merge(tmp_path / "base", folders, tmp_path / "out", weights=weights, mode=mode)
    report = at.validate(tmp_path / "base", folders, tmp_path / "out", weights=weights, mode=mode)
    assert_clean_pass(report)
    changed = adapted(report)
    assert changed and report["adapted"] == len(changed)
    assert report["untouched"] + report["adapted"] == report["checked"]
    floors = [r["floor_db"] for r in report["tensors"] if r.get("floor_db") is not None]
    expected = {"fp32": 120, "fp16": 60, "bf16": 45}[dtype]   # the dtype's own noise, roughly
    assert min(floors) > expected and (dtype != "bf16" or max(floors) < 70)


def test_dtype_cast_is_judged_in_the_output_dtype(tmp_path):
    """fp32 base merged with --dtype bf16: adapted tensors against the bf16 floor, untouched ones
    must be the base cast once."""
    folders = build_case(tmp_path, "llama", [CASES["plain"][1][0]], torch.float32)
    at.merge(tmp_path / "base", folders, tmp_path / "out", dtype="bf16")
    report = at.validate(tmp_path / "base", folders, tmp_path / "out")
    assert_clean_pass(report)
    assert {r["dtype"] for r in report["tensors"]} == {"BF16"}
    name = "model.layers.0.input_layernorm.weight"
    value = read(tmp_path / "out", name)
    value[0] = -value[0]
    rewrite(tmp_path / "out", name, value)
    assert failed(at.validate(tmp_path / "base", folders, tmp_path / "out")) == {name}


@pytest.fixture(scope="module")
def gguf_merges(tmp_path_factory):
    """A tiny Llama (RoPE-permuted q/k) as F32 and F16 GGUF models, a PEFT adapter, and their
    merges (through the PEFT adapter and through its GGUF conversion)."""
    from helpers.gguf_base import make_base_model, write_gguf_base
    from helpers.peft_adapters import perturb_trainables
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("validate_gguf")
    model = make_base_model("llama")
    model.save_pretrained(root / "hf")
    f32 = write_gguf_base(model, root / "base-f32.gguf", "llama")
    f16 = write_gguf_base(model, root / "base-f16.gguf", "llama", f16=True)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_ALL,
                                                  init_lora_weights=False))
    perturb_trainables(peft_model)
    peft_model.save_pretrained(root / "peft")
    at.convert(root / "peft", root / "lora.gguf", to="gguf", base=root / "hf")
    at.merge(f32, [root / "peft"], root / "merged-f32.gguf")
    at.merge(f16, [root / "lora.gguf"], root / "merged-f16.gguf")
    return root, f32, f16


@pytest.mark.parametrize("variant", ["f32", "f16"])
def test_correct_gguf_merge_passes(gguf_merges, variant):
    root, f32, f16 = gguf_merges
    base, adapter = (f32, root / "peft") if variant == "f32" else (f16, root / "lora.gguf")
    report = at.validate(base, [adapter], root / f"merged-{variant}.gguf")
    assert_clean_pass(report)
    assert "blk.0.attn_q.weight" in adapted(report) and report["adapted"] == 14
    assert report["untouched"] > 0


# ----------------------------------------------------------------------------- 2. mistakes

@pytest.fixture(scope="module")
def bf16_merge(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate_mistakes")
    folders = build_case(root, "llama", [{"r": 4, "lora_alpha": 8, "target_modules": LLAMA_ALL}],
                         torch.bfloat16)
    at.merge(root / "base", folders, root / "out")
    return root, folders


def corrupted(root: Path, tmp_path: Path) -> Path:
    shutil.copytree(root / "out", tmp_path / "bad")
    return tmp_path / "bad"


Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize("mistake", ["left_out", "scale_2x", "transposed"])
def test_a_wrong_tensor_fails_and_is_named(bf16_merge, tmp_path, mistake):
    root, folders = bf16_merge
    bad = corrupted(root, tmp_path)
    name = UP1 if mistake != "transposed" else Q0         # transposing needs a square weight
    base = read(root / "base", name).double()
    d = delta(folders[0], name)
    wrong = {"left_out": lambda: base, "scale_2x": lambda: base + 2 * d,
             "transposed": lambda: base + d.T}[mistake]()
    rewrite(bad, name, wrong)
    report = at.validate(root / "base", folders, bad)
    assert not report["passed"] and failed(report) == {name}
    row = report["tensors"][0]                             # worst first
    assert row["name"] == name and row["margin_db"] < -10 and "floor" in row["problem"]


def test_untouched_tensor_one_ulp_off_fails(bf16_merge, tmp_path):
    root, folders = bf16_merge
    bad = corrupted(root, tmp_path)
    name = "model.layers.1.post_attention_layernorm.weight"
    value = read(bad, name)
    bits = value.view(torch.int16)
    bits[3] += 1                                           # the next bf16 number
    rewrite(bad, name, bits.view(torch.bfloat16))
    report = at.validate(root / "base", folders, bad)
    assert failed(report) == {name}
    row = next(r for r in report["tensors"] if r["name"] == name)
    assert row["kind"] == "untouched" and "byte-identical" in row["problem"]


def test_rslora_read_as_plain_lora_fails_on_every_tensor(tmp_path):
    folders = build_case(tmp_path, "llama", [{"r": 8, "lora_alpha": 6, "use_rslora": True,
                                                  "target_modules": ["q_proj", "v_proj"]}],
                         torch.bfloat16)
    plain = tmp_path / "as_plain"
    shutil.copytree(folders[0], plain)
    config = json.loads((plain / "adapter_config.json").read_text())
    config["use_rslora"] = False                           # what a reader bug would do
    (plain / "adapter_config.json").write_text(json.dumps(config))
    at.merge(tmp_path / "base", [plain], tmp_path / "out")
    report = at.validate(tmp_path / "base", folders, tmp_path / "out")
    assert failed(report) == adapted(report) and len(adapted(report)) == 4
    assert at.validate(tmp_path / "base", [plain], tmp_path / "out")["passed"]


def test_one_adapters_weight_applied_twice_fails_where_it_acts(tmp_path):
    configs = [{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
               {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"]}]
    folders = build_case(tmp_path, "llama", configs, torch.float32)
    at.merge(tmp_path / "base", folders, tmp_path / "out", weights=[1.4, -0.3])   # 0.7 twice
    report = at.validate(tmp_path / "base", folders, tmp_path / "out", weights=[0.7, -0.3])
    expected = {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2)
                for m in ("q_proj", "v_proj")}
    assert failed(report) == expected                      # o_proj: only the other adapter
    assert {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(2)} <= adapted(report)


def test_gguf_merge_without_the_rope_permutation_fails(gguf_merges, tmp_path):
    from adaptertools.formats.names import permute_rows

    root, f32, _ = gguf_merges
    bad = tmp_path / "bad.gguf"
    shutil.copy(root / "merged-f32.gguf", bad)
    names = {"blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", 4),
             "blk.1.attn_k.weight": ("model.layers.1.self_attn.k_proj.weight", 2)}
    for gguf_name, (hf_name, heads) in names.items():
        d = delta(root / "peft", hf_name)
        base = read(f32, gguf_name).double()
        assert torch.allclose(read(bad, gguf_name).double(), base + permute_rows(d, heads),
                              atol=1e-5)                   # the engine permutes ...
        rewrite(bad, gguf_name, base + d)                  # ... a merge that forgot to does not
    report = at.validate(f32, [root / "peft"], bad)
    assert failed(report) == set(names)


# ----------------------------------------------------------------------------- seeds

@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A correct weighted fp32 merge (the dtype where merge and floor round independently the
    most) and a copy with one tensor's scale slightly off (+3%)."""
    root = tmp_path_factory.mktemp("validate_seeds")
    configs = [{"r": 4, "lora_alpha": 8, "target_modules": LLAMA_ALL},
               {"r": 8, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "down_proj"]}]
    folders = build_case(root, "llama", configs, torch.float32)
    at.merge(root / "base", folders, root / "out", weights=[0.5, 0.9])
    shutil.copytree(root / "out", root / "bad")
    name = "model.layers.1.mlp.down_proj.weight"
    good = read(root / "out", name).double()
    rewrite(root / "bad", name, good + 0.03 * 0.5 * delta(folders[0], name))
    return root, folders, name


@pytest.mark.parametrize("seed", range(20))
def test_no_flakiness_across_probe_seeds(seeded, seed):
    root, folders, name = seeded
    good = at.validate(root / "base", folders, root / "out", weights=[0.5, 0.9], seed=seed)
    assert_clean_pass(good)
    assert all(r["probes"] >= 16 for r in good["tensors"] if "probes" in r)
    bad = at.validate(root / "base", folders, root / "bad", weights=[0.5, 0.9], seed=seed)
    assert failed(bad) == {name}


# ----------------------------------------------------------------------------- 3. report, CLI

def test_merge_validate_writes_validation_json(bf16_merge, tmp_path):
    root, folders = bf16_merge
    out = tmp_path / "merged"
    outcome = run_cli("merge", root / "base", folders[0], "--out", out, "--validate",
                      "--json")
    assert outcome.code == 0, outcome.stderr
    summary = json.loads(outcome.stdout)["validation"]
    assert summary["passed"] and summary["failures"] == [] and summary["adapted"] == 14
    saved = json.loads((out / "validation.json").read_text())
    assert saved["passed"] and len(saved["tensors"]) == summary["checked"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]      # atomic: no leftovers


def test_merge_validate_gguf_report_beside_the_file(gguf_merges, tmp_path):
    root, f32, _ = gguf_merges
    out = tmp_path / "m.gguf"
    report = at.merge(f32, [root / "peft"], out, validate=True)
    assert report["validation"]["passed"]
    assert json.loads((tmp_path / "m.gguf.validation.json").read_text())["passed"]


def test_cli_validate_merged_exit_codes_table_and_json(bf16_merge, tmp_path):
    root, folders = bf16_merge
    ok = run_cli("validate", root / "base", folders[0], "--merged", root / "out")
    assert ok.code == 0 and "validation passed" in ok.stderr and Q0 in ok.stdout
    bad = corrupted(root, tmp_path)
    rewrite(bad, UP1, read(root / "base", UP1))
    outcome = run_cli("validate", root / "base", folders[0], "--merged", bad, "--json",
                      "--probes", "8", "--seed", "3", "--tolerance-db", "0.5")
    assert outcome.code == 1
    report = json.loads(outcome.stdout)
    assert report["tensors"][0]["name"] == UP1 and report["failed"] == 1
    assert (report["probes"], report["seed"], report["tolerance_db"]) == (8, 3, 0.5)
    text = run_cli("validate", root / "base", folders[0], "--merged", bad)
    assert text.code == 1 and "FAIL" in text.stdout and "validation FAILED" in text.stderr


def test_cli_forms_are_exclusive(bf16_merge):
    root, folders = bf16_merge
    assert_cli_error(run_cli("validate", folders[0], how="subprocess"), ["--merged", "--against"],
                     code=2)
    assert_cli_error(run_cli("validate", root / "base", folders[0], "--merged", root / "out",
                             "--against", folders[0], how="subprocess"),
                     ["--merged", "--against"], code=2)
    assert_cli_error(run_cli("validate", root / "base", "--merged", root / "out", how="subprocess"),
                     ["BASE", "ADAPTER"], code=2)
    assert_cli_error(run_cli("validate", folders[0], "--against", folders[0], "--e2e",
                             how="subprocess"),
                     ["--e2e", "--merged"], code=2)
    assert_cli_error(run_cli("merge", root / "base", folders[0], "--dry-run", "--validate",
                             how="subprocess"),
                     ["--validate", "--dry-run"], code=2)


def test_plot_is_a_png(bf16_merge, tmp_path):
    pytest.importorskip("matplotlib")
    root, folders = bf16_merge
    outcome = run_cli("validate", root / "base", folders[0], "--merged", root / "out",
                      "--plot", tmp_path / "sqnr.png")
    assert outcome.code == 0
    assert (tmp_path / "sqnr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(bf16_merge, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    root, folders = bf16_merge
    outcome = run_cli("validate", root / "base", folders[0], "--merged", root / "out",
                      "--plot", tmp_path / "sqnr.png")
    assert_cli_error(outcome, ["matplotlib", "adaptertools[plot]"])
    assert not (tmp_path / "sqnr.png").exists()


def test_wrong_merged_model_is_a_clear_error(bf16_merge, gguf_merges):
    root, folders = bf16_merge
    with pytest.raises(UnsupportedError, match="gguf"):
        at.validate(root / "base", folders, gguf_merges[0] / "merged-f32.gguf")
    other = gguf_merges[0] / "hf"            # an HF model with other tensors: rows, not a crash
    report = at.validate(root / "base", folders, other)
    assert not report["passed"] and all("shape" in r["problem"] for r in report["tensors"]
                                        if r["name"].startswith("model.layers.0."))


def test_floor_for_and_survival():
    x = torch.randn(64, 32, dtype=torch.float64)
    assert floor_for("BF16")(x).dtype == torch.bfloat16
    # block types: the codec's round trip (quantized merges: tests/test_merge_gguf_quant.py)
    wide = torch.randn(4, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kept = floor_for("Q8_0")(wide)
    assert kept.dtype == torch.float32 and not torch.equal(kept, wide.float())
    assert torch.equal(floor_for("Q8_0")(kept), kept)            # Q8_0 grids are fixed points
    assert 0 < float((floor_for("Q4_K")(wide) - wide).abs().max()) < 0.5
    with pytest.raises(UnsupportedError, match="IQ4_XS"):
        floor_for("IQ4_XS")
    base = torch.randn(64, 32)
    change = 0.01 * torch.randn(64, 32)
    assert survival(base, base + change, change) == pytest.approx(1.0)
    assert survival(base, base, torch.zeros(64, 32)) is None
    # the change drowned in requantization noise: nothing of it survives
    noise = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    assert abs(survival(base, base + noise, change)) < 0.2
    assert survival(base, (base + change).bfloat16(), change) > 0.9
    assert os.environ.get("HF_HUB_OFFLINE") == "1"        # nothing fetched at test time
