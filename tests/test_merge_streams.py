"""The merge engine's I/O helpers: pieced writes, early writeback, the read-ahead of a base while
torch is imported, and the CLI's exit without interpreter teardown.

Speed is measured in benchmarks/merge.py, not here; these tests check that each helper does
what it must for correctness: every byte lands where it belongs, writeback is started as often
as promised, the read-ahead reads the files a merge needs (in its order, within its budget) and
puts them in the page cache, and a CLI run that exits early still prints everything and
returns its exit code.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adaptertools as at
from adaptertools import _prefetch as prefetch
from adaptertools.merging import streams
from adaptertools.merging import run as merge_run
from adaptertools.merging.jobs import Job
from adaptertools.merging.streams import tensor_bytes
from adaptertools.tensor_index import TensorEntry
from adaptertools.tiny import TinyLlama, make_adapter, make_base

from helpers.cli import run_cli

# ----------------------------------------------------------------------------- writes

@pytest.mark.parametrize("offset", [None, 0, 12345])
def test_write_all_writes_every_piece_in_place(tmp_path, offset):
    """A buffer of several WRITE_PIECEs plus a ragged tail, at the file position or an offset."""
    data = torch.randint(0, 256, (3 * streams.WRITE_PIECE + 777,), dtype=torch.uint8)
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if offset is None:
            os.write(fd, b"head")
        assert streams.write_all(fd, memoryview(data.numpy()), offset) == data.numel()
    finally:
        os.close(fd)
    stored = path.read_bytes()
    start = 4 if offset is None else offset
    assert stored[start:] == data.numpy().tobytes()
    assert len(stored) == start + data.numel()


def test_buffered_sink_starts_writeback_every_step(tmp_path, monkeypatch):
    """On the writer thread, writeback is started once per WRITEBACK_STEP bytes written."""
    calls = []
    monkeypatch.setattr(streams, "WRITEBACK_STEP", 1000)
    monkeypatch.setattr(streams, "start_writeback", lambda fd: calls.append(fd))
    fd = os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        sink = streams.BufferedSink(fd)
        with ThreadPoolExecutor(max_workers=1) as executor:
            writer = streams.OrderedWriter(executor, lambda n: None)
            for _ in range(7):                      # 7 x 400 bytes: steps at 1200, 2400
                writer.submit(400, sink.write, bytes(400))
            writer.drain()
    finally:
        os.close(fd)
    assert calls == [fd, fd]
    assert (tmp_path / "out.bin").stat().st_size == 2800


@pytest.mark.skipif(streams.SYNC_FILE_RANGE is None, reason="sync_file_range is Linux-only")
def test_start_writeback_leaves_the_data_intact(tmp_path):
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        streams.write_all(fd, b"x" * 100_000)
        streams.start_writeback(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 100_000


# ----------------------------------------------------------------------------- mapped reads

def _file_with_tensor(tmp_path: Path, offset: int, rows: int = 1024, cols: int = 2048):
    """A file holding a bf16 (rows, cols) tensor at ``offset`` (random bytes around it)."""
    tensor = torch.randn(rows, cols).bfloat16()
    data = tensor_bytes(tensor).tobytes()
    path = tmp_path / "base.bin"
    path.write_bytes(os.urandom(offset) + data + os.urandom(5000))
    entry = TensorEntry("w", path.name, "BF16", (rows, cols), offset, len(data))
    return path, tensor, Job("w", entry, "BF16")


def _mapping_rss(address: int) -> int:
    """Resident bytes of this process's mapping that contains ``address`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low <= address < high
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds that address")


@pytest.mark.skipif(streams.MADVISE is None, reason="mapped reads are Linux-only")
def test_mapped_reads_view_the_file_and_let_the_pages_go(tmp_path):
    path, tensor, job = _file_with_tensor(tmp_path, offset=3 * 4096 + 128)
    fd = os.open(path, os.O_RDONLY)
    try:
        reads = streams.Reads(fd, streams.BufferPool(), mapped=True)
        assert reads.base is not None
        source = reads.read(job)
        resident = _mapping_rss(source.data_ptr())               # before anything touches it
        assert resident >= job.source.nbytes - 2 * 4096         # faulted in by read()
        assert torch.equal(source.view(torch.int16), tensor.view(torch.int16))
        assert reads._mapped(source)                           # a view, not a copy
        reads.done(source)
        assert _mapping_rss(source.data_ptr()) <= 2 * 4096      # only the shared edge pages
        source.view(torch.int16)[0, 0] = 7                       # private: the file is safe
        reads.close()
    finally:
        os.close(fd)
    assert path.read_bytes()[job.source.offset:job.source.offset + 2] == \
        tensor_bytes(tensor)[:2].tobytes()


def test_reads_fall_back_to_pread(tmp_path, monkeypatch):
    """Unaligned tensors, and platforms without madvise, are read into pooled buffers."""
    path, tensor, job = _file_with_tensor(tmp_path, offset=4097, rows=64, cols=64)
    fd = os.open(path, os.O_RDONLY)
    try:
        pool = streams.BufferPool()
        reads = streams.Reads(fd, pool, mapped=True)
        source = reads.read(job)                                 # odd offset for bf16
        assert torch.equal(source.view(torch.int16), tensor.view(torch.int16))
        assert reads.base is None or not reads._mapped(source)
        reads.done(source)
        assert len(pool.free) == 1                               # its buffer is back
        monkeypatch.setattr(streams, "MADVISE", None)
        assert streams.Reads(fd, pool, mapped=True).base is None
    finally:
        os.close(fd)


def test_pread_is_the_default_and_drops_written_pages(tmp_path, monkeypatch):
    """Reads are pread into pooled buffers unless mapped; with ``drop``, each tensor's bytes
    leave the page cache once it is written (POSIX_FADV_DONTNEED over exactly its range)."""
    path, tensor, job = _file_with_tensor(tmp_path, offset=3 * 4096 + 128)
    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: (advised.append(a[1:]), real(*a))[1])
    fd = os.open(path, os.O_RDONLY)
    try:
        pool = streams.BufferPool()
        for drop in (False, True):
            reads = streams.Reads(fd, pool, drop=drop)
            assert reads.base is None
            source = reads.read(job)
            assert torch.equal(source.view(torch.int16), tensor.view(torch.int16))
            reads.done(source)
            reads.close()
        assert advised == [(job.source.offset, job.source.nbytes, os.POSIX_FADV_DONTNEED)]
        assert len(pool.free) == 1                               # the one buffer, reused
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["sharded", "gguf"])
def test_mapped_and_pread_merges_are_byte_identical(tmp_path, monkeypatch, kind):
    adapter = tmp_path / "adapter"
    if kind == "gguf":     # an F16 GGUF model (tests/helpers/gguf_base.py) and a PEFT LoRA of it
        from helpers.gguf_base import make_base_model, write_gguf_base
        from helpers.peft_adapters import perturb_trainables
        from peft import LoraConfig, get_peft_model

        model = make_base_model("llama")
        base = write_gguf_base(model, tmp_path / "base.gguf", "llama", f16=True)
        peft_model = get_peft_model(model, LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
            init_lora_weights=False))
        perturb_trainables(peft_model)
        peft_model.save_pretrained(adapter)
        outs = [tmp_path / "mapped.gguf", tmp_path / "pread.gguf"]
    else:
        spec = TinyLlama()
        at.save(make_adapter(spec, seed=5), adapter, format="peft")
        base = make_base(tmp_path / "base", spec, dtype=torch.bfloat16)
        outs = [tmp_path / "mapped", tmp_path / "pread"]
    monkeypatch.setattr(streams, "MAPPED_READS", True)
    at.merge(base, [adapter], outs[0])
    monkeypatch.setattr(streams, "MAPPED_READS", False)
    # and the pages of a base "larger than memory" dropped as it goes (run.drops_pages)
    monkeypatch.setattr(merge_run, "available_memory", lambda: 0)
    at.merge(base, [adapter], outs[1])
    files = [sorted(p.rglob("*.safetensors")) if p.is_dir() else [p] for p in outs]
    assert [f.read_bytes() for f in files[0]] == [f.read_bytes() for f in files[1]]


# ----------------------------------------------------------------------------- O_DIRECT output

def _direct_cases(tmp_path: Path) -> dict:
    """A sharded-free HF base and an F16 GGUF base with an adapter each (as above)."""
    from helpers.gguf_base import make_base_model, write_gguf_base
    from helpers.peft_adapters import perturb_trainables
    from peft import LoraConfig, get_peft_model

    model = make_base_model("llama")
    gguf = write_gguf_base(model, tmp_path / "base.gguf", "llama", f16=True)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "up_proj"]))
    perturb_trainables(peft_model)
    peft_model.save_pretrained(tmp_path / "gguf_adapter")
    spec = TinyLlama()
    at.save(make_adapter(spec, seed=7), tmp_path / "hf_adapter", format="peft")
    hf = make_base(tmp_path / "hf", spec, dtype=torch.bfloat16)
    return {"hf": (hf, tmp_path / "hf_adapter", {}),
            "gguf": (gguf, tmp_path / "gguf_adapter", {}),
            "gguf-relaid": (gguf, tmp_path / "gguf_adapter", {"requantize": "q8_0"})}


def _outputs(path: Path) -> list[bytes]:
    return [f.read_bytes() for f in (sorted(path.glob("*.safetensors")) if path.is_dir()
                                     else [path])]


@pytest.fixture(scope="module")
def direct_cases(tmp_path_factory):
    return _direct_cases(tmp_path_factory.mktemp("direct"))


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
@pytest.mark.parametrize("case", ["hf", "gguf", "gguf-relaid"])
def test_direct_output_is_byte_identical(direct_cases, tmp_path, monkeypatch, case):
    """Every file through O_DIRECT with an 8 KB staging buffer (hundreds of flushes, copies and
    tensors split across them, a padded last block) equals the page-cache path's output."""
    base, adapter, options = direct_cases[case]
    suffix = "" if case == "hf" else ".gguf"
    at.merge(base, [adapter], tmp_path / f"buffered{suffix}", **options)
    sinks = []
    real_open = streams.open_sink
    monkeypatch.setattr(streams, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(streams, "STAGING_BYTES", 8192)
    monkeypatch.setattr(merge_run, "open_sink",
                        lambda *a: sinks.append(real_open(*a)) or sinks[-1])
    at.merge(base, [adapter], tmp_path / f"direct{suffix}", **options)
    assert sinks and all(isinstance(s, streams.DirectSink) for s in sinks)
    assert _outputs(tmp_path / f"direct{suffix}") == _outputs(tmp_path / f"buffered{suffix}")


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
def test_direct_output_falls_back_when_refused_and_fails_cleanly(direct_cases, tmp_path,
                                                                monkeypatch):
    base, adapter, _ = direct_cases["hf"]
    at.merge(base, [adapter], tmp_path / "buffered")
    monkeypatch.setattr(streams, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(streams, "STAGING_BYTES", 8192)
    real = streams.write_all

    def refusing(error):
        def write_all(fd, data, offset=None, piece_bytes=streams.WRITE_PIECE):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(error, os.strerror(error))
            return real(fd, data, offset, piece_bytes)
        return write_all

    # a filesystem that opens with O_DIRECT but refuses the writes: the page cache takes over
    monkeypatch.setattr(streams, "write_all", refusing(errno.EINVAL))
    at.merge(base, [adapter], tmp_path / "fallback")
    assert _outputs(tmp_path / "fallback") == _outputs(tmp_path / "buffered")
    # a full disk: the error comes through and nothing is left at OUT
    monkeypatch.setattr(streams, "write_all", refusing(errno.ENOSPC))
    with pytest.raises(OSError) as info:
        at.merge(base, [adapter], tmp_path / "full")
    assert info.value.errno == errno.ENOSPC
    assert not (tmp_path / "full").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".full")]


# ----------------------------------------------------------------------------- read-ahead

def _shards(folder: Path, names: list[str], index: bool) -> None:
    folder.mkdir()
    for i, name in enumerate(names):
        (folder / name).write_bytes(bytes([i]) * (1000 + i))
    if index:
        weight_map = {f"t{i}": name for i, name in enumerate(reversed(names))}
        (folder / prefetch.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))


def test_weight_files_in_the_order_a_merge_reads_them(tmp_path):
    names = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
             "model-00003-of-00003.safetensors"]
    _shards(tmp_path / "indexed", names, index=True)
    assert prefetch.weight_files(tmp_path / "indexed") == [tmp_path / "indexed" / n for n in names]
    _shards(tmp_path / "plain", ["b.safetensors", "a.safetensors"], index=False)
    assert prefetch.weight_files(tmp_path / "plain") == [tmp_path / "plain" / "a.safetensors",
                                                         tmp_path / "plain" / "b.safetensors"]
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert prefetch.weight_files(gguf) == [gguf]
    # not local, or not weights: nothing to read (the merge reports real problems itself)
    assert prefetch.weight_files("hf://owner/name") == []
    assert prefetch.weight_files(tmp_path / "missing") == []
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / prefetch.INDEX_NAME).write_text("{not json")
    assert prefetch.weight_files(tmp_path / "bad") == []


def test_read_ahead_reads_within_budget_and_stops(tmp_path):
    names = ["a.safetensors", "b.safetensors", "c.safetensors"]
    _shards(tmp_path / "base", names, index=False)
    paths = prefetch.weight_files(tmp_path / "base")
    total = sum(p.stat().st_size for p in paths)
    assert prefetch.read_ahead(paths, 10**9, threading.Event()) == total
    assert prefetch.read_ahead(paths, 1500, threading.Event()) == 1500
    stopped = threading.Event()
    stopped.set()
    assert prefetch.read_ahead(paths, 10**9, stopped) == 0
    assert prefetch.read_ahead(paths + [tmp_path / "gone.safetensors"], 10**9,
                               threading.Event()) == total


def test_start_reads_in_the_commands_order(tmp_path, monkeypatch):
    """merge loads its adapters before the base; validate reads the base beside the merge."""
    _shards(tmp_path / "base", ["b1.safetensors", "b2.safetensors"], index=False)
    _shards(tmp_path / "other", ["o.safetensors"], index=False)
    seen = []
    monkeypatch.setattr(prefetch, "read_ahead", lambda paths, budget, stop: seen.append(
        ([p.name for p in paths], budget)))
    prefetch.start(tmp_path / "base", (str(tmp_path / "other"),))
    prefetch.start(tmp_path / "base", (str(tmp_path / "other"),), first="base")
    prefetch.start(tmp_path / "missing")                  # nothing to read: no thread
    for _ in range(100):
        if len(seen) == 2:
            break
        threading.Event().wait(0.01)
    assert sorted(names for names, _ in seen) == [  # (the two threads may report in any order)
        ["b1.safetensors", "b2.safetensors", "o.safetensors"],
        ["o.safetensors", "b1.safetensors", "b2.safetensors"]]
    assert all(0 < budget <= prefetch.available_memory() // 4 + (1 << 20) for _, budget in seen)


def _resident_fraction(path: Path) -> float:
    """Fraction of ``path``'s pages in the page cache (mincore on a read-only mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value)
        try:
            assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vector) / pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX_FADV_DONTNEED, mincore")
def test_read_ahead_puts_the_base_in_the_page_cache(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(8 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)                                              # clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if _resident_fraction(path) > 0.5:
        pytest.skip("this kernel kept the pages; nothing to measure")
    stop = prefetch.start(path)
    for _ in range(200):
        if _resident_fraction(path) == 1.0:
            break
        threading.Event().wait(0.05)
    stop.set()
    assert _resident_fraction(path) == 1.0


# ----------------------------------------------------------------------------- the CLI's exit

def test_cli_merge_output_and_exit_code_survive_the_fast_exit(tmp_path):
    """A real process: the merge report (JSON on stdout) is complete and the files are there."""
    spec = TinyLlama()
    base = make_base(tmp_path / "base", spec, dtype=torch.bfloat16)
    adapter = tmp_path / "adapter"
    at.save(make_adapter(spec, seed=3), adapter, format="peft")
    proc = run_cli("merge", base, adapter, "--out", tmp_path / "out", "--json", how="subprocess")
    assert proc.code == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["changed"]) == 14          # q,k,v,o,gate,up,down of 2 layers
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == \
        set(load_file(base / "model.safetensors"))
    failed = run_cli("merge", base, adapter, "--out", tmp_path / "out", how="subprocess")  # exists
    assert failed.code == 1
    assert failed.stderr.strip().startswith("error:")
