"""No exit 0 with tensors dropped or misread (issue 15 item 2).

Every reader accounts for each tensor of its file (a factor, magnitude, bias, saved copy, or a
full tensor of a module the config lists in ``modules_to_save``) and refuses anything else by the
name of the format it looks like; configs that disagree with their weights are warned about,
saying which reading is used and what PEFT would compute. One group per case of the issue:

1. an mlx-lm adapter folder, as mlx-lm writes it, and after the edits the old message invited;
2. diffusers, kohya and LyCORIS single files;
3. PEFT's KaSA, VeLoRA, MonteCLoRA and LoRA on a grouped convolution (nn.MultiheadAttention:
   tests/test_peft_mha.py);
4. activated LoRA (aLoRA): merge refused, convert keeps the invocation tokens;
5. a GPT-2 adapter on ``wte`` + ``c_attn`` round-trips PEFT -> safetensors -> PEFT;
6. our own safetensors files are recognised by content, whatever their name;
7. DoRA magnitudes without ``use_dora`` (torchtune 0.6.1) and the reverse; validate --e2e says
   when its oracle reads the adapter differently;
8. odd or impossible configs and factors;
9. ``--scale`` for bare factor files in merge, validate and combine.

Each test failed on the code before this change.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.adapter import first_difference
from adaptertools.errors import AdapterToolsWarning, FormatError, OptionError, UnsupportedError
from adaptertools.tiny import make_adapter, make_base

from helpers.cli import assert_cli_error, assert_nothing_written, run_cli, stderr_lines
from helpers.models import LLAMA_ALL, make_model, model_input
from helpers.peft_adapters import build_peft_case, load_with_peft, perturb_trainables

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def refused(outcome, fragments: list[str], dst: Path | None = None, *, code: int = 1) -> str:
    line = assert_cli_error(outcome, fragments, code=code)
    if dst is not None:
        assert_nothing_written(dst)
    return line


def edit_config(folder: Path, change) -> Path:
    config = json.loads((folder / CONFIG).read_text())
    change(config)
    (folder / CONFIG).write_text(json.dumps(config))
    return folder


def peft_adapter(folder: Path, model: torch.nn.Module, **config) -> Path:
    """``model`` (a copy) wrapped by PEFT with ``config``, perturbed as training would, saved."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**config))
    perturb_trainables(peft_model)
    peft_model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> Path:
    """helpers.models' tiny Llama as an HF folder (the model PEFT adapters below are made on)."""
    folder = tmp_path_factory.mktemp("readings") / "llama"
    make_model("llama").save_pretrained(folder)
    return folder


# ============================================================================ 1. mlx-lm

MLX_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def mlx_adapter(folder: Path, rank: int = 8) -> Path:
    """What ``mlx_lm.lora`` writes (FORMATS.md, mlx-lm 0.32) for helpers.models' tiny Llama:
    ``adapters.safetensors`` with ``<module>.lora_a`` (in, r) / ``.lora_b`` (r, out), and its
    training arguments as ``adapter_config.json``."""
    folder.mkdir(parents=True)
    shapes = {n: tuple(t.shape) for n, t in make_model("llama").state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for layer in range(2):
        for key in MLX_KEYS:
            stem = f"model.layers.{layer}.{key}"
            out, inp = shapes[stem + ".weight"]
            tensors[stem + ".lora_a"] = torch.randn(inp, rank, generator=gen) * 0.1   # (in, r)
            tensors[stem + ".lora_b"] = torch.randn(rank, out, generator=gen) * 0.1   # (r, out)
    save_file(tensors, folder / "adapters.safetensors", metadata={"format": "mlx"})
    config = {"model": "tiny-llama", "train": True, "fine_tune_type": "lora", "optimizer": "adam",
              "data": "data", "seed": 0, "num_layers": 2, "batch_size": 4, "iters": 100,
              "learning_rate": 1e-05, "adapter_path": str(folder), "max_seq_length": 2048,
              "grad_checkpoint": False,
              "lora_parameters": {"rank": rank, "dropout": 0.0, "scale": 20.0, "keys": MLX_KEYS}}
    (folder / CONFIG).write_text(json.dumps(config, indent=4))
    return folder


def test_mlx_folder_is_read_as_mlx_not_asked_for_r(tmp_path):
    """Read by formats/mlx.py now (tests/test_mlx.py checks it against mlx-lm); as PEFT it is
    refused by name."""
    folder = mlx_adapter(tmp_path / "mlx")
    assert json.loads(run_cli("inspect", folder, "--json", expect=0).stdout)["format"] == "mlx"
    assert at.load(folder).weights["model.layers.0.self_attn.q_proj.weight"].scale == 20.0
    refused(run_cli("inspect", folder, "--from", "peft"), ["MLX (mlx-lm)", "--from mlx"])


def test_mlx_folder_after_the_edits_the_old_message_asked_for(tmp_path):
    """r set and the file renamed: before, inspect and convert exited 0 with 0 LoRA tensors and
    28 "full tensors" named ...lora_a."""
    folder = mlx_adapter(tmp_path / "mlx")
    (folder / "adapters.safetensors").rename(folder / WEIGHTS)
    edit_config(folder, lambda c: c.update(r=8, lora_alpha=160))
    out = tmp_path / "out"
    refused(run_cli("inspect", folder), ["MLX (mlx-lm)"])
    refused(run_cli("convert", folder, out, "--to", "safetensors"), ["MLX (mlx-lm)"], out)
    # and with the mlx-lm fields gone too: the keys say what the file is
    edit_config(folder, lambda c: [c.pop(k) for k in list(c) if k not in ("r", "lora_alpha")])
    refused(run_cli("inspect", folder), ["MLX (mlx-lm)", "28 tensor(s)", "model.layers.",
                                              ".lora_a"])


def test_mlx_weights_file_alone(tmp_path):
    folder = mlx_adapter(tmp_path / "mlx")
    alone = shutil.copy(folder / "adapters.safetensors", tmp_path / "adapters.safetensors")
    out = tmp_path / "out"
    refused(run_cli("convert", alone, out, "--to", "peft"),
            ["adapters.safetensors", "MLX (mlx-lm)", "adapter_config.json"], out)


# ============================================================================ 2. diffusers, kohya, LyCORIS

def _factors(stem: str, rows: int, cols: int, rank: int = 4, a="lora_A.weight", b="lora_B.weight"):
    return {f"{stem}.{a}": torch.randn(rank, cols) * 0.1, f"{stem}.{b}": torch.randn(rows, rank) * 0.1}


def diffusers_file(path: Path, *, metadata: bool = True) -> Path:
    """``save_lora_weights`` of diffusers 0.42: PEFT keys under unet. / text_encoder., the config
    in ``lora_adapter_metadata``."""
    unet = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    text = "text_encoder.text_model.encoder.layers.0.self_attn"
    tensors = {**_factors(f"{unet}.to_q", 32, 32), **_factors(f"{unet}.to_k", 32, 32),
               **_factors(f"{text}.q_proj", 16, 16)}
    info = {"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": ["to_q", "to_k"],
            "text_encoder.r": 4, "text_encoder.lora_alpha": 4}
    save_file(tensors, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(info)}
              if metadata else {"format": "pt"})
    return path


def kohya_file(path: Path) -> Path:
    tensors = {}
    for stem, rows, cols in (("lora_unet_down_blocks_0_attentions_0_proj_in", 32, 32),
                             ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 16, 16)):
        tensors.update(_factors(stem, rows, cols, a="lora_down.weight", b="lora_up.weight"))
        tensors[f"{stem}.alpha"] = torch.tensor(4.0)
    save_file(tensors, path)
    return path


def lycoris_file(path: Path, kind: str) -> Path:
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    if kind == "loha":
        tensors = {f"{stem}.hada_w1_a": torch.randn(32, 4), f"{stem}.hada_w1_b": torch.randn(4, 32),
                   f"{stem}.hada_w2_a": torch.randn(32, 4), f"{stem}.hada_w2_b": torch.randn(4, 32)}
    else:
        tensors = {f"{stem}.lokr_w1": torch.randn(4, 4), f"{stem}.lokr_w2": torch.randn(8, 8)}
    tensors[f"{stem}.alpha"] = torch.tensor(4.0)
    save_file(tensors, path)
    return path


def test_diffusers_files_are_read_with_each_components_scale(tmp_path):
    """Before: refused ("not supported yet"); earlier still, read as bare PEFT with the prefix
    kept and alpha ignored, exit 0. Now formats/diffusers.py reads them (tests/test_diffusers.py
    checks them against diffusers itself)."""
    path = diffusers_file(tmp_path / "pytorch_lora_weights.safetensors")
    adapter = at.load(path)
    scales = {name.split(".", 1)[0]: w.scale for name, w in adapter.weights.items()}
    assert scales == {"unet": 8 / 4, "text_encoder": 4 / 4}
    with pytest.raises(OptionError, match="drop --scale"):
        at.load(path, scale=2.0)
    bare = diffusers_file(tmp_path / "bare.safetensors", metadata=False)
    with pytest.warns(AdapterToolsWarning, match="scale 1 assumed"):
        assert {w.scale for w in at.load(bare).weights.values()} == {1.0}
    assert {w.scale for w in at.load(bare, scale=3.0).weights.values()} == {3.0}


KOHYA_STYLE = {
    "kohya": kohya_file,
    "loha": lambda p: lycoris_file(p, "loha"),
    "lokr": lambda p: lycoris_file(p, "lokr"),
}


@pytest.mark.parametrize("kind", KOHYA_STYLE)
def test_kohya_style_files_need_their_base(tmp_path, kind):
    """Before: refused as unsupported. Their names are underscore forms of the base's module
    names, so they are read against the base (tests/test_kohya.py, tests/test_lycoris.py); with
    no base the refusal says so, and nothing is written."""
    path = KOHYA_STYLE[kind](tmp_path / "pytorch_lora_weights.safetensors")
    out = tmp_path / "out"
    refused(run_cli("convert", path, out, "--to", "peft"), [str(path), "kohya", "--base"], out,
            code=2)
    refused(run_cli("inspect", path, "--from", "safetensors"), ["not an adaptertools file",
                                                                "--from kohya"])


# ============================================================================ 3. PEFT variants

class GroupedConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 8, 3, groups=2)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean((-1, -2)))


LLAMA_QV = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
VARIANTS = {
    # name: (model, LoraConfig kwargs, fragments of the refusal)
    "kasa": (lambda: make_model("llama"), dict(LLAMA_QV, kasa_config={}),
             ["a KaSA adapter", "not supported yet"]),
    # read as plain LoRA with their config field (tests/test_peft_training_only.py); without
    # it, their tensors still say what they are
    "velora": (lambda: make_model("llama"), dict(LLAMA_QV, velora_config={"num_groups": 4}),
               ["a VeLoRA adapter", "not supported yet"]),
    "monteclora": (lambda: make_model("llama"), dict(LLAMA_QV, monteclora_config={}),
                   ["a MonteCLoRA adapter", "not supported yet"]),
    "grouped_conv": (GroupedConvNet, dict(r=2, lora_alpha=4, target_modules=["conv"]),
                     ["conv", "grouped convolution", "groups = 2", "not supported yet"]),
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: peft_adapter(root / name, make(), **config)
                for name, (make, config, _) in VARIANTS.items()}


@pytest.mark.parametrize("name", ["kasa", "grouped_conv"])
def test_lora_variants_are_refused_by_name(variants, tmp_path, name):
    fragments = VARIANTS[name][2]
    out = tmp_path / "out"
    refused(run_cli("inspect", variants[name]), fragments)
    refused(run_cli("convert", variants[name], out, "--to", "peft"), fragments, out)


def test_kasa_merge_names_kasa_not_another_model(variants, llama_base, tmp_path):
    """Before: merge said "Is the adapter for another model?" (lora_diag read as a full tensor),
    and convert --to peft renamed lora_diag to base_layer.lora_diag (PEFT's outputs 0.76 off)."""
    out = tmp_path / "merged"
    line = refused(run_cli("merge", llama_base, variants["kasa"], "--out", out),
                   ["a KaSA adapter"], out)
    assert "another model" not in line


@pytest.mark.parametrize("name", ["kasa", "velora", "monteclora"])
def test_variant_tensors_are_named_without_their_config_field(variants, tmp_path, name):
    """The config field gone (a tool that dropped it): the tensors still say what it is."""
    folder = tmp_path / name
    shutil.copytree(variants[name], folder)
    edit_config(folder, lambda c: c.update(kasa_config=None, velora_config=None,
                                           monteclora_config=None))
    keys = [k for k in load_file(folder / WEIGHTS) if "lora_A" not in k and "lora_B" not in k]
    if not keys:
        pytest.skip(f"{name} saves no tensors of its own")
    refused(run_cli("inspect", folder), [VARIANTS[name][2][0]])


# ============================================================================ 4. aLoRA

@pytest.fixture(scope="module")
def alora(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("alora") / "alora"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft_adapter(folder, make_model("llama"), task_type="CAUSAL_LM",
                            alora_invocation_tokens=[5, 6], **LLAMA_QV)


def test_alora_merge_is_refused_with_the_reason(alora, llama_base, tmp_path):
    """Before: exit 0, the merged model 0.44 off what PEFT computes (PEFT refuses the merge)."""
    out = tmp_path / "merged"
    refused(run_cli("merge", llama_base, alora, "--out", out),
            ["aLoRA", "[5, 6]", "invocation", "refusing to merge it"], out)
    refused(run_cli("validate", llama_base, alora, "--merged", llama_base), ["aLoRA"])
    combined = tmp_path / "combined"
    refused(run_cli("combine", alora, alora, "--out", combined), ["aLoRA"], combined)
    with pytest.raises(UnsupportedError, match="aLoRA"):
        at.merge(llama_base, [alora], tmp_path / "merged2")


def test_alora_convert_keeps_the_invocation_tokens(alora, llama_base, tmp_path):
    out = tmp_path / "alora.gguf"
    outcome = run_cli("convert", alora, out, "--to", "gguf", "--base", llama_base)
    assert outcome.code == 0, outcome.stderr
    assert at.load(out).metadata["alora_invocation_tokens"] == [5, 6]


# ============================================================================ 5. GPT-2 wte + c_attn

def test_gpt2_embedding_beside_conv1d_round_trips(tmp_path):
    """PEFT's own case: an embedding LoRA next to Conv1D ones (fan_in_fan_out, which PEFT's
    Embedding ignores). Before: "only some tensors have a GPT-2 Conv1D layout"."""
    case = build_peft_case(tmp_path, "wte", "gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True,
                                                        target_modules=["wte", "c_attn"]))
    single, back = tmp_path / "wte.safetensors", tmp_path / "back"
    for src, dst, to in ((case.folder, single, "safetensors"), (single, back, "peft")):
        outcome = run_cli("convert", src, dst, "--to", to)
        assert outcome.code == 0, outcome.stderr
    assert first_difference(at.load(case.folder), at.load(back)) is None
    assert json.loads((back / CONFIG).read_text())["fan_in_fan_out"] is True
    with torch.no_grad():
        out = load_with_peft(back, "gpt2")(model_input("gpt2")).logits
    assert torch.equal(out, case.reference)


# ============================================================================ 6. own files by content

@pytest.mark.parametrize("name", ["out.st", "adapter", "adapter.bin"])
def test_own_safetensors_file_is_recognised_by_content(tmp_path, name):
    src = tmp_path / "peft"
    at.save(make_adapter(), src, format="peft")
    dst = tmp_path / name
    assert run_cli("convert", src, dst, "--to", "safetensors").code == 0
    outcome = run_cli("inspect", dst, "--json")
    assert outcome.code == 0, outcome.stderr
    assert json.loads(outcome.stdout)["format"] == "safetensors"


# ============================================================================ 7. DoRA: config vs weights

@pytest.fixture(scope="module")
def dora_cases(tmp_path_factory, llama_base):
    """torchtune 0.6.1's export (magnitudes, no use_dora) and the reverse (use_dora, none)."""
    root = tmp_path_factory.mktemp("dora")
    torchtune = peft_adapter(root / "torchtune", make_model("llama"), use_dora=True, **LLAMA_QV)
    edit_config(torchtune, lambda c: c.pop("use_dora"))
    reverse = peft_adapter(root / "reverse", make_model("llama"), **LLAMA_QV)
    edit_config(reverse, lambda c: c.update(use_dora=True))
    return torchtune, reverse


def test_magnitudes_without_use_dora_warn(dora_cases, tmp_path):
    torchtune, _ = dora_cases
    with pytest.warns(AdapterToolsWarning, match=r"use_dora` is not set.*reads them as DoRA.*"
                                                 r"PEFT would ignore them"):
        adapter = at.load(torchtune)
    assert all(w.magnitude is not None for w in adapter.weights.values())
    dst = tmp_path / "converted"
    outcome = run_cli("convert", torchtune, dst, "--to", "peft")
    assert outcome.code == 0, outcome.stderr
    assert any("use_dora" in line and line.startswith("warning:") for line in stderr_lines(outcome))


def test_use_dora_without_magnitudes_warns(dora_cases):
    _, reverse = dora_cases
    with pytest.warns(AdapterToolsWarning, match=r"`use_dora` is true but 4 module\(s\) have no "
                                                 r"lora_magnitude_vector.*plain LoRA.*initial"):
        adapter = at.load(reverse)
    assert all(w.magnitude is None for w in adapter.weights.values())


def test_e2e_says_when_its_oracle_reads_the_adapter_differently(dora_cases, llama_base, tmp_path):
    torchtune, _ = dora_cases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at.merge(llama_base, [torchtune], tmp_path / "merged")
    with pytest.warns(AdapterToolsWarning, match="oracle"):
        report = at.validate(llama_base, [torchtune], tmp_path / "merged", e2e=True)
    notes = report["e2e"]["oracle_notes"]
    assert len(notes) == 1 and "drops the DoRA magnitudes" in notes[0] and str(torchtune) in notes[0]
    assert report["tensors"] and all(r["passed"] for r in report["tensors"])   # the merge is right


# ============================================================================ 8. odd and impossible

def _folder(tmp_path: Path, change_config=None, change_weights=None) -> Path:
    folder = tmp_path / "adapter"
    at.save(make_adapter(), folder, format="peft")
    if change_config:
        edit_config(folder, change_config)
    if change_weights:
        tensors = load_file(folder / WEIGHTS)
        change_weights(tensors)
        save_file(tensors, folder / WEIGHTS)
    return folder


def _int32(tensors):
    for key in [k for k in tensors if "layers.0.self_attn.q_proj.lora_A" in k]:
        tensors[key] = (tensors[key] * 100).to(torch.int32)


IMPOSSIBLE = {
    "int32 factors": (None, _int32, ["q_proj", "lora_A is int32", "floating-point"]),
    "r 8.5": (lambda c: c.update(r=8.5), None, ["`r`", "8.5", "whole number"]),
    "negative alpha_pattern": (lambda c: c.update(alpha_pattern={"q_proj": -16}), None,
                               ["`alpha_pattern['q_proj']`", "-16", "> 0"]),
    "lora_alpha 1e30": (lambda c: c.update(lora_alpha=1e30), None,
                        ["the delta", "has norm", "float32", "lora_alpha / r"]),
}


@pytest.mark.parametrize("case", IMPOSSIBLE)
def test_what_cannot_be_right_is_refused(tmp_path, case):
    change_config, change_weights, fragments = IMPOSSIBLE[case]
    folder = _folder(tmp_path, change_config, change_weights)
    out = tmp_path / "out"
    refused(run_cli("inspect", folder), fragments)
    refused(run_cli("convert", folder, out, "--to", "safetensors"), fragments, out)


def test_target_modules_not_covering_the_tensors_warns(tmp_path):
    folder = _folder(tmp_path, lambda c: c.update(target_modules=["q_proj"]))
    outcome = run_cli("inspect", folder)
    assert outcome.code == 0, outcome.stderr
    lines = [line for line in stderr_lines(outcome) if line.startswith("warning:")]
    assert len(lines) == 1 and "12 module(s)" in lines[0] and "PEFT ignores" in lines[0]
    assert "model.layers.0.mlp.down_proj" in lines[0]
    # covered, by a list or a regular expression: no warning
    for targets in (LLAMA_ALL, r".*\.(q|k|v|o|gate|up|down)_proj"):
        edit_config(folder, lambda c: c.update(target_modules=targets))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            at.load(folder)


def test_huge_scale_of_a_bare_file_is_refused(tmp_path):
    folder = _folder(tmp_path)
    bare = tmp_path / "bare.safetensors"
    shutil.copy(folder / WEIGHTS, bare)
    with pytest.raises(FormatError, match="has norm"):
        at.load(bare, scale=1e30)


# ============================================================================ 9. --scale

@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A tiny base, a PEFT adapter on it (scale 2) and its weights file alone (no config)."""
    root = tmp_path_factory.mktemp("scale")
    base = make_base(root / "base")
    peft = root / "peft"
    at.save(make_adapter(), peft, format="peft")
    path = root / "bare.safetensors"
    shutil.copy(peft / WEIGHTS, path)
    merged = root / "merged"
    at.merge(base, [peft], merged)
    return base, peft, path, merged


def test_merge_with_scale_of_a_bare_file(bare, tmp_path):
    base, _, path, merged = bare
    out = tmp_path / "out"
    outcome = run_cli("merge", base, path, "--out", out, "--scale", "2")
    assert outcome.code == 0, outcome.stderr
    assert not [line for line in stderr_lines(outcome) if "scale 1.0" in line]
    got, want = load_file(out / "model.safetensors"), load_file(merged / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_validate_with_scale_of_a_bare_file(bare):
    base, _, path, merged = bare
    outcome = run_cli("validate", base, path, "--merged", merged, "--scale", "2")
    assert outcome.code == 0, outcome.stderr
    assert run_cli("validate", base, path, "--merged", merged, "--scale", "1").code == 1


def test_combine_with_scale_of_a_bare_file(bare, tmp_path):
    _, peft, path, _ = bare
    out, want = tmp_path / "combined", tmp_path / "want"
    outcome = run_cli("combine", path, path, "--out", out, "--scale", "2")
    assert outcome.code == 0, outcome.stderr
    at.combine([peft, peft], want)
    assert at.validate_against(out, want)["passed"]       # the same delta, tensor by tensor


@pytest.mark.parametrize("command", ["merge", "validate", "combine"])
def test_scale_is_refused_for_adapters_with_their_own(bare, tmp_path, command):
    base, peft, _, merged = bare
    own = tmp_path / "own.safetensors"
    at.convert(peft, own, to="safetensors")
    out = tmp_path / "out"
    for adapter in (peft, own):
        args = {"merge": ["merge", base, adapter, "--out", out],
                "validate": ["validate", base, adapter, "--merged", merged],
                "combine": ["combine", adapter, "--out", out]}[command]
        refused(run_cli(*args, "--scale", "2"), ["--scale only applies to files without a "
                                                      "config", str(adapter)], out,
                code=2)                     # an option that does not apply: misuse
