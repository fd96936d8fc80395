"""Merging into diffusers folders: a pipeline folder, or one component's folder.

A pipeline folder (``DiffusionPipeline.save_pretrained``) holds ``model_index.json`` naming each
component as ``[library, class]`` and one subfolder per component: ``unet/`` or
``transformer/`` (config.json + diffusion_pytorch_model.safetensors), ``text_encoder/``
(config.json + model.safetensors), ``vae/``, ``scheduler/``, ``tokenizer/``... Each model
folder is an HF folder the streaming engine already merges into (``bases.open_base``).

An adapter read from a multi-component file keys its tensors ``<component>.<name inside that
component>`` (formats/diffusers.py, formats/kohya.py). ``merge_pipeline`` splits it by
component (``split_by_component``), merges each targeted component with the HF engine into its
subfolder of a temporary folder beside OUT, copies every other file and folder byte for byte,
and renames the whole onto OUT (paths.atomic_output): OUT appears complete or not at all.
``for_component`` (formats/diffusers.py, used by inputs.open_inputs for merge and validate)
strips the prefix when the base is one component's own folder (``unet/``); ``align_names``
bridges a module prefix one library version dropped (CLIPTextModel's ``text_model.`` in
transformers 5) between a LoRA's names and a checkpoint's.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from .._io import read_json
from ..adapter import Adapter
from ..errors import FormatError, OptionError, UnsupportedError
from ..formats.diffusers import (
    COMPONENTS,
    align_names,
    for_component,
    split_by_component,
)
from ..paths import atomic_output, contained_file

INDEX_NAME = "model_index.json"
__all__ = ["COMPONENTS", "align_names", "components", "for_component", "is_pipeline",
           "merge_pipeline", "split_by_component", "validate_pipeline"]


def is_pipeline(path) -> bool:
    """Is ``path`` a local diffusers pipeline folder (it holds model_index.json)?"""
    if not isinstance(path, (str, os.PathLike)) or os.fspath(path).startswith("hf://"):
        return False
    return (Path(path) / INDEX_NAME).is_file()


def components(folder: str | os.PathLike) -> dict[str, Path]:
    """The components model_index.json names (``"unet": ["diffusers", "UNet2DConditionModel"]``)
    whose subfolder exists, by name; entries starting with ``_`` and ``[null, null]`` (a
    component left out) are not components."""
    folder = Path(folder)
    index = read_json(contained_file(folder, INDEX_NAME))
    found = {}
    for name, value in index.items():
        if name.startswith("_") or not (isinstance(value, list) and len(value) == 2):
            continue
        if value[1] is None:
            continue
        sub = contained_file(folder, name)
        if sub.is_dir():
            found[name] = sub
    return found


# ----------------------------------------------------------------------------- pipeline merge

def _copy_into(folder: Path, rel: str, dst: Path) -> int:
    """Copy ``folder / rel`` (a file or a whole subfolder) to ``dst / rel``, byte for byte,
    links followed only where they stay inside ``folder`` (paths.contained_file); the count of
    files copied."""
    src = contained_file(folder, rel)
    if src.is_file():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst / rel)
        shutil.copystat(src, dst / rel)
        return 1
    count = 0
    for path in sorted(src.rglob("*")):
        inner = path.relative_to(folder).as_posix()
        if path.is_file() or (path.is_symlink() and contained_file(folder, inner).is_file()):
            count += _copy_into(folder, inner, dst)
    return count


def _missing(names: list[str], splits: list[dict], parts: dict, base) -> None:
    for name, split in zip(names, splits):
        absent = sorted(set(split) - set(parts))
        if absent:
            first = split[absent[0]]
            example = next(iter(first.weights), None) or next(iter(first.replacements))
            folders = ", ".join(a + "/" for a in absent)
            raise UnsupportedError(f"{name}: has LoRA tensors for {', '.join(absent)} (e.g. "
                                   f"{absent[0]}.{example}), but {base} has no {folders} "
                                   f"component{'s' if len(absent) > 1 else ''} "
                                   "(model_index.json lists "
                                   f"{', '.join(sorted(parts)) or 'none'}); merge into the "
                                   "pipeline the LoRA was trained for")


def plan_pipeline(base: Path, loaded: list[Adapter], names: list[str], factors: list[float], *,
                  mode: str, dtype: str, requantize: str, max_shard_size, allow_modified_base
                  ) -> dict:
    """{component: plan} for every component some adapter targets."""
    from ..inputs import make_plan

    parts = components(base)
    splits = [split_by_component(a, where=n) for a, n in zip(loaded, names)]
    _missing(names, splits, parts, base)
    plans = {}
    for component, folder in parts.items():
        chosen = [i for i, split in enumerate(splits) if component in split]
        if not chosen:
            continue
        checkpoint, left_out = _open_component(folder)
        if checkpoint.kind != "safetensors":
            raise UnsupportedError(f"{folder}: not a safetensors model folder; convert the "
                                   "pipeline to safetensors first")
        entries = checkpoint.entries()
        plan = make_plan(
            checkpoint, [align_names(splits[i][component], entries) for i in chosen],
            [f"{names[i]} ({component})" for i in chosen], [factors[i] for i in chosen],
            mode=mode, dtype=dtype, requantize=requantize, quantize_like=None,
            max_shard_size=max_shard_size, allow_modified_base=allow_modified_base)
        if left_out:
            note = (f"weight variant(s) {', '.join(left_out)} not merged and left out of the "
                    "output (they hold the unmerged weights); for fp16 weights merge again "
                    "with --dtype fp16")
            plan = replace(plan, warnings=(*plan.warnings, note))
        plans[component] = plan
    return plans


# diffusers' and transformers' weight file names; other *.safetensors beside one of them are
# variants (save_pretrained(variant="fp16"): diffusion_pytorch_model.fp16.safetensors)
CANONICAL = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def _open_component(folder: Path):
    """(the component's base, the variant files left out): a folder holding its canonical
    weights file beside variants is opened as that one file."""
    from .bases import INDEX_NAMES, open_base

    files = sorted(p.name for p in folder.glob("*.safetensors"))
    canonical = next((n for n in CANONICAL if n in files), None)
    if len(files) < 2 or canonical is None or any((folder / n).is_file() for n in INDEX_NAMES):
        return open_base(folder), []
    return open_base(folder / canonical), [n for n in files if n != canonical]


def _report(plans: dict, base, out, names, factors, mode, dtype, copied: dict,
            plan_report) -> dict:
    """One merge report over the components (``plan_report``: api's report of one plan):
    their changed tensors named ``<component>.<tensor>``, warnings prefixed with the
    component, per-component counts."""
    report = {"base": str(base), "out": None if out is None else str(out),
              "format": "diffusers-pipeline", "adapters": list(names),
              "weights": list(factors), "mode": mode, "dtype": dtype, "tensors": 0,
              "output_bytes": 0, "changed": [], "warnings": []}
    counts = {}
    for component, plan in plans.items():
        part = plan_report(plan, plan.base.folder, out, dtype, list(plan.warnings))
        report["tensors"] += part["tensors"]
        report["output_bytes"] += part["output_bytes"]
        for row in part["changed"]:
            row["name"] = f"{component}.{row['name']}"
            report["changed"].append(row)
        report["warnings"] += [f"{component}: {w}" for w in part["warnings"]]
        counts[component] = {"merged": len(part["changed"]), "tensors": part["tensors"]}
    for rel, files in copied.items():
        counts[rel] = {"copied": files}
    report["base_model"] = None
    report["components"] = counts
    return report


def merge_pipeline(base, paths: list, out, *, factors: list[float], mode: str, dtype: str,
                   scale=None, device: str = "cpu", kernels: str = "auto", force: bool = False,
                   dry_run: bool = False, progress=None, requantize: str = "keep",
                   max_shard_size=None, allow_modified_base: bool = False,
                   validate: bool = False, plan_report) -> dict:
    """``api.merge`` into a pipeline folder ``base``; the report as a dict (MergeReport's, or
    MergePlanReport's with ``dry_run``, plus ``components``). ``plan_report(plan, base, out,
    dtype, warnings) -> dict`` is api's report of one plan (passed in: api imports this
    module)."""
    from ..inputs import load_finite
    from .run import execute

    base = Path(base)
    names = [str(p) for p in paths]
    if requantize != "keep":
        raise OptionError("--requantize applies to GGUF and bitsandbytes bases, not to a "
                          "diffusers pipeline folder")
    loaded = load_finite(paths, names, base=base, refusal="refusing to merge it", scale=scale)
    plans = plan_pipeline(base, loaded, names, factors, mode=mode, dtype=dtype,
                          requantize=requantize, max_shard_size=max_shard_size,
                          allow_modified_base=allow_modified_base)
    others = sorted(p.name for p in base.iterdir() if p.name not in plans and not
                    p.name.startswith("."))
    report = _report(plans, base, out, names, factors, mode, dtype, {}, plan_report)
    if dry_run:
        return report
    if callable(getattr(progress, "start", None)):
        progress.start(report["output_bytes"])
    start, inputs, runs, copied = time.perf_counter(), (base, *paths), {}, {}
    size = report["output_bytes"] + sum(f.stat().st_size for o in others
                                        for f in ([base / o] if (base / o).is_file()
                                                  else (base / o).rglob("*")) if f.is_file())
    with atomic_output(out, force=force, is_dir=True, expected_bytes=size,
                       inputs=inputs) as tmp:
        for rel in others:
            copied[rel] = _copy_into(base, rel, tmp)
        for component, plan in plans.items():
            runs[component] = execute(plan, tmp / component, device=device, progress=progress,
                                      kernels=kernels, inputs=inputs)
    report = _report(plans, base, out, names, factors, mode, dtype, copied, plan_report)
    first = next(iter(runs.values()), {})
    report.update(wall_s=time.perf_counter() - start, device=first.get("device", device),
                  kernels=first.get("kernels", kernels),
                  copied_files=sorted(f"{c}/{f}" for c, r in runs.items()
                                      for f in r["copied_files"]) + others,
                  survival=None)
    if validate:    # every component checked; validation.json in OUT, as for an HF merge
        from ..validation.run import summary, write_report

        checked = check_components(plans, Path(out))
        report["validation"] = summary(checked)
        report["validation"]["report"] = str(write_report(checked, out))
    return report


def check_options(*, executor: str, quantize_like, push_to) -> None:
    """What a pipeline merge does not take (yet): one OptionError naming it."""
    for given, what in ((executor != "local", "--executor ray"),
                        (quantize_like is not None, "--quantize-like"),
                        (push_to is not None, ("--push-to (push OUT afterwards with "
                                               "`adaptertools push`)"))):
        if given:
            raise OptionError(f"{what} does not apply to a diffusers pipeline folder; merge "
                              "without it")


def validate_pipeline(base, paths: list, merged, *, factors: list[float], mode: str,
                      settings, scale=None, allow_modified_base: bool = False,
                      progress=None) -> dict:
    """``api.validate`` of a pipeline merge: every targeted component's folder in ``merged``
    checked against its plan (validation/run.check_output), the rows named
    ``<component>.<tensor>`` and summarised together (ValidationReport's fields)."""
    from ..inputs import load_finite

    base, merged = Path(base), Path(merged)
    names = [str(p) for p in paths]
    loaded = load_finite(paths, names, base=base, refusal="nothing to validate", scale=scale)
    plans = plan_pipeline(base, loaded, names, factors, mode=mode, dtype="keep",
                          requantize="keep", max_shard_size=None,
                          allow_modified_base=allow_modified_base)
    report = check_components(plans, merged, settings=settings, progress=progress)
    report.update(merged=str(merged), base=str(base), adapters=names, weights=list(factors),
                  mode=mode)
    return report


def check_components(plans: dict, merged: Path, *, settings=None, progress=None) -> dict:
    """validation/run.check_output for each component's plan against ``merged/<component>``;
    the rows named ``<component>.<tensor>``, summarised together."""
    from ..validation.merged import Settings, summarize
    from ..validation.run import check_output

    settings = settings or Settings()
    start, rows = time.perf_counter(), []
    for component, plan in plans.items():
        folder = Path(merged) / component
        if not folder.is_dir():
            raise FormatError(f"{merged}: has no {component}/ folder, which the adapters "
                              "target; pass the merged pipeline folder")
        part = check_output(plan, folder, settings=settings, progress=progress)
        rows += [dict(row, name=f"{component}.{row['name']}") for row in part["tensors"]]
    return summarize(rows, settings, time.perf_counter() - start)
