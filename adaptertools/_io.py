"""File helpers shared by every format: atomic outputs and safetensors reads with clear errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import FormatError, InputNotFoundError, OutputExistsError


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


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _out_of_space(exc: OSError, dst: Path) -> OSError:
    """A full disk (or quota) met while writing ``dst``: the same errno, a message naming it."""
    reason = os.strerror(exc.errno).lower()
    new = OSError(f"{dst}: {reason} while writing it, nothing was written; free some space or "
                  "write elsewhere")
    new.errno = exc.errno        # set after, so str(new) is the message alone
    return new


@contextmanager
def atomic_output(dst: str | os.PathLike, *, force: bool = False, is_dir: bool,
                  expected_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; on success fsync it and rename it onto ``dst``.

    Free space is checked before anything is created; on any error (or Ctrl-C) the temporary
    path and the parent folders this call created are removed, so nothing is left behind. A full
    disk met inside the block is re-raised as an OSError (same errno) that names ``dst``.
    """
    dst = Path(dst)
    if (dst.exists() or dst.is_symlink()) and not force:
        raise OutputExistsError(f"{dst}: already exists; pass --force (force=True) to overwrite it")
    ancestor = _existing_ancestor(dst.parent)
    ensure_free_space(ancestor, expected_bytes, dst=dst)
    # the folders between ``ancestor`` and ``dst``, deepest first: removed again on failure
    created = [p for p in (dst.parent, *dst.parent.parents) if p != ancestor
               and ancestor in p.parents]
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            tmp.mkdir()
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, dst)
    except BaseException as exc:
        _remove(tmp)
        _remove_empty(created)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            raise _out_of_space(exc, dst) from exc
        raise


def _replace(tmp: Path, dst: Path) -> None:
    """Rename ``tmp`` onto ``dst``; an existing ``dst`` is put back if that rename fails."""
    if not (dst.exists() or dst.is_symlink()):
        os.replace(tmp, dst)
        return
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    _remove(old)


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) that are empty; leave any that are not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc}); fix or regenerate the file") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(path: Path, data: dict) -> None:
    # sort_keys and a trailing newline: byte-deterministic output for the same adapter
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_safetensors(path: Path) -> tuple[dict, dict[str, str]]:
    """All tensors of a safetensors file and its ``__metadata__``, or a FormatError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FormatError(f"{path}: not a readable safetensors file ({reason}); the file is "
                          "truncated or corrupt, download or save it again") from None
    return tensors, metadata
