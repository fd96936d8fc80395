"""Reads a local base's weight files into the page cache while the interpreter is still busy.

``adaptertools merge`` spends its first 1.3-1.6 s importing torch, on one core, with the disk
idle. A daemon thread started before that import reads the base's weight files, in the order the
engine will want them, into the kernel's page cache, where the engine's own reads find them.
Measured on the 2-core machine, W1 (2.2 GB) from a cold cache: 1.0-1.4 s, so most of it is in
memory by the time the first tensor is folded.

The reading is ``sendfile`` to /dev/null, 256 MB per call: the kernel fills the page cache and
copies nothing to this process, and the thread holds the GIL for a few calls in all. (A loop of
small ``pread`` calls into a buffer made the import 1 s slower: every call takes the GIL back
from the importing thread.)

Bounded: at most a quarter of the memory the kernel reports available (a base larger than
memory, like W3, is only read ahead at its start; the engine's sequential reads do the rest).
Torch-free and best effort: anything unexpected (a missing file, an hf:// name) just reads less,
and the merge itself reports real errors.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from ._io import available_memory

INDEX_NAME = "model.safetensors.index.json"     # (merging/bases.INDEX_NAME; bases.py imports more)
CHUNK = 256 << 20          # bytes per sendfile call


def weight_files(base: str | os.PathLike) -> list[Path]:
    """A local base's weight files in the order a merge reads them; [] for anything else."""
    path = Path(base)
    if path.is_file():
        return [path] if path.suffix in (".gguf", ".safetensors") else []
    if not path.is_dir():
        return []
    index = path / INDEX_NAME
    try:
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            names = sorted(p.name for p in path.glob("*.safetensors"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return []
    return [path / name for name in names if (path / name).is_file()]


def read_ahead(paths: list[Path], budget: int, stop: threading.Event) -> int:
    """Read up to ``budget`` bytes of ``paths`` in order (stopping early when ``stop`` is set);
    returns the bytes read."""
    if not hasattr(os, "sendfile"):
        return 0
    done = 0
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                offset = 0
                while done < budget and not stop.is_set():
                    n = os.sendfile(null, fd, offset, min(CHUNK, budget - done))
                    if n <= 0:
                        break
                    offset, done = offset + n, done + n
            except OSError:          # e.g. a platform whose sendfile needs a socket
                return done
            finally:
                os.close(fd)
            if done >= budget or stop.is_set():
                break
    finally:
        os.close(null)
    return done


def start(base: str | os.PathLike, others: tuple[str, ...] = (), *,
          first: str = "others") -> threading.Event:
    """Start reading the weight files of ``others`` (a merge's adapters, a validation's merged
    model) and ``base``, in a daemon thread, ``first`` ("others" or "base") first: the order the
    command loads them. Set the returned event to stop it early."""
    stop = threading.Event()
    rest = [p for other in others for p in weight_files(other)]
    paths = rest + weight_files(base) if first == "others" else weight_files(base) + rest
    if paths:
        budget = available_memory() // 4
        threading.Thread(target=read_ahead, args=(paths, budget, stop), daemon=True,
                         name="adaptertools-prefetch").start()
    return stop
