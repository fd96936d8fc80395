"""Adapters that need another base (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ), and PEFT's ``bias`` modes.

1. PiSSA (and its kin) start by moving the adapter's initial delta out of the base weights: an
   adapter saved without PEFT's conversion (``init_lora_weights`` still names the method) only
   fits that modified base. Merged into the original base it gives a different model: ``merge``
   (library and CLI) refuses it, naming the fix, unless ``allow_modified_base`` /
   ``--allow-modified-base`` (then into the modified base: PEFT's merge, bit for bit);
   ``validate --merged`` refuses it as a reference; ``inspect`` and ``convert`` only warn. The
   adapter PEFT converts (``path_initial_model_for_weight_conversion``) merges into the original
   base and computes what the trained PiSSA model computes. A real PEFT PiSSA adapter, built on a
   tiny Llama on the CPU.
2. ``bias`` "none" / "all" / "lora_only": PEFT -> PEFT and PEFT -> safetensors -> PEFT give folders
   PEFT loads, with the same outputs; merges keep the trained biases as PEFT's merge_and_unload.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adaptertools as at
from adaptertools.errors import AdapterToolsWarning, UnsupportedError

from helpers.cli import assert_nothing_written, run_cli
from helpers.models import make_model, model_input, model_output

pytestmark = [pytest.mark.filterwarnings("ignore:.*init_lora_weights.*:UserWarning"),
              pytest.mark.filterwarnings("ignore:PiSSA changes the base weights:UserWarning")]
CONFIG = "adapter_config.json"
PISSA = dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def train(peft_model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


# ----------------------------------------------------------------------------- 1. PiSSA

@pytest.fixture(scope="module")
def pissa(tmp_path_factory):
    """The original base, the base PiSSA modified, the unconverted and the converted adapter,
    PEFT's trained model's output and its merge_and_unload."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("pissa")
    base = make_model("llama")
    base.save_pretrained(root / "base")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights="pissa", **PISSA))
    # PEFT's recipe: save the initial adapter as plain LoRA, to convert the trained one against
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(root / "initial")
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    copy.deepcopy(peft_model).unload().save_pretrained(root / "modified_base")   # W - B0 A0
    train(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(root / "unconverted")
    peft_model.save_pretrained(root / "converted",
                               path_initial_model_for_weight_conversion=str(root / "initial"))
    reference = model_output(peft_model, "llama")
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    return root, reference, {k: v.clone() for k, v in merged.items()}


def test_peft_saved_what_the_cases_need(pissa):
    root, _, _ = pissa
    assert json.loads((root / "unconverted" / CONFIG).read_text())["init_lora_weights"] == "pissa"
    converted = json.loads((root / "converted" / CONFIG).read_text())
    assert converted["init_lora_weights"] is True and converted["r"] == 2 * PISSA["r"]


def test_merge_refuses_an_unconverted_pissa_adapter(pissa):
    root, _, _ = pissa
    out = root / "refused"
    with pytest.raises(UnsupportedError) as caught:
        at.merge(root / "base", [root / "unconverted"], out)
    message = str(caught.value)
    for fragment in ("init_lora_weights='pissa'", "path_initial_model_for_weight_conversion",
                     "allow_modified_base", "--allow-modified-base", "modified base",
                     str(root / "unconverted")):
        assert fragment in message, fragment
    assert_nothing_written(out)
    with pytest.raises(UnsupportedError, match="pissa"):       # a dry run says so too
        at.merge(root / "base", [root / "unconverted"], out, dry_run=True)


def test_cli_merge_refuses_it_and_allow_modified_base_merges_into_the_modified_base(pissa):
    root, _, merged = pissa
    out = root / "cli_refused"
    outcome = run_cli("merge", root / "base", root / "unconverted", "--out", out)
    # the reader's warning (as inspect and convert print it), then the refusal
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert outcome.code == 1 and outcome.crash is None and "Traceback" not in outcome.stderr
    assert lines[-1].startswith("error:") and len(lines) <= 2, lines
    for fragment in ("pissa", "path_initial_model_for_weight_conversion", "--allow-modified-base"):
        assert fragment in lines[-1], fragment
    assert_nothing_written(out)
    out = root / "cli_allowed"
    outcome = run_cli("merge", root / "modified_base", root / "unconverted", "--out", out,
                      "--allow-modified-base", "--json")
    assert outcome.code == 0, outcome.stderr
    ours = read_folder(out)
    for name, tensor in ours.items():       # PEFT's merge of the trained PiSSA model, exactly
        assert torch.equal(tensor, merged[name]), name


def test_library_allow_modified_base(pissa):
    root, _, merged = pissa
    report = at.merge(root / "modified_base", [root / "unconverted"], root / "lib_allowed",
                      allow_modified_base=True)
    assert report["changed"]
    ours = read_folder(root / "lib_allowed")
    assert all(torch.equal(t, merged[n]) for n, t in ours.items())


def test_the_converted_adapter_merges_into_the_original_base(pissa):
    """What the refusal tells the user to do works: PEFT's converted adapter merged into the
    ORIGINAL base computes what the trained PiSSA model computes (fp32 rounding apart)."""
    import transformers

    root, reference, _ = pissa
    report = at.merge(root / "base", [root / "converted"], root / "converted_merged")
    assert not [w for w in report["warnings"] if "init_lora_weights" in w]
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "converted_merged").eval()
    with torch.no_grad():
        logits = model(model_input("llama")).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=2e-5)
    assert at.validate(root / "base", [root / "converted"], root / "converted_merged")["passed"]


def test_unconverted_merge_into_the_original_base_would_be_wrong(pissa):
    """Why it is refused: the same adapter merged into the original base (as adaptertools did,
    exit 0) is far from the trained model."""
    import transformers

    root, reference, _ = pissa
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at.merge(root / "base", [root / "unconverted"], root / "wrong", allow_modified_base=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "wrong").eval()
    with torch.no_grad():
        logits = model(model_input("llama")).logits
    assert float((logits - reference).abs().max()) > 1e-2


def test_validate_refuses_it_as_a_reference(pissa):
    root, _, _ = pissa
    with pytest.raises(UnsupportedError, match="pissa"):
        at.validate(root / "base", [root / "unconverted"], root / "lib_allowed")


def test_validate_allow_modified_base_checks_the_merge_into_the_modified_base(pissa, tmp_path):
    """validate --allow-modified-base: the merge into the base PEFT modified passes, and the
    same adapter merged into the original base (wrong weights) fails against it."""
    root, _, _ = pissa
    at.merge(root / "modified_base", [root / "unconverted"], tmp_path / "right",
             allow_modified_base=True)
    report = at.validate(root / "modified_base", [root / "unconverted"], tmp_path / "right",
                         allow_modified_base=True)
    assert report["passed"] and report["adapted"] > 0
    outcome = run_cli("validate", root / "modified_base", root / "unconverted", "--merged",
                      tmp_path / "right", "--allow-modified-base", "--json")
    assert outcome.code == 0, outcome.stderr
    at.merge(root / "base", [root / "unconverted"], tmp_path / "wrong", allow_modified_base=True)
    report = at.validate(root / "modified_base", [root / "unconverted"], tmp_path / "wrong",
                         allow_modified_base=True)
    assert not report["passed"]


def test_inspect_and_convert_only_warn(pissa, tmp_path):
    root, _, _ = pissa
    with pytest.warns(AdapterToolsWarning, match="pissa"):
        report = at.inspect(root / "unconverted")
    assert any("pissa" in p and "--allow-modified-base" in p for p in report["problems"])
    with pytest.warns(AdapterToolsWarning, match="pissa"):
        at.convert(root / "unconverted", tmp_path / "a.safetensors", to="safetensors")
    # the method survives the conversion, and so does the refusal
    with pytest.raises(UnsupportedError, match="pissa"):
        at.merge(root / "base", [tmp_path / "a.safetensors"], tmp_path / "out")


@pytest.mark.parametrize("init", ["pissa_niter_4", "olora", "corda", "lora_ga", "loftq", "PiSSA"])
def test_every_base_modifying_init_is_refused(pissa, tmp_path, init):
    import shutil

    root, _, _ = pissa
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "converted", adapter)
    edit_config(adapter, init_lora_weights=init)
    with pytest.raises(UnsupportedError, match=f"init_lora_weights={init!r}"):
        at.merge(root / "base", [adapter], tmp_path / "out", dry_run=True)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_other_inits_merge(pissa, tmp_path, init):
    import shutil

    root, _, _ = pissa
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "converted", adapter)
    edit_config(adapter, init_lora_weights=init)
    at.merge(root / "base", [adapter], tmp_path / "out", dry_run=True)


# ----------------------------------------------------------------------------- 2. bias modes

BIAS_MODES = ["none", "all", "lora_only"]


@pytest.fixture(scope="module", params=BIAS_MODES)
def bias_case(request, tmp_path_factory):
    """A GPT-2 (biases everywhere) with a LoRA on c_attn and the given ``bias`` mode, trained
    (LoRA factors and every trainable bias perturbed), saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    mode = request.param
    root = tmp_path_factory.mktemp(f"bias_{mode}")
    base = make_model("gpt2")
    base.save_pretrained(root / "base")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias=mode))
    train(peft_model, seed=11)
    peft_model.eval().save_pretrained(root / "adapter")
    reference = model_output(peft_model, "gpt2")
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    return mode, root, base, reference, {k: v.clone() for k, v in merged.items()}


def test_bias_modes_store_trained_biases(bias_case):
    mode, root, base, _, merged = bias_case
    keys = load_file(root / "adapter" / "adapter_model.safetensors").keys()
    biases = [k for k in keys if k.endswith(".bias")]
    if mode == "none":
        assert not biases
    else:
        assert biases and all(not torch.equal(merged[k.removeprefix("base_model.model.")
                                                     .replace(".base_layer", "")],
                                              base.state_dict()[k.removeprefix("base_model.model.")
                                                                .replace(".base_layer", "")])
                              for k in biases)


@pytest.mark.parametrize("route", ["peft", "safetensors"])
def test_bias_modes_round_trip_to_folders_peft_loads(bias_case, route, tmp_path):
    from peft import PeftModel

    mode, root, _, reference, _ = bias_case
    out = tmp_path / "out"
    if route == "peft":
        at.convert(root / "adapter", out, to="peft")
    else:
        at.convert(root / "adapter", tmp_path / "a.safetensors", to="safetensors")
        at.convert(tmp_path / "a.safetensors", out, to="peft")
    config = json.loads((out / CONFIG).read_text())
    assert config["bias"] == mode and not config.get("modules_to_save")
    original = load_file(root / "adapter" / "adapter_model.safetensors")
    written = load_file(out / "adapter_model.safetensors")
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)    # no missing / unexpected keys
        warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
        loaded = PeftModel.from_pretrained(make_model("gpt2"), out).eval()
    assert torch.equal(model_output(loaded, "gpt2"), reference)


def test_bias_modes_merge_as_peft_merges(bias_case):
    mode, root, _, _, merged = bias_case
    at.merge(root / "base", [root / "adapter"], root / "merged")
    ours = read_folder(root / "merged")
    differ = [n for n, t in ours.items() if not torch.equal(t, merged[n])]
    assert not differ, differ
