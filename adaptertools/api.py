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
    make_plan,
    open_inputs,
    parse_weights,
)
from .options import (
    AdapterDtype,
    CombineMethod,
    Device,
    Executor,
    Kernels,
    MergeDtype,
    MergeMode,
    SvdChoice,
)
from .paths import atomic_output, refuse_output
from .registry import get_format
from .reports import (
    CombineReport,
    ComparisonReport,
    ExtractReport,
    InspectReport,
    MergePlanReport,
    MergeReport,
    ValidationReport,
)


def inspect(path: str | os.PathLike, *, layers: bool = False, format: str | None = None,
            scale: float | None = None, base=None, endpoint: str | None = None,
            token=None) -> InspectReport:
    """Summary of an adapter: ranks, scales, targets, sizes and problems.

    Args:
        path: the adapter (folder or file), or a Hub URI ``hf://owner/name[@revision][/sub]``.
        layers: also one row per adapted tensor (``layers``).
        format: skip detection and read it as this format.
        scale: the effective scale of bare factor files (no config).
        base: the base model (HF folder, config.json or GGUF model, or a Hub URI); maps GGUF
            names back to HF.
        endpoint, token: the Hub to fetch ``hf://`` inputs from.

    Returns:
        InspectReport (``to_dict()``: what ``inspect --json`` prints).

    Raises:
        InputNotFoundError, FormatError, UnsupportedError, OptionError, HubError: as ``load``,
            which reads the adapter the same way.

    Example:
        >>> from adaptertools import inspect
        >>> report = inspect("peft_adapter", layers=True)
        >>> report.format, [row["rank"] for row in report.layers][:2]
        ('peft', [8, 8])
    """
    from .inspection import adapter_report
    from .light.route import light_or_torch

    hub, sources = {"endpoint": endpoint, "token": token}, []
    path = local_input_path(path, "adapter", hub, sources)
    base = local_input_path(base, "config", hub, sources, role="base")
    path = require_exists(path)

    def report_of(light: bool) -> dict:     # light: numpy, no torch (light/route.py)
        fmt = _readable(path, format, light=light)
        adapter = _read(fmt, path, scale, base, unplaced=base is None, light=light)
        report = adapter_report(adapter, path=path, format_name=fmt.name, layers=layers)
        describe = getattr(fmt.module, "describe", None)
        if callable(describe):  # storage facts only the format knows (e.g. GGUF tensor types)
            report["storage"] = describe(path)
        return report

    report = light_or_torch(report_of)
    if sources:
        report["hub_inputs"] = sources
    return InspectReport.from_dict(report)


def merge(base: str | os.PathLike, adapters, out: str | os.PathLike | None = None, *,
          weights=None, mode: MergeMode = "weighted", dtype: MergeDtype = "keep",
          device: Device = "cpu", dry_run: bool = False, force: bool = False, progress=None,
          push_to: str | None = None, private: bool = False, revision: str | None = None,
          commit_message: str | None = None, endpoint: str | None = None, token=None,
          validate: bool = False, requantize: str = "keep", quantize_like=None,
          kernels: Kernels = "auto", max_shard_size: int | str | None = None,
          scale: float | None = None,
          allow_modified_base: bool = False, executor: Executor = "local",
          address: str | None = None) -> MergeReport | MergePlanReport:
    """Fold adapters into a base checkpoint, streaming it tensor by tensor.

    Args:
        base: an HF folder (safetensors, bitsandbytes too) or a GGUF model, or a Hub URI
            (``hf://owner/name[@revision][/subfolder]``).
        adapters: one adapter or a sequence of them (paths or Hub URIs).
        out: the output: a folder for an HF base, a file for a GGUF base; None with ``dry_run``.
        weights: one per adapter (``"0.5,0.5"``, a number or a sequence); default 1 each.
        mode: "weighted": ``W + sum_i w_i * s_i * B_i @ A_i`` in fp32, rounded once;
            "stacked": the adapters applied one after another, in order (differs for DoRA).
        dtype: storage dtype of the output's floating tensors ("keep": the base's).
        device: where the fold runs; "cpu" is the reference.
        dry_run: make the plan only; nothing is written.
        force: replace an existing ``out``.
        progress: called with the bytes done (after its ``start(total)``, when it has one).
        push_to, private, revision, commit_message: upload ``out`` with a model card to this
            repo, as ``convert`` does.
        endpoint, token: the Hub of ``hf://`` inputs and of the push.
        validate: check every tensor of ``out`` afterwards (validation.json beside it); a
            failure shows in ``validation["passed"]`` and cancels ``push_to``.
        requantize: GGUF bases: the type of the adapted tensors ("keep": each its own, or
            f32, f16, bf16, q8_0, q4_0, ..., q2_k..q6_k, any case); bitsandbytes bases: "keep",
            or bf16/fp16/fp32 for a plain model.
        quantize_like: a quantized GGUF of the same model: every tensor of an F16/BF16/F32
            GGUF base gets the type it has there (one quantization instead of two).
        kernels: "auto": the fused Triton kernels on a CUDA device when triton is importable,
            else the torch reference; "torch" or "triton" forces one (``kernels`` says which ran).
        max_shard_size: HF bases: new shards of at most this (bytes, or "5GB", "500MB",
            "2GiB"), named as ``save_pretrained(max_shard_size=...)`` does; None keeps the
            base's files.
        scale: the effective scale of bare factor files (no config), as for ``load``.
        allow_modified_base: merge adapters whose ``init_lora_weights`` (PiSSA, OLoRA, CorDA,
            LoRA-GA, LoftQ, saved without PEFT's conversion) fit only the base PEFT modified,
            which ``base`` must then be.
        executor: "local": this process; "ray": one Ray task per output file (HF shards) or
            byte range (a GGUF kept in its layout), the bytes identical to "local"'s. Every
            input and ``out`` must lie on storage every node sees. A run that was stopped
            resumes: the finished pieces (``.OUT.at-pieces.json`` beside ``out``) are kept
            unless ``force``. Needs ``adaptertools[ray]``.
        address: the Ray cluster to join ("auto", "ray://host:10001", ...); default: the one
            RAY_ADDRESS names, else a new local one.

    Returns:
        MergeReport, or MergePlanReport with ``dry_run``. Hub inputs' commits are under
        ``hub_inputs``; for quantized outputs ``survival`` scores how much of the adapter each
        quantized tensor kept.

    Raises:
        OptionError: misuse: an unknown ``dtype``, ``mode`` or ``kernels``, no ``out``,
            ``validate`` or ``push_to`` with ``dry_run``, bad ``weights`` or
            ``max_shard_size``, options this base does not take (``dtype``, ``max_shard_size``
            on GGUF; ``quantize_like`` on HF), an HF ``out`` named like a file, a
            ``requantize`` type that cannot be written, ``kernels="triton"`` off CUDA,
            ``scale`` for an adapter that carries its own.
        InputNotFoundError: an input does not exist.
        FormatError: an input is malformed, an adapter holds NaN or Inf values, or its tensors
            do not fit the base (names, shapes).
        UnsupportedError: what cannot be merged into this base (an activated LoRA, a
            modified-base init without ``allow_modified_base``, DoRA adapters that do not add
            up, a tensor type that cannot be written back), ``device="cuda"`` without CUDA,
            ``kernels="triton"`` without triton, a bad ``push_to`` id, an ``out`` that is,
            holds or lies in an input.
        OutputExistsError: ``out`` exists and ``force`` is False.
        HubError: a Hub input could not be fetched, or the push failed (``out`` stays).
        OSError: too little free disk space for ``out``, or its folder is not writable.

    Example:
        >>> from adaptertools import merge
        >>> report = merge("base_model", ["adapter", "other"], "merged", weights=[0.7, 0.3])
        >>> report.out, report.weights
        ('merged', [0.7, 0.3])
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
    if executor not in ("local", "ray"):
        raise OptionError(f"unknown executor {executor!r}; choose local or ray")
    if address is not None and executor != "ray":
        raise OptionError("--address names a Ray cluster; add --executor ray")
    if validate and dry_run:
        raise OptionError("--validate needs a real run; drop --dry-run")
    requantize = str(requantize).lower()      # as the CLI: Q4_K and q4_k name one type
    if push_to is not None:
        from .hub import check_push

        if dry_run:
            raise OptionError("--push-to needs a real run; drop --dry-run")
        check_push(push_to)
    from .merging import pipeline

    if pipeline.is_pipeline(base):     # a diffusers pipeline folder: each component merged
        pipeline.check_options(executor=executor, quantize_like=quantize_like, push_to=push_to)
        report = pipeline.merge_pipeline(
            base, paths, out, factors=factors, mode=mode, dtype=dtype, scale=scale,
            device=device, kernels=kernels, force=force, dry_run=dry_run, progress=progress,
            requantize=requantize, max_shard_size=max_shard_size,
            allow_modified_base=allow_modified_base, validate=validate, plan_report=_plan_report)
        return (MergePlanReport if dry_run else MergeReport).from_dict(report)
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
    plan = make_plan(checkpoint, loaded, names, factors, mode=mode, dtype=dtype,
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
        return MergePlanReport.from_dict(report)
    if callable(getattr(progress, "start", None)):
        progress.start(plan.size)     # e.g. the CLI's progress bar, now that the total is known
    if executor == "ray":
        from .parallel import MergeSpec, execute_parallel

        spec = MergeSpec(os.path.abspath(local_base), tuple(map(os.path.abspath, local_paths)),
                         tuple(names), tuple(factors), mode, dtype, requantize,
                         quantize_like and os.path.abspath(quantize_like), max_shard_size,
                         scale, allow_modified_base, device, kernels)
        report.update(execute_parallel(plan, spec, out, force=force, progress=progress,
                                       address=address, inputs=inputs))
    else:
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
    return MergeReport.from_dict(_push_after(report, out, push_to, push, hub))


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
                     "adapters": sorted({c.adapter for c in j.contributions + j.bias_contributions}
                                        | {i for _, _, i in j.token_rows}),
                     "replaced": j.replacement is not None, "added": j.name not in stored}
                    for j in changed],
        "warnings": warnings,
    } | ({} if plan.max_shard_size is None else {   # --max-shard-size: the new files
        "max_shard_size": plan.max_shard_size,
        "shards": [{"file": f.name, "tensors": len(f.jobs), "bytes": f.size} for f in plan.files]})


def validate(base: str | os.PathLike, adapters, merged: str | os.PathLike, *, weights=None,
             mode: MergeMode = "weighted", e2e: bool = False, probes: int = 16, seed: int = 0,
             tolerance_db: float = 1.0, progress=None, endpoint: str | None = None,
             token=None, scale: float | None = None,
             allow_modified_base: bool = False) -> ValidationReport:
    """Does ``merged`` compute what ``base`` with ``adapters`` computes?

    Per adapted tensor: ``probes`` seeded random vectors, the merged tensor's SQNR against the
    float64 reference ``W x + sum(w * s * B (A x))``, passing within ``tolerance_db`` of the
    floor its own dtype allows; every other tensor byte-identical to the base.

    Args:
        base, adapters, weights, mode: as given to ``merge`` (any may be a Hub URI).
        merged: the merge to check (folder or GGUF file, or a Hub URI).
        e2e: also compare logits of the merged model with the unmerged one (transformers +
            PEFT for HF bases, llama.cpp for GGUF).
        probes, seed: how many random probe vectors per tensor, and their seed.
        tolerance_db: how far below its dtype's noise floor a tensor's SQNR may fall.
        progress: called with the bytes of each tensor checked.
        endpoint, token: the Hub of ``hf://`` inputs (their commits go under ``hub_inputs``).
        scale, allow_modified_base: as for ``merge``.

    Returns:
        ValidationReport: ``passed``, and one row per tensor in ``tensors``, worst first (see
        validation/merged.py).

    Raises:
        OptionError: misuse: ``probes`` < 1, an unknown ``mode``, bad ``weights``, ``scale``
            for an adapter that carries its own.
        InputNotFoundError: an input does not exist.
        FormatError: an input is malformed, an adapter holds NaN or Inf values, or its tensors
            do not fit the base (names, shapes).
        UnsupportedError: what ``merge`` would refuse, ``merged`` of another kind than
            ``base``, ``e2e`` without its packages (transformers and peft; llama-cpp-python)
            or where it has no reference (stacked DoRA; several adapters on GGUF).
        LlamaCppError: ``e2e`` on a GGUF base: llama.cpp crashed, failed or timed out.
        HubError: a Hub input could not be fetched.

    Example:
        >>> from adaptertools import validate
        >>> report = validate("base_model", ["adapter"], "merged")
        >>> report.passed
        True
    """
    from .merging import pipeline
    from .validation.run import validate_merge

    if pipeline.is_pipeline(base):     # a diffusers pipeline folder: each component checked
        if e2e:
            raise OptionError("--e2e does not apply to a diffusers pipeline folder; validate "
                              "without it")
        from .validation.merged import Settings

        paths, factors = adapter_inputs(adapters, weights, mode)
        if probes < 1:
            raise OptionError(f"--probes {probes}: give at least 1 probe vector")
        return ValidationReport.from_dict(pipeline.validate_pipeline(
            base, paths, merged, factors=factors, mode=mode, scale=scale, progress=progress,
            settings=Settings(probes, seed, tolerance_db),
            allow_modified_base=allow_modified_base))
    report = validate_merge(base, adapters, merged, weights=weights, mode=mode, e2e=e2e,
                            probes=probes, seed=seed, tolerance_db=tolerance_db,
                            progress=progress, hub={"endpoint": endpoint, "token": token},
                            scale=scale, allow_modified_base=allow_modified_base)
    return ValidationReport.from_dict(report)


def validate_against(adapter: str | os.PathLike, other: str | os.PathLike, *, base=None,
                     scale: float | None = None, endpoint: str | None = None,
                     token=None) -> ComparisonReport:
    """Do two adapters (e.g. a conversion and its source) give the same delta for every tensor?

    Exact when both store the same dtypes, else within the coarser dtype's rounding; computed
    from the factors.

    Args:
        adapter, other: the two adapters (paths or Hub URIs), formats detected.
        base: the base model, for GGUF adapters (as for ``load``).
        scale: for bare factor files, as for ``load``.
        endpoint, token: the Hub of ``hf://`` inputs (their commits go under ``hub_inputs``).

    Returns:
        ComparisonReport: ``passed``, and one row per tensor in ``tensors``, worst first.

    Raises:
        InputNotFoundError: an adapter does not exist.
        FormatError: an adapter is not recognised or is malformed.
        UnsupportedError: an adapter uses what adaptertools cannot read.
        OptionError: ``scale`` for an adapter that carries its own.
        HubError: a Hub input could not be fetched.

    Example:
        >>> from adaptertools import convert, validate_against
        >>> convert("peft_adapter", "adapter.gguf", to="gguf", base="base_model")
        >>> validate_against("adapter.gguf", "peft_adapter", base="base_model").passed
        True
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
    return ComparisonReport.from_dict(report)


def _factor_dtype(dtype: str):
    """--dtype of combine/extract: fp32/fp16/bf16 set the factors' dtype here (so the reported
    error includes that rounding); keep and format types (q8_0) are left to ``save``."""
    return parse_dtype(dtype) if dtype in ("fp32", "fp16", "bf16") else None


def combine(adapters, out: str | os.PathLike, *, method: CombineMethod = "cat", weights=None,
            rank: int | None = None, energy: float | None = None, density: float | None = None,
            seed: int = 0, svd: SvdChoice = "auto", materialize: bool = False, base=None,
            to: str = "peft", dtype: AdapterDtype = "keep", force: bool = False,
            scale: float | None = None) -> CombineReport:
    """Combine adapters into one new adapter written to ``out`` (any format, ``to``).

    Args:
        adapters: the adapters (paths), in order.
        out: the combined adapter.
        method: "cat" (exact: ranks concatenated), "svd" (the weighted sum truncated to
            ``rank``, or to the fewest ranks keeping ``energy``), "ties", "dare_linear",
            "dare_ties", "magnitude_prune" (on the full deltas, with ``density``, factored
            back by SVD).
        weights: one per adapter (``"0.5,0.5"``, a number or a sequence); default 1 each.
        rank, energy: the output rank, or instead the share (0 < E <= 1) of each delta's
            squared norm to keep; not for "cat".
        density: ties/dare/magnitude_prune: the fraction of entries kept.
        seed: of the random draws (DARE masks, randomized SVD).
        svd: the SVD of full matrices; "randomized" is seeded by ``seed``.
        materialize: combine DoRA adapters through their full delta (needs ``base``).
        base: the HF base folder: base weights for ``materialize``, names for GGUF in and out.
        to, dtype: the output format and factor dtype ("keep": the inputs' widest).
        force: replace an existing ``out``.
        scale: for bare factor files, as for ``load``.

    Returns:
        CombineReport: per tensor and in ``total``, the share of the target delta's energy
        kept and the relative error.

    Raises:
        OptionError: misuse: an unknown ``method`` or ``svd``, ``rank`` with ``energy`` (or
            with "cat"), a pruning method without ``density``, bad ``weights`` or ``seed``,
            ``materialize`` without ``base``, ``scale`` for an adapter that carries its own.
        InputNotFoundError: an input does not exist.
        FormatError: an input is malformed, or holds NaN or Inf values.
        UnsupportedError: adapters that cannot be combined (DoRA without ``materialize``,
            mismatched shapes, an overflowing or empty sum), an unknown or read-only ``to``,
            an ``out`` that is, holds or lies in an input.
        OutputExistsError: ``out`` exists and ``force`` is False.
        OSError: too little free disk space for ``out``, or its folder is not writable.

    Example:
        >>> from adaptertools import combine
        >>> report = combine(["math", "code"], "both", method="svd", rank=16)
        >>> report.total["energy_kept"] > 0.9
        True
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
    return CombineReport(method=method, inputs=names, weights=list(options.weights), rank=rank,
                         energy=energy, density=density, seed=seed, out=str(out), format=to,
                         replaced=sorted(combined.replacements), warnings=warnings,
                         **summarize(results), wall_s=time.perf_counter() - start)


def extract(base: str | os.PathLike, finetuned: str | os.PathLike, out: str | os.PathLike, *,
            rank: int | None = None, energy: float | None = None, targets=None,
            svd: SvdChoice = "auto", seed: int = 0, to: str = "peft", dtype: AdapterDtype = "fp32",
            force: bool = False, progress=None) -> ExtractReport:
    """A LoRA approximating ``finetuned - base``, both HF safetensors checkpoints, streamed
    tensor by tensor and written to ``out``.

    Args:
        base, finetuned: the two HF checkpoint folders.
        out: the extracted adapter.
        rank, energy: the rank of each tensor, or instead the share (0 < E <= 1) of each
            delta's squared norm to keep.
        targets: module names or suffixes (``"q_proj,v_proj"`` or a list) to factor; by
            default every 2-D weight but the embeddings. Other differing tensors are kept
            whole (modules_to_save).
        svd, seed: the SVD of each delta; "randomized" (or "auto" on a rank well below the
            matrix's) is seeded by ``seed``.
        to, dtype: the output format and factor dtype.
        force: replace an existing ``out``.
        progress: called with the bytes of each tensor pair read.

    Returns:
        ExtractReport: per tensor and in ``total``, the share of the delta's energy kept and
        the relative error.

    Raises:
        OptionError: misuse: neither or both of ``rank`` and ``energy``, either out of range,
            an unknown ``svd``, a bad ``seed``, empty ``targets``.
        InputNotFoundError: a checkpoint does not exist.
        FormatError: a checkpoint is malformed, or holds NaN or Inf values.
        UnsupportedError: not two HF safetensors checkpoints of one model, ``targets``
            matching nothing, no difference at all, an unknown or read-only ``to``, an
            ``out`` that is, holds or lies in an input.
        OutputExistsError: ``out`` exists and ``force`` is False.
        OSError: too little free disk space for ``out``, or its folder is not writable.

    Example:
        >>> from adaptertools import extract
        >>> report = extract("base_model", "finetuned_model", "lora", rank=16)
        >>> report.rank, report.format
        (16, 'peft')
    """
    import time

    from .algebra.common import check_truncation, summarize
    from .algebra.extract import ExtractOptions, extract_checkpoints

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
    return ExtractReport(base=str(base), finetuned=str(finetuned), out=str(out), format=to,
                         rank=rank, energy=energy, svd=svd, seed=seed,
                         replaced=sorted(adapter.replacements), warnings=warnings,
                         **summarize(results), wall_s=time.perf_counter() - start)
