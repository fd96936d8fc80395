"""Sniffing that helps (issue 17 items 7 and 8): an input no format reads is refused with what
it looks like; ``--from safetensors`` on another tool's file names that tool's format; a file
that only looks like a format we read points at its ``--from``; inspect names every delta's
kind in the same words (LoRA, LoCon, LoHa, LoKr, +DoRA) whatever the format."""

from __future__ import annotations

import pytest
import torch
from helpers.cli import assert_cli_error, run_cli
from peft import LoHaConfig, LoraConfig, get_peft_model
from safetensors.torch import save_file

import adaptertools as at
from adaptertools.formats import foreign


def _file(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


KOHYA = {"lora_unet_down_blocks_0_proj_in.lora_down.weight": torch.zeros(2, 4),
         "lora_unet_down_blocks_0_proj_in.lora_up.weight": torch.zeros(4, 2)}


def test_an_unknown_file_is_refused_with_what_it_looks_like(tmp_path):
    odd = _file(tmp_path / "weights.dat", {"encoder.block.w": torch.zeros(2)})
    assert_cli_error(run_cli("inspect", odd), ["not a recognised adapter", "formats tried",
                                               "look like none of them", "encoder.block.w",
                                               "--from FORMAT"])
    pickled = tmp_path / "adapter_model.pt"
    torch.save({"x": torch.zeros(1)}, pickled)
    assert_cli_error(run_cli("inspect", pickled), ["a pickled checkpoint", "--from torchtune",
                                                   "PEFT's adapter_model.bin"])
    folder = tmp_path / "folder"
    folder.mkdir()
    _file(folder / "w.bin2", {"blk.0.attn_q.weight.lora_a": torch.zeros(2, 2)})
    assert_cli_error(run_cli("inspect", folder), ["(w.bin2)", "GGUF (llama.cpp) LoRA tensor "
                                                  "names in a non-GGUF file", "not supported yet"])


def test_from_safetensors_on_another_tools_file_names_its_format(tmp_path):
    kohya = _file(tmp_path / "style.safetensors", KOHYA)
    assert_cli_error(run_cli("inspect", kohya, "--from", "safetensors"),
                     ["style.safetensors", "not an adaptertools file", "format kohya",
                      "--from kohya"])


def test_signs_route_to_the_formats_that_read_them():
    assert foreign.read_by(KOHYA) == "kohya"
    assert foreign.read_by(["lycoris_layers_0_q.hada_w1_a"]) == "kohya"
    assert foreign.read_by(["unet.down_blocks.0.proj_in.lora_A.weight"]) == "diffusers"
    assert foreign.read_by(["layers.0.attn.q_proj.lora_a.weight"]) == "torchtune"
    # read by nothing: named, and said to be unsupported
    assert foreign.read_by(["m.lora_diag"]) is None
    assert foreign.route(["m.lora_diag"]).endswith("not supported yet")
    assert foreign.route(KOHYA).endswith("read it with --from kohya")


def _peft_folder(tmp_path, config, name):
    torch.manual_seed(0)
    from helpers.models import TinyLinearConv

    model = get_peft_model(TinyLinearConv(), config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname or "hada_" in pname:
                p.add_(0.1)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("config, kinds", [
    (lambda: LoraConfig(r=2, target_modules=["lin", "c2"]), {"LoRA": 1, "LoCon": 1}),
    (lambda: LoraConfig(r=2, target_modules=["lin"], use_dora=True), {"LoRA+DoRA": 1}),
    (lambda: LoHaConfig(r=2, alpha=2, target_modules=["lin", "c2"]), {"LoHa": 2}),
], ids=["lora-locon", "dora", "loha"])
def test_inspect_names_each_kind_the_same_way(tmp_path, config, kinds):
    folder = _peft_folder(tmp_path, config(), "adapter")
    assert at.inspect(folder).kinds == kinds
    shown = run_cli("inspect", folder, expect=0).stdout
    assert all(k in shown for k in kinds)


def test_a_kohya_file_is_inspected_without_its_base(tmp_path):
    """inspect keys it by the file's own module names (shapes from the factors); convert and
    merge still need the base."""
    kohya = _file(tmp_path / "style.safetensors",
                  {**KOHYA, "lora_unet_down_blocks_0_proj_in.alpha": torch.tensor(1.0),
                   "lora_unet_down_blocks_0_proj_in.lora_up.weight": torch.ones(4, 2)})
    report = at.inspect(kohya)
    assert report.format == "kohya" and report.target_modules == [
        "lora_unet_down_blocks_0_proj_in"]
    assert report.ranks == {"2": 1} and report.scales == {"0.5": 1}
    outcome = run_cli("convert", kohya, tmp_path / "out", "--to", "peft")
    assert_cli_error(outcome, ["--base"], code=2)
    assert not (tmp_path / "out").exists()
    from adaptertools.adapter_io import _read
    from adaptertools.errors import UnsupportedError
    from adaptertools.registry import get_format

    unplaced = _read(get_format("kohya"), kohya, None, unplaced=True)
    with pytest.raises(UnsupportedError, match="cannot be written"):
        at.save(unplaced, tmp_path / "o", format="peft")
