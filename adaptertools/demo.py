"""``adaptertools demo``: a tiny base and adapter built in code, then every command run on them."""

from __future__ import annotations

import tempfile
from pathlib import Path

from . import _ui
from .adapter import first_difference


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
        gguf_file, gguf_back = root / "adapter.gguf", root / "adapter_from_gguf"
        _ui.convert_result(api.convert(peft_dir, gguf_file, to="gguf", base=base, force=True))
        _ui.convert_result(api.convert(gguf_file, gguf_back, to="peft", force=True))
        ok = True
        for label, folder in (("safetensors", back), ("GGUF", gguf_back)):
            difference = first_difference(api.load(peft_dir), api.load(folder))
            ok = ok and difference is None
            (_ui.info if difference is None else _ui.error)(
                f"round trip PEFT -> {label} -> PEFT: "
                f"{'bit-exact' if difference is None else 'MISMATCH: ' + difference}")
        ok = _demo_merge(root, base, peft_dir) and ok
        if workdir:
            _ui.info(f"demo files kept in {root}")
        return ok


def _demo_merge(root: Path, base: Path, peft_dir: Path) -> bool:
    """Merge the adapter into the base and check every tensor against the reference fold."""
    import torch
    from safetensors.torch import load_file

    from . import api
    from .kernels.reference import apply_lora

    merged_dir = root / "merged"
    report = api.merge(base, [peft_dir], merged_dir, force=True)
    _ui.merge_report(report, dry_run=False)
    adapter = api.load(peft_dir)
    before, after = load_file(base / "model.safetensors"), load_file(merged_dir / "model.safetensors")
    wrong = [name for name, tensor in before.items()
             if not torch.equal(after[name], apply_lora(tensor, adapter.weights[name]).to(tensor.dtype)
                                if name in adapter.weights else tensor)]
    (_ui.info if not wrong else _ui.error)(
        f"merge: {len(adapter.weights)} tensors folded, {len(before) - len(adapter.weights)} copied "
        f"byte for byte; {'all equal to the reference fold' if not wrong else 'MISMATCH in ' + wrong[0]}")
    # the validator, as `adaptertools validate BASE ADAPTER --merged OUT` runs it
    checked = api.validate(base, [peft_dir], merged_dir)
    (_ui.info if checked["passed"] else _ui.error)(
        f"validate: {checked['adapted']} adapted tensors within "
        f"{checked['tolerance_db']:g} dB of their floor (worst margin "
        f"{checked['worst_margin_db']:+.3f} dB), {checked['untouched']} untouched tensors "
        f"byte-identical: {'passed' if checked['passed'] else 'FAILED'}")
    return not wrong and checked["passed"]
