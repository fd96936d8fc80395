"""Where adaptertools may read and write: output rules, atomic outputs, and links inside inputs.

Outputs. Every command that writes goes through ``atomic_output``:

- OUT is resolved first (symlinks, ``..``), so ``b/../b`` and a link to the base are the base.
- An OUT that is an input, contains one or lies inside one is refused before anything is
  written, with or without ``--force``.
- ``--force`` replaces a regular file, an empty folder, or a folder that looks like a model or
  adapter folder; never a device, socket or FIFO, a mount point, ``/``, the home folder, the
  current folder (or one above it), or a folder with other content.
- One run at a time per OUT: a lock file beside OUT (``.NAME.at-lock``) is held for the whole
  run; without ``--force`` the final rename cannot replace an OUT that appeared meanwhile.
- Temporaries are siblings named ``.NAME.at<pid>-<4 hex>`` (``NAME`` cut so the whole name fits
  in 255 bytes); the next run into the same OUT, holding the lock, removes stale ones and says
  so (a replaced OUT left by a killed run, ``....old``, is put back first when OUT is missing).

Inputs. Files found inside an input folder (shards, configs, tokenizer files, files to push) are
read through a symlink only when it stays inside that folder, or inside the Hugging Face cache
when the folder is a snapshot there (its files are links into the cache's blobs).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
import sys
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ._io import _existing_ancestor, ensure_free_space
from ._signals import raise_if_signalled
from .errors import AdapterToolsWarning, FormatError, OutputExistsError, UnsupportedError

NAME_MAX = 255                       # bytes in one file name (ext4, xfs, btrfs, tmpfs, APFS)
TEMP_TAG = re.compile(r"\.at(\d+)-[0-9a-f]{4}(\.old)?$")
LOCK_TAG = ".at-lock"
LONGEST_TAG = len(".at4194304-abcd.old")     # pid_max is at most 2^22
# what a folder replaced by --force may hold at its top level besides adapter sub-folders
MODEL_MARKERS = ("config.json", "adapter_config.json", "model.safetensors.index.json",
                 "adapters.safetensors", "pytorch_lora_weights.safetensors", "model_index.json")
MODEL_SUFFIXES = {".safetensors", ".json", ".gguf", ".md", ".txt", ".model", ".jinja",
                  ".tiktoken", ".py", ".bin", ".pt", ".pth", ".png", ".vocab", ".spm", ".npz"}
MODEL_NAMES = {".gitattributes", "LICENSE", "NOTICE", "USE_POLICY", "README"}


# ----------------------------------------------------------------------------- output rules

def output_path(dst: str | os.PathLike) -> Path:
    """``dst`` as the absolute path that will be written: symlinks and ``..`` resolved."""
    text = os.fspath(dst)
    if text.startswith("hf://"):
        raise UnsupportedError(f"{text}: outputs are local paths; write to a local folder or "
                               "file and pass --push-to OWNER/NAME to upload it")
    if not text or any(ord(c) < 32 for c in text):
        raise UnsupportedError(f"{text!r}: not a usable output path (empty, or control "
                               "characters); choose another")
    path = Path(text).expanduser().resolve()
    if len(path.name.encode()) > NAME_MAX:
        raise UnsupportedError(f"{path.name[:40]}...: file name too long "
                               f"({len(path.name.encode())} bytes; file systems allow "
                               f"{NAME_MAX}); choose a shorter name")
    return path


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def refuse_output(dst: str | os.PathLike, *, force: bool, is_dir: bool,
                  inputs: Iterable = ()) -> Path:
    """The resolved output path, or an error (before anything is written) when writing it
    would touch an input, or ``--force`` would replace something that is not ours to replace."""
    out = output_path(dst)
    if _within(Path.cwd().resolve(), out) or out == Path.home().resolve():
        raise UnsupportedError(f"{dst}: is the current folder, one above it, the home folder or "
                               "/; name a new folder or file for the output")
    for given in inputs:
        if given is None or os.fspath(given).startswith("hf://"):
            continue
        source = Path(given).expanduser().resolve()
        if source == out:
            raise UnsupportedError(f"{dst}: is the input {given}; write the output elsewhere")
        if out in source.parents:
            raise UnsupportedError(f"{dst}: contains the input {given}; writing there would "
                                   "replace it, choose another output")
        if source in out.parents:
            raise UnsupportedError(f"{dst}: lies inside the input {given}; write the output "
                                   "elsewhere")
    ancestor = _existing_ancestor(out.parent)
    if not ancestor.is_dir():
        raise UnsupportedError(f"{dst}: {ancestor} is a file, not a folder; choose another "
                               "output")
    try:
        info = os.lstat(out)
    except FileNotFoundError:
        return out
    if not force:
        raise OutputExistsError(f"{dst}: already exists; pass --force (force=True) to "
                                "overwrite it")
    _check_replaceable(out, info, dst, is_dir)
    return out


def _check_replaceable(out: Path, info: os.stat_result, dst, is_dir: bool) -> None:
    """What ``--force`` may replace: a regular file, or a model/adapter folder (or empty one)."""
    if stat.S_ISREG(info.st_mode):
        return
    if not stat.S_ISDIR(info.st_mode):
        kind = ("a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
                else "a socket" if stat.S_ISSOCK(info.st_mode)
                else "a FIFO" if stat.S_ISFIFO(info.st_mode) else "not a regular file")
        raise UnsupportedError(f"{dst}: is {kind}; --force only replaces regular files and "
                               "model folders, choose another output")
    if os.path.ismount(out):
        raise UnsupportedError(f"{dst}: is a mount point; --force never replaces one, name a "
                               "folder inside it")
    if not is_dir and any(out.iterdir()):
        raise UnsupportedError(f"{dst}: is a folder, and this output is one file; give a file "
                               "name (the folder is left as it is)")
    foreign = _foreign_entry(out)
    if foreign is not None:
        raise UnsupportedError(f"{dst}: not a model or adapter folder ({foreign}); --force only "
                               "replaces those and empty folders, remove it yourself or choose "
                               "another output")


def _foreign_entry(folder: Path) -> str | None:
    """The first entry showing that ``folder`` is not a model or adapter folder (None when it
    is one, or empty)."""
    entries = sorted(folder.iterdir())
    if not entries:
        return None
    if not any((folder / m).is_file() for m in MODEL_MARKERS) \
            and not any(e.suffix == ".safetensors" for e in entries):
        return f"it has no {MODEL_MARKERS[0]}, {MODEL_MARKERS[1]} or *.safetensors"
    for entry in entries:
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            return f"it holds {entry.name!r}, a link or special file"
        if entry.is_dir():
            if (entry / "adapter_config.json").is_file() and _foreign_entry(entry) is None:
                continue        # a PEFT adapter saved under its own name
            if (folder / "model_index.json").is_file() and _component_folder(entry):
                continue        # a diffusers pipeline's component (unet/, scheduler/, ...)
            return f"it holds the folder {entry.name!r}"
        if entry.suffix not in MODEL_SUFFIXES and entry.name not in MODEL_NAMES \
                and entry.name.split(".")[0] not in MODEL_NAMES:
            return f"it holds {entry.name!r}"
    return None


def _component_folder(folder: Path) -> bool:
    """A diffusers pipeline's component folder: model files only, no links or subfolders."""
    return all(e.is_file() and not e.is_symlink() and (e.suffix in MODEL_SUFFIXES or
                                                       e.name.split(".")[0] in MODEL_NAMES)
               for e in folder.iterdir())


# ----------------------------------------------------------------------------- siblings

def _sibling(out: Path, tag: str) -> Path:
    """``.NAME<tag>`` beside ``out``; NAME is cut (on a character boundary) so that the longest
    tag still fits in NAME_MAX bytes, the same cut for every tag."""
    return out.parent / f"{_temp_prefix(out)}{tag}"


def _temp_prefix(out: Path) -> str:
    name = out.name.encode()[:NAME_MAX - 1 - LONGEST_TAG].decode(errors="ignore")
    return f".{name}"


def temporaries(out: Path) -> list[Path]:
    """Temporaries of our runs beside ``out`` (any process, stale or live)."""
    prefix = _temp_prefix(out)
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    return sorted(out.parent / n for n in names
                  if n.startswith(prefix) and TEMP_TAG.fullmatch(n[len(prefix):]))


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``.NAME.at-lock`` beside ``out`` for the block; a second run into the same OUT
    fails at once. The file is removed again before the lock is let go."""
    path = _sibling(out, LOCK_TAG)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _unwritable(exc, out, out.parent) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputExistsError(f"{out}: another adaptertools run (pid {owner}) is writing "
                                    "it now; wait for it to finish or choose another output") \
                from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:        # not a file an earlier holder unlinked between our open and our lock
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def clean_stale(out: Path) -> list[str]:
    """With OUT's lock held, every temporary of ours beside it is a killed run's: put a replaced
    OUT back where OUT is missing, remove the rest. Returns what was done, for a warning."""
    done = []
    for path in temporaries(out):
        if path.name.endswith(".old") and not os.path.lexists(out):
            os.replace(path, out)
            done.append(f"put back {out.name} from {path.name}")
            continue
        _remove(path)
        done.append(f"removed {path.name}")
    return done


# ----------------------------------------------------------------------------- atomic output

@contextmanager
def atomic_output(dst: str | os.PathLike, *, force: bool = False, is_dir: bool,
                  expected_bytes: int = 0, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; on success fsync it and rename it onto ``dst``.

    ``refuse_output`` runs first (``inputs``: the paths this run reads). Free space is checked
    before anything is created; on any error (or Ctrl-C) the temporary path and the parent
    folders this call created are removed, so nothing is left behind. A full disk met inside
    the block is re-raised as an OSError (same errno) that names ``dst``.
    """
    out = refuse_output(dst, force=force, is_dir=is_dir, inputs=inputs)
    ancestor = _existing_ancestor(out.parent)
    ensure_free_space(ancestor, expected_bytes, dst=Path(dst))
    # the folders between ``ancestor`` and ``out``, deepest first: removed again on failure
    created = [p for p in (out.parent, *out.parent.parents) if ancestor in p.parents]
    tmp = _sibling(out, f".at{os.getpid()}-{uuid.uuid4().hex[:4]}")
    try:
        _setup(lambda: out.parent.mkdir(parents=True, exist_ok=True), dst, out.parent)
        with output_lock(out):
            _claim(out, dst, force=force, is_dir=is_dir)
            if is_dir:
                _setup(tmp.mkdir, dst, out.parent)
            try:
                yield tmp
                _fsync_tree(tmp)
                _replace(tmp, out, force=force, dst=dst)
            except BaseException:
                _remove(tmp)
                raise
    except BaseException as exc:
        _remove_empty(created)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            raise _out_of_space(exc, Path(dst)) from exc
        raise


def _claim(out: Path, dst, *, force: bool, is_dir: bool) -> None:
    """With OUT's lock held: a killed run's temporaries cleaned up (with a warning), and an
    existing OUT refused unless ``force`` may replace it."""
    stale = clean_stale(out)
    if stale:
        warnings.warn(f"{dst}: an earlier run was interrupted: {'; '.join(stale)}",
                      AdapterToolsWarning, stacklevel=4)
    if os.path.lexists(out):
        if not force:
            raise OutputExistsError(f"{dst}: already exists; pass --force (force=True) "
                                    "to overwrite it")
        _check_replaceable(out, os.lstat(out), dst, is_dir)


PARTIAL_TAG = ".at-partial"          # a shard-parallel merge's output while it is written
PIECES_TAG = ".at-pieces.json"       # its manifest of finished pieces (manifest.py)


@contextmanager
def resumable_output(dst: str | os.PathLike, *, force: bool = False, is_dir: bool,
                     expected_bytes: int = 0, inputs: Iterable = ()) -> Iterator[tuple[Path, Path]]:
    """``atomic_output`` for work that resumes (parallel.py): yields (``.NAME.at-partial``
    beside ``dst``, ``.NAME.at-pieces.json``: the manifest of finished pieces). The partial
    path is fixed and kept when the block fails or the run is killed, so a rerun with the same
    inputs finds the finished pieces; on success it is fsynced and renamed onto ``dst`` and the
    manifest removed. ``force``: an existing ``dst`` is replaced, and a partial output of an
    earlier run is discarded first (everything is redone). OUT's lock is held throughout."""
    out = refuse_output(dst, force=force, is_dir=is_dir, inputs=inputs)
    partial, manifest = _sibling(out, PARTIAL_TAG), _sibling(out, PIECES_TAG)
    ancestor = _existing_ancestor(out.parent)
    done = sum(p.stat().st_size for p in _files_in(partial))     # what a stopped run wrote
    ensure_free_space(ancestor, max(0, expected_bytes - done), dst=Path(dst))
    _setup(lambda: out.parent.mkdir(parents=True, exist_ok=True), dst, out.parent)
    with output_lock(out):
        _claim(out, dst, force=force, is_dir=is_dir)
        if force or (partial.exists() and partial.is_dir() != is_dir):
            _remove(partial)
            _remove(manifest)
        try:
            yield partial, manifest
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise _out_of_space(exc, Path(dst)) from exc
            raise
        _fsync_tree(partial)
        _replace(partial, out, force=force, dst=dst)
        _remove(manifest)
        _remove(manifest.with_name(manifest.name + ".lock"))


def _setup(step, dst, folder: Path) -> None:
    """Run ``step`` (creating a folder); an OSError becomes one line naming ``dst``."""
    try:
        step()
    except OSError as exc:
        raise _unwritable(exc, dst, folder) from None


def _unwritable(exc: OSError, dst, folder: Path) -> OSError:
    reason = {errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.ENOTDIR: "a part of the path is a file, not a folder",
              errno.EEXIST: "a part of the path is a file, not a folder",
              errno.ENAMETOOLONG: "the name is too long"}.get(exc.errno,
                                                               os.strerror(exc.errno or 0).lower())
    new = OSError(f"{dst}: cannot write in {folder}: {reason}; choose another output")
    new.errno = exc.errno        # set after, so str(new) is the message alone
    return new


def _files_in(path: Path) -> list[Path]:
    """``path`` when it is a file, the files under it when it is a folder, else none."""
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []


def _fsync_tree(path: Path) -> None:
    for p in _files_in(path):
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _out_of_space(exc: OSError, dst: Path) -> OSError:
    """A full disk (or quota) met while writing ``dst``: the same errno, a message naming it."""
    reason = os.strerror(exc.errno).lower()
    new = OSError(f"{dst}: {reason} while writing it, nothing was written; free some space or "
                  "write elsewhere")
    new.errno = exc.errno
    return new


RENAME_NOREPLACE = 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` onto ``dst`` unless ``dst`` exists (FileExistsError), atomically where
    the platform has renameat2 (Linux); elsewhere an existence check first."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd = -100
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst),
                     RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):     # EINVAL: the file system lacks it
            raise OSError(code, os.strerror(code), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.replace(src, dst)


def _replace(tmp: Path, out: Path, *, force: bool, dst) -> None:
    """Rename ``tmp`` onto ``out``; an existing ``out`` (only with ``force``) is moved aside
    first and put back if the rename fails. A Ctrl-C or SIGTERM whose exception was lost on
    its way (_signals.py) raises here instead, before anything is committed."""
    raise_if_signalled()
    if not os.path.lexists(out) or not force:
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:
            raise OutputExistsError(f"{dst}: appeared while this run was writing it; nothing "
                                    "was replaced, pass --force to overwrite it") from None
        return
    old = Path(f"{tmp}.old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
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


# ----------------------------------------------------------------------------- inputs

def hf_cache_root() -> Path:
    """The Hugging Face hub cache: huggingface_hub's own setting once it is imported (every Hub
    input imports it), else found as it would find it, without importing it."""
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        return Path(constants.HF_HUB_CACHE).expanduser().resolve()
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser().resolve()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return (Path(home).expanduser() / "hub").resolve()


def contained_file(folder: str | os.PathLike, name: str | os.PathLike) -> Path:
    """``folder / name``, or a FormatError when it leads out of ``folder``: an absolute name,
    ``..``, or a symlink whose target is elsewhere (a snapshot folder in the Hugging Face cache
    may link into the cache)."""
    root = Path(folder).resolve()
    path = Path(folder) / name
    target = path.resolve()
    if _within(target, root) and target != root:
        return path
    cache = hf_cache_root()
    if _within(root, cache) and _within(target, cache):
        return path
    parts = Path(name).parts
    links = [p for p in (Path(folder, *parts[:i]) for i in range(len(parts), 0, -1))
             if p.is_symlink()]
    if links:
        link = links[0]
        raise FormatError(f"{link}: a symlink to {os.readlink(link)}, outside {folder}; refusing "
                          "to read files out of the input folder, copy the file in instead")
    raise FormatError(f"{folder}: names {str(name)!r}, which lies outside the folder; refusing "
                      "to read it, fix the file that names it")
