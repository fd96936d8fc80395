"""LoHa and LoKr reference deltas (kernels/deltas.py) against PEFT 0.21.2's own.

Tiny models built in code (Linear, Conv2d k=3 and 1x1, grouped Conv2d, Conv1d k=3 and k=1) are
wrapped with LoHaConfig / LoKrConfig over ranks, alphas, rank/alpha patterns,
``use_effective_conv2d``, ``decompose_both`` and ``decompose_factor``; every adapter tensor is set
to seeded random values (PEFT zeroes one factor). For every adapted layer, in every case:

  * ``loha_delta`` / ``lokr_delta`` are BIT-IDENTICAL to ``get_delta_weight("default")`` (the
    same operations in the same order: every case here is bit-identical, none needs a tolerance);
  * ``base + delta`` is bit-identical to the weight ``merge_and_unload()`` leaves;
  * the scale comes from the config by ``peft_scale`` (not read back from the layer);
  * ``loha_norm`` (Gram and dense) and ``lokr_norm`` are within 1e-5 relative of
    ``torch.linalg.norm`` of PEFT's dense delta; the delta's rank is at most ``rank_bound``.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, get_peft_model
from peft.tuners.lycoris_utils import LycorisLayer

from adaptertools.kernels.deltas import (
    LOHA,
    LOKR,
    LohaWeight,
    LokrWeight,
    is_low_rank,
    kind_of,
    loha_delta,
    loha_norm,
    loha_weight,
    lokr_delta,
    lokr_norm,
    lokr_weight,
    peft_scale,
    rank_bound,
)

TARGETS = ["lin", "sq", "c2", "pw2", "g2", "c1", "pw1"]


class Tiny(torch.nn.Module):
    """One of each layer PEFT's LoHa/LoKr adapt; the forward is never run."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 48)                      # LoKr split (6, 8) x (8, 8)
        self.sq = torch.nn.Linear(36, 36)
        self.c2 = torch.nn.Conv2d(16, 32, 3)                    # weight (32, 16, 3, 3)
        self.pw2 = torch.nn.Conv2d(32, 24, 1)                   # 1x1: never the CP form
        self.g2 = torch.nn.Conv2d(16, 16, 3, groups=2)          # weight (16, 8, 3, 3)
        self.c1 = torch.nn.Conv1d(24, 16, 3)                    # weight (16, 24, 3)
        self.pw1 = torch.nn.Conv1d(16, 8, 1)                    # k=1: never the CP form


LOHA_CASES = {
    "r1-flat": {"r": 1, "alpha": 1},
    "r1-cp": {"r": 1, "alpha": 2, "use_effective_conv2d": True},
    "r2-cp": {"r": 2, "alpha": 4, "use_effective_conv2d": True},
    "r4-cp-alpha2.5": {"r": 4, "alpha": 2.5, "use_effective_conv2d": True},
    "r3-flat-patterns": {"r": 3, "alpha": 8, "rank_pattern": {"lin": 5, "c1": 1},
                         "alpha_pattern": {"c2": 7, "pw1": 0.5}},
    "r2-cp-patterns": {"r": 2, "alpha": 1, "use_effective_conv2d": True,
                       "rank_pattern": {"c2": 3}, "alpha_pattern": {"c1": 3}},
}
LOKR_CASES = {
    "r2": {"r": 2, "alpha": 4},
    "r2-cp-both": {"r": 2, "alpha": 3, "use_effective_conv2d": True, "decompose_both": True},
    "r8-full": {"r": 8, "alpha": 2},                # w1 and w2 full, scale still alpha/r
    # c1 (a rank-1 CP Conv1d) makes PEFT itself raise: test_lokr_conv1d_cp_rank1_peft_raises
    "r1-cp-both-f4": {"r": 1, "alpha": 1, "use_effective_conv2d": True, "decompose_both": True,
                      "decompose_factor": 4, "exclude_modules": ["c1"]},
    "r4-cp-f8": {"r": 4, "alpha": 16, "use_effective_conv2d": True, "decompose_factor": 8},
    # factor 16 makes a > b: a low-rank w1 next to a full w2
    "r3-both-f16": {"r": 3, "alpha": 5, "decompose_both": True, "decompose_factor": 16},
    "r2-cp-both-f16": {"r": 2, "alpha": 6, "use_effective_conv2d": True, "decompose_both": True,
                       "decompose_factor": 16},
    "r2-both-patterns": {"r": 2, "alpha": 2, "decompose_both": True,
                         "rank_pattern": {"lin": 1, "c1": 1, "g2": 1, "sq": 8},
                         "alpha_pattern": {"c2": 7, "c1": 0.25}},
}


def _config(kind: str, options: dict):
    cls = LoHaConfig if kind == "loha" else LoKrConfig
    return cls(**{"target_modules": TARGETS, "rank_dropout": 0.0, **options})


def adapted(kind: str, name: str, options: dict | None = None):
    """(peft model, config, {layer: base weight}) with every adapter tensor seeded random."""
    torch.manual_seed(0)
    model = Tiny()
    base = {n: getattr(model, n).weight.detach().clone() for n in TARGETS}
    config = _config(kind, options or (LOHA_CASES if kind == "loha" else LOKR_CASES)[name])
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(sum(map(ord, kind + name)))
    with torch.no_grad():
        for pname, p in sorted(peft_model.named_parameters()):
            if "hada_" in pname or "lokr_" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return peft_model, config, base


def layers(peft_model) -> dict[str, LycorisLayer]:
    return {n.rsplit(".", 1)[-1]: m for n, m in peft_model.named_modules()
            if isinstance(m, LycorisLayer)}


def reference_weight(kind: str, layer: LycorisLayer, config, name: str):
    """Our weight from the layer's tensors and the scale from the CONFIG (PEFT's rule)."""
    tensors = {t: getattr(layer, t)["default"].detach() for t in layer.adapter_layer_names
               if "default" in getattr(layer, t)}
    r = config.rank_pattern.get(name, config.r)
    alpha = config.alpha_pattern.get(name, config.alpha)
    make = loha_weight if kind == "loha" else lokr_weight
    return make(tensors, scale=peft_scale(alpha, r),
                weight_shape=tuple(layer.get_base_layer().weight.shape))


def delta(w: LohaWeight | LokrWeight, factor: float = 1.0,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (loha_delta if isinstance(w, LohaWeight) else lokr_delta)(w, dtype, factor)


def form(w: LohaWeight | LokrWeight, layer_name: str) -> tuple[str, ...]:
    if isinstance(w, LohaWeight):
        return layer_name, "cp" if w.t1 is not None else "flat"
    w1 = "full" if w.w1 is not None else "lowrank"
    w2 = "full" if w.w2 is not None else "cp" if w.t2 is not None else "lowrank"
    return layer_name, w1, w2


ALL_CASES = [("loha", n) for n in LOHA_CASES] + [("lokr", n) for n in LOKR_CASES]


@pytest.mark.parametrize("kind,name", ALL_CASES)
def test_delta_bit_identical_to_peft_and_merge(kind, name):
    peft_model, config, base = adapted(kind, name)
    want = {}
    with torch.no_grad():
        for lname, layer in layers(peft_model).items():
            w = reference_weight(kind, layer, config, lname)
            assert layer.scaling["default"] == w.scale
            got, peft_delta = delta(w), layer.get_delta_weight("default")
            assert got.shape == base[lname].shape
            assert got.dtype == peft_delta.dtype
            assert torch.equal(got, peft_delta), (lname, form(w, lname))
            want[lname] = base[lname] + got
        merged = peft_model.merge_and_unload()
    assert sorted(want) == sorted(set(TARGETS) - set(config.exclude_modules or ()))
    for lname, weight in want.items():
        assert torch.equal(getattr(merged, lname).weight, weight), lname


@pytest.mark.parametrize("kind,name", ALL_CASES)
def test_norms_and_rank_bound(kind, name):
    peft_model, config, _ = adapted(kind, name)
    with torch.no_grad():
        for lname, layer in layers(peft_model).items():
            w = reference_weight(kind, layer, config, lname)
            dense = layer.get_delta_weight("default")
            want = float(torch.linalg.norm(dense))
            if kind == "loha":
                norms = {m: loha_norm(w, method=m) for m in ("gram", "dense", "auto")}
            else:
                norms = {"kron": lokr_norm(w)}
            for method, got in norms.items():
                assert math.isclose(got, want, rel_tol=1e-5), (lname, method, got, want)
            # the rank of the delta computed in fp64 (fp32 rounding noise has full rank)
            flat = delta(w, dtype=torch.float64).reshape(dense.shape[0], -1)
            assert int(torch.linalg.matrix_rank(flat)) <= rank_bound(w), (lname, form(w, lname))


def test_cases_cover_every_form():
    """The parametrisation reaches every tensor layout PEFT can store, and the 1x1 / k=1 convs
    never get the CP form even when ``use_effective_conv2d`` asks for it."""
    seen = set()
    for kind, name in ALL_CASES:
        peft_model, config, _ = adapted(kind, name)
        for lname, layer in layers(peft_model).items():
            seen.add((kind, *form(reference_weight(kind, layer, config, lname), lname)))
    kinds = {"lin": "linear", "sq": "linear", "c2": "conv2d", "g2": "conv2d", "pw2": "1x1",
             "c1": "conv1d", "pw1": "1x1"}
    loha = {(kinds[f[1]], f[2]) for f in seen if f[0] == "loha"}
    assert loha == {("linear", "flat"), ("conv2d", "flat"), ("conv2d", "cp"), ("conv1d", "flat"),
                    ("conv1d", "cp"), ("1x1", "flat")}
    lokr = {(kinds[f[1]], f[2], f[3]) for f in seen if f[0] == "lokr"}
    for layer_kind in ("linear", "conv2d", "conv1d", "1x1"):
        for w1 in ("full", "lowrank"):
            for w2 in ("full", "lowrank"):
                assert (layer_kind, w1, w2) in lokr, (layer_kind, w1, w2)
    for layer_kind in ("conv2d", "conv1d"):
        assert {(layer_kind, "full", "cp"), (layer_kind, "lowrank", "cp")} <= lokr
    assert not {f for f in lokr if f[0] in ("linear", "1x1") and f[2] == "cp"}


def test_lokr_full_matrices_keep_alpha_over_r():
    """PEFT's rule, not LyCORIS's (which uses scale 1 when w1 and w2 are both full)."""
    peft_model, config, _ = adapted("lokr", "r8-full")
    layer = layers(peft_model)["lin"]
    w = reference_weight("lokr", layer, config, "lin")
    assert w.w1 is not None and w.w2 is not None
    assert layer.scaling["default"] == 2 / 8 and w.scale == 0.25


def test_lokr_conv1d_full_w2_uses_peft_layout():
    """PEFT's make_kron only unsqueezes w1 for a 4-D w2: a Conv1d's full (b, d, k) w2 gives a
    permutation of the Kronecker layout LyCORIS writes (w1 unsqueezed at the end)."""
    peft_model, config, _ = adapted("lokr", "r8-full")
    layer = layers(peft_model)["c1"]
    w = reference_weight("lokr", layer, config, "c1")
    assert w.w1 is not None and w.w2 is not None and w.w2.dim() == 3
    with torch.no_grad():
        peft_delta = layer.get_delta_weight("default")
        lycoris = (torch.kron(w.w1[:, :, None], w.w2) * w.scale).reshape(peft_delta.shape)
    assert torch.equal(lokr_delta(w), peft_delta)
    assert not torch.allclose(lycoris, peft_delta)
    assert torch.equal(lycoris.flatten().sort().values, peft_delta.flatten().sort().values)


@pytest.mark.parametrize("kind,name", [("loha", "r2-cp"), ("lokr", "r2-cp-both")])
def test_factor_scales_delta_and_norm(kind, name):
    peft_model, config, _ = adapted(kind, name)
    for lname, layer in layers(peft_model).items():
        w = reference_weight(kind, layer, config, lname)
        torch.testing.assert_close(delta(w, factor=-0.7), -0.7 * delta(w), rtol=1e-6, atol=0)
        norm = loha_norm if kind == "loha" else lokr_norm
        assert math.isclose(norm(w, -0.7), 0.7 * norm(w), rel_tol=1e-12)


def test_kinds():
    assert not LOHA.exactly_low_rank and not LOKR.exactly_low_rank
    peft_model, config, _ = adapted("loha", "r1-flat")
    w = reference_weight("loha", layers(peft_model)["lin"], config, "lin")
    assert kind_of(w) is LOHA and not is_low_rank(w) and rank_bound(w) == 1
    peft_model, config, _ = adapted("lokr", "r2")
    w = reference_weight("lokr", layers(peft_model)["lin"], config, "lin")
    assert kind_of(w) is LOKR and not is_low_rank(w)
    assert rank_bound(w) == 6 * 2          # full w1 (6, 8) times a rank-2 w2 (8, 8)


def test_lokr_conv1d_cp_rank1_peft_raises():
    """A rank-1 LoKr on a Conv1d in the CP form: PEFT 0.21.2's get_delta_weight (so its forward
    and merge too) raises in torch.kron on the einsum's strides (pytorch/pytorch#54135). The
    reference computes it; it is bit-identical to PEFT's own make_weight_cp and make_kron with
    w2 given row-major strides, and to base + delta."""
    from peft.tuners.lokr.layer import make_kron, make_weight_cp

    options = {"r": 1, "alpha": 3, "use_effective_conv2d": True, "target_modules": ["c1"]}
    peft_model, config, base = adapted("lokr", "conv1d-cp-r1", options)
    layer = layers(peft_model)["c1"]
    w = reference_weight("lokr", layer, config, "c1")
    assert w.t2 is not None and w.t2.shape == (1, 1, 3, 1)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="view size is not compatible"):
            layer.get_delta_weight("default")
        w2 = make_weight_cp(w.t2, w.w2_a, w.w2_b).clone(memory_format=torch.contiguous_format)
        want = make_kron(w.w1, w2, layer.scaling["default"]).reshape(base["c1"].shape)
    assert torch.equal(lokr_delta(w), want)
    assert math.isclose(lokr_norm(w), float(torch.linalg.norm(want)), rel_tol=1e-5)
