"""Reading, writing and converting one adapter: ``load``, ``save``, ``convert`` (re-exported by
api.py, the public API), and Hub inputs as local paths (``local_input_path``). Below api.py and
the validators, which both use it.
"""

from __future__ import annotations

import inspect as _signature
import os
from pathlib import Path

from ._io import require_exists
from .adapter import Adapter, LoraWeight, cast_adapter, nonfinite_tensors
from .errors import FormatError, OptionError, UnsupportedError
from .options import AdapterDtype
from .paths import atomic_output, refuse_output
from .registry import Format, detect_format, get_format
from .reports import ConvertReport

DTYPES = ("keep", "fp32", "fp16", "bf16")

# Storage types a format may offer beyond plain casts (its writer then takes ``dtype`` itself).
FORMAT_DTYPES = ("q8_0",)


def parse_dtype(name: str):
    """``keep`` -> None, else the torch dtype (``fp32``, ``fp16``, ``bf16``)."""
    if name == "keep":            # the light path's (no torch dtype table needed)
        return None
    from .dtypes import OPTION_DTYPES

    table = {"keep": None, **OPTION_DTYPES}
    if name not in table:
        raise OptionError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)} "
                          f"({', '.join(FORMAT_DTYPES)} only where the format has it)")
    return table[name]


def _accepts(func, option: str) -> bool:
    """Does ``func`` take ``option`` by keyword: it names it or has ``**opts`` (registry.py)?"""
    try:
        params = _signature.signature(func).parameters.values()
    except (TypeError, ValueError):      # no signature to read (a builtin): pass nothing
        return False
    kind = _signature.Parameter
    return any(p.kind is kind.VAR_KEYWORD or
               (p.name == option and p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY))
               for p in params)


def _base_info(base):
    """``base`` as a path (HF folder, config.json, GGUF model) -> BaseInfo; BaseInfo passes."""
    if base is None or not isinstance(base, (str, os.PathLike)):
        return base
    from .formats.names import load_base_info

    return load_base_info(base)


def _base_for(module, base):
    """``base`` as ``module`` takes it: a format that names the base's own tensors itself
    (``BASE_AS_PATH = True``, e.g. kohya: any diffusers or single-file checkpoint) gets the
    path, the others a BaseInfo (``_base_info``)."""
    if getattr(module, "BASE_AS_PATH", False) and isinstance(base, (str, os.PathLike)):
        return Path(base)
    return _base_info(base)


def _readable(path: Path, format: str | None, *, light: bool = False) -> Format:
    """The format that reads ``path``; ``light``: NeedsTorch where the light path does not
    read it (light/route.py)."""
    fmt = get_format(format) if format else detect_format(path)
    if light:
        from .light.route import require_reader

        require_reader(fmt)
    if not fmt.can_read:
        raise UnsupportedError(f"format {fmt.name!r} can only be written, not read")
    if format and path.is_dir() and not fmt.output_is_dir and not _sniffs(fmt, path):
        raise FormatError(_folder_for_file_format(path, fmt))
    return fmt


def _sniffs(fmt: Format, path: Path) -> bool:
    try:
        return bool(fmt.module.sniff(path))
    except Exception:  # noqa: BLE001  (a plugin's sniff: only a hint here)
        return False


def _folder_for_file_format(path: Path, fmt: Format) -> str:
    """--from FORMAT names a one-file format, and ``path`` is a folder: say so, and name the
    files in it that FORMAT could mean."""
    try:
        meant = sorted(p.name for p in path.iterdir() if p.is_file() and _sniffs(fmt, p))
    except OSError:
        meant = []
    hint = (f"pass one of its files: {', '.join(meant[:5])}" + (", ..." if len(meant) > 5 else "")
            if meant else f"it holds no {fmt.name} file; pass the file itself or drop --from")
    return f"{path}: is a folder, and {fmt.name} adapters are one file; {hint}"


def local_input_path(path, kind: str, hub: dict, sources: list | None = None, role: str | None = None):
    """``path`` as a local path: Hub URIs (``hf://owner/name[@rev][/sub]``) and plain
    ``owner/name`` ids are fetched, only the files ``kind`` needs; their provenance (resolved
    commit, under ``role``) is appended to ``sources``. ``hub``: ``endpoint`` and ``token``."""
    if path is None:
        return None
    from .hub import local_input

    local, provenance = local_input(path, kind=kind, **hub)
    if provenance is not None and sources is not None:
        sources.append(dict(provenance, role=role or kind))
    return local


def _push_after(report: dict, output, push_to: str | None, push: dict, hub: dict) -> dict:
    """Push ``output`` with its model card (from ``report``) when asked; the push is recorded."""
    if push_to is not None:
        from .errors import AdapterToolsError
        from .hub import push as push_output

        try:
            report["pushed"] = push_output(output, push_to, report=report, **push,
                                           **hub).to_dict()
        except AdapterToolsError as exc:     # the output stays: say how to push it later
            raise type(exc)(f"{exc} ({output} was written; push it with `adaptertools push "
                            f"{output} {push_to}`)") from None
    return report


def load(path: str | os.PathLike, *, format: str | None = None, scale: float | None = None,
         base=None, endpoint: str | None = None, token=None) -> Adapter:
    """Read an adapter; the format is detected unless given.

    Args:
        path: the adapter (folder or file), or a Hub URI ``hf://owner/name[@revision][/sub]``.
        format: skip detection and read it as this format (see ``adaptertools formats``).
        scale: the effective scale of bare factor files that carry no config.
        base: the base model (HF folder, its config.json or a GGUF model, or a Hub URI); maps
            GGUF names back to HF.
        endpoint, token: the Hub to fetch ``hf://`` inputs from (see ``adaptertools.hub``).

    Returns:
        Adapter (not a report: the factors themselves).

    Raises:
        InputNotFoundError: ``path`` does not exist.
        FormatError: ``path`` is no adapter adaptertools recognises, or is malformed.
        UnsupportedError: the format is unknown, unavailable or write-only, or the adapter
            uses what adaptertools cannot read.
        OptionError: ``scale`` for an adapter that carries its own.
        HubError: a Hub input could not be fetched.

    Example:
        >>> from adaptertools import load
        >>> adapter = load("peft_adapter")
        >>> sorted(adapter.weights)[0]
        'model.layers.0.mlp.down_proj.weight'
    """
    hub = {"endpoint": endpoint, "token": token}
    path, base = local_input_path(path, "adapter", hub), local_input_path(base, "config", hub)
    path = require_exists(path)
    fmt = _readable(path, format)
    return _read(fmt, path, scale, base)


def _read(fmt: Format, path: Path, scale: float | None, base=None, *,
          unplaced: bool = False, light: bool = False) -> Adapter:
    """``fmt.read`` with the options it takes; ``base`` (path or BaseInfo) is only resolved
    when the format uses it, so a PEFT adapter never needs a GGUF-mappable base. ``unplaced``
    (inspect without a base): a format whose names need the base (kohya) keys the adapter by
    the file's own names instead of refusing; such an adapter is never merged or written. Only a
    reader that names it gets it (not every ``**opts`` plugin: it is no user's option).
    ``light``: the tensors as numpy (light/), from the built-in readers that take it."""
    options = {"light": True} if light else {}
    if unplaced and "unplaced" in _signature.signature(fmt.module.read).parameters:
        options["unplaced"] = True
    if scale is not None:
        if not _accepts(fmt.module.read, "scale"):
            raise OptionError(f"{path}: --scale only applies to files without a config; "
                              f"{fmt.name} adapters carry their own scale, drop --scale")
        options["scale"] = scale
    if base is not None and _accepts(fmt.module.read, "base"):
        options["base"] = _base_for(fmt.module, base)
    return fmt.module.read(path, **options)


def _refuse_dense_kinds(adapter: Adapter, format_name: str) -> None:
    """The writers store LoRA factors (B, A); a LoHa/LoKr delta is none (kernels/deltas.py)."""
    if all(isinstance(w, LoraWeight) for w in adapter.weights.values()):
        return          # (deltas.LORA, exactly low rank; asked without importing the kernels)
    from .kernels.deltas import exactly_low_rank, kind

    name, w = next(((n, w) for n, w in adapter.weights.items() if not exactly_low_rank(w)
                    and not (w.layer == "param" and format_name in ("peft", "gguf"))),
                (None, None))
    if name is not None and w.layer == "param":    # PEFT target_parameters (peft_params.py)
        from .formats.peft_params import REFUSED_BY_OTHER_FORMATS

        raise UnsupportedError(f"{name}: {format_name} cannot hold {REFUSED_BY_OTHER_FORMATS}")
    if name is not None:
        raise UnsupportedError(
            f"{name}: a {kind(w).name} delta ({kind(w).formula}) is not B @ A, and {format_name} "
            "stores LoRA factors; take a LoRA of it by SVD with adaptertools combine ADAPTER "
            "--method svd --rank R --out LORA (the report says how much of the delta it keeps) "
            "and convert that, or merge it into its base directly")


def _kohya_unplaced(adapter: Adapter) -> bool:
    from .formats.kohya import UNPLACED

    return bool(adapter.metadata.get(UNPLACED))


def _refuse_unwritable(adapter: Adapter, fmt: Format) -> None:
    """What no writer (or only some) can hold, refused before anything is written: a kohya
    adapter read without its base (its keys are the file's own names), PEFT's LoRA on
    nn.MultiheadAttention (peft_mha.py), and trained token rows (PEFT trainable tokens) except
    where the format keeps them (``WRITES_TOKEN_ROWS``): dropping any of them would change what
    the adapter computes."""
    from .formats.peft_mha import METADATA

    # the flag only a kohya read sets (kohya.py, which imports torch, is imported only then)
    if adapter.metadata.get("source_format") == "kohya" and _kohya_unplaced(adapter):
        raise UnsupportedError("a kohya adapter read without its base (keyed by its own module "
                               "names) cannot be written; pass --base <the model it was "
                               "trained on>")
    attention = adapter.metadata.get(METADATA)
    if attention:
        raise UnsupportedError(
            f"{attention[0]}: a LoRA on nn.MultiheadAttention (PEFT), which {fmt.name} does not "
            "express (PEFT applies its out_proj delta twice); merge the adapter into its base "
            "(adaptertools merge), or keep the PEFT folder")
    if adapter.token_rows and not getattr(fmt.module, "WRITES_TOKEN_ROWS", False):
        name, rows = next(iter(adapter.token_rows.items()))
        raise UnsupportedError(
            f"{name}: {len(rows.indices)} trained token row(s) (PEFT trainable tokens), which "
            f"{fmt.name} cannot hold; merge the adapter into its base (adaptertools merge), "
            "or keep it as a PEFT folder")


def save(adapter: Adapter, path: str | os.PathLike, *, format: str, dtype: AdapterDtype = "keep",
         force: bool = False, base=None, inputs=()) -> None:
    """Write ``adapter`` atomically: nothing appears at ``path`` unless the whole write succeeds.

    Args:
        adapter: what to write.
        path: the output file or folder (as the format writes it).
        format: the output format (see ``adaptertools formats``).
        dtype: cast the factors (fp32, fp16, bf16); q8_0 where the format has it (GGUF).
        force: replace an existing ``path``.
        base: as for ``load``; GGUF needs it unless the adapter came from one of our own GGUF
            files.
        inputs: paths the caller read, which ``path`` must neither be, contain nor lie inside
            (``paths.py``).

    Raises:
        UnsupportedError: ``format`` is unknown, unavailable or read-only, or cannot express
            the adapter; ``path`` is, holds or lies in an input.
        OptionError: an unknown ``dtype``.
        FormatError: the adapter holds NaN or Inf values.
        OutputExistsError: ``path`` exists and ``force`` is False.
        OSError: too little free disk space, or the folder is not writable.

    Example:
        >>> from adaptertools import load, save
        >>> save(load("peft_adapter"), "adapter.safetensors", format="safetensors", dtype="bf16")
    """
    _save(adapter, path, get_format(format), dtype=dtype, force=force, base=base, inputs=inputs)


def _save(adapter: Adapter, path, fmt: Format, *, dtype: str, force: bool, base,
          inputs) -> None:
    """``save`` to the format ``fmt`` (convert's light path finds it without the registry)."""
    if not fmt.can_write:
        raise UnsupportedError(f"format {fmt.name!r} can be read but not written")
    _refuse_dense_kinds(adapter, fmt.name)
    _refuse_unwritable(adapter, fmt)
    adapter = _one_component(adapter, fmt)
    bad = nonfinite_tensors(adapter)
    if bad:
        raise FormatError(f"{bad[0]} holds NaN or Inf values ({len(bad)} tensor(s) in all); "
                          "refusing to write a broken adapter, fix or retrain it")
    options = {}
    if _accepts(fmt.module.write, "dtype"):
        options["dtype"] = dtype          # the format casts (and may quantize) itself
    else:
        adapter = cast_adapter(adapter, _cast_target(adapter, dtype))
    if base is not None and _accepts(fmt.module.write, "base"):
        options["base"] = _base_for(fmt.module, base)
    nbytes = sum(t.numel() * t.element_size() for w in adapter.weights.values()
                 for t in (w.a, w.b, w.magnitude, w.bias) if t is not None)
    nbytes += sum(t.numel() * t.element_size() for t in adapter.replacements.values())
    with atomic_output(path, force=force, is_dir=fmt.output_is_dir, expected_bytes=nbytes,
                       inputs=inputs) as tmp:
        fmt.module.write(adapter, tmp, **options)


def _cast_target(adapter: Adapter, dtype: str):
    """``parse_dtype(dtype)``; for the light path's Stored tensors torch's name of it instead
    (``Stored.to`` casts as ``Tensor.to`` does, light/arrays.py), no torch needed."""
    from .dtypes import CONFIG_DTYPES, DTYPE_NAMES
    from .light.arrays import is_stored

    stored = any(is_stored(w.a) for w in adapter.weights.values()) or \
        any(is_stored(t) for t in adapter.replacements.values())
    if stored and dtype in DTYPE_NAMES:
        return CONFIG_DTYPES[DTYPE_NAMES[dtype]]
    return parse_dtype(dtype)


def _one_component(adapter: Adapter, fmt: Format) -> Adapter:
    """A pipeline LoRA (``metadata["components"]``, keys ``unet.<name>``: diffusers, kohya)
    for a format that holds one model's LoRA (no ``PIPELINE_KEYS``): its one component with
    the prefix dropped; several components are refused (no such file could load them)."""
    components = adapter.metadata.get("components")
    if not components or getattr(fmt.module, "PIPELINE_KEYS", False):
        return adapter
    if len(components) > 1:
        raise UnsupportedError(f"this LoRA holds {', '.join(components)} (a pipeline LoRA); a "
                               f"{fmt.name} adapter is one model's: write --to diffusers, or "
                               "merge it into the pipeline folder")
    from .formats.diffusers import split_by_component

    (part,) = split_by_component(adapter).values()
    return part


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str,
            from_format: str | None = None, dtype: AdapterDtype = "keep", force: bool = False,
            scale: float | None = None, base=None, push_to: str | None = None,
            private: bool = False, revision: str | None = None,
            commit_message: str | None = None, endpoint: str | None = None,
            token=None) -> ConvertReport:
    """Convert an adapter between formats, losslessly or not at all.

    Args:
        src: the adapter (folder or file), or a Hub URI ``hf://owner/name[@revision][/sub]``.
        dst: the output file or folder.
        to, from_format: the target format, and the source's (detected when None).
        dtype, force, base: as for ``save``; ``base`` may be a Hub URI.
        scale: for bare factor files, as for ``load``.
        push_to: upload ``dst`` with a model card to this repo (``owner/name``), on branch
            ``revision``, created (``private`` if asked) when missing, with ``commit_message``.
        endpoint, token: the Hub of ``hf://`` inputs and of the push.

    Returns:
        ConvertReport: the formats, the tensor counts, and the push (``pushed``).

    Raises:
        InputNotFoundError: ``src`` does not exist.
        FormatError: ``src`` is no adapter adaptertools recognises, is malformed, or holds
            NaN or Inf values.
        UnsupportedError: ``to`` cannot express the adapter (the conversion is refused, not
            approximated), a format is unknown or unavailable, a bad ``push_to`` id or
            ``revision``, a ``dst`` that is, holds or lies in an input.
        OptionError: ``base`` for formats that take none, ``scale`` for an adapter that
            carries its own, an unknown ``dtype``.
        OutputExistsError: ``dst`` exists and ``force`` is False.
        HubError: a Hub input could not be fetched, or the push failed (``dst`` stays).
        OSError: too little free disk space, or the folder is not writable.

    Example:
        >>> from adaptertools import convert
        >>> report = convert("peft_adapter", "adapter.gguf", to="gguf", base="base_model")
        >>> report["from"], report.to
        ('peft', 'gguf')
    """
    hub, sources = {"endpoint": endpoint, "token": token}, []
    if push_to is not None:
        from .hub import check_push

        check_push(push_to)       # a bad id or offline mode fails before any work
    given = str(src)
    src = local_input_path(src, "adapter", hub, sources)
    base = local_input_path(base, "config", hub, sources, role="base")
    src_path = require_exists(src)
    inputs = (src_path, base if isinstance(base, (str, os.PathLike)) else None)

    def run(light: bool):       # light: numpy, no torch (light/route.py)
        fmt = _readable(src_path, from_format, light=light)
        target = require_writer(get_format(to), dtype) if light else get_format(to)
        refuse_output(dst, force=force, is_dir=target.output_is_dir, inputs=inputs)
        reads_base = _accepts(fmt.module.read, "base") and \
            getattr(fmt.module, "uses_base", lambda path: True)(src_path)
        given_base = base
        if given_base is not None and not (reads_base or _accepts(target.module.write, "base")):
            raise OptionError(f"--base does not apply to {fmt.name} -> {target.name}; drop it")
        if not any(getattr(f.module, "BASE_AS_PATH", False) for f in (fmt, target)):
            given_base = _base_info(given_base)     # parsed once, for the reader and the writer
        adapter = _read(fmt, src_path, scale, given_base, light=light)
        named, notes = None, []
        if given_base is None:
            named = _named_base(adapter, target)
            if named is not None:
                given_base = _base_info(named)
                notes.append(f"base model {named}: the one the adapter names (its "
                             "base_model_name_or_path); pass --base to use another")
        _save(adapter, dst, target, dtype=dtype, force=force, base=given_base, inputs=inputs)
        return fmt, target, adapter, named, notes

    from .light.route import light_or_torch, require_writer

    fmt, target, adapter, named, notes = light_or_torch(run)
    from_hub = any(s["role"] == "adapter" for s in sources)
    # a GGUF LoRA stores no full tensors: the writer dropped those (unchanged copies of the
    # base, as PEFT saves beside an adapted embedding) or refused the conversion
    dropped = len(adapter.replacements) if target.name == "gguf" else 0
    report = {"src": given if from_hub else str(src_path), "dst": str(dst), "from": fmt.name,
              "to": to, "dtype": dtype, "adapted_tensors": len(adapter.weights),
              "replaced_tensors": len(adapter.replacements) - dropped}
    if dropped:
        report["dropped_tensors"] = dropped
    if named is not None:
        report["base"] = named
    if notes:
        report["notes"] = notes
    if adapter.base_model:           # for a pushed model card's ``base_model``
        report["base_model"] = adapter.base_model
    if sources:
        report["hub_inputs"] = sources
    push = {"private": private, "revision": revision, "commit_message": commit_message}
    return ConvertReport.from_dict(_push_after(report, dst, push_to, push, hub))


def _named_base(adapter: Adapter, target: Format) -> str | None:
    """The base the adapter was trained on (PEFT's base_model_name_or_path) when it is a local
    folder or file and ``target`` writes with a base it was not given (GGUF); a Hub id is not
    fetched."""
    named = adapter.base_model
    if (not named or not _accepts(target.module.write, "base") or "gguf_base" in adapter.metadata
            or not os.path.exists(named)):
        return None
    return named
