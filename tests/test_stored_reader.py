"""The one reader of stored tensors (``tensor_index.read_entry``) and its one truncation error.

Every path that reads a stored tensor's bytes goes through ``read_entry``: the merge engine
(``merging.streams.Reads``), validation (``validation.stored.Files``, ``same_bytes``), extract and
DoRA's --materialize (``algebra.extract``), and the saved-copy checks (``merging.copies``). Here:
its data is bit for bit what ``safetensors.safe_open`` gives, for every dtype a checkpoint may
hold, whole and in row ranges; and each of those paths, on a file that ends inside a tensor,
raises ``TruncatedFileError`` naming the file and the tensor; the CLI says so in one line, exit 1.
Files are built here with ``safetensors.torch.save_file``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import adaptertools as at
from adaptertools.algebra.extract import ExtractOptions, Pair, extract_pair, read_float
from adaptertools.errors import FormatError, TruncatedFileError
from adaptertools.merging.bases import open_base
from adaptertools.merging.copies import copy_matches_base
from adaptertools.merging.jobs import Job
from adaptertools.merging.streams import BufferPool, Reads
from adaptertools.tensor_index import read_entry, read_safetensors_header
from adaptertools.tiny import make_adapter, make_base
from adaptertools.validation.stored import Files, same_bytes

WEIGHTS = "model.safetensors"
LAST = "z.last.weight"          # stored last (one dtype: sorted by name): the one a cut hits


def _tensors() -> dict[str, torch.Tensor]:
    """One tensor of every dtype the project reads typed, odd shapes, a scalar and an empty one."""
    gen = torch.Generator().manual_seed(3)
    floats = torch.randn(7, 5, generator=gen) * 3
    ints = torch.randint(-128, 128, (6, 4), generator=gen)
    return {
        "f32": floats, "f16": floats.half(), "bf16": floats.bfloat16(), "f64": floats.double(),
        "f8_e4m3": floats.to(torch.float8_e4m3fn), "f8_e5m2": floats.to(torch.float8_e5m2),
        "i8": ints.to(torch.int8), "u8": (ints + 128).to(torch.uint8), "i16": ints.short() * 99,
        "i32": ints.int() * 70001, "i64": ints.long() << 40, "three_d": torch.randn(3, 2, 4),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "bool": ints > 0,
    }


def _two_weights(seed: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a.first.weight": torch.randn(4, 4, generator=gen),
            LAST: torch.randn(16, 8, generator=gen)}


def _saved(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """``folder`` holding ``tensors`` as its one safetensors file."""
    folder.mkdir()
    save_file(tensors, str(folder / WEIGHTS))
    return folder


@pytest.fixture
def stored(tmp_path) -> Path:
    return _saved(tmp_path / "model", _tensors())


@pytest.fixture
def two(tmp_path) -> Path:
    return _saved(tmp_path / "two", _two_weights())


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _expect_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit: dtype, shape and bytes (NaN payloads and -0.0 included); a dtype no torch
    table maps (BOOL) comes back as its raw bytes."""
    if want.dtype == torch.bool:
        assert got.dtype == torch.uint8 and _bits(got) == _bits(want)
        return
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    assert _bits(got) == _bits(want)


def test_read_entry_equals_safe_open_for_every_dtype(stored):
    path = stored / WEIGHTS
    header = read_safetensors_header(path)
    pool = BufferPool()
    fd = os.open(path, os.O_RDONLY)
    try:
        with safe_open(str(path), framework="pt") as fh:
            for entry in header.tensors:
                want = fh.get_tensor(entry.name)
                _expect_same(read_entry(path, entry), want)            # a path
                _expect_same(read_entry(fd, entry), want)              # a shared descriptor
                got = read_entry(fd, entry, pool=pool)                 # pooled memory
                _expect_same(got, want)
                pool.give(got)
    finally:
        os.close(fd)


def test_row_ranges_equal_safe_open_slices(stored):
    path = stored / WEIGHTS
    with safe_open(str(path), framework="pt") as fh:
        for entry in read_safetensors_header(path).tensors:
            if not entry.shape:
                _expect_same(read_entry(path, entry, start=0, stop=1), fh.get_tensor(entry.name))
                continue
            rows = entry.shape[0]
            for start, stop in ((0, rows), (1, rows), (0, rows - 1), (2, 4), (3, 3)):
                start, stop = min(start, rows), max(min(stop, rows), min(start, rows))
                want = fh.get_slice(entry.name)[start:stop]
                _expect_same(read_entry(path, entry, start=start, stop=stop), want)
    entry = read_safetensors_header(path).tensors[0]
    with pytest.raises(ValueError):
        read_entry(path, entry, start=2, stop=1)


def test_the_engine_and_validation_read_the_same_data(stored):
    """Reads (mapped views, or pread where the mapping cannot serve) and validation's Files."""
    path = stored / WEIGHTS
    checkpoint = open_base(stored)
    files = Files(checkpoint)
    fd = os.open(path, os.O_RDONLY)
    try:
        reads = Reads(fd, BufferPool())
        with safe_open(str(path), framework="pt") as fh:
            for entry in checkpoint.entries().values():
                want = fh.get_tensor(entry.name)
                _expect_same(reads.read(entry), want)
                _expect_same(reads.read(Job(entry.name, entry, entry.dtype)), want)  # run.py's
                _expect_same(files.read(entry), want)
                assert same_bytes(files, entry, files, entry)
        reads.close()
    finally:
        os.close(fd)
        files.close()


# ----------------------------------------------------------------------------- truncated files

def _cut_inside_last(folder: Path) -> str:
    """Cut ``folder``'s weights 10 bytes into the last tensor; returns its name."""
    path = folder / WEIGHTS
    entry = max(read_safetensors_header(path).tensors, key=lambda t: t.offset)
    assert entry.name == LAST
    os.truncate(path, entry.offset + 10)
    return entry.name


def _names_file_and_tensor(exc: TruncatedFileError, file: str, tensor: str) -> None:
    assert isinstance(exc, FormatError)
    message = str(exc)
    assert "\n" not in message
    assert file in message and tensor in message and exc.tensor == tensor
    assert "truncated" in message and "download it again" in message


def test_every_reader_raises_truncated_file_error(two, tmp_path):
    """Indexed while whole, cut afterwards: the readers meet the short file."""
    checkpoint = open_base(two)
    entry = checkpoint.entries()[LAST]
    name = _cut_inside_last(two)
    path = two / WEIGHTS

    def raised(read) -> TruncatedFileError:
        with pytest.raises(TruncatedFileError) as info:
            read()
        return info.value

    # the reader itself, by path and by descriptor (which names the file by its name)
    _names_file_and_tensor(raised(lambda: read_entry(path, entry)), str(path), name)
    # algebra: extract and --materialize
    _names_file_and_tensor(raised(lambda: read_float(two, entry)), str(path), name)
    tuned = _saved(tmp_path / "tuned", _two_weights(seed=6))
    pair = Pair(name, open_base(tuned).entries()[name], entry, "lora")
    _names_file_and_tensor(raised(lambda: extract_pair(checkpoint, open_base(tuned), pair,
                                                       ExtractOptions(rank=2))), str(path), name)
    # the saved-copy check of a merge
    copy = _two_weights()[LAST]
    _names_file_and_tensor(raised(lambda: copy_matches_base(copy, checkpoint, entry)), str(path),
                           name)
    # validation
    files = Files(checkpoint)
    try:
        _names_file_and_tensor(raised(lambda: files.read(entry)), WEIGHTS, name)
        _names_file_and_tensor(raised(lambda: same_bytes(files, entry, files, entry)), WEIGHTS,
                               name)
    finally:
        files.close()
    # the engine: the mapping is the short file's size, so this is read_entry's pread path
    fd = os.open(path, os.O_RDONLY)
    try:
        reads = Reads(fd, BufferPool())
        _names_file_and_tensor(raised(lambda: reads.read(entry)), WEIGHTS, name)
        _names_file_and_tensor(raised(lambda: reads.read(Job(name, entry, entry.dtype))),
                               WEIGHTS, name)
        reads.close()
    finally:
        os.close(fd)
    # and the index: a file shorter than its header says
    _names_file_and_tensor(raised(lambda: open_base(two)), str(path), name)


def test_truncated_file_error_survives_pickling():
    exc = TruncatedFileError("a.safetensors", "w", " (at byte 9)")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is TruncatedFileError and str(back) == str(exc) and back.tensor == "w"


def test_cli_merge_of_a_truncated_base_is_one_line_exit_1(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = tmp_path / "adapter"
    at.save(make_adapter(), adapter, format="peft")
    path = base / WEIGHTS
    os.truncate(path, path.stat().st_size - 100)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "adaptertools.cli", "merge", str(base),
                           str(adapter), "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert str(path) in lines[0] and "truncated" in lines[0] and "download it again" in lines[0]
    assert "Traceback" not in proc.stderr and not out.exists()


# ----------------------------------------------------------------------------- the GGUF base

def test_gguf_base_owns_its_base_info(tmp_path, monkeypatch):
    """GGUFBase.info is load_base_info's answer, from the reader open_base already parsed."""
    import gguf
    import numpy as np

    from adaptertools.formats import names

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_tensor("token_embd.weight", np.ones((8, 16), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((16, 16), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    base = open_base(path)
    want = names.load_base_info(path)

    def parse_again(_):
        raise AssertionError("GGUFBase.info parsed the file again")

    monkeypatch.setattr(names, "open_gguf", parse_again)
    assert base.info == want
    assert (base.info.arch, base.info.n_blocks, base.info.n_head, base.info.n_head_kv,
            base.info.tied_embeddings) == ("llama", 1, 4, 2, True)
