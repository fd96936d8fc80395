"""``adaptertools demo``: a tiny base and adapter built in code, then every command run on them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from . import _ui
from .adapter import Adapter


def adapters_equal(x: Adapter, y: Adapter) -> bool:
    """Bit-exact equality of factors, scales, extras and replacements."""
    def same(s, t):
        return (s is None) == (t is None) and (s is None or (s.dtype == t.dtype and
                                                             torch.equal(s, t)))

    if x.weights.keys() != y.weights.keys() or x.replacements.keys() != y.replacements.keys():
        return False
    for name, w in x.weights.items():
        v = y.weights[name]
        if not (same(w.a, v.a) and same(w.b, v.b) and same(w.magnitude, v.magnitude)
                and same(w.bias, v.bias) and w.scale == v.scale and w.layer == v.layer
                and w.weight_shape == v.weight_shape):
            return False
    return all(same(t, y.replacements[n]) for n, t in x.replacements.items())


def run_demo(workdir: str | None = None) -> bool:
    from . import api
    from .tiny import TinyLlama, make_adapter, make_base

    with tempfile.TemporaryDirectory(prefix="adaptertools-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        spec = TinyLlama()
        base = make_base(root / "base", spec)
        adapter = make_adapter(spec, rank=8, alpha=16, base_model=str(base))
        peft_dir = root / "adapter_peft"
        api.save(adapter, peft_dir, format="peft", force=True)
        _ui.info(f"built a tiny Llama base in {base} and a rank-8 LoRA in {peft_dir}")

        _ui.inspect_report(api.inspect(peft_dir))
        raw = root / "adapter.safetensors"
        back = root / "adapter_roundtrip"
        _ui.convert_result(api.convert(peft_dir, raw, to="safetensors", force=True))
        _ui.convert_result(api.convert(raw, back, to="peft", force=True))
        ok = adapters_equal(api.load(peft_dir), api.load(back))
        (_ui.info if ok else _ui.error)(
            f"round trip PEFT -> safetensors -> PEFT: {'bit-exact' if ok else 'MISMATCH'}")
        if workdir:
            _ui.info(f"demo files kept in {root}")
        return ok
