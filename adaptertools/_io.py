"""File helpers shared by every format: sizes, free space, JSON and safetensors reads with clear
errors. Atomic outputs and the rules on what may be written and read are in ``paths.py``."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from .errors import FormatError, InputNotFoundError, UnsupportedError

DEFAULT_BUDGET = 1 << 30   # when /proc/meminfo cannot be read (_prefetch.py)


def require_exists(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file or directory; check the path")
    return path


def human_size(nbytes: int) -> str:
    """``1234567`` -> ``"1.23 MB"``: decimal units, bytes below 1 kB (here, not in ``_ui``, so
    that messages raised by the library read the same without importing rich)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


def _existing_ancestor(folder: Path) -> Path:
    """``folder`` itself or the nearest folder above it that exists."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()    # not reached: a relative path ends at ".", an absolute one at "/"


def ensure_free_space(folder: Path, nbytes: int, *, dst: Path | None = None) -> None:
    """Refuse (OSError, errno ENOSPC) when ``folder``'s file system has under ``nbytes`` free."""
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        where = folder if dst is None else f"{dst} (on {folder})"
        exc = OSError(f"{where}: {human_size(nbytes)} needed but only {human_size(free)} free; "
                      "free some space or write elsewhere")
        exc.errno = errno.ENOSPC     # set after: OSError(errno, text) prints "[Errno 28]"
        raise exc


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc}); fix or regenerate the file") from None
    except RecursionError:       # json's parser recurses once per nesting level
        import sys

        raise FormatError(f"{path}: JSON nested too deeply to be a config or index (over "
                          f"{sys.getrecursionlimit()} levels); fix or regenerate the file") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(path: Path, data, *, strict: bool = True) -> None:
    """``data`` as JSON in ``path``: sorted keys, a trailing newline (byte-deterministic output
    for the same data). ``strict`` (the default) writes RFC 8259 JSON, see ``json_text``;
    ``strict=False`` keeps Python's ``NaN``/``Infinity`` tokens (a copy of an input's own)."""
    text = json_text(data) if strict else json.dumps(data, indent=2, sort_keys=True) + "\n"
    path.write_text(text, encoding="utf-8")


def json_text(data, *, default=None) -> str:
    """``data`` as strict JSON (``json.loads(..., allow_nan=False)``-safe: no ``NaN`` or
    ``Infinity`` tokens, which RFC 8259, JavaScript and most parsers but Python's refuse).

    A non-finite float is written ``null``; when ``data`` is a dict, a top-level ``"nonfinite"``
    note then maps each such field's JSON Pointer (RFC 6901, e.g. ``/tensors/3/relative_error``)
    to what it was: ``"nan"``, ``"inf"`` or ``"-inf"``. A null alone would read as "no value"
    (and hide the difference between NaN and an infinity); a string in the field itself would
    break readers that compare numbers. Finite data gives the same text as ``json.dumps``.
    """
    found: dict[str, str] = {}
    clean = _finite(data, "", found)
    if found and isinstance(clean, dict):
        note = clean.get("nonfinite")
        clean["nonfinite"] = {**(note if isinstance(note, dict) else {}), **found}
    return json.dumps(clean, indent=2, sort_keys=True, allow_nan=False, default=default) + "\n"


def _finite(value, pointer: str, found: dict[str, str]):
    """A copy of ``value`` with non-finite floats as None, each recorded in ``found``."""
    import math

    if isinstance(value, float):
        if math.isfinite(value):
            return value
        found[pointer] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return None
    if isinstance(value, dict):
        return {k: _finite(v, pointer + "/" + str(k).replace("~", "~0").replace("/", "~1"),
                           found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{pointer}/{i}", found) for i, v in enumerate(value)]
    return value


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes; DEFAULT_BUDGET * 4 where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return DEFAULT_BUDGET * 4


def check_fits_in_memory(path: str | os.PathLike, sizes: dict[str, int]) -> None:
    """Adapters are loaded whole (eagerly): refuse one whose tensors, ``sizes`` (name -> bytes
    once loaded, from the file's header), need more than the memory available, before any is
    read. A file declaring a 100 GB tensor would otherwise be read until the kernel kills us."""
    total = sum(sizes.values())
    available = available_memory()
    if total <= available:
        return
    largest = max(sizes, key=sizes.get)
    raise UnsupportedError(f"{path}: its tensors need {human_size(total)} of memory ({largest} "
                           f"alone {human_size(sizes[largest])}) but only {human_size(available)} "
                           "is available; adapters are loaded whole, so one can be at most about "
                           "the free memory: free some, or use a larger machine (a LoRA adapter is "
                           "usually MBs to a few GB: check that this file is one)")


def load_safetensors(path: Path) -> tuple[dict, dict[str, str]]:
    """All tensors of a safetensors file and its ``__metadata__``, or a FormatError naming the file.
    Tensors the header declares larger than the memory available are refused before any is read
    (``check_fits_in_memory``)."""
    from safetensors import SafetensorError, safe_open

    from .errors import AdapterToolsError
    from .tensor_index import read_safetensors_header

    try:   # loaded whole: the sizes the header declares are checked against memory first
        declared = {t.name: t.nbytes for t in read_safetensors_header(path).tensors}
    except (AdapterToolsError, OSError):
        declared = {}       # safe_open below says what is wrong with the file, in its words
    if declared:
        check_fits_in_memory(path, declared)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FormatError(f"{path}: not a readable safetensors file ({reason}); the file is "
                          "truncated or corrupt, download or save it again") from None
    return tensors, metadata
