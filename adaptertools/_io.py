"""File helpers shared by every format: atomic outputs and safetensors reads with clear errors."""

from __future__ import annotations

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


def ensure_free_space(folder: Path, nbytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise OSError(f"{folder}: {nbytes / 1e9:.2f} GB needed but only {free / 1e9:.2f} GB free; "
                      "free some space or write elsewhere")


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())


@contextmanager
def atomic_output(dst: str | os.PathLike, *, force: bool = False, is_dir: bool,
                  expected_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; on success fsync it and rename it onto ``dst``.

    On any error the temporary path is removed, so no partial output is ever left at ``dst``.
    """
    dst = Path(dst)
    if dst.exists() and not force:
        raise OutputExistsError(f"{dst}: already exists; pass --force (force=True) to overwrite it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(dst.parent, expected_bytes)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            _remove(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise


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
