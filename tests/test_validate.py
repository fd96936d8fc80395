"""`validate ADAPTER --against OTHER`: same delta per tensor, from the factors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adaptertools as at
from adaptertools.adapter import LoraWeight
from adaptertools.api import validate_against
from adaptertools.tiny import TinyLlama, make_adapter, make_base
from adaptertools.validation.adapters import delta_difference, delta_norm

from helpers.cli import run_cli


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 20), r1=st.integers(1, 6),
       r2=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), close=st.booleans())
def test_factor_route_equals_formed_difference(rows, cols, r1, r2, seed, close):
    gen = torch.Generator().manual_seed(seed)
    w = LoraWeight(a=torch.randn(r1, cols, generator=gen), b=torch.randn(rows, r1, generator=gen),
                   scale=1.5)
    if close:   # the case that matters: a nearly equal copy (cancellation)
        v = dataclasses.replace(w, b=w.b * (1 + 1e-6 * torch.randn(rows, r1, generator=gen)))
    else:
        v = LoraWeight(a=torch.randn(r2, cols, generator=gen),
                       b=torch.randn(rows, r2, generator=gen), scale=0.5)
    formed = lambda x: x.scale * x.b.double() @ x.a.double()          # noqa: E731
    expected = float(torch.linalg.matrix_norm(formed(w) - formed(v)))
    assert delta_difference(w, v) == pytest.approx(expected, rel=1e-9, abs=1e-13)
    assert delta_norm(w) == pytest.approx(float(torch.linalg.matrix_norm(formed(w))), rel=1e-12)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    spec = TinyLlama()
    base = make_base(root / "base", spec)
    at.save(make_adapter(spec, rank=4, alpha=8), root / "peft", format="peft")
    at.convert(root / "peft", root / "a.gguf", to="gguf", base=base)
    at.convert(root / "peft", root / "bf16.safetensors", to="safetensors", dtype="bf16")
    return root


def test_conversion_validates_exactly(converted):
    report = validate_against(converted / "peft", converted / "a.gguf")
    assert report["passed"] and report["failed"] == 0
    assert len(report["tensors"]) == 14
    assert all(row["relative_error"] == 0.0 for row in report["tensors"])


def test_dtype_change_validates_within_its_rounding(converted):
    report = validate_against(converted / "peft", converted / "bf16.safetensors")
    assert report["passed"]
    errors = [row["relative_error"] for row in report["tensors"]]
    assert all(0 < e <= 2.01 * 2 ** -8 + 1e-12 for e in errors)
    assert all(row["tolerance"] == pytest.approx(2.01 * 2 ** -8, rel=1e-6)
               for row in report["tensors"])


def test_a_changed_tensor_fails_and_is_named(converted, tmp_path):
    adapter = at.load(converted / "peft")
    name = "model.layers.1.mlp.up_proj.weight"
    w = adapter.weights[name]
    b = w.b.clone()
    b[0, 0] *= 1.001                  # one element, a thousandth: far above fp32 rounding
    adapter.weights[name] = dataclasses.replace(w, b=b)
    del adapter.weights["model.layers.0.self_attn.q_proj.weight"]
    at.save(adapter, tmp_path / "changed.safetensors", format="safetensors")
    report = validate_against(converted / "peft", tmp_path / "changed.safetensors")
    assert not report["passed"] and report["failed"] == 2
    failed = {row["name"]: row for row in report["tensors"] if not row["passed"]}
    assert failed[name]["problem"] == "delta differs" and failed[name]["relative_error"] > 1e-6
    assert "only in" in failed["model.layers.0.self_attn.q_proj.weight"]["problem"]
    assert report["tensors"][0]["passed"] is False           # failures first
    outcome = run_cli("validate", converted / "peft", "--against",
                      tmp_path / "changed.safetensors", "--json")
    assert outcome.code == 1
    assert json.loads(outcome.stdout)["failed"] == 2
    text = run_cli("validate", converted / "peft", "--against",
                   tmp_path / "changed.safetensors")
    assert text.code == 1 and name in text.stdout and "2 of 14 tensors differ" in text.stderr


def test_cli_passes_with_exit_0(converted):
    outcome = run_cli("validate", converted / "a.gguf", "--against", converted / "peft")
    assert outcome.code == 0 and "same delta" in outcome.stderr
