"""Resume records: what a finished piece of work read, how it was asked for, and what it wrote.

A batch job (``batch.py``) and a shard task of a parallel merge (``merging/pieces.py``) each
record one ``Entry`` when they finish. A rerun skips a piece whose entry still matches: the same
inputs (size and mtime of every file, or the Hub commit asked for), the same options, the same
adaptertools version, and outputs that are still there with the size, mtime and (where asked)
hash recorded. Anything else is redone.

The manifest is one JSON file, rewritten whole on each record (temporary file + rename, under an
``fcntl`` lock), so a crash leaves either the old manifest or the new one, never half of it.
Local executors and Ray tasks on one shared filesystem may record into the same file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__

MANIFEST_VERSION = 1
HASH_CHUNK = 8 << 20


def _files(path: Path) -> list[Path]:
    """A file, or every file under a folder (sorted; hidden temporaries of our writers skipped)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()
                  and not any(part.startswith(".at") for part in p.relative_to(path).parts))


def fingerprint(path: str | os.PathLike) -> dict:
    """What identifies an input cheaply: for a local file or folder, each file's size and
    mtime (ns); for a Hub URI, the URI itself (its ``@revision``, a commit where pinned); for a
    path that does not exist, ``{"missing": true}`` (never equal to a real input)."""
    text = str(path)
    if text.startswith("hf://"):
        return {"uri": text}
    return output_record(path, hashed=False)


def sha256(path: str | os.PathLike, start: int = 0, end: int | None = None) -> str:
    """The sha256 of a file, or of its bytes [start, end) (a byte range of a GGUF output)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            chunk = fh.read(HASH_CHUNK if left is None else min(HASH_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            left = None if left is None else left - len(chunk)
    return digest.hexdigest()


def output_record(path: str | os.PathLike, *, hashed: bool = True) -> dict:
    """An output as it is now: per file, [size, mtime_ns] and (``hashed``) its sha256."""
    p = Path(path)
    if not p.exists():
        return {"missing": True}
    root = p if p.is_dir() else p.parent
    record = {}
    for f in _files(p):
        st = f.stat()
        name = str(f.relative_to(root)) if p.is_dir() else f.name
        record[name] = [st.st_size, st.st_mtime_ns] + ([sha256(f)] if hashed else [])
    return {"files": record}


def _same_output(recorded: dict, path: str) -> bool:
    """Still there, every file with the recorded size and mtime (no re-hash: cheap)."""
    now = output_record(path, hashed=False)
    if "files" not in recorded or "files" not in now:
        return False
    then = {name: v[:2] for name, v in recorded["files"].items()}
    return then == now["files"]


@dataclass(frozen=True)
class Entry:
    key: str                 # the piece: "job 3 merge -> merged_a", "shard model-00001-of-00002"
    inputs: dict             # path -> fingerprint(path)
    options: dict            # the piece's keyword arguments (JSON-able), paths resolved
    outputs: dict            # path -> output_record(path)
    version: str = __version__
    extra: dict = field(default_factory=dict)    # wall, peak memory, report summary: not compared


def entry_for(key: str, inputs: Iterable, options: dict, outputs: Iterable, *,
              hashed: bool = True, extra: dict | None = None) -> Entry:
    return Entry(key, {str(p): fingerprint(p) for p in inputs}, _jsonable(options),
                 {str(p): output_record(p, hashed=hashed) for p in outputs}, __version__,
                 dict(extra or {}))


def _jsonable(value):
    return json.loads(json.dumps(value, default=str, sort_keys=True))


class Manifest:
    """One manifest file: ``fresh`` asks whether a piece can be skipped, ``record`` adds one."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def entries(self) -> dict[str, Entry]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}      # unreadable: nothing is trusted, everything is redone
        if data.get("manifest_version") != MANIFEST_VERSION:
            return {}
        out = {}
        for key, raw in data.get("entries", {}).items():
            with contextlib.suppress(TypeError):
                out[key] = Entry(**raw)
        return out

    def fresh(self, key: str, inputs: Iterable, options: dict) -> Entry | None:
        """The recorded entry for ``key`` when it still holds: same version, inputs, options,
        and every recorded output unchanged on disk; else None (the piece must run)."""
        entry = self.entries().get(key)
        if entry is None or entry.version != __version__:
            return None
        if entry.options != _jsonable(options):
            return None
        if entry.inputs != {str(p): fingerprint(p) for p in inputs}:
            return None
        if not all(_same_output(rec, path) for path, rec in entry.outputs.items()):
            return None
        return entry

    def record(self, entry: Entry) -> None:
        self._update(lambda entries: {**entries, entry.key: asdict(entry)})

    def forget(self, key: str) -> None:
        self._update(lambda entries: {k: v for k, v in entries.items() if k != key})

    def _update(self, change) -> None:
        """Read, change and rewrite the whole file under the lock (temporary file + rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path.with_name(self.path.name + ".lock")):
            entries = change({k: asdict(v) for k, v in self.entries().items()})
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"manifest_version": MANIFEST_VERSION,
                                       "entries": entries}, indent=1, sort_keys=True))
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)


@contextlib.contextmanager
def _locked(lock_path: Path):
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
