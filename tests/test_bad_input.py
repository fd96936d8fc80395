"""Bad inputs are refused with a clear error, through the library and through the CLI.

Library: the exception class and a message naming the offending file or tensor.
CLI: exit 1 (2 for misuse), one ``error:`` line on stderr naming the file or tensor, no traceback,
and nothing written at DST (no temporary leftovers beside it either). Every case runs through
click's CliRunner; a representative subset also runs as a real subprocess, which is what a user
gets (exit code from the interpreter, stderr as written, warnings shown by the CLI's hook).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.errors import (AdapterToolsWarning, FormatError, InputNotFoundError, OptionError,
                                 OutputExistsError, UnsupportedError)
from adaptertools.tiny import make_adapter

from helpers.adapters import with_bad_value, write_peft
from helpers.cli import (assert_cli_error, assert_nothing_written, leftovers_beside, run_cli,
                         stderr_lines)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
UP = "model.layers.1.mlp.up_proj"
KEY = "base_model.model.{}.{}.weight"          # PEFT's saved key of a module's factor


# ----------------------------------------------------------------------------- helpers

def edit_config(folder: Path, change: Callable[[dict], None]) -> None:
    path = folder / CONFIG
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def edit_weights(folder: Path, change: Callable[[dict], None]) -> None:
    path = folder / WEIGHTS
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def write_unchecked_peft(folder: Path, adapter) -> Path:
    """A PEFT folder written by the format module itself, bypassing save()'s NaN/Inf refusal."""
    from adaptertools.formats import peft

    folder.mkdir()
    peft.write(adapter, folder)
    return folder


class Evil:
    """Unpickling this runs code that creates ``marker``: a loader must never execute it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


# ----------------------------------------------------------------------------- the cases

@dataclass
class Case:
    src: Path
    error: type[Exception]
    fragments: list[str]                    # each must appear in the message
    to: str = "safetensors"
    options: dict = field(default_factory=dict)   # library keywords; CLI flags derived from them
    marker: Path | None = None              # must never be created
    code: int = 1                           # the CLI's exit code: 2 for misuse of an option


def case_no_config(tmp: Path) -> Case:
    folder = write_peft(tmp / "adapter")
    (folder / CONFIG).unlink()
    return Case(folder, FormatError, [str(folder), "not a recognised adapter"])


def case_bad_json(tmp: Path) -> Case:
    folder = write_peft(tmp / "adapter")
    (folder / CONFIG).write_text('{"r": 8, "lora_alpha": 16,')
    return Case(folder, FormatError, [str(folder / CONFIG), "JSON"])


def case_no_r(tmp: Path) -> Case:
    folder = write_peft(tmp / "adapter")
    edit_config(folder, lambda c: c.pop("r"))
    return Case(folder, FormatError, [str(folder / CONFIG), "`r`"])


def case_no_alpha(tmp: Path) -> Case:
    folder = write_peft(tmp / "adapter")
    edit_config(folder, lambda c: c.pop("lora_alpha"))
    return Case(folder, FormatError, [str(folder / CONFIG), "`lora_alpha`"])


def case_a_without_b(tmp: Path) -> Case:
    folder = write_peft(tmp / "adapter")
    edit_weights(folder, lambda t: t.pop(KEY.format(K, "lora_B")))
    return Case(folder, FormatError, [str(folder), K, "lora_B"])


def case_ranks_disagree(tmp: Path) -> Case:
    folder = write_peft(tmp / "adapter")
    # k_proj is (32, 64): keep A at rank 8, give B rank 4
    edit_weights(folder, lambda t: t.update({KEY.format(K, "lora_B"): torch.randn(32, 4)}))
    return Case(folder, FormatError, [str(folder), K, "rank 8", "rank 4"])


def case_config_rank_disagrees(tmp: Path) -> Case:
    folder = write_peft(tmp / "adapter")
    edit_config(folder, lambda c: c.update(r=4))
    return Case(folder, FormatError, [str(folder), "model.layers.", "rank 8", CONFIG])


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def case_truncated_peft(tmp: Path) -> Case:
    folder = write_peft(tmp / "adapter")
    _cut_in_half(folder / WEIGHTS)
    return Case(folder, FormatError, [str(folder / WEIGHTS), "truncated or corrupt"])


def case_garbage_peft(tmp: Path) -> Case:
    folder = write_peft(tmp / "adapter")
    _garbage(folder / WEIGHTS)
    return Case(folder, FormatError, [str(folder / WEIGHTS), "truncated or corrupt"])


def case_truncated_file(tmp: Path) -> Case:
    path = tmp / "adapter.safetensors"
    at.save(make_adapter(), path, format="safetensors")
    _cut_in_half(path)
    return Case(path, FormatError, [str(path), "truncated or corrupt"], to="peft")


def case_garbage_file(tmp: Path) -> Case:
    path = tmp / "adapter.safetensors"
    _garbage(path)
    return Case(path, FormatError, [str(path), "truncated or corrupt"], to="peft")


def _legacy_folder(tmp: Path, payload) -> Path:
    folder = write_peft(tmp / "adapter")
    (folder / WEIGHTS).unlink()
    torch.save(payload, folder / "adapter_model.bin")
    return folder


def case_legacy_pickle_with_code(tmp: Path) -> Case:
    marker = tmp / "PWNED"
    folder = _legacy_folder(tmp, {KEY.format(Q, "lora_A"): Evil(marker)})
    return Case(folder, FormatError, [str(folder / "adapter_model.bin")], marker=marker)


def case_legacy_not_a_tensor_dict(tmp: Path) -> Case:
    folder = _legacy_folder(tmp, {KEY.format(Q, "lora_A"): [torch.zeros(8, 64)]})
    return Case(folder, FormatError, [str(folder / "adapter_model.bin")])


def case_nan_factor(tmp: Path) -> Case:
    folder = write_unchecked_peft(tmp / "adapter",
                                  with_bad_value(make_adapter(), Q + ".weight", "a", float("nan")))
    return Case(folder, FormatError, [Q + ".weight", "lora_A", "NaN"])


def case_inf_factor(tmp: Path) -> Case:
    folder = write_unchecked_peft(tmp / "adapter",
                                  with_bad_value(make_adapter(), UP + ".weight", "b", float("inf")))
    return Case(folder, FormatError, [UP + ".weight", "lora_B", "Inf"])


def case_missing_path(tmp: Path) -> Case:
    # brackets and a colon pair: the CLI must print the path literally, not as rich markup/emoji
    path = tmp / "run[1]" / "[/]:smile:adapter"
    return Case(path, InputNotFoundError, [str(path)])


def case_scale_for_peft(tmp: Path) -> Case:
    folder = write_peft(tmp / "adapter")
    return Case(folder, OptionError, [str(folder), "--scale"], options={"scale": 2.0}, code=2)


def case_writer_fails_midway(tmp: Path) -> Case:
    """PEFT cannot hold DoRA on only some tensors: the PEFT writer refuses after it started."""
    adapter = make_adapter()
    w = adapter.weights[Q + ".weight"]
    adapter.weights[Q + ".weight"] = replace(w, magnitude=torch.ones(w.shape[0]))
    path = tmp / "mixed.safetensors"
    at.save(adapter, path, format="safetensors")
    return Case(path, UnsupportedError, ["DoRA"], to="peft")


UNSUPPORTED_TYPES = ("IA3", "VERA", "OFT", "ADALORA")


def case_lora_tensors_under_loha_config(tmp: Path) -> Case:
    """LoHa and LoKr are read (formats/peft_lycoris.py): LoRA tensors under a LOHA config are
    named as not belonging to it, never merged as something else."""
    folder = write_peft(tmp / "adapter")
    edit_config(folder, lambda c: c.update(peft_type="LOHA", alpha=8))
    return Case(folder, FormatError, [str(folder), "not LOHA tensors", "lora_A"])


def make_unsupported(peft_type: str) -> Callable[[Path], Case]:
    def build(tmp: Path) -> Case:
        folder = write_peft(tmp / "adapter")
        edit_config(folder, lambda c: c.update(peft_type=peft_type))
        return Case(folder, UnsupportedError, [str(folder / CONFIG),
                                               f"not supported yet: {peft_type}"])
    return build


CASES: dict[str, Callable[[Path], Case]] = {
    "no-config": case_no_config,
    "bad-json": case_bad_json,
    "no-r": case_no_r,
    "no-alpha": case_no_alpha,
    "a-without-b": case_a_without_b,
    "ranks-disagree": case_ranks_disagree,
    "config-rank-disagrees": case_config_rank_disagrees,
    "truncated-peft": case_truncated_peft,
    "garbage-peft": case_garbage_peft,
    "truncated-file": case_truncated_file,
    "garbage-file": case_garbage_file,
    "legacy-pickle-with-code": case_legacy_pickle_with_code,
    "legacy-not-a-tensor-dict": case_legacy_not_a_tensor_dict,
    "nan-factor": case_nan_factor,
    "inf-factor": case_inf_factor,
    "missing-path": case_missing_path,
    "scale-for-peft": case_scale_for_peft,
    "writer-fails-midway": case_writer_fails_midway,
    **{f"unsupported-{t}": make_unsupported(t) for t in UNSUPPORTED_TYPES},
    "lora-under-loha-config": case_lora_tensors_under_loha_config,
}

# The cases that also run as a real subprocess: one per error class and per code path.
SUBPROCESS = ("no-config", "bad-json", "a-without-b", "garbage-file", "legacy-pickle-with-code",
              "nan-factor", "missing-path", "scale-for-peft", "writer-fails-midway",
              "unsupported-IA3", "lora-under-loha-config")
# Inputs that only convert refuses: inspect reports NaN/Inf as problems, a mixed-DoRA file is
# valid (only PEFT cannot hold it), and --scale is tested with inspect separately.
INSPECT_ACCEPTS = {"nan-factor", "inf-factor", "scale-for-peft", "writer-fails-midway"}


def cli_flags(options: dict) -> list[str]:
    return [arg for key, value in options.items() for arg in (f"--{key}", str(value))]


# ----------------------------------------------------------------------------- library

@pytest.mark.parametrize("name", CASES)
def test_library_refuses(name, tmp_path):
    case = CASES[name](tmp_path)
    dst = tmp_path / "out" / "converted"
    dst.parent.mkdir()
    with pytest.raises(case.error) as info:
        at.convert(case.src, dst, to=case.to, **case.options)
    for fragment in case.fragments:
        assert fragment in str(info.value)
    assert_nothing_written(dst)
    if name not in INSPECT_ACCEPTS:
        with pytest.raises(case.error):
            at.inspect(case.src)
    if case.marker is not None:
        assert not case.marker.exists(), "the pickle's code ran"


def test_library_error_classes_are_also_builtins():
    # callers catching the builtin keep working (DESIGN.md convention 8)
    assert issubclass(FormatError, ValueError) and issubclass(UnsupportedError, ValueError)
    assert issubclass(InputNotFoundError, FileNotFoundError)
    assert issubclass(OutputExistsError, FileExistsError)


# ----------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("name, via", [(n, "inprocess") for n in CASES] +
                         [(n, "subprocess") for n in SUBPROCESS])
def test_cli_convert_refuses(name, via, tmp_path):
    case = CASES[name](tmp_path)
    dst = tmp_path / "out" / ("converted.safetensors" if case.to == "safetensors" else "converted")
    dst.parent.mkdir()
    run = run_cli if via == "subprocess" else run_cli
    outcome = run("convert", case.src, dst, "--to", case.to, *cli_flags(case.options))
    assert_cli_error(outcome, case.fragments, code=case.code)
    assert_nothing_written(dst)
    if case.marker is not None:
        assert not case.marker.exists(), "the pickle's code ran"


@pytest.mark.parametrize("name", [n for n in CASES if n not in INSPECT_ACCEPTS])
def test_cli_inspect_refuses_bad_input(name, tmp_path):
    case = CASES[name](tmp_path)
    assert_cli_error(run_cli("inspect", case.src, "--json"), case.fragments)


def test_cli_inspect_refuses_truncated_file_in_subprocess(tmp_path):
    case = case_truncated_peft(tmp_path)
    outcome = run_cli("inspect", case.src, how="subprocess")
    assert_cli_error(outcome, case.fragments)
    assert outcome.stdout == ""


def test_cli_inspect_refuses_scale_for_peft(tmp_path):
    case = case_scale_for_peft(tmp_path)
    assert_cli_error(run_cli("inspect", case.src, "--scale", "2"), case.fragments, code=2)


def test_evil_pickle_really_would_create_the_marker(tmp_path):
    """The marker test above can fail: loading the same file unsafely does create the marker."""
    case = case_legacy_pickle_with_code(tmp_path)
    with pytest.raises(FormatError):
        at.load(case.src)
    assert not case.marker.exists()
    torch.load(case.src / "adapter_model.bin", weights_only=False)  # our own payload: harmless
    assert case.marker.exists()


def test_legacy_plain_tensor_dict_is_read(tmp_path):
    """The refusal is specific: a legacy .bin holding only tensors loads, bit-exact."""
    adapter = make_adapter()
    folder = write_peft(tmp_path / "adapter", adapter)
    state = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    torch.save(state, folder / "adapter_model.bin")
    back = at.load(folder)
    assert back.weights.keys() == adapter.weights.keys()
    for name, w in adapter.weights.items():
        assert torch.equal(back.weights[name].a, w.a) and torch.equal(back.weights[name].b, w.b)


# ----------------------------------------------------------------------------- NaN / Inf inspect

NONFINITE = {"nan": case_nan_factor, "inf": case_inf_factor}


@pytest.mark.parametrize("kind", NONFINITE)
def test_library_inspect_reports_nonfinite(kind, tmp_path):
    case = NONFINITE[kind](tmp_path)
    report = at.inspect(case.src, layers=True)
    tensor = case.fragments[0]
    assert any(tensor in p for p in report["problems"]), report["problems"]
    flagged = [row["name"] for row in report["layers"] if "nan/inf" in row["flags"]]
    assert flagged == [tensor]
    assert [row["delta_norm"] for row in report["layers"] if row["name"] == tensor] == [None]
    json.dumps(report, allow_nan=False)  # --json output stays valid JSON (no bare NaN)


def test_cli_inspect_reports_nonfinite(tmp_path):
    case = case_nan_factor(tmp_path)
    outcome = run_cli("inspect", case.src, how="subprocess")
    assert "Traceback" not in outcome.stdout + outcome.stderr
    assert outcome.code == 0, outcome.stderr
    warnings_ = [line for line in stderr_lines(outcome) if line.startswith("warning:")]
    assert any(case.fragments[0] in line for line in warnings_), outcome.stderr


# ----------------------------------------------------------------------------- misuse (exit 2)

@pytest.mark.parametrize("args, option", [
    (["--dtype", "bf16"], "--to"),                               # --to missing
    (["--to", "safetensors", "--dtype", "int4"], "--dtype"),     # unknown dtype
])
def test_cli_misuse_exits_2(args, option, tmp_path):
    src = write_peft(tmp_path / "adapter")
    dst = tmp_path / "converted.safetensors"
    outcome = run_cli("convert", src, dst, *args, how="subprocess")
    assert_cli_error(outcome, [option], code=2)
    assert_nothing_written(dst)


# ----------------------------------------------------------------------------- existing output

def test_library_existing_destination_needs_force(tmp_path):
    src = write_peft(tmp_path / "adapter")
    dst = tmp_path / "converted.safetensors"
    dst.write_bytes(b"precious")
    with pytest.raises(OutputExistsError) as info:
        at.convert(src, dst, to="safetensors")
    assert str(dst) in str(info.value)
    assert dst.read_bytes() == b"precious"
    assert leftovers_beside(dst) == []


def test_library_force_replaces_atomically(tmp_path, monkeypatch):
    """While the new output is written, DST still holds the old one; then one rename swaps them."""
    from adaptertools.formats import peft

    src = tmp_path / "adapter.safetensors"
    at.save(make_adapter(), src, format="safetensors")
    dst = tmp_path / "converted"
    dst.mkdir()                 # an older conversion: an adapter folder --force may replace
    (dst / CONFIG).write_text("{}")
    (dst / "stale.txt").write_text("old output")
    seen = {}
    real_write = peft.write

    def spying_write(adapter, path):
        seen["tmp"] = Path(path)
        seen["dst_during_write"] = sorted(p.name for p in dst.iterdir())
        real_write(adapter, path)

    monkeypatch.setattr(peft, "write", spying_write)
    at.convert(src, dst, to="peft", force=True)
    assert seen["dst_during_write"] == [CONFIG, "stale.txt"]
    assert seen["tmp"].parent == dst.parent and seen["tmp"].name.startswith("." + dst.name)
    assert sorted(p.name for p in dst.iterdir()) == [CONFIG, WEIGHTS]   # replaced, not merged
    assert leftovers_beside(dst) == []


def test_library_failed_forced_write_keeps_old_output(tmp_path):
    case = case_writer_fails_midway(tmp_path)
    dst = tmp_path / "converted"
    write_peft(dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    with pytest.raises(UnsupportedError):
        at.convert(case.src, dst, to="peft", force=True)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert leftovers_beside(dst) == []


def test_cli_existing_destination_then_force(tmp_path):
    src = write_peft(tmp_path / "adapter")
    dst = tmp_path / "converted.safetensors"
    dst.write_bytes(b"precious")
    outcome = run_cli("convert", src, dst, "--to", "safetensors", how="subprocess")
    assert_cli_error(outcome, [str(dst), "--force"])
    assert dst.read_bytes() == b"precious"

    outcome = run_cli("convert", src, dst, "--to", "safetensors", "--force", how="subprocess")
    assert outcome.code == 0, outcome.stderr
    assert "Traceback" not in outcome.stderr and stderr_lines(outcome) == []
    assert at.load(dst).weights.keys() == at.load(src).weights.keys()
    assert leftovers_beside(dst) == []


# ----------------------------------------------------------------------------- warnings, not errors

def test_library_pissa_warns_but_converts(tmp_path):
    src = write_peft(tmp_path / "adapter")
    edit_config(src, lambda c: c.update(init_lora_weights="pissa"))
    dst = tmp_path / "converted.safetensors"
    with pytest.warns(AdapterToolsWarning, match="pissa"):
        at.convert(src, dst, to="safetensors")
    assert at.load(dst).weights.keys() == make_adapter().weights.keys()


def test_cli_pissa_warns_but_converts(tmp_path):
    src = write_peft(tmp_path / "adapter")
    edit_config(src, lambda c: c.update(init_lora_weights="pissa"))
    dst = tmp_path / "converted.safetensors"
    outcome = run_cli("convert", src, dst, "--to", "safetensors", how="subprocess")
    assert outcome.code == 0, outcome.stderr
    assert "Traceback" not in outcome.stderr
    lines = stderr_lines(outcome)
    assert len(lines) == 1 and lines[0].startswith("warning:"), outcome.stderr
    assert "pissa" in lines[0] and str(src / CONFIG) in lines[0]
    assert dst.is_file()


def bare_peft_file(tmp: Path) -> Path:
    """PEFT's keys in a plain safetensors file: no config, no adaptertools metadata."""
    folder = write_peft(tmp / "adapter")
    path = tmp / "bare.safetensors"
    shutil.copy(folder / WEIGHTS, path)
    return path


def test_library_bare_file_scale(tmp_path):
    path = bare_peft_file(tmp_path)
    with pytest.warns(AdapterToolsWarning, match=r"scale 1\.0"):
        default = at.load(path)
    assert {w.scale for w in default.weights.values()} == {1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # an explicit scale is not guessed: no warning
        scaled = at.load(path, scale=2.0)
    assert {w.scale for w in scaled.weights.values()} == {2.0}
    original = make_adapter()
    assert scaled.weights.keys() == original.weights.keys()
    for name, w in original.weights.items():
        assert torch.equal(scaled.weights[name].a, w.a) and torch.equal(scaled.weights[name].b, w.b)


def test_cli_bare_file_warns_about_scale_1(tmp_path):
    path = bare_peft_file(tmp_path)
    dst = tmp_path / "converted"
    outcome = run_cli("convert", path, dst, "--to", "peft", how="subprocess")
    assert outcome.code == 0, outcome.stderr
    lines = stderr_lines(outcome)
    assert len(lines) == 1 and lines[0].startswith("warning:"), outcome.stderr
    assert str(path) in lines[0] and "1.0" in lines[0]
    assert {w.scale for w in at.load(dst).weights.values()} == {1.0}


def test_cli_bare_file_with_scale_2(tmp_path):
    path = bare_peft_file(tmp_path)
    dst = tmp_path / "converted"
    outcome = run_cli("convert", path, dst, "--to", "peft", "--scale", "2", how="subprocess")
    assert outcome.code == 0, outcome.stderr
    assert stderr_lines(outcome) == []
    assert {w.scale for w in at.load(dst).weights.values()} == {2.0}
    config = json.loads((dst / CONFIG).read_text())
    assert config["lora_alpha"] / config["r"] == 2.0
