"""LyCORIS LoHa and LoKr modules (adaptertools/formats/lycoris.py) against lycoris-lora 4.1.3
itself, on CPU: its own LohaModule / LokrModule around Linear, Conv2d 3x3 and 1x1, Conv1d and
Conv3d layers (flat and CP/tucker forms, decompose_both, full w1/w2, alpha 0 and others), random
non-zero factors, its ``state_dict()`` read by ``module_delta`` and folded by the engine.

The reference is the weight LyCORIS's forward computes with (what the adapter was trained with):
our merge is bit-identical to it for every case. lycoris-lora 4.1.3's ``merge_to`` multiplies
LoHa/LoKr deltas by the scale twice (``get_weight`` applies it, ``get_diff_weight`` again), so
it equals ours bit for bit exactly when the scale is 1, and is pinned as ``W + scale * delta``
otherwise. Its own loader rebuilds the same weight, except a CP LoKr with a full w1, which it
cannot load at all (pinned). The end-to-end tests (a ``create_lycoris`` network on a tiny Llama,
``save_weights``, ``adaptertools.load`` / ``merge``) need the kohya reader (formats/kohya.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.lycoris_files import (
    CASES,
    LAYERS,
    forward_weight,
    llama_lycoris,
    make_module,
    merged_weight,
    reloaded,
    unet_lycoris,
)

from adaptertools.errors import FormatError, UnsupportedError
from adaptertools.formats.lycoris import LYCORIS_PARTS, claims, module_delta
from adaptertools.kernels import deltas
from adaptertools.kernels.deltas import LohaWeight, LokrWeight
from adaptertools.kernels.reference import Contribution, dora_rescale, merge_step

pytest.importorskip("lycoris")

GRID = [(layer, case) for layer in LAYERS for case in CASES]
U = 2.0 ** -24          # fp32 unit roundoff


def _ours(base, module):
    """(the delta module_delta reads from LyCORIS's state_dict, the engine's fold of it)."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    w = module_delta("lycoris_x", state, tuple(base.weight.shape))
    return w, merge_step(base.weight.detach(), Contribution(w))


def _refused(base, case) -> bool:
    """A DoRA module with ``wd_on_out=False`` on a conv with a kernel: its norm runs per input
    channel over (out, *kernel), no axis of the 2-D view: refused by name (test below)."""
    return case.endswith("-in") and math.prod(base.weight.shape[2:]) > 1


@pytest.mark.parametrize("layer,case", GRID, ids=[f"{a}-{b}" for a, b in GRID])
def test_fold_equals_lycoris_forward_weight(layer, case):
    base, module = make_module(layer, case)
    if _refused(base, case):
        with pytest.raises(UnsupportedError, match="wd_on_out=False"):
            _ours(base, module)
        return
    w, merged = _ours(base, module)
    assert isinstance(w, LohaWeight if case.startswith("loha") else LokrWeight)
    assert w.scale == module.scale                       # the trained alpha / r
    assert (w.magnitude is not None) == module.wd
    reference = forward_weight(module)
    assert merged.shape == reference.shape == base.weight.shape
    assert torch.equal(merged, reference), (merged - reference).abs().max()
    assert not torch.equal(merged, base.weight)          # the delta is not zero


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("case", ["loha-a1", "loha-cp", "lokr-cp", "lokr-both"])
def test_lycoris_forward_output_within_fp32_bound(layer, case):
    """LyCORIS's forward, ``op(x, W) + op(x, fl(W + D) - W)``, against ``op(x, M)`` with our
    merged M = fl(W + D). With K = in * prod(kernel) terms per output and u = 2^-24, each fp32
    op errs by at most gamma_K = K u / (1 - K u) times op(|x|, |weight|), the subtraction and
    the final add by u each: |difference| <= (2 gamma_K + 3u) op(|x|, |W| + |M| + |M - W|)."""
    base, module = make_module(layer, case)
    _, merged = _ours(base, module)
    module.apply_to()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, *((64,) if layer == "linear" else (16,) + (6,) * (base.weight.dim() - 2)),
                    generator=gen)
    with torch.no_grad():
        theirs = base(x)                                 # LyCORIS's forward (apply_to)
        ours = module.op(x, merged, None, **module.kw_dict)
        w0 = base.weight.detach()
        k = math.prod(w0.shape[1:])
        gamma = k * U / (1 - k * U)
        bound = (2 * gamma + 3 * U) * module.op(
            x.abs(), w0.abs() + merged.abs() + (merged - w0).abs(), None, **module.kw_dict)
    module.restore()
    err = (theirs - ours).abs()
    print(f"{layer} {case}: max abs error {err.max():.3e}, worst error / bound "
          f"{(err / bound).max():.3f}")
    assert bool((err <= bound).all())


SCALE_ONE = [c for c in CASES if c in ("loha-a0", "lokr-full", "lokr-rank1")]


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_merge_to(layer, case):
    """merge_to is bit-identical to ours where the scale is 1; elsewhere it is exactly
    ``W + (delta * scale)``: lycoris-lora 4.1.3 squares the scale in get_merged_weight."""
    base, module = make_module(layer, case)
    if _refused(base, case):
        return
    w, merged = _ours(base, module)
    theirs = merged_weight(base, module)
    if w.scale == 1.0:
        assert torch.equal(theirs, merged)
    else:
        assert case not in SCALE_ONE
        full = deltas.loha_delta(w) if isinstance(w, LohaWeight) else deltas.lokr_delta(w)
        squared = base.weight.detach() + full * w.scale
        if w.magnitude is not None:              # then weight_decompose, as ours
            squared = dora_rescale(squared.reshape(w.shape), w).reshape(squared.shape)
        assert torch.equal(theirs, squared)
        assert not torch.equal(theirs, merged)


@pytest.mark.parametrize("layer,case", GRID, ids=[f"{a}-{b}" for a, b in GRID])
def test_lycoris_own_loader(layer, case):
    """make_module_from_state_dict (what create_lycoris_from_weights runs per module) rebuilds
    the weight we read; a CP LoKr with a full w1 it cannot load (it takes lokr_w2_a's second
    axis, b, for the rank, builds a full-w2 module and has no lokr_w2_a to copy into), nor a
    DoRA module saved with wd_on_out=False."""
    base, module = make_module(layer, case)
    if _refused(base, case):
        return
    state = {k: v.detach() for k, v in module.state_dict().items()}
    _, merged = _ours(base, module)
    if "lokr_t2" in state and "lokr_w1" in state:
        with pytest.raises(AttributeError, match="lokr_w2_a"):
            reloaded(module, base, state)
        return
    if case.endswith("-in"):           # it builds wd_on_out=True and copies (1, in) into (out, 1)
        with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
            reloaded(module, base, state)
        return
    again = reloaded(module, base, state)
    assert torch.equal(forward_weight(again), merged)


@pytest.mark.parametrize("layer,case", [("conv3x3", "loha-cp"), ("linear", "lokr-both"),
                                        ("linear", "loha-dora"), ("conv1d", "lokr-cp-both"),
                                        ("conv1x1", "lokr-rs")])
def test_bf16_file_into_bf16_base(layer, case):
    """A file saved in bf16 (``save_weights(file, torch.bfloat16)``) merged into a bf16 base:
    LyCORIS's own loader takes the bf16 tensors into its fp32 module, whose forward weight on
    the upcast base, rounded once to bf16, is our merge bit for bit (the engine adds in fp32 and
    rounds once; LyCORIS's merge_to would instead compute the delta in the base's bf16)."""
    base, module = make_module(layer, case)
    state = {k: v.detach().to(torch.bfloat16) for k, v in module.state_dict().items()}
    with torch.no_grad():
        base.weight.copy_(base.weight.to(torch.bfloat16).float())
    base16 = base.weight.detach().to(torch.bfloat16)
    w = module_delta("lycoris_x", state, tuple(base16.shape))
    ours = merge_step(base16, Contribution(w))
    assert ours.dtype == torch.bfloat16
    theirs = forward_weight(reloaded(module, base, state)).to(torch.bfloat16)
    assert torch.equal(ours, theirs)


def test_parts_and_claims():
    assert {"hada_w1_a", "hada_t2", "lokr_w1_b", "lokr_t2", "alpha", "dora_scale"} <= \
        set(LYCORIS_PARTS)
    assert claims(["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"])
    assert claims(["lokr_w1", "lokr_w2"])
    assert not claims(["lora_down.weight", "lora_up.weight", "alpha"])      # LoCon: kohya's
    for layer in LAYERS:
        for case in CASES:
            _, module = make_module(layer, case)
            saved = set(module.state_dict())
            assert saved <= set(LYCORIS_PARTS) and claims(saved), (layer, case, saved)


def _one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_missing_hada_w2_b_is_named():
    base, module = make_module("linear", "loha-a1")
    state = {k: v.detach() for k, v in module.state_dict().items()}
    del state["hada_w2_b"]
    with pytest.raises(FormatError) as e:
        module_delta("lycoris_model_layers_0_mlp_up_proj", state, tuple(base.weight.shape))
    message = _one_line(e, "lycoris_model_layers_0_mlp_up_proj", "no hada_w2_b")
    print(message)


def _state(layer, case):
    base, module = make_module(layer, case)
    return base, {k: v.detach() for k, v in module.state_dict().items()}


def test_bad_modules_are_refused_by_name():
    base, state = _state("conv3x3", "loha-cp")
    shape = tuple(base.weight.shape)
    with pytest.raises(FormatError) as e:
        module_delta("m", {k: v for k, v in state.items() if k != "hada_t2"}, shape)
    _one_line(e, "m:", "hada_t2")
    with pytest.raises(FormatError) as e:                            # CP on a Linear weight
        module_delta("m", state, (32, 16))
    _one_line(e, "m:", "CP form", "Linear")
    with pytest.raises(FormatError) as e:                            # wrong base shape
        module_delta("m", state, (32, 8, 3, 3))
    _one_line(e, "m:", "hada_w1_b", "expected")
    with pytest.raises(FormatError) as e:
        module_delta("m", {**state, "scalar": torch.tensor(1.0)}, shape)
    _one_line(e, "m:", "scalar", "not a LyCORIS LoHa tensor")
    with pytest.raises(UnsupportedError) as e:                       # wd_on_out=False, 3x3
        module_delta("m", {**state, "dora_scale": torch.ones(1, 16, 1, 1)}, shape)
    _one_line(e, "m:", "dora_scale", "wd_on_out=False")
    with pytest.raises(FormatError) as e:
        module_delta("m", {**state, "dora_scale": torch.ones(32, 1)}, shape)
    _one_line(e, "m:", "dora_scale", "expected [32, 1, 1, 1]")
    base, lokr = _state("linear", "lokr-w2lr")
    with pytest.raises(FormatError) as e:
        module_delta("m", {**lokr, **state}, tuple(base.weight.shape))
    _one_line(e, "m:", "LoHa", "LoKr")
    with pytest.raises(FormatError) as e:
        module_delta("m", {k: v for k, v in lokr.items() if k != "lokr_w2_a"},
                     tuple(base.weight.shape))
    _one_line(e, "m:", "no lokr_w2_a")
    with pytest.raises(FormatError) as e:
        module_delta("m", {**lokr, "lokr_w2": torch.zeros(12, 16)}, tuple(base.weight.shape))
    _one_line(e, "m:", "lokr_w2", "either full or factorised")
    with pytest.raises(FormatError) as e:                            # w1 does not divide
        module_delta("m", lokr, (50, 64))
    _one_line(e, "m:", "lokr_w1", "does not divide")
    with pytest.raises(FormatError) as e:
        module_delta("m", {**lokr, "alpha": torch.ones(2)}, tuple(base.weight.shape))
    _one_line(e, "m:", "alpha")


def test_rs_lora_full_lokr_scale_is_not_in_the_file():
    """rs_lora makes a LoKr with both halves full train at scale sqrt(r) (alpha forced to r,
    divided by sqrt(r): LokrModule.__init__); the file has no rank to undo that with, and
    LyCORIS's own loader reads scale 1, as we do."""
    base, module = make_module("linear", "lokr-full-rs")
    state = {k: v.detach() for k, v in module.state_dict().items()}
    assert set(state) == {"alpha", "lokr_w1", "lokr_w2"} and module.scale == 2.0
    w, _ = _ours(base, module)
    assert w.scale == reloaded(module, base, state).scale == 1.0


def test_alpha_rules():
    """alpha missing or 0 -> rank (scale 1); both LoKr halves full -> scale 1 whatever alpha."""
    base, state = _state("linear", "loha-a1")
    shape = tuple(base.weight.shape)
    assert module_delta("m", state, shape).scale == 0.5
    assert module_delta("m", {k: v for k, v in state.items() if k != "alpha"}, shape).scale == 1.0
    assert module_delta("m", {**state, "alpha": torch.tensor(0.0)}, shape).scale == 1.0
    base, full = _state("linear", "lokr-full")
    assert set(full) == {"alpha", "lokr_w1", "lokr_w2"}
    assert module_delta("m", {**full, "alpha": torch.tensor(7.0)}, tuple(base.weight.shape)).scale \
        == 1.0


# -- end to end: create_lycoris on a tiny Llama, save_weights, adaptertools.load / merge ----------

def _kohya_built() -> bool:
    from adaptertools.formats import kohya

    return "Placeholder" not in (kohya.__doc__ or "")


needs_kohya = pytest.mark.skipif(not _kohya_built(), reason="formats/kohya.py (the reader of "
                                 "lycoris_ / lora_unet_ files) is still a placeholder")


def _merged_state(tmp_path, base, path):
    from safetensors.torch import load_file

    import adaptertools as at

    out = tmp_path / "out"
    at.merge(base, [path], out)
    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def _module_names(model) -> dict[str, str]:
    """LyCORIS's module name (``lycoris_`` + the dotted path with underscores) -> the base's."""
    return {f"lycoris_{name}".replace(".", "_"): name for name, _ in model.named_modules()}


@needs_kohya
@pytest.mark.parametrize("algo,dim,alpha,extra", [
    ("loha", 4, 2.0, {}), ("loha", 4, 4.0, {}),
    ("lokr", 4, 2.0, {"factor": 4}), ("lokr", 2, 1.0, {"factor": 4, "decompose_both": True}),
    ("lokr", 4, 3.0, {}),                             # full w1 and w2 here: scale 1
    ("loha", 2, 1.0, {"dora_wd": True}), ("lokr", 2, 2.0, {"factor": 4, "dora_wd": True}),
    ("lokr", 1, 0.5, {"factor": 4, "decompose_both": True, "dora_wd": True,
                      "wd_on_output": False}),
], ids=["loha", "loha-scale1", "lokr", "lokr-both", "lokr-full", "doha", "dokr", "dokr-in"])
def test_create_lycoris_file_merged_as_its_forward(tmp_path, algo, dim, alpha, extra):
    from safetensors.torch import load_file

    import adaptertools as at

    base, path, model, network = llama_lycoris(tmp_path, algo, dim=dim, alpha=alpha, **extra)
    keys = list(load_file(path))
    assert keys and all(k.startswith("lycoris_") for k in keys)
    adapter = at.load(path, base=base)
    names = _module_names(model)
    expected = {f"{names[lora.lora_name]}.weight": forward_weight(lora) for lora in network.loras}
    assert sorted(adapter.weights) == sorted(expected)
    merged = _merged_state(tmp_path, base, path)
    for name, weight in expected.items():
        assert torch.equal(merged[name], weight), name
    report = at.validate(base, [path], merged=tmp_path / "out")     # the validator agrees
    assert report["passed"] and report["adapted"] == len(expected), report
    original = {k: v for k, v in model.state_dict().items() if k not in expected}
    for name, tensor in original.items():
        if name in merged:
            assert torch.equal(merged[name], tensor), name
    network.restore()
    if all(lora.scale == 1.0 for lora in network.loras):      # merge_to agrees there
        network.merge_to(1.0)
        for name in expected:
            assert torch.equal(merged[name], model.state_dict()[name]), name


@needs_kohya
@pytest.mark.parametrize("algo,extra", [
    ("loha", {"linear_dim": 2, "linear_alpha": 1.0, "conv_dim": 2, "conv_alpha": 1.0,
              "use_tucker": True}),
    ("lokr", {"linear_dim": 2, "linear_alpha": 1.0, "conv_dim": 2, "conv_alpha": 4.0,
              "use_tucker": True, "factor": 4, "dora_wd": True}),
], ids=["loha-cp", "dokr-cp"])
def test_create_lycoris_on_a_diffusers_unet(tmp_path, algo, extra):
    """Every Linear and Conv2d (3x3 in the CP form, 1x1) of a tiny UNet2DConditionModel,
    merged into its component folder: each weight as LyCORIS's forward computes it."""
    from safetensors.torch import load_file

    folder, path, unet, network = unet_lycoris(tmp_path, algo, **extra)
    saved = {k.split(".", 1)[1] for k in load_file(path)}
    assert {"alpha", "hada_t1" if algo == "loha" else "lokr_t2"} <= saved     # CP cores
    names = _module_names(unet)
    kernels = {tuple(lora.org_module[0].weight.shape[2:]) for lora in network.loras}
    assert {(), (3, 3), (1, 1)} <= kernels
    merged = _merged_state(tmp_path, folder, path)
    for lora in network.loras:
        name = f"{names[lora.lora_name]}.weight"
        assert torch.equal(merged[name], forward_weight(lora)), name


@needs_kohya
def test_create_lycoris_locon_file_merged_as_merge_to(tmp_path):
    """LoCon is plain LoRA (the kohya reader's), scale applied once by LyCORIS too."""
    base, path, model, network = llama_lycoris(tmp_path, "locon", dim=4, alpha=2.0)
    names = _module_names(model)
    targets = [f"{names[lora.lora_name]}.weight" for lora in network.loras]
    merged = _merged_state(tmp_path, base, path)
    network.restore()
    network.merge_to(1.0)
    state = model.state_dict()
    for name in targets:
        assert torch.equal(merged[name], state[name]), name


@needs_kohya
def test_loha_file_missing_hada_w2_b(tmp_path):
    from safetensors.torch import load_file, save_file

    import adaptertools as at

    base, path, _, _ = llama_lycoris(tmp_path, "loha", dim=2, alpha=1.0)
    state = load_file(path)
    gone = next(k for k in sorted(state) if k.endswith(".hada_w2_b"))
    del state[gone]
    save_file(state, path)
    with pytest.raises(FormatError) as e:
        at.load(path, base=base)
    print(_one_line(e, str(path), gone.rsplit(".", 1)[0], "no hada_w2_b"))
