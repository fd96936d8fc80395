"""The stored tensors of a base and a merged checkpoint, read for validation: descriptors shared
by the checking threads, streamed byte comparisons, and quantized tensors as numbers."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from ..dtypes import TORCH_DTYPES
from ..merging.bases import GGUFBase, HFBase, TensorEntry
from ..merging.jobs import Job
from ..tensor_index import read_entry, short_read

COMPARE_CHUNK = 16 << 20


def stored_values(entry: TensorEntry, raw: torch.Tensor) -> torch.Tensor:
    """A stored tensor as numbers: float types as they are, quantized ones dequantized (fp32)."""
    if entry.dtype in TORCH_DTYPES:
        return raw
    from ..kernels.quant.codec import dequantize

    return dequantize(raw, entry.dtype, tuple(entry.shape), name=entry.name)


class Files:
    """Read-only descriptors of a checkpoint's files, opened on first use."""

    def __init__(self, checkpoint: HFBase | GGUFBase) -> None:
        self.checkpoint, self.fds, self.lock = checkpoint, {}, threading.Lock()

    def fd(self, entry: TensorEntry) -> int:
        with self.lock:           # two checking threads share the descriptors (pread only)
            if entry.file not in self.fds:
                c = self.checkpoint
                path = c.path if isinstance(c, GGUFBase) else Path(c.folder) / entry.file
                self.fds[entry.file] = os.open(path, os.O_RDONLY)
            return self.fds[entry.file]

    def read(self, entry: TensorEntry) -> torch.Tensor:
        return read_entry(self.fd(entry), entry)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def same_bytes(x: Files, a: TensorEntry, y: Files, b: TensorEntry) -> bool:
    """Streamed comparison of two stored tensors' bytes; a file that ends inside its tensor is
    a TruncatedFileError (a regular file reads short only at its end)."""
    if a.nbytes != b.nbytes:
        return False
    fa, fb, done = x.fd(a), y.fd(b), 0
    while done < a.nbytes:
        n = min(COMPARE_CHUNK, a.nbytes - done)
        left, right = os.pread(fa, n, a.offset + done), os.pread(fb, n, b.offset + done)
        for got, entry in ((left, a), (right, b)):
            if len(got) < n:
                raise short_read(entry.file, entry, entry.offset + done + len(got))
        if left != right:
            return False
        done += n
    return True


def check_untouched(job: Job, entry: TensorEntry, base: Files, merged: Files) -> dict:
    if job.source.dtype == entry.dtype:
        same = same_bytes(base, job.source, merged, entry)
        problem = "changed, but no adapter touches it: must be byte-identical to the base"
    else:     # the merge cast it (--dtype): it must be the base rounded once
        cast = base.read(job.source).to(TORCH_DTYPES[entry.dtype])
        same = torch.equal(cast.reshape(-1).view(torch.uint8),
                           merged.read(entry).reshape(-1).view(torch.uint8))
        problem = f"not the base cast to {entry.dtype}, but no adapter touches it"
    return {"name": job.name, "kind": "untouched", "dtype": entry.dtype, "shape": list(entry.shape),
            "passed": same, "problem": "" if same else problem}
