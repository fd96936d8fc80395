"""Reports (adaptertools/reports.py): every public function's result is a frozen dataclass whose
``to_dict()`` is what ``--json`` prints and the dict the function returned before reports were
typed, key order included; dict-era reads (``report["x"]``, ``in``, ``.get``, ``json.dumps``)
keep working, and the option Literals (options.py) stay the sets checked at run time."""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
import types
import typing
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import adaptertools as at
from adaptertools import options, reports
from adaptertools.cli import cli
from adaptertools.tiny import make_adapter, make_base

# Top-level keys, in order, of the dicts these calls returned before reports (commit 792fa0d),
# recorded by running that commit's library on the same inputs. ``--json`` sorts its keys
# (_io.json_text), so the order is checked here, against the record, not against the CLI.
INSPECT = ["path", "format", "base_model", "size_bytes", "adapted_tensors", "replaced_tensors",
           "saved_base_copies", "parameters", "dtypes", "ranks", "scales", "rslora",
           "target_modules", "layer_kinds", "dora", "lora_bias", "total_delta_norm", "problems",
           "kinds"]
CONVERT = ["src", "dst", "from", "to", "dtype", "adapted_tensors", "replaced_tensors"]
PLAN = ["base", "out", "format", "adapters", "weights", "mode", "dtype", "tensors",
        "output_bytes", "changed", "warnings"]
RUN = ["wall_s", "device", "kernels", "copied_files", "survival"]
VALIDATE = ["passed", "failed", "checked", "adapted", "untouched", "worst_margin_db", "probes",
            "seed", "tolerance_db", "wall_s", "tensors", "merged", "base", "adapters", "weights",
            "mode"]
TRUNCATION = ["replaced", "warnings", "tensors", "total", "wall_s"]
OLD_KEYS = {
    "inspect": INSPECT,
    "inspect_layers": INSPECT + ["layers"],
    "inspect_gguf": INSPECT + ["storage"],
    "convert": CONVERT,
    "convert_named_base": CONVERT + ["base", "notes", "base_model"],
    "merge_dry_run": PLAN + ["base_model"],
    "merge": PLAN + ["base_model"] + RUN,
    "merge_validate_shards": PLAN + ["max_shard_size", "shards", "base_model"] + RUN
                             + ["validation"],
    "validate": VALIDATE,
    "validate_against": ["passed", "tensors", "failed", "adapter", "against"],
    "combine": ["command", "method", "inputs", "weights", "rank", "energy", "density", "seed",
                "out", "format"] + TRUNCATION,
    "extract": ["command", "base", "finetuned", "out", "format", "rank", "energy", "svd",
                "seed"] + TRUNCATION,
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Tiny Llama bases (fp32, bf16), two PEFT adapters (the second naming the base, so GGUF
    conversion picks it up), a fine-tune to extract from, a GGUF copy and a merge to check."""
    root = tmp_path_factory.mktemp("reports")
    base = make_base(root / "base")
    make_base(root / "base16", dtype=torch.bfloat16)
    at.save(make_adapter(rank=4, targets=("q_proj", "v_proj", "down_proj")), root / "a1",
            format="peft")
    at.save(make_adapter(rank=2, seed=5, targets=("q_proj",), base_model=str(base)), root / "a2",
            format="peft")
    at.merge(base, [root / "a1"], root / "finetuned")
    at.convert(root / "a2", root / "a2.gguf", to="gguf")
    at.merge(base, [root / "a1", root / "a2"], root / "merged", weights=[0.5, 1])
    return root


# name -> (CLI arguments before --json, the same call through the library, its report class);
# outputs go to the same paths with --force, so the two runs differ only in their timings
CASES = {
    "inspect": lambda r: (["inspect", r / "a1"], lambda: at.inspect(r / "a1"),
                          reports.InspectReport),
    "inspect_layers": lambda r: (["inspect", r / "a1", "--layers"],
                                 lambda: at.inspect(r / "a1", layers=True), reports.InspectReport),
    "inspect_gguf": lambda r: (["inspect", r / "a2.gguf", "--base", r / "base"],
                               lambda: at.inspect(r / "a2.gguf", base=r / "base"),
                               reports.InspectReport),
    "convert": lambda r: (
        ["convert", r / "a1", r / "out" / "a1.safetensors", "--to", "safetensors", "--force"],
        lambda: at.convert(r / "a1", r / "out" / "a1.safetensors", to="safetensors", force=True),
        reports.ConvertReport),
    "convert_named_base": lambda r: (
        ["convert", r / "a2", r / "out" / "a2.gguf", "--to", "gguf", "--force"],
        lambda: at.convert(r / "a2", r / "out" / "a2.gguf", to="gguf", force=True),
        reports.ConvertReport),
    "merge_dry_run": lambda r: (
        ["merge", r / "base", r / "a1", r / "a2", "--out", r / "out" / "dry", "--dry-run"],
        lambda: at.merge(r / "base", [r / "a1", r / "a2"], r / "out" / "dry", dry_run=True),
        reports.MergePlanReport),
    "merge": lambda r: (
        ["merge", r / "base", r / "a1", r / "a2", "--out", r / "out" / "m", "--weights", "0.5,1",
         "--mode", "stacked", "--force"],
        lambda: at.merge(r / "base", [r / "a1", r / "a2"], r / "out" / "m", weights=[0.5, 1],
                         mode="stacked", force=True),
        reports.MergeReport),
    "merge_validate_shards": lambda r: (
        ["merge", r / "base16", r / "a1", "--out", r / "out" / "mv", "--validate",
         "--max-shard-size", "100KB", "--force"],
        lambda: at.merge(r / "base16", [r / "a1"], r / "out" / "mv", validate=True,
                         max_shard_size="100KB", force=True),
        reports.MergeReport),
    "validate": lambda r: (
        ["validate", r / "base", r / "a1", r / "a2", "--merged", r / "merged", "--weights",
         "0.5,1"],
        lambda: at.validate(r / "base", [r / "a1", r / "a2"], r / "merged", weights=[0.5, 1]),
        reports.ValidationReport),
    "validate_against": lambda r: (
        ["validate", r / "a2.gguf", "--against", r / "a2", "--base", r / "base"],
        lambda: at.validate_against(r / "a2.gguf", r / "a2", base=r / "base"),
        reports.ComparisonReport),
    "combine": lambda r: (
        ["combine", r / "a1", r / "a2", "--out", r / "out" / "c", "--method", "svd", "--rank", "2",
         "--force"],
        lambda: at.combine([r / "a1", r / "a2"], r / "out" / "c", method="svd", rank=2,
                           force=True),
        reports.CombineReport),
    "extract": lambda r: (
        ["extract", r / "base", r / "finetuned", "--out", r / "out" / "e", "--rank", "2",
         "--force"],
        lambda: at.extract(r / "base", r / "finetuned", r / "out" / "e", rank=2, force=True),
        reports.ExtractReport),
}


def cli_json(*args) -> dict:
    result = CliRunner().invoke(cli, [str(a) for a in args] + ["--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def without_timings(value):
    """``value`` with every ``wall_s`` (the one field two runs do not share) set to 0."""
    if isinstance(value, dict):
        return {k: 0 if k == "wall_s" else without_timings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def key_orders(value):
    """Every dict's keys in order, nested dicts and lists included."""
    if isinstance(value, dict):
        return [(k, key_orders(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [key_orders(v) for v in value]
    return None


def conforms(value, hint) -> bool:
    """Is ``value`` of the annotated type ``hint`` (the few forms reports.py uses)?"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(conforms(k, args[0]) and conforms(v, args[1])
                                               for k, v in value.items())
    if hint is float:      # PEP 484: an int is acceptable where a float is
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def assert_field_types(report) -> None:
    hints = typing.get_type_hints(type(report))
    for f in dataclasses.fields(report):
        value = getattr(report, f.name)
        assert conforms(value, hints[f.name]), (f.name, hints[f.name], value)


@pytest.mark.parametrize("case", CASES)
def test_json_output_is_the_reports_dict(case, root):
    args, call, cls = CASES[case](root)
    shown = cli_json(*args)
    report = call()
    assert type(report) is cls
    data = report.to_dict()
    assert type(data) is dict
    assert list(data) == OLD_KEYS[case]              # the old dict's keys, in its order
    assert without_timings(shown) == without_timings(data)
    assert key_orders(data) == key_orders(dict(report))   # nested sections as they were
    assert_field_types(report)


def test_survival_and_optional_sections(root):
    """Keys a result has only sometimes are absent, not null; survival is null when nothing
    quantized was merged (it is a stable key of a real run)."""
    report = at.merge(root / "base", [root / "a1"], root / "out" / "opt", force=True)
    assert report.survival is None and report["survival"] is None
    for key in ("validation", "pushed", "hub_inputs", "max_shard_size", "shards"):
        assert key not in report and getattr(report, key) is None and report.get(key) is None


def test_reports_read_as_the_dicts_they_were(root):
    report = at.inspect(root / "a1", layers=True)
    data = report.to_dict()
    assert report["ranks"] == report.ranks == {"4": 6}
    assert "layers" in report and "storage" not in report and report.get("storage", 1) == 1
    assert list(report) == list(report.keys()) == list(data) and len(report) == len(data)
    assert dict(report.items()) == data and report == data and isinstance(report, dict)
    assert json.dumps(report) == json.dumps(data)
    assert isinstance(report, reports.Report) and at.InspectReport is reports.InspectReport


def test_reports_are_read_only_and_to_dict_is_a_copy(root):
    report = at.inspect(root / "a1", layers=True)
    for change in (lambda r: r.__setitem__("format", "x"), lambda r: r.__delitem__("format"),
                   lambda r: r.update(format="x"), lambda r: r.pop("format"), lambda r: r.clear(),
                   lambda r: r.setdefault("new", 1), lambda r: r.popitem()):
        with pytest.raises(TypeError, match="read-only"):
            change(report)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.format = "x"
    data = report.to_dict()
    data["layers"].clear()
    data["format"] = "changed"
    assert report.layers and report["format"] == "peft"
    again = pickle.loads(pickle.dumps(report))
    assert type(again) is reports.InspectReport and again == report
    trimmed = dataclasses.replace(report, layers=None)
    assert "layers" not in trimmed and list(trimmed) == INSPECT


def test_from_dict_refuses_a_key_without_a_field():
    data = {"passed": True, "tensors": [], "failed": 0, "adapter": "a", "against": "b"}
    assert list(reports.ComparisonReport.from_dict(data).to_dict()) == list(data)
    with pytest.raises(TypeError, match="'surprise'"):
        reports.ComparisonReport.from_dict({**data, "surprise": 1})


def choices(command: str, option: str) -> tuple:
    param = next(p for p in cli.commands[command].params if p.name == option)
    assert isinstance(param.type, click.Choice)
    return tuple(param.type.choices)


def test_option_literals_are_the_sets_checked_at_run_time():
    from adaptertools.adapter_io import DTYPES, FORMAT_DTYPES
    from adaptertools.algebra.combine import METHODS
    from adaptertools.kernels.lowrank import SVD_CHOICES
    from adaptertools.kernels.triton.engine import KERNELS
    from adaptertools.merging.plan import MODES

    args = typing.get_args
    assert args(options.MergeMode) == MODES == choices("merge", "mode") == choices("validate",
                                                                                  "mode")
    assert args(options.MergeDtype) == DTYPES
    assert set(args(options.MergeDtype)) == set(choices("merge", "dtype"))
    assert args(options.AdapterDtype) == DTYPES + FORMAT_DTYPES == choices("convert", "dtype")
    assert args(options.Device) == choices("merge", "device")
    assert args(options.Kernels) == KERNELS == choices("merge", "kernels")
    assert args(options.CombineMethod) == METHODS == choices("combine", "method")
    assert args(options.SvdChoice) == SVD_CHOICES == choices("extract", "svd")
    hints = typing.get_type_hints(at.merge)
    assert hints["mode"] is options.MergeMode and hints["kernels"] is options.Kernels


def test_reports_import_light_and_ship_typed():
    script = ("import sys, adaptertools as at; at.MergeReport; at.ValidationReport; "
              "print([m for m in ('torch', 'rich', 'huggingface_hub') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"
    assert (Path(at.__file__).parent / "py.typed").is_file()


# ----------------------------------------------------------------------------- push and pull

def test_push_and_pull_return_reports(monkeypatch, tmp_path):
    """hub.push and hub.pull return PushReport / PullReport; ``push --json`` prints its to_dict,
    and a merge's ``pushed`` section is that dict, plain."""
    from helpers.cli import run_cli
    from helpers.hub_server import WRITE_TOKEN, serve_hub

    hub_server = serve_hub(monkeypatch, tmp_path)
    hub = next(hub_server)
    try:
        base = make_base(tmp_path / "base")
        adapter = tmp_path / "adapter"
        at.save(make_adapter(), adapter, format="peft")
        pushed = at.push(adapter, "me/ad", endpoint=hub.endpoint, token=WRITE_TOKEN)
        assert type(pushed) is reports.PushReport and pushed.commit == pushed["commit"]
        assert list(pushed.to_dict()) == ["repo_id", "revision", "commit", "url", "private",
                                          "endpoint", "files"]
        pulled = at.pull("hf://me/ad", endpoint=hub.endpoint)
        assert type(pulled) is reports.PullReport and pulled.commit == pushed.commit
        assert sorted(pulled.files) == sorted(f for f in pushed.files if f != ".gitattributes")
        assert list(pulled.to_dict())[-2:] == ["path", "bytes"]
        outcome = run_cli("push", adapter, "me/ad2", "--token", WRITE_TOKEN, "--endpoint",
                          hub.endpoint, "--json", expect=0)
        printed = json.loads(outcome.stdout)
        assert set(printed) == set(pushed.to_dict()) and printed["repo_id"] == "me/ad2"
        report = at.merge(base, [adapter], tmp_path / "out", push_to="me/merged",
                          endpoint=hub.endpoint, token=WRITE_TOKEN)
        assert type(report["pushed"]) is dict and report["pushed"]["repo_id"] == "me/merged"
    finally:
        hub_server.close()
