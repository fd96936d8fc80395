"""``adaptertools validate BASE ADAPTER... --merged MERGED`` and ``merge --validate``: plan the merge
the way ``merge`` does (same planner: names, GGUF layout, RoPE permutation, untying), then check
the merged checkpoint tensor by tensor (``merged.py``) and, with ``e2e``, end to end (``e2e.py``).
"""

from __future__ import annotations

from pathlib import Path

from .._io import require_exists, write_json
from ..paths import atomic_output
from ..errors import OptionError, UnsupportedError
from .merged import Settings, check_plan

REPORT_NAME = "validation.json"


def make_plan(base, adapters, *, weights=None, mode: str = "weighted", hub: dict | None = None,
              sources: list | None = None, scale: float | None = None,
              allow_modified_base: bool = False):
    """The plan ``merge`` would make (``--dtype keep``; a cast output is judged in its own
    dtype), with the local paths of the base and the adapters (Hub inputs fetched through
    ``hub``, their provenance appended to ``sources``)."""
    from ..inputs import adapter_inputs, open_inputs
    from ..merging.plan import plan_for

    paths, factors = adapter_inputs(adapters, weights, mode)
    local_base, checkpoint, local_paths, loaded = open_inputs(
        base, paths, hub or {}, [] if sources is None else sources, refusal="nothing to validate",
        scale=scale)
    plan = plan_for(checkpoint, loaded, [str(p) for p in paths], factors, mode=mode, dtype="keep",
                    allow_modified_base=allow_modified_base)
    return plan, local_base, local_paths


def check_output(plan, merged, *, settings: Settings | None = None, progress=None) -> dict:
    """Per-tensor report of the checkpoint at ``merged`` against ``plan``."""
    from ..merging.bases import open_base
    from ..merging.run import fold_mode

    settings = settings or Settings()

    merged = require_exists(merged)
    checkpoint = open_base(merged)
    if checkpoint.kind != plan.base.kind:
        raise UnsupportedError(f"{merged}: a {checkpoint.kind} model, but the base is "
                               f"{plan.base.kind}; pass the merge of this base")
    # one adapter into an HF base is merged in PEFT's order (merging/run.py fold_mode): the
    # floor then rounds the way PEFT does; the float64 reference is the same either way
    stacked = fold_mode(plan) == "stacked"
    report = check_plan(plan, checkpoint, stacked=stacked, settings=settings, progress=progress)
    report.update(merged=str(merged), base=str(getattr(plan.base, "folder", None) or
                                              plan.base.path),
                  adapters=list(plan.adapter_names), weights=list(plan.factors), mode=plan.mode)
    return report


def validate_merge(base, adapters, merged, *, weights=None, mode: str = "weighted",
                   e2e: bool = False, probes: int = 16, seed: int = 0,
                   tolerance_db: float = 1.0, progress=None, hub: dict | None = None,
                   scale: float | None = None, allow_modified_base: bool = False) -> dict:
    """Any input may be a Hub URI, fetched through ``hub`` (endpoint, token); their commits
    are reported under ``hub_inputs``. ``scale``: for bare factor files (``api.load``)."""
    from ..adapter_io import local_input_path

    if probes < 1:
        raise OptionError(f"--probes {probes}: give at least 1 probe vector")
    sources: list = []
    plan, base, adapters = make_plan(base, adapters, weights=weights, mode=mode, hub=hub,
                                     sources=sources, scale=scale,
                                     allow_modified_base=allow_modified_base)
    merged = local_input_path(merged, "base", hub or {}, sources, role="merged")
    report = check_output(plan, merged, settings=Settings(probes, seed, tolerance_db),
                          progress=progress)
    if e2e:
        from .e2e import end_to_end

        dtypes = {row["dtype"] for row in report["tensors"] if row.get("dtype")}
        report["e2e"] = end_to_end(base, adapters, merged, weights=list(plan.factors), mode=mode,
                                   kind=plan.base.kind, dtypes=dtypes)
        report["passed"] = report["passed"] and report["e2e"]["passed"]
    if sources:
        report["hub_inputs"] = sources
    return report


def report_path(out) -> Path:
    """``validation.json`` inside a merged folder; ``<out>.validation.json`` beside a file."""
    out = Path(out)
    return out / REPORT_NAME if out.is_dir() else out.with_name(f"{out.name}.{REPORT_NAME}")


def write_report(report: dict, out) -> Path:
    path = report_path(out)
    with atomic_output(path, force=True, is_dir=False) as tmp:
        write_json(tmp, report)
    return path


def summary(report: dict) -> dict:
    """What ``merge --validate`` puts in the merge report: the verdict and the failures."""
    keys = ("passed", "failed", "checked", "adapted", "untouched", "worst_margin_db",
            "tolerance_db", "probes", "seed", "wall_s")
    out = {k: report[k] for k in keys}
    out["failures"] = [{"name": r["name"], "problem": r["problem"]}
                       for r in report["tensors"] if not r["passed"]]
    return out
