"""The ``adaptertools`` command on good inputs: startup imports, formats, inspect, convert, demo."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adaptertools as at
from adaptertools.adapter import Adapter
from adaptertools.tiny import make_adapter

from helpers.cli import run_cli

HEAVY = ("torch", "triton", "huggingface_hub")


def mixed_adapter() -> Adapter:
    """Two ranks and two scales: q/v at rank 4, scale 2; down_proj at rank 2, scale 0.5."""
    attention = make_adapter(rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=3)
    mlp = make_adapter(rank=2, alpha=1, targets=("down_proj",), seed=4)
    return Adapter(weights={**attention.weights, **mlp.weights},
                   metadata={"source_format": "test"})


@pytest.fixture
def peft_dir(tmp_path) -> Path:
    folder = tmp_path / "adapter"
    at.save(make_adapter(), folder, format="peft")
    return folder


# ----------------------------------------------------------------------------- startup

def test_import_and_help_do_not_import_heavy_modules():
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        heavy = {HEAVY!r}
        import adaptertools
        after_import = [m for m in heavy if m in sys.modules]
        from adaptertools.cli import cli
        helps = {{}}
        for args in (["--help"], ["convert", "--help"], ["inspect", "--help"]):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                code = cli.main(args, prog_name="adaptertools", standalone_mode=False)
            helps[" ".join(args)] = [code, buf.getvalue()]
        after_help = [m for m in heavy if m in sys.modules]
        print(json.dumps({{"after_import": after_import, "after_help": after_help,
                          "helps": helps}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["after_import"] == []
    assert result["after_help"] == []
    # the help really was rendered (so the check above is about a help that ran)
    code, text = result["helps"]["--help"]
    assert code == 0 and "Usage: adaptertools" in text
    for command in ("convert", "inspect", "formats", "demo"):
        assert command in text
    assert "--to" in result["helps"]["convert --help"][1]
    assert "--layers" in result["helps"]["inspect --help"][1]


def test_version():
    proc = run_cli("--version", how="subprocess")
    assert proc.code == 0, proc.stderr
    assert proc.stdout.strip() == f"adaptertools, version {at.__version__}"
    assert at.__version__ == version("adaptertools")


# ----------------------------------------------------------------------------- formats

def test_formats_json():
    rows = json.loads(run_cli("formats", "--json", expect=0).stdout)
    by_name = {row["name"]: row for row in rows}
    for name in ("peft", "safetensors"):
        assert by_name[name]["read"] is True and by_name[name]["write"] is True
        assert by_name[name]["package"] == "adaptertools"
        assert by_name[name]["description"]


def test_formats_table():
    text = run_cli("formats", expect=0).stdout
    for name in ("peft", "safetensors", "adaptertools"):
        assert name in text


# ----------------------------------------------------------------------------- inspect

def explicit_delta(w) -> torch.Tensor:
    return w.scale * (w.b.double() @ w.a.double())   # (rows, cols), formed in float64


def entropy_rank(sv: torch.Tensor) -> float:
    p = sv / sv.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def test_inspect_json_summary(tmp_path):
    adapter = mixed_adapter()
    folder = tmp_path / "adapter"
    at.save(adapter, folder, format="peft")
    report = json.loads(run_cli("inspect", folder, "--json", expect=0).stdout)
    assert "layers" not in report
    assert report["format"] == "peft"
    assert report["adapted_tensors"] == 6
    assert report["replaced_tensors"] == []
    assert report["ranks"] == {"4": 4, "2": 2}
    assert report["scales"] == {"2.0": 4, "0.5": 2}
    assert report["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert report["layer_kinds"] == {"linear": 6}
    assert report["dtypes"] == ["float32"]
    assert report["parameters"] == sum(w.a.numel() + w.b.numel() for w in adapter.weights.values())
    assert report["dora"] is False and report["lora_bias"] is False
    assert report["problems"] == []
    total = math.sqrt(sum(float(explicit_delta(w).norm()) ** 2 for w in adapter.weights.values()))
    assert report["total_delta_norm"] == pytest.approx(total, rel=1e-9)


def test_inspect_layers_json_matches_explicit_delta(tmp_path):
    adapter = mixed_adapter()
    folder = tmp_path / "adapter"
    at.save(adapter, folder, format="peft")
    proc = run_cli("inspect", folder, "--layers", "--json", how="subprocess")
    assert proc.code == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = {row["name"]: row for row in report["layers"]}
    assert rows.keys() == adapter.weights.keys()
    for name, w in adapter.weights.items():
        row, delta = rows[name], explicit_delta(w)
        assert row["rank"] == w.rank and row["scale"] == w.scale
        assert row["shape"] == list(delta.shape) and row["layer"] == "linear"
        assert row["dtype"] == "float32" and row["flags"] == []
        assert row["delta_norm"] == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-9)
        sv = torch.linalg.svdvals(delta)              # min(rows, cols) values, r of them non-zero
        assert row["effective_rank"] == pytest.approx(entropy_rank(sv), rel=1e-6)
        assert 1.0 < row["effective_rank"] <= w.rank + 1e-9


# ----------------------------------------------------------------------------- convert

def assert_same_tensors(x: dict, y: dict) -> None:
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


def test_convert_round_trip_is_bit_identical(tmp_path):
    src = tmp_path / "adapter"
    at.save(mixed_adapter(), src, format="peft")
    raw, back = tmp_path / "adapter.safetensors", tmp_path / "back"
    for args in ((src, raw, "--to", "safetensors"), (raw, back, "--to", "peft")):
        proc = run_cli("convert", *args, how="subprocess")
        assert proc.code == 0, proc.stderr
        assert proc.stderr == ""
        assert f"wrote {args[1]}" in proc.stdout
    assert_same_tensors(load_file(src / "adapter_model.safetensors"),
                        load_file(back / "adapter_model.safetensors"))
    assert (back / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()
    # the middle file is the kohya-style layout: A, B and alpha per tensor
    middle = load_file(raw)
    assert len(middle) == 3 * 6
    q = "model.layers.0.self_attn.q_proj"
    assert float(middle[q + ".alpha"]) == 8.0                # scale 2 * rank 4


def test_convert_json_reports_what_was_done(peft_dir, tmp_path):
    dst = tmp_path / "out.safetensors"
    result = json.loads(run_cli("convert", peft_dir, dst, "--to", "safetensors",
                                "--json", expect=0).stdout)
    assert result == {"src": str(peft_dir), "dst": str(dst), "from": "peft", "to": "safetensors",
                      "dtype": "keep", "adapted_tensors": 14, "replaced_tensors": 0}
    assert dst.is_file()


@pytest.mark.parametrize("to, factor_suffixes", [
    ("safetensors", (".lora_down.weight", ".lora_up.weight")),
    ("peft", (".lora_A.weight", ".lora_B.weight")),
])
def test_convert_dtype_bf16_casts_every_factor(to, factor_suffixes, peft_dir, tmp_path):
    original = make_adapter()
    dst = tmp_path / ("out.safetensors" if to == "safetensors" else "out")
    run_cli("convert", peft_dir, dst, "--to", to, "--dtype", "bf16", expect=0)
    tensors = load_file(dst if to == "safetensors" else dst / "adapter_model.safetensors")
    factors = {k: t for k, t in tensors.items() if k.endswith(factor_suffixes)}
    assert len(factors) == 2 * len(original.weights)
    assert {t.dtype for t in factors.values()} == {torch.bfloat16}
    back = at.load(dst)
    for name, w in original.weights.items():
        assert torch.equal(back.weights[name].a, w.a.to(torch.bfloat16))
        assert torch.equal(back.weights[name].b, w.b.to(torch.bfloat16))
        assert back.weights[name].scale == w.scale


# ----------------------------------------------------------------------------- demo

def test_demo_round_trip_is_bit_exact(tmp_path):
    proc = run_cli("demo", "--workdir", tmp_path / "demo", how="subprocess")
    assert proc.code == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "bit-exact" in proc.stdout + proc.stderr
    assert "MISMATCH" not in proc.stdout + proc.stderr
    assert (tmp_path / "demo" / "adapter_roundtrip" / "adapter_config.json").is_file()
