"""Property tests: random adapters survive every format that can express them, bit for bit."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adaptertools as at
from adaptertools.adapter import Adapter, LoraWeight, first_difference
from adaptertools.errors import UnsupportedError
from adaptertools.formats.peft import FAN_IN_LAYERS, alpha_for, scale_of
from adaptertools.inspection import delta_singular_values
from adaptertools.kernels.reference import lora_delta

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
scales = st.one_of(
    st.floats(min_value=1e-4, max_value=1e4, allow_nan=False, allow_infinity=False),
    st.builds(lambda alpha, r: alpha / r, st.integers(1, 128), st.integers(1, 64)),
    st.builds(lambda alpha, r: alpha / math.sqrt(r), st.integers(1, 128), st.integers(1, 64)),
)


@st.composite
def lora_weights(draw, *, dora: bool, bias: bool, kinds) -> LoraWeight:
    kind = draw(st.sampled_from(kinds))
    rank = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    weight_shape = None
    if kind == "conv":
        kernel = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
        rows, cin = draw(st.integers(1, 9)), draw(st.integers(1, 4))
        weight_shape = (rows, cin, *kernel)
        cols = cin * math.prod(kernel)
    else:
        rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    w = LoraWeight(a=torch.randn(rank, cols, generator=gen).to(dtype),
                   b=torch.randn(rows, rank, generator=gen).to(dtype),
                   scale=draw(scales), layer=kind, weight_shape=weight_shape)
    outputs = w.outputs
    return LoraWeight(a=w.a, b=w.b, scale=w.scale, layer=kind, weight_shape=weight_shape,
                      magnitude=torch.rand(outputs, generator=gen).to(dtype) + 0.5 if dora else None,
                      bias=torch.randn(outputs, generator=gen).to(dtype) if bias else None)


@st.composite
def adapters(draw, *, peft_expressible: bool = False) -> Adapter:
    """Random adapters; with ``peft_expressible`` the config-wide PEFT switches are uniform."""
    dora, bias = draw(st.booleans()), draw(st.booleans())
    if peft_expressible:
        kinds = draw(st.sampled_from([("linear", "conv"), ("conv1d",)]))
        if bias:
            dora = False  # PEFT refuses lora_bias together with DoRA
    else:
        kinds = ("linear", "embedding", "conv1d", "conv")
    count = draw(st.integers(1, 4))
    weights = {}
    for i in range(count):
        per_tensor_dora = dora if peft_expressible else draw(st.booleans())
        per_tensor_bias = bias if peft_expressible else draw(st.booleans())
        weights[f"model.layers.{i}.mod{i}.weight"] = draw(
            lora_weights(dora=per_tensor_dora, bias=per_tensor_bias, kinds=kinds))
    replacements = {f"extra{j}.weight": torch.randn(3, 2).to(draw(st.sampled_from(DTYPES)))
                    for j in range(draw(st.integers(0, 2)))}
    base_model = draw(st.one_of(st.none(), st.text("abcdefgh/-_", min_size=1, max_size=12)))
    metadata = draw(st.dictionaries(st.text("xyz", min_size=1, max_size=3),
                                    st.one_of(st.integers(), st.text(max_size=5)), max_size=2))
    return Adapter(weights=weights, replacements=replacements, base_model=base_model,
                   metadata=metadata)


SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(adapter=adapters())
def test_safetensors_round_trip_is_bit_exact(adapter):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.safetensors"
        at.save(adapter, path, format="safetensors")
        back = at.load(path)
    assert first_difference(adapter, back) is None
    assert back.base_model == adapter.base_model and back.metadata == adapter.metadata


@SETTINGS
@given(adapter=adapters(peft_expressible=True))
def test_peft_round_trip_is_bit_exact(adapter):
    with tempfile.TemporaryDirectory() as tmp:
        at.save(adapter, Path(tmp) / "peft", format="peft")
        back = at.load(Path(tmp) / "peft")
        at.convert(Path(tmp) / "peft", Path(tmp) / "a.safetensors", to="safetensors")
        at.convert(Path(tmp) / "a.safetensors", Path(tmp) / "peft2", to="peft")
        again = at.load(Path(tmp) / "peft2")
    # PEFT stores alpha, not the scale: where no float64 alpha gives alpha / r == scale exactly,
    # the scale comes back within one ulp (2^-52 relative, far below any weight dtype)
    for name, w in adapter.weights.items():
        assert abs(back.weights[name].scale - w.scale) <= math.ulp(w.scale), name
    exact_scales = {n: dataclasses.replace(w, scale=back.weights[n].scale)
                    for n, w in adapter.weights.items()}
    assert first_difference(dataclasses.replace(adapter, weights=exact_scales), back) is None
    # once in PEFT's terms, every further round trip is bit-exact
    assert first_difference(back, again) is None
    assert back.metadata["peft_config"] == again.metadata["peft_config"]


@SETTINGS
@given(adapter=adapters())
def test_peft_refuses_mixed_switches_and_writes_nothing(adapter):
    has = [(w.magnitude is not None, w.bias is not None) for w in adapter.weights.values()]
    # fan_in_fan_out is one switch for Linear and Conv1D layers (PEFT's Embedding and Conv
    # ignore it): an embedding LoRA beside Conv1D ones is what PEFT writes for GPT-2
    fan_in = {w.layer == "conv1d" for w in adapter.weights.values() if w.layer in FAN_IN_LAYERS}
    mixed = any(len({h[i] for h in has}) > 1 for i in range(2)) or len(fan_in) > 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peft"
        if mixed:
            with pytest.raises(UnsupportedError, match="one switch for the whole adapter"):
                at.save(adapter, out, format="peft")
            assert list(Path(tmp).iterdir()) == []
        else:
            at.save(adapter, out, format="peft")
            assert (out / "adapter_config.json").is_file()


@settings(max_examples=300, deadline=None)
@given(scale=scales, rank=st.integers(1, 512), rslora=st.booleans())
def test_alpha_for_reproduces_scale(scale, rank, rslora):
    """The alpha we write makes PEFT's alpha / r (or / sqrt(r)) give back the scale exactly,
    or, where float64 has no such alpha, within one ulp."""
    got = scale_of(alpha_for(scale, rank, rslora), rank, rslora)
    assert got == scale or abs(got - scale) <= math.ulp(scale)


@SETTINGS
@given(w=lora_weights(dora=False, bias=False, kinds=("linear",)))
def test_spectrum_from_factors_matches_formed_delta(w):
    """inspect's norms and effective ranks come from QR cores; check against the full delta."""
    expected = torch.linalg.svdvals(lora_delta(w, torch.float64))
    got = delta_singular_values(w)
    k = min(len(expected), len(got))
    torch.testing.assert_close(got[:k], expected[:k], rtol=1e-9, atol=1e-12 * float(expected[0] + 1))
    assert torch.all(expected[k:] <= 1e-9 * float(expected[0] + 1))
