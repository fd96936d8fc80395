"""The library's public functions; ``adaptertools/__init__.py`` re-exports them lazily."""

from __future__ import annotations

import os
from pathlib import Path

from ._io import require_exists
from .adapter import Adapter
from .adapter_io import (  # noqa: F401  (load, save, convert: public, re-exported)
    DTYPES,
    _push_after,
    _read,
    _readable,
    convert,
    load,
    local_input_path,
    parse_dtype,
    save,
)
from .errors import OptionError
from .inputs import (
    adapter_inputs,
    adapter_list,
    load_finite,
    open_inputs,
    parse_weights,
)
from .paths import atomic_output, refuse_output
from .registry import get_format


def inspect(path: str | os.PathLike, *, layers: bool = False, format: str | None = None,
            scale: float | None = None, base=None, endpoint: str | None = None,
            token=None) -> dict:
    """Summary of an adapter (ranks, scales, targets, sizes, problems); per layer with ``layers``.
    ``path`` and ``base`` may be Hub URIs."""
    from .inspection import adapter_report

    hub, sources = {"endpoint": endpoint, "token": token}, []
    path = local_input_path(path, "adapter", hub, sources)
    base = local_input_path(base, "config", hub, sources, role="base")
    path = require_exists(path)
    fmt = _readable(path, format)
    adapter = _read(fmt, path, scale, base)
    report = adapter_report(adapter, path=path, format_name=fmt.name, layers=layers)
    describe = getattr(fmt.module, "describe", None)
    if callable(describe):  # storage facts only the format knows (e.g. GGUF tensor types)
        report["storage"] = describe(path)
    if sources:
        report["hub_inputs"] = sources
    return report


def merge(base: str | os.PathLike, adapters, out: str | os.PathLike | None = None, *,
          weights=None, mode: str = "weighted", dtype: str = "keep", device: str = "cpu",
          dry_run: bool = False, force: bool = False, progress=None,
          push_to: str | None = None, private: bool = False, revision: str | None = None,
          commit_message: str | None = None, endpoint: str | None = None, token=None,
          validate: bool = False, requantize: str = "keep", quantize_like=None,
          kernels: str = "auto", max_shard_size: int | str | None = None,
          scale: float | None = None, allow_modified_base: bool = False) -> dict:
    """Fold adapters into a base checkpoint, streaming it tensor by tensor.

    ``mode="weighted"``: ``W + sum_i w_i * s_i * B_i @ A_i`` in fp32, rounded once.
    ``mode="stacked"``: adapters applied one after another, in order (differs for DoRA).
    Returns a report; with ``dry_run`` only the plan is made and nothing is written.
    ``base`` and ``adapters`` may be Hub URIs (their commits go into the report); ``push_to``
    uploads the output with a model card, as in ``convert``.
    GGUF bases: adapted quantized tensors are dequantized, folded in fp32 and written back in
    their type (``requantize="keep"``) or the type ``requantize`` names; ``quantize_like`` (a
    quantized GGUF of the same model) gives every tensor of an F16/BF16/F32 base the type it has
    there. The report's ``survival`` section scores how much of the adapter each quantized
    tensor kept.
    ``kernels``: "auto" runs the fused Triton kernels on a CUDA device when triton is importable,
    else the torch reference; "torch" or "triton" forces one (the report says which ran).
    ``scale``: the effective scale of bare factor files (no config), as for ``load``; refused
    for adapters that carry their own.
    ``max_shard_size`` (HF bases; bytes, or "5GB", "500MB", "2GiB"): new shards grouped and
    named as ``save_pretrained(max_shard_size=...)`` does (merging/shards.py); None keeps the
    base's files.
    ``allow_modified_base``: merge adapters whose ``init_lora_weights`` (PiSSA, OLoRA, CorDA,
    LoRA-GA, LoftQ; saved without PEFT's conversion) fit only the base PEFT modified at
    initialisation, which ``base`` must then be; refused otherwise.
    """
    from .merging.run import execute

    paths, factors = adapter_inputs(adapters, weights, mode)
    if max_shard_size is not None:
        from .merging.shards import parse_size

        max_shard_size = parse_size(max_shard_size)
    if dtype not in DTYPES:
        raise OptionError(f"unknown dtype {dtype!r} for a merge; choose one of {', '.join(DTYPES)}")
    if out is None and not dry_run:
        raise OptionError("no output given; pass --out")
    if validate and dry_run:
        raise OptionError("--validate needs a real run; drop --dry-run")
    requantize = str(requantize).lower()      # as the CLI: Q4_K and q4_k name one type
    if push_to is not None:
        from .hub import check_push

        if dry_run:
            raise OptionError("--push-to needs a real run; drop --dry-run")
        check_push(push_to)
    hub, sources = {"endpoint": endpoint, "token": token}, []
    local_base, checkpoint, local_paths, loaded = open_inputs(base, paths, hub, sources,
                                                              refusal="refusing to merge it",
                                                              scale=scale)
    inputs = (local_base, *local_paths, quantize_like)
    out_exists = out is not None and os.path.lexists(out)
    if out is not None and checkpoint.kind == "safetensors":
        _refuse_file_name(out, base)
    if out is not None and not (dry_run and out_exists):
        refuse_output(out, force=force, is_dir=checkpoint.kind == "safetensors", inputs=inputs)
    names = [str(p) for p in paths]
    plan = _make_plan(checkpoint, loaded, names, factors, mode=mode, dtype=dtype,
                      requantize=requantize, quantize_like=quantize_like,
                      max_shard_size=max_shard_size, allow_modified_base=allow_modified_base)
    warnings = list(plan.warnings) + _base_model_warnings(checkpoint, loaded, names)
    report = _plan_report(plan, base, out, dtype, warnings)
    report["base_model"] = _base_model(checkpoint, loaded, sources)
    if sources:
        report["hub_inputs"] = sources
    if dry_run:
        if out_exists:
            report["warnings"].append(f"{out} exists: the real run needs --force"
                                      if not force else f"{out} exists: --force replaces it")
        return report
    if callable(getattr(progress, "start", None)):
        progress.start(plan.size)     # e.g. the CLI's progress bar, now that the total is known
    report.update(execute(plan, out, device=device, force=force, progress=progress,
                          kernels=kernels, inputs=inputs))
    if report.get("survival"):
        _survival_report(report, out)
    if validate:      # per-tensor check of the output; validation.json is written beside it
        from .validation.run import check_output, summary, write_report

        checked = check_output(plan, out)
        report["validation"] = summary(checked)
        report["validation"]["report"] = str(write_report(checked, out))
        if push_to is not None and not checked["passed"]:
            report["warnings"].append(f"validation failed: not pushed to {push_to}")
            push_to = None
    push = {"private": private, "revision": revision, "commit_message": commit_message}
    return _push_after(report, out, push_to, push, hub)


FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".json")    # names of files, not folders


def _refuse_file_name(out, base) -> None:
    """An HF base merges into a folder: an OUT named like a file (``x.gguf``) is a mistake."""
    suffix = Path(out).suffix.lower()
    if suffix in FILE_SUFFIXES:
        raise OptionError(f"--out {out}: {base} is an HF checkpoint, so the merge is a folder "
                          f"(config.json and *.safetensors), not a {suffix} file; name a folder "
                          f"(e.g. {Path(out).with_suffix('')})"
                          + ("; for a merged GGUF, merge into a GGUF base" if suffix == ".gguf"
                             else ""))


def _make_plan(checkpoint, loaded, names, factors, *, mode, dtype, requantize, quantize_like,
               max_shard_size=None, allow_modified_base=False):
    """``plan_for`` with ``quantize_like`` (a path) opened as a GGUF model."""
    from .merging.bases import open_base
    from .merging.plan import plan_for

    like = None
    if quantize_like is not None:
        like = open_base(require_exists(quantize_like))
        if like.kind != "gguf":
            raise OptionError(f"--quantize-like {quantize_like}: expected a GGUF model file")
    return plan_for(checkpoint, loaded, names, factors, mode=mode, dtype=dtype,
                    requantize=requantize, quantize_like=like, max_shard_size=max_shard_size,
                    allow_modified_base=allow_modified_base)


def _survival_report(report: dict, out) -> None:
    """Survival of the adapter in quantized tensors: a warning when low, and the scores saved
    as JSON beside a GGUF output (``OUT.survival.json``), inside an HF folder (``survival.json``)."""
    from ._io import write_json

    survival = report["survival"]
    if "warning" in survival:
        report["warnings"].append(survival["warning"])
    path = Path(out) / "survival.json" if Path(out).is_dir() else Path(f"{out}.survival.json")
    with atomic_output(path, force=True, is_dir=False) as tmp:
        write_json(tmp, survival)
    survival["report"] = str(path)


def _base_model(checkpoint, adapters: list[Adapter], sources: list[dict]) -> str | None:
    """The base's Hub id, for a model card: where it was fetched from, else what its config or
    the adapters name."""
    for source in sources:
        if source["role"] == "base":
            return source["repo_id"]
    named = (getattr(checkpoint, "config", {}) or {}).get("_name_or_path")
    trained_on = {a.base_model for a in adapters if a.base_model}
    return named or (trained_on.pop() if len(trained_on) == 1 else None)


def _base_model_warnings(checkpoint, adapters: list[Adapter], names: list[str]) -> list[str]:
    config = getattr(checkpoint, "config", {}) or {}
    base_name = config.get("_name_or_path")
    return [f"{name}: trained on {a.base_model!r}, the base says {base_name!r}; check it is the "
            "same model" for name, a in zip(names, adapters)
            if a.base_model and base_name and a.base_model != base_name]


def _plan_report(plan, base, out, dtype: str, warnings: list[str]) -> dict:
    stored = plan.base.entries()
    # changed tensors, and tensors the base does not store (an untied lm_head)
    changed = [j for j in plan.jobs if j.changed or j.name not in stored]
    return {
        "base": str(base), "out": None if out is None else str(out), "format": plan.base.kind,
        "adapters": list(plan.adapter_names), "weights": list(plan.factors), "mode": plan.mode,
        "dtype": dtype, "tensors": len(plan.jobs), "output_bytes": plan.size,
        "changed": [{"name": j.name, "shape": list(j.output_shape), "dtype": j.out_dtype,
                     "adapters": sorted({c.adapter for c in j.contributions + j.bias_contributions}),
                     "replaced": j.replacement is not None, "added": j.name not in stored}
                    for j in changed],
        "warnings": warnings,
    } | ({} if plan.max_shard_size is None else {   # --max-shard-size: the new files
        "max_shard_size": plan.max_shard_size,
        "shards": [{"file": f.name, "tensors": len(f.jobs), "bytes": f.size} for f in plan.files]})


def validate(base: str | os.PathLike, adapters, merged: str | os.PathLike, *, weights=None,
             mode: str = "weighted", e2e: bool = False, probes: int = 16, seed: int = 0,
             tolerance_db: float = 1.0, progress=None, endpoint: str | None = None,
             token=None, scale: float | None = None, allow_modified_base: bool = False) -> dict:
    """Does ``merged`` compute what ``base`` with ``adapters`` computes?

    Per adapted tensor: ``probes`` seeded random vectors, the merged tensor's SQNR against the
    float64 reference ``W x + sum(w * s * B (A x))``, passing within ``tolerance_db`` of the
    floor its own dtype allows; every other tensor byte-identical to the base. ``e2e``: logits
    of the merged model against the unmerged one (transformers + PEFT, or llama.cpp). Any input
    may be a Hub URI (``hf://owner/name[@revision][/subfolder]``); their commits are reported
    under ``hub_inputs``. ``scale``: for bare factor files, ``allow_modified_base``: adapters
    fitting a base PEFT modified (PiSSA, ...), both as in ``merge``. Returns a report
    with ``passed`` and one row per tensor, worst first (see validation/merged.py).
    """
    from .validation.run import validate_merge

    return validate_merge(base, adapters, merged, weights=weights, mode=mode, e2e=e2e,
                          probes=probes, seed=seed, tolerance_db=tolerance_db, progress=progress,
                          hub={"endpoint": endpoint, "token": token}, scale=scale,
                          allow_modified_base=allow_modified_base)


def validate_against(adapter: str | os.PathLike, other: str | os.PathLike, *, base=None,
                     scale: float | None = None, endpoint: str | None = None,
                     token=None) -> dict:
    """Do two adapters (e.g. a conversion and its source) give the same delta for every tensor?

    Exact when both store the same dtypes, else within the coarser dtype's rounding; computed
    from the factors. Returns a report with ``passed`` and one row per tensor, worst first.
    """
    from .validation.adapters import compare_adapters

    hub, sources = {"endpoint": endpoint, "token": token}, []
    paths = [local_input_path(p, "adapter", hub, sources) for p in (adapter, other)]
    base = local_input_path(base, "config", hub, sources, role="base")
    first, second = (load(p, scale=scale, base=base) for p in paths)
    report = compare_adapters(first, second)
    report.update(adapter=str(adapter), against=str(other))
    if sources:
        report["hub_inputs"] = sources
    return report


def _factor_dtype(dtype: str):
    """--dtype of combine/extract: fp32/fp16/bf16 set the factors' dtype here (so the reported
    error includes that rounding); keep and format types (q8_0) are left to ``save``."""
    return parse_dtype(dtype) if dtype in ("fp32", "fp16", "bf16") else None


def combine(adapters, out: str | os.PathLike, *, method: str = "cat", weights=None,
            rank: int | None = None, energy: float | None = None, density: float | None = None,
            seed: int = 0, svd: str = "auto", materialize: bool = False, base=None,
            to: str = "peft", dtype: str = "keep", force: bool = False,
            scale: float | None = None) -> dict:
    """Combine adapters into one new adapter written to ``out`` (any format, ``to``).

    ``method``: cat (exact: ranks concatenated), svd (the weighted sum truncated to ``rank`` or
    to the fewest ranks keeping ``energy``), ties, dare_linear, dare_ties, magnitude_prune (on
    the full deltas, with ``density``, seeded by ``seed``, factored back by SVD). DoRA inputs need
    ``materialize=True`` and ``base`` (the HF base folder). ``scale``: for bare factor files, as
    in ``merge``. Returns per tensor and in total the fraction of the target delta's energy
    kept and the relative error.
    """
    import time

    from .algebra.combine import Options, check_options, combine_adapters
    from .algebra.common import summarize

    start = time.perf_counter()
    paths = adapter_list(adapters)
    options = Options(method, tuple(parse_weights(weights, len(paths))), rank, energy, density,
                      seed, svd, materialize, _factor_dtype(dtype))
    check_options(options, len(paths))
    if materialize and base is None:
        raise OptionError("--materialize needs --base MODEL (the HF base folder) to read "
                          "the base weights from")
    inputs = (*paths, base)
    refuse_output(out, force=force, is_dir=get_format(to).output_is_dir, inputs=inputs)
    names = [str(p) for p in paths]
    loaded = load_finite(paths, names, base=base, refusal="refusing to combine it", scale=scale)
    combined, results, warnings = combine_adapters(loaded, names, options,
                                                   base=base if materialize else None)
    save(combined, out, format=to, dtype="keep" if options.dtype else dtype, force=force,
         base=base, inputs=inputs)
    return {"command": "combine", "method": method, "inputs": names, "weights": list(options.weights),
            "rank": rank, "energy": energy, "density": density, "seed": seed, "out": str(out),
            "format": to, "replaced": sorted(combined.replacements), "warnings": warnings,
            **summarize(results), "wall_s": time.perf_counter() - start}


def extract(base: str | os.PathLike, finetuned: str | os.PathLike, out: str | os.PathLike, *,
            rank: int | None = None, energy: float | None = None, targets=None,
            svd: str = "auto", seed: int = 0, to: str = "peft", dtype: str = "fp32",
            force: bool = False, progress=None) -> dict:
    """A LoRA approximating ``finetuned - base``, both HF safetensors checkpoints streamed tensor
    by tensor; written to ``out`` (``to``: any format). ``targets``: module names or suffixes
    (``"q_proj,v_proj"`` or a list) to factor; by default every 2-D weight but the embeddings.
    Other differing tensors are kept whole (modules_to_save). Returns per tensor and in total
    the fraction of the delta's energy kept and the relative error.
    """
    import time

    from .algebra.extract import ExtractOptions, extract_checkpoints
    from .algebra.common import check_truncation, summarize

    start = time.perf_counter()
    check_truncation(rank, energy, svd, seed, what="extract")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if targets is not None and not targets:
        raise OptionError("--targets is empty; name modules, e.g. q_proj,v_proj")
    inputs = (base, finetuned)
    refuse_output(out, force=force, is_dir=get_format(to).output_is_dir, inputs=inputs)
    options = ExtractOptions(rank, energy, None if targets is None else tuple(targets), svd, seed,
                             _factor_dtype(dtype) or parse_dtype("fp32"))
    adapter, results, warnings = extract_checkpoints(base, finetuned, options, progress=progress)
    save(adapter, out, format=to, dtype="keep" if dtype in ("fp32", "fp16", "bf16") else dtype,
         force=force, base=base, inputs=inputs)
    return {"command": "extract", "base": str(base), "finetuned": str(finetuned), "out": str(out),
            "format": to, "rank": rank, "energy": energy, "svd": svd, "seed": seed,
            "replaced": sorted(adapter.replacements), "warnings": warnings, **summarize(results),
            "wall_s": time.perf_counter() - start}
