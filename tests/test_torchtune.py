"""torchtune checkpoints (formats/torchtune.py) against torchtune 0.6.1 itself, on the CPU.

torchtune runs in an environment of its own (helpers/torchtune_env.py, made once and cached):
its LoRA builders (``lora_llama3``, ``lora_qwen2``) on tiny HF bases, its HF checkpointer, its
``get_merged_lora_ckpt`` and ``save_checkpoint`` as its LoRA recipe calls them
(helpers/torchtune_oracle.py). For LoRA and DoRA on a Llama and a Gemma2 (q/k rows permuted in
torchtune's checkpoints) and a Qwen2 (not permuted), with LoRA on every attention projection,
the MLP and the output (Gemma2: no output, its embeddings are tied):

- our merge of its adapter_model.pt into the HF base is bit-identical to torchtune's own merged
  checkpoint, every tensor (the arithmetic is the same plain torch: ``W + (alpha / r) * B @ A``,
  DoRA's row norms; measured max abs difference 0.0);
- the permutation rule per model type matters: flipped, exactly the q/k tensors differ;
- torchtune's PEFT-form export: right for Llama LoRA; wrong q/k lora_B for Qwen2 and unpermuted
  q/k DoRA magnitudes for Llama; ``peft_export_fix`` repairs both bit-exactly, and the repaired
  Qwen2 export merges as torchtune does;
- write: a PEFT adapter converted to torchtune is loaded by torchtune's LoRA model and merged
  by get_merged_lora_ckpt bit-identically to our merge of the PEFT adapter; torchtune -> ours ->
  torchtune is bit-exact; per-module ranks are refused;
- bad input: alpha unknown, --scale beside a config, no base for q/k, a foreign key, a missing
  lora_b, a pickle that is more than tensors: one line each, exit 1 (2 for misuse).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers.cli import assert_cli_error, assert_nothing_written, run_cli
from helpers.models import make_causal_lm
from helpers.peft_adapters import make_adapter
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.adapter import first_difference
from adaptertools.errors import AdapterToolsWarning
from adaptertools.formats import torchtune as tt
from adaptertools.formats.names import load_base_info

CASES = [(m, d) for m in ("llama", "qwen2", "gemma2") for d in (False, True)]
WRITTEN = [c for c in CASES if c[0] != "gemma2"]  # torchtune's Gemma2 has no output LoRA
RANK, ALPHA = 4, 8.0
MERGED = "model-00001-of-00001.safetensors"        # torchtune's merged HF checkpoint
ROPE = ("self_attn.q_proj.weight", "self_attn.k_proj.weight")
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "lm_head"]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """{(model, dora): epoch_0 folder as torchtune wrote it}, and the HF bases by model."""
    from helpers.torchtune_env import make_checkpoints, oracle_python

    try:
        python = oracle_python()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(f"no torchtune 0.6.1 oracle environment: {exc}")
    root = tmp_path_factory.mktemp("torchtune")
    bases = {}
    for model in ("llama", "qwen2", "gemma2"):
        bases[model] = root / f"base_{model}"
        make_causal_lm(model).save_pretrained(bases[model])
    specs = [{"base": bases[m], "out": root / f"{m}_{'dora' if d else 'lora'}", "model": m,
              "dora": d, "rank": RANK, "alpha": ALPHA, "seed": 11} for m, d in CASES]
    for model, dora in WRITTEN:        # PEFT -> ours -> torchtune, merged by torchtune
        peft = root / f"peft_{model}_{dora}"
        make_adapter(make_causal_lm(model), peft / "peft", r=RANK, lora_alpha=ALPHA,
                     use_dora=dora, target_modules=PEFT_TARGETS)
        at.convert(peft / "peft", peft / "tt", to="torchtune", base=bases[model])
        specs.append({"base": bases[model], "out": peft / "tt_merged", "model": model,
                      "dora": dora, "rank": RANK, "alpha": ALPHA,
                      "adapter": peft / "tt" / "adapter_model.pt"})
    make_checkpoints(python, specs)
    return {(m, d): s["out"] / "epoch_0" for (m, d), s in zip(CASES, specs)}, bases


def _ids(cases):
    return [f"{m}-{'dora' if d else 'lora'}" for m, d in cases]


@pytest.fixture(params=CASES, ids=_ids(CASES))
def case(request, oracle):
    folders, bases = oracle
    return request.param, folders[request.param], bases[request.param[0]]


@pytest.fixture(params=WRITTEN, ids=_ids(WRITTEN))
def written(request, oracle):
    folders, bases = oracle
    return request.param, folders[request.param], bases[request.param[0]]


def _merge_and_compare(base, adapter, out) -> tuple[list[str], int]:
    """(tensors that differ from torchtune's merge, tensors the adapter changed)."""
    run_cli("merge", base, adapter, "--out", out, expect=0)
    ours = load_file(out / "model.safetensors")
    theirs = load_file(adapter.parent / MERGED) if adapter.is_file() else None
    original = load_file(base / "model.safetensors")
    assert ours.keys() == theirs.keys()
    differ = sorted(k for k in theirs if not torch.equal(ours[k], theirs[k]))
    return differ, sum(not torch.equal(original[k], theirs[k]) for k in theirs)


def test_merge_is_bit_identical_to_torchtunes_merge(case, tmp_path):
    (model, _), folder, base = case
    differ, changed = _merge_and_compare(base, folder / "adapter_model.pt", tmp_path / "m")
    assert differ == []
    assert changed == 15 - (model == "gemma2")     # 7 per block x 2 + lm_head: it matters


def test_read_names_rank_and_scale(case):
    (model, dora), folder, base = case
    adapter = at.load(folder / "adapter_model.pt", base=base)
    names = set(load_file(base / "model.safetensors"))
    assert len(adapter.weights) == 15 - (model == "gemma2") and set(adapter.weights) <= names
    w = adapter.weights["model.layers.1.self_attn.k_proj.weight"]
    assert (w.rank, w.scale, w.shape) == (RANK, ALPHA / RANK, (32, 64))
    assert (w.magnitude is not None) == dora
    assert adapter.metadata["qk_unpermuted"] == (model != "qwen2")
    # the epoch folder sniffs as PEFT (its export); --from torchtune reads the .pt beside it
    same = at.load(folder, format="torchtune", base=base)
    assert same.weights.keys() == adapter.weights.keys()


def test_inspect(oracle):
    folders, bases = oracle
    file = folders["llama", True] / "adapter_model.pt"
    report = json.loads(run_cli("inspect", file, "--base", bases["llama"], "--json",
                                expect=0).stdout)
    assert report["format"] == "torchtune"
    assert report["storage"] == {"file": "adapter_model.pt", "r": RANK, "lora_alpha": ALPHA,
                                 "dora": True}


@pytest.mark.parametrize("model", ["llama", "qwen2", "gemma2"])
def test_the_permutation_rule_per_model_type(oracle, model, tmp_path, monkeypatch):
    """Read with the other rule, exactly the q/k tensors differ from torchtune's merge: Llama's
    and Gemma2's checkpoints are permuted, Qwen2's are not."""
    folders, bases = oracle
    monkeypatch.setitem(tt.TUNE_PERMUTES_QK, model, not tt.TUNE_PERMUTES_QK[model])
    differ, _ = _merge_and_compare(bases[model], folders[model, False] / "adapter_model.pt",
                                   tmp_path / "m")
    assert differ == [f"model.layers.{i}.{p}" for i in (0, 1) for p in sorted(ROPE)]


def _export(folder):
    return json.loads((folder / "adapter_config.json").read_text()), \
        load_file(folder / "adapter_model.safetensors")


def _export_disagreements(state: dict, adapter) -> list[str]:
    """The export's tensors that are not our reading of adapter_model.pt (bit for bit)."""
    bad = []
    for key, tensor in state.items():
        hf = key.removeprefix("base_model.model.")
        module, leaf = (hf.rsplit(".", 2)[0], hf.split(".")[-2]) if hf.endswith(".weight") \
            else hf.rsplit(".", 1)
        w = adapter.weights[module + ".weight"]
        ours = {"lora_A": w.a, "lora_B": w.b, "lora_magnitude_vector": w.magnitude}[leaf]
        if not torch.equal(ours, tensor):
            bad.append(f"{module.removeprefix('model.layers.')}.{leaf}")
    return sorted(bad)


def test_peft_export_bugs_and_their_fix(case):
    """torchtune's PEFT-form export vs its own adapter_model.pt read by us."""
    (model, dora), folder, base = case
    adapter = at.load(folder / "adapter_model.pt", base=base)
    config, state = _export(folder)
    assert tt.is_torchtune_export(config)
    assert not tt.is_torchtune_export({**config, "task_type": "CAUSAL_LM", "bias": "none"})
    wrong = _export_disagreements(state, adapter)
    leaf = "lora_B" if model == "qwen2" else "lora_magnitude_vector" if dora else None
    assert wrong == ([f"{i}.self_attn.{p}.{leaf}" for i in (0, 1) for p in ("k_proj", "q_proj")]
                     if leaf else [])
    fixed, notes = tt.peft_export_fix(config, state, model, n_head=4, n_head_kv=2)
    assert tt.peft_export_fix(config, state, load_base_info(base))[1] == notes   # BaseInfo too
    assert _export_disagreements(fixed, adapter) == []
    assert len(notes) == (leaf is not None) + dora
    assert all("torchtune" in n for n in notes)


def test_fixed_qwen2_export_merges_as_torchtune(oracle, tmp_path):
    """The Qwen2 export is off torchtune's merge on q/k when read as a plain PEFT adapter (its
    config altered so it is not recognised as torchtune's); as exported (the PEFT reader
    recognises the export and repairs it from --base, with a warning), it merges as torchtune
    does. (peft_export_fix itself: test_peft_export_bugs_and_their_fix.)"""
    folders, bases = oracle
    folder = folders["qwen2", False]
    for how in ("unrecognised", "as exported"):
        peft = tmp_path / how.replace(" ", "_")
        peft.mkdir()
        config, state = _export(folder)
        if how == "unrecognised":
            config = {**config, "task_type": "CAUSAL_LM"}
        save_file(state, peft / "adapter_model.safetensors", metadata={"format": "pt"})
        (peft / "adapter_config.json").write_text(json.dumps(config))
        shutil.copy(folder / MERGED, peft / MERGED)      # _merge_and_compare's reference
        differ, _ = _merge_and_compare(bases["qwen2"], peft / "adapter_model.safetensors",
                                       tmp_path / f"m_{peft.name}")
        assert differ == ([f"model.layers.{i}.{p}" for i in (0, 1) for p in sorted(ROPE)]
                          if how == "unrecognised" else [])
    with pytest.warns(AdapterToolsWarning, match="RoPE-permuted as for Llama"):
        at.load(tmp_path / "as_exported", base=bases["qwen2"])
    with pytest.warns(AdapterToolsWarning, match="pass --base"):
        at.load(tmp_path / "as_exported")


def test_validate_against_torchtunes_merge_catches_the_qwen2_export(oracle, tmp_path):
    """The recipe for any third-party export (issue 17): ``validate BASE ADAPTER --merged
    <the tool's own merge>``. torchtune's Qwen2 PEFT export fails on exactly its 4 q/k tensors;
    its adapter_model.pt read by us passes."""
    folders, bases = oracle
    folder = folders["qwen2", False]
    export, merged = tmp_path / "export", tmp_path / "merged"
    for dst, names in ((export, ("adapter_config.json", "adapter_model.safetensors")),
                       (merged, (MERGED, "model.safetensors.index.json", "config.json"))):
        dst.mkdir()
        for name in names:
            shutil.copy(folder / name, dst / name)
    config = json.loads((export / "adapter_config.json").read_text())   # as another tool's
    (export / "adapter_config.json").write_text(json.dumps({**config, "task_type": "CAUSAL_LM"}))
    outcome = run_cli("validate", bases["qwen2"], export, "--merged", merged, "--json")
    report = json.loads(outcome.stdout)
    assert outcome.code == 1 and (report["checked"], report["failed"]) == (27, 4)
    assert sorted(t["name"] for t in report["tensors"] if not t["passed"]) == \
        [f"model.layers.{i}.{p}" for i in (0, 1) for p in sorted(ROPE)]
    run_cli("validate", bases["qwen2"], folder / "adapter_model.pt", "--merged", merged, expect=0)


# ----------------------------------------------------------------------------- write

def test_written_checkpoint_merged_by_torchtune_as_we_merge_the_peft_adapter(written, tmp_path):
    """PEFT -> torchtune (ours): torchtune loads our adapter_model.pt into its LoRA model
    (every adapter tensor must fit) and its get_merged_lora_ckpt is bit-identical to our merge
    of the PEFT adapter, LoRA and DoRA (the same plain torch arithmetic; measured 0.0)."""
    (model, dora), folder, base = written
    peft = folder.parent.parent / f"peft_{model}_{dora}"
    run_cli("merge", base, peft / "peft", "--out", tmp_path / "m", expect=0)
    ours = load_file(tmp_path / "m" / "model.safetensors")
    theirs = load_file(peft / "tt_merged" / "epoch_0" / MERGED)
    original = load_file(base / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert [k for k in theirs if not torch.equal(ours[k], theirs[k])] == []
    assert sum(not torch.equal(original[k], theirs[k]) for k in theirs) == 15
    config = json.loads((peft / "tt" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    assert tt.is_torchtune_export(config)
    assert not tt.is_torchtune_export(json.loads((peft / "peft" / "adapter_config.json")
                                                 .read_text()))      # PEFT's own save


def test_round_trip_through_ours_is_bit_exact(case, tmp_path):
    (_, dora), folder, base = case
    run_cli("convert", folder / "adapter_model.pt", tmp_path / "tt", "--to", "torchtune",
            "--base", base, expect=0)
    original = torch.load(folder / "adapter_model.pt", weights_only=True)
    again = torch.load(tmp_path / "tt" / "adapter_model.pt", weights_only=True)
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k])
                                                  for k in original)
    assert any(k.endswith("magnitude") for k in again) == dora


def test_what_torchtune_cannot_hold_is_refused(oracle, tmp_path):
    _, bases = oracle
    peft = tmp_path / "peft"
    make_adapter(make_causal_lm("llama"), peft, r=RANK, lora_alpha=ALPHA,
                 target_modules=PEFT_TARGETS, rank_pattern={"v_proj": 2})
    dst = tmp_path / "tt"
    outcome = run_cli("convert", peft, dst, "--to", "torchtune", "--base", bases["llama"])
    assert_cli_error(outcome, ["ranks [2, 4]", "one lora_rank"])
    assert_nothing_written(dst)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def llama(oracle, tmp_path):
    """A copy of the Llama LoRA's adapter_model.pt (and config) to break, and its base."""
    folders, bases = oracle
    copy = tmp_path / "tt"
    copy.mkdir()
    for name in ("adapter_model.pt", "adapter_config.json"):
        shutil.copy(folders["llama", False] / name, copy / name)
    return copy, bases["llama"]


def test_alpha_from_scale_when_there_is_no_config(llama, tmp_path):
    copy, base = llama
    reference = at.load(copy / "adapter_model.pt", base=base)
    (copy / "adapter_config.json").unlink()
    dst = tmp_path / "out"
    outcome = run_cli("convert", copy / "adapter_model.pt", dst, "--to", "peft", "--base", base)
    assert_cli_error(outcome, ["adapter_model.pt", "lora_alpha", "pass --scale", "rank 4"])
    assert_nothing_written(dst)
    adapter = at.load(copy / "adapter_model.pt", base=base, scale=ALPHA / RANK)
    assert all(torch.equal(adapter.weights[k].b, w.b) and adapter.weights[k].scale == w.scale
               for k, w in reference.weights.items())
    # the same tensors under torchtune's names in a safetensors file (issue 17): sniffed too
    save_file(torch.load(copy / "adapter_model.pt", weights_only=True), tmp_path / "tt.safetensors")
    again = at.load(tmp_path / "tt.safetensors", base=base, scale=ALPHA / RANK)
    assert again.metadata["source_format"] == "torchtune"
    assert first_difference(again, adapter) is None


def test_scale_beside_a_config_and_a_missing_base(llama, tmp_path):
    copy, base = llama
    outcome = run_cli("inspect", copy / "adapter_model.pt", "--scale", "2", "--base", base)
    assert_cli_error(outcome, ["lora_alpha 8.0", "drop --scale"], code=2)
    outcome = run_cli("inspect", copy / "adapter_model.pt")
    assert_cli_error(outcome, ["adapter_model.pt", "RoPE", "pass --base"])


@pytest.mark.parametrize("edit, fragments, code", [
    (lambda sd: sd.update({"layers.0.attn.q_proj.lora_up.weight": torch.zeros(2)}),
     ["layers.0.attn.q_proj.lora_up.weight"], 1),
    (lambda sd: sd.pop("layers.1.mlp.w2.lora_b.weight"),
     ["layers.1.mlp.w2.lora_b.weight is missing"], 1),
    (lambda sd: sd.update({"layers.0.attn.pos_embeddings.lora_a.weight": torch.zeros(4, 8),
                           "layers.0.attn.pos_embeddings.lora_b.weight": torch.zeros(8, 4)}),
     ["layers.0.attn.pos_embeddings", "no HF name"], 1),
])
def test_tensors_it_cannot_place_are_named(llama, edit, fragments, code):
    copy, base = llama
    state = torch.load(copy / "adapter_model.pt", weights_only=True)
    edit(state)
    torch.save(state, copy / "adapter_model.pt")
    outcome = run_cli("inspect", copy / "adapter_model.pt", "--from", "torchtune", "--base", base)
    assert_cli_error(outcome, fragments, code=code)


def test_a_pickle_beyond_tensors_is_not_unpickled(llama):
    copy, base = llama
    torch.save({"layers.0.attn.q_proj.lora_a.weight": torch.zeros(4, 64),
                "note": shutil.copy}, copy / "adapter_model.pt")       # a global: code
    outcome = run_cli("inspect", copy / "adapter_model.pt", "--from", "torchtune", "--base", base)
    assert_cli_error(outcome, ["adapter_model.pt", "weights_only"])
