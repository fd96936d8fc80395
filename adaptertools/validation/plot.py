"""``validate ... --plot FILE.png``: per-layer SQNR of every adapted tensor against its floor."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from ..paths import atomic_output
from ..errors import UnsupportedError

LAYER = re.compile(r"(?:layers|blk|h|layer|block|blocks)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


def module_of(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj``; GGUF ``blk.3.attn_q.weight`` -> ``attn_q``."""
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 else name


def plot_report(report: dict, path) -> Path:
    """Draw the report's adapted tensors: x the block index (tensors outside blocks at -1), y the
    SQNR in dB; hollow markers the floor of each tensor, filled ones the merged tensor, red when
    it failed. Written atomically as PNG."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UnsupportedError("--plot needs matplotlib: pip install 'adaptertools[plot]'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["tensors"] if r.get("floor_db") is not None]
    modules = sorted({module_of(r["name"]) for r in rows})
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    for i, module in enumerate(modules):
        mine = [r for r in rows if module_of(r["name"]) == module]
        xs = [(layer_of(r["name"]) if layer_of(r["name"]) is not None else -1) + 0.08 * i
              for r in mine]
        color = f"C{i % 10}"
        ax.scatter(xs, [r["floor_db"] for r in mine], facecolors="none", edgecolors=color, s=40)
        ax.scatter(xs, [r["sqnr_db"] if r["sqnr_db"] is not None else r["floor_db"] for r in mine],
                   color=[color if r["passed"] else "red" for r in mine], s=12, label=module)
    failed = sum(not r["passed"] for r in report["tensors"])
    ax.set_xlabel("layer (block index; -1: outside the blocks)")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(f"{Path(str(report.get('merged', ''))).name}: merged SQNR (dots) vs its dtype's "
                 f"floor (circles); {'all pass' if not failed else f'{failed} FAILED (red)'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path, force=True, is_dir=False) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
