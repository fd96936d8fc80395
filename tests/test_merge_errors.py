"""Bad input for ``adaptertools merge``: refused with a clear error, and nothing left behind.

Library: ``adaptertools.merge(base, [adapter], out)`` raises a library error (or OSError, or lets
KeyboardInterrupt through) whose message names the offending file or tensor. CLI: exit 1 (2 for
misuse), exactly one ``error:`` line on stderr, no traceback. Either way nothing appears at OUT and
no temporary ``.OUT.tmp-*`` / ``.OUT.old-*`` is left beside it; an existing OUT is left untouched
unless the merge succeeds with ``--force``.

Bases are tiny Llama checkpoints built in code (bf16, one file or three shards with
``model.safetensors.index.json``); failures in the middle of a run (full disk, Ctrl-C) are
simulated by patching ``adaptertools.merging.run``; one Ctrl-C is a real SIGINT to a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest
import torch

import adaptertools as at
import adaptertools._io
import adaptertools.merging.run as merge_run
import adaptertools.merging.streams as merge_streams
from adaptertools.adapter import Adapter, LoraWeight
from adaptertools.errors import FormatError, OutputExistsError, UnsupportedError
from adaptertools.tiny import TinyLlama, make_adapter, make_base

from helpers.checkpoints import INDEX, SHARDS, SPEC, make_sharded_base
from helpers.cli import (assert_cli_error, assert_nothing_written, leftovers_beside, run_cli,
                         start_cli, stderr_lines)

SMALL = TinyLlama(hidden=32, intermediate=64)                   # same names, other shapes
DEEP = TinyLlama(layers=4)                                      # layers 2, 3 not in SPEC
Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"


# ----------------------------------------------------------------------------- builders

def shard_of(folder: Path, tensor: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][tensor]


def edit_header(path: Path, change) -> None:
    """Rewrite the JSON header of a safetensors file in place, keeping its data bytes."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header = change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])


def foreign_adapter() -> Adapter:
    """A GPT-2-style adapter: none of its tensor names exist in a Llama base."""
    gen = torch.Generator().manual_seed(5)
    weights = {f"transformer.h.{n}.attn.c_proj.weight":
               LoraWeight(a=torch.randn(4, 64, generator=gen), b=torch.randn(64, 4, generator=gen),
                          scale=2.0) for n in range(2)}
    return Adapter(weights=weights)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge_models")
    paths = {"single": make_base(root / "single", SPEC, dtype=torch.bfloat16),
             "sharded": make_sharded_base(root / "sharded")}
    for name, adapter in {"adapter": make_adapter(SPEC), "small": make_adapter(SMALL),
                          "deep": make_adapter(DEEP), "foreign": foreign_adapter()}.items():
        at.save(adapter, root / name, format="peft")
        paths[name] = root / name
    # the reference: an uninterrupted merge of the sharded base
    at.merge(paths["sharded"], [paths["adapter"]], root / "reference")
    paths["reference"] = root / "reference"
    return paths


@pytest.fixture()
def sharded(models, tmp_path) -> Path:
    """A private copy of the sharded base, free to damage."""
    return Path(shutil.copytree(models["sharded"], tmp_path / "base"))


def assert_library_error(exc: BaseException, fragments: list[str]) -> None:
    message = str(exc)
    assert "\n" not in message.strip(), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ----------------------------------------------------------------------------- adapter vs base

def test_adapter_for_another_size_lists_first_mismatches_with_both_shapes(models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FormatError) as info:
        at.merge(models["single"], [models["small"]], out)
    assert_library_error(info.value, [DOWN0, "(32, 64)", "(64, 128)"])
    assert_nothing_written(out)

    outcome = run_cli("merge", models["single"], models["small"], "--out", out, how="subprocess")
    line = assert_cli_error(outcome, [DOWN0, "(32, 64)", "(64, 128)", str(models["small"])])
    # 14 adapted tensors, all mismatching: the first few are listed with both shapes, then a count
    assert "14" in line
    shown = [name for name in SMALL.shapes() if name in line]
    assert 1 <= len(shown) < 14, shown
    assert "more" in line
    assert_nothing_written(out)


def test_dry_run_also_refuses_a_mismatching_adapter(models, tmp_path):
    with pytest.raises(FormatError, match="down_proj"):
        at.merge(models["single"], [models["small"]], None, dry_run=True)
    outcome = run_cli("merge", models["single"], models["small"], "--dry-run")
    assert_cli_error(outcome, [DOWN0, "(64, 128)"])
    assert outcome.stdout == ""


@pytest.mark.parametrize("adapter, missing", [
    ("deep", "model.layers.2.mlp.down_proj.weight"),          # more layers than the base
    ("foreign", "transformer.h.0.attn.c_proj.weight"),         # another architecture's names
])
def test_adapter_tensor_names_not_in_base(models, tmp_path, adapter, missing):
    out = tmp_path / "out"
    with pytest.raises(FormatError) as info:
        at.merge(models["sharded"], [models[adapter]], out)
    assert_library_error(info.value, [missing])
    outcome = run_cli("merge", models["sharded"], models[adapter], "--out", out)
    assert_cli_error(outcome, [missing, str(models[adapter])])
    assert_nothing_written(out)


# ----------------------------------------------------------------------------- damaged bases

def test_missing_shard(models, sharded, tmp_path):
    (sharded / SHARDS[1]).unlink()
    out = tmp_path / "out"
    with pytest.raises(FormatError) as info:
        at.merge(sharded, [models["adapter"]], out)
    assert_library_error(info.value, [SHARDS[1]])
    outcome = run_cli("merge", sharded, models["adapter"], "--out", out, how="subprocess")
    assert_cli_error(outcome, [SHARDS[1], INDEX])
    assert_nothing_written(out)


def test_shards_without_their_index(models, sharded, tmp_path):
    (sharded / INDEX).unlink()
    out = tmp_path / "out"
    outcome = run_cli("merge", sharded, models["adapter"], "--out", out)
    assert_cli_error(outcome, [str(sharded), INDEX])
    assert_nothing_written(out)


def assert_merge_refused(base, adapter, out, fragments) -> None:
    """The library raises a FormatError naming ``fragments``, the CLI prints it as one line,
    and nothing is left at ``out``."""
    with pytest.raises(FormatError) as info:
        at.merge(base, [adapter], out)
    assert_library_error(info.value, fragments)
    assert_cli_error(run_cli("merge", base, adapter, "--out", out), fragments)
    assert_nothing_written(out)


@pytest.mark.parametrize("keep", [
    pytest.param(lambda size: size - 100, id="cut-in-last-tensor"),
    pytest.param(lambda size: size // 2, id="cut-in-half"),
    pytest.param(lambda size: 50, id="cut-in-header"),
    pytest.param(lambda size: 5, id="cut-in-length-prefix"),
    pytest.param(lambda size: 0, id="empty"),
])
def test_truncated_shard(models, sharded, tmp_path, keep):
    shard = sharded / SHARDS[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:keep(len(data))])
    assert_merge_refused(sharded, models["adapter"], tmp_path / "out", [str(shard)])


def test_truncated_shard_subprocess(models, sharded, tmp_path):
    shard = sharded / SHARDS[2]
    shard.write_bytes(shard.read_bytes()[:-8])
    out = tmp_path / "out"
    outcome = run_cli("merge", sharded, models["adapter"], "--out", out, how="subprocess")
    line = assert_cli_error(outcome, [str(shard)])
    assert "truncated" in line
    assert_nothing_written(out)


def _random_bytes(size: int) -> bytes:
    gen = torch.Generator().manual_seed(11)
    return torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8).numpy().tobytes()


def _raw_header(obj) -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw


GARBAGE = {
    "random-bytes": lambda path: path.write_bytes(_random_bytes(4096)),
    "git-lfs-pointer": lambda path: path.write_bytes(
        b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123\n"),
    "html-error-page": lambda path: path.write_bytes(b"<!DOCTYPE html><html>404</html>\n" * 4),
    "json-header-not-utf8": lambda path: path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe\xfd"
                                                          b"\xfc"),
}


@pytest.mark.parametrize("damage", list(GARBAGE), ids=list(GARBAGE))
def test_garbage_shard(models, sharded, tmp_path, damage):
    shard = sharded / SHARDS[1]
    GARBAGE[damage](shard)
    assert_merge_refused(sharded, models["adapter"], tmp_path / "out", [str(shard)])


def _set(tensor, key, value):
    def change(header):
        header[tensor][key] = value(header[tensor][key])
        return header
    return change


def _drop(tensor, key):
    def change(header):
        del header[tensor][key]
        return header
    return change


# A safetensors header must be an object of {dtype, shape, data_offsets=[begin<=end]} entries
# whose byte length is numel*itemsize, in ranges that do not overlap (merge/bases.py checks it).
Q1 = "model.layers.1.self_attn.q_proj.weight"               # adapted, in the second shard
LN0 = "model.layers.0.input_layernorm.weight"               # untouched, in the second shard
LN0_POST = "model.layers.0.post_attention_layernorm.weight"  # untouched, in the second shard

# The second shard with a header that is valid JSON but describes its tensors wrongly (a corrupt
# or hand-made file). Each must be refused naming the shard (and the tensor), without a traceback.
BAD_HEADERS = {
    # bases.py:120 `header.pop("__metadata__", None)` on a list -> TypeError traceback
    "header-is-a-list": (lambda path: path.write_bytes(_raw_header([1, 2, 3])), None),
    # bases.py:124 `info["data_offsets"]` -> KeyError traceback
    "entry-without-data-offsets": (lambda path: edit_header(path, _drop(LN0_POST, "data_offsets")),
                                   LN0_POST),
    # dtype says F32, the bytes are a BF16 tensor: run.py:57 reshape -> RuntimeError traceback
    # from the reader thread, once OUT's temporary folder exists (it is removed)
    "dtype-disagrees-with-byte-length-adapted": (
        lambda path: edit_header(path, _set(Q1, "dtype", lambda d: "F32")), Q1),
    # same damage on a tensor no adapter touches: copied as is, the merge exits 0 and writes an
    # output whose header no safetensors reader accepts
    "dtype-disagrees-with-byte-length-untouched": (
        lambda path: edit_header(path, _set(LN0, "dtype", lambda d: "F32")), LN0),
    # data_offsets [end, begin]: run.py:46 bytearray(negative) -> ValueError traceback
    "reversed-data-offsets": (
        lambda path: edit_header(path, _set(Q1, "data_offsets", lambda o: o[::-1])), Q1),
}


@pytest.mark.parametrize("damage", list(BAD_HEADERS), ids=list(BAD_HEADERS))
def test_inconsistent_shard_header(models, sharded, tmp_path, damage):
    write, tensor = BAD_HEADERS[damage]
    shard = sharded / SHARDS[1]
    assert tensor is None or shard_of(sharded, tensor) == shard
    write(shard)
    out = tmp_path / "out"
    outcome = run_cli("merge", sharded, models["adapter"], "--out", out)
    assert_nothing_written(out)
    assert_cli_error(outcome, [str(shard)] + ([tensor] if tensor else []))
    with pytest.raises(FormatError):
        at.merge(sharded, [models["adapter"]], out)


# ----------------------------------------------------------------------------- full disk

class _Usage:
    def __init__(self, free: int) -> None:
        self.total, self.used, self.free = 10**12, 10**12 - free, free


def test_full_disk_precheck_refuses_before_writing(models, tmp_path, monkeypatch):
    monkeypatch.setattr(adaptertools._io.shutil, "disk_usage", lambda path: _Usage(4096))
    calls = _record_writers(monkeypatch)
    out = tmp_path / "out"
    before = listing(tmp_path)
    with pytest.raises(OSError) as info:
        at.merge(models["sharded"], [models["adapter"]], out)
    assert_library_error(info.value, [str(tmp_path)])
    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out)
    line = assert_cli_error(outcome, [str(tmp_path)])
    assert "free" in line
    assert calls == [], "bytes were written before the free-space check"
    assert listing(tmp_path) == before
    assert_nothing_written(out)


def _record_writers(monkeypatch) -> list:
    """What a merge writes through, recorded (and still done): every output file of the engine
    (a safetensors shard, a GGUF file) gets its sink from ``open_sink`` in ``_file_pair``, and
    the side files (config, tokenizer) are written by ``copy_side_files``."""
    calls = []
    for name in ("open_sink", "copy_side_files"):
        real = getattr(merge_run, name)
        monkeypatch.setattr(merge_run, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or
                            _real(*a, **k))
    return calls


def test_record_writers_sees_an_ordinary_merge(models, tmp_path, monkeypatch):
    """The recorder of the free-space test can fail: a merge that writes is seen."""
    calls = _record_writers(monkeypatch)
    at.merge(models["sharded"], [models["adapter"]], tmp_path / "out")
    assert "open_sink" in calls and "copy_side_files" in calls


def test_full_disk_precheck_creates_no_parent_folders(models, tmp_path, monkeypatch):
    monkeypatch.setattr(adaptertools._io.shutil, "disk_usage", lambda path: _Usage(4096))
    out = tmp_path / "new" / "deeper" / "out"
    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out)
    assert_cli_error(outcome, ["free"])
    assert not (tmp_path / "new").exists()


def _enospc_after(monkeypatch, calls_allowed: int) -> list:
    real = merge_run.write_all
    calls = []

    def write_all(*args, **kwargs):
        calls.append(1)
        if len(calls) > calls_allowed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_run, "write_all", write_all)        # headers, padding
    monkeypatch.setattr(merge_streams, "write_all", write_all)    # folded tensors
    return calls


@pytest.mark.parametrize("allowed", [0, 3, 9])    # at the first header, mid-shard, a later shard
def test_disk_fills_up_mid_run(models, tmp_path, monkeypatch, allowed):
    calls = _enospc_after(monkeypatch, allowed)
    out = tmp_path / "out"
    with pytest.raises(OSError) as info:
        at.merge(models["sharded"], [models["adapter"]], out)
    assert info.value.errno == errno.ENOSPC
    assert len(calls) == allowed + 1
    assert_nothing_written(out)

    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out)
    line = assert_cli_error(outcome, [])
    assert "space" in line.lower()
    assert_nothing_written(out)

    monkeypatch.undo()           # space freed: the same command now succeeds
    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out)
    assert outcome.code == 0, outcome.stderr
    assert folder_bytes(out) == folder_bytes(models["reference"])


def test_disk_full_error_names_the_output(models, tmp_path, monkeypatch):
    _enospc_after(monkeypatch, 3)
    out = tmp_path / "out"
    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out)
    assert_cli_error(outcome, [str(out)])


def test_disk_full_with_force_keeps_the_existing_output(models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous merge")
    _enospc_after(monkeypatch, 4)
    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out, "--force")
    assert_cli_error(outcome, [])
    assert listing(out) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "previous merge"
    assert leftovers_beside(out) == []


# ----------------------------------------------------------------------------- Ctrl-C

def _interrupt_on_second_fold(monkeypatch) -> list:
    real = merge_run.fold
    calls = []

    def fold(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_run, "fold", fold)
    return calls


def test_ctrl_c_mid_merge_leaves_nothing_and_a_rerun_matches(models, tmp_path, monkeypatch):
    calls = _interrupt_on_second_fold(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        at.merge(models["sharded"], [models["adapter"]], out)
    assert len(calls) == 2
    assert_nothing_written(out)

    monkeypatch.undo()
    at.merge(models["sharded"], [models["adapter"]], out)
    assert folder_bytes(out) == folder_bytes(models["reference"])
    assert leftovers_beside(out) == []


def test_ctrl_c_through_the_cli(models, tmp_path, monkeypatch):
    _interrupt_on_second_fold(monkeypatch)
    out = tmp_path / "out"
    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out)
    assert outcome.code != 0
    assert outcome.crash is None
    assert "Traceback" not in outcome.stdout + outcome.stderr
    assert_nothing_written(out)

    monkeypatch.undo()
    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out)
    assert outcome.code == 0, outcome.stderr
    assert folder_bytes(out) == folder_bytes(models["reference"])


SLOW_FOLD = """
import sys, time
from pathlib import Path
import adaptertools.merging.run as run

marker, real, calls = Path(sys.argv[1]), run.fold, []

def fold(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        marker.touch()
        for _ in range(1200):   # short sleeps: a signal met between the touch and a sleep is
            time.sleep(0.1)     # acted on at the next one, not after two minutes
    return real(*args, **kwargs)

run.fold = fold
sys.argv = ["adaptertools"] + sys.argv[2:]
from adaptertools.cli import main
main()
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_real_sigint_to_a_running_merge(models, tmp_path, signum, code):
    """What a user's Ctrl-C (or a ``kill``) does: the signal while the second tensor is being
    folded. The child gets SIGINT as from a terminal (helpers.cli.foreground): this test once
    hung, stderr empty, when the run that held it had been started in the background of a
    non-interactive shell, whose jobs get SIGINT ignored; the child inherited that, Python
    leaves an ignored SIGINT ignored, and the signal did nothing."""
    script, marker, out = tmp_path / "slow_merge.py", tmp_path / "folding", tmp_path / "out"
    script.write_text(SLOW_FOLD)
    proc = start_cli(marker, "merge", models["sharded"], models["adapter"], "--out", out,
                     launcher=script)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the merge never reached its second fold: {proc.poll()}"
        assert leftovers_beside(out), "expected the temporary output to exist mid-run"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stdout + stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no partial output was left behind" in lines[0], stderr
    assert_nothing_written(out)


# ----------------------------------------------------------------------------- existing OUT

@pytest.mark.parametrize("kind", ["folder", "file"])
def test_existing_output_refused_then_replaced_with_force(models, tmp_path, kind):
    out = tmp_path / "out"
    if kind == "folder":
        out.mkdir()             # a previous merge: a model folder --force may replace
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_text("previous merge")
    else:
        out.write_text("previous merge")
    snapshot = folder_bytes(out) if kind == "folder" else out.read_bytes()

    with pytest.raises(OutputExistsError) as info:
        at.merge(models["sharded"], [models["adapter"]], out)
    assert_library_error(info.value, [str(out)])
    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out)
    assert_cli_error(outcome, [str(out), "--force"])
    assert (folder_bytes(out) if kind == "folder" else out.read_bytes()) == snapshot
    assert leftovers_beside(out) == []

    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out, "--force")
    assert outcome.code == 0, outcome.stderr
    assert out.is_dir()
    assert folder_bytes(out) == folder_bytes(models["reference"])
    assert leftovers_beside(out) == []


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("weights, adapters, fragment", [
    ("1,2", 1, "2"),           # two weights, one adapter
    ("0.5", 2, "1"),           # one weight, two adapters
    ("abc", 1, "abc"),
    ("0.5;0.5", 2, "0.5;0.5"),
    ("", 1, "--weights"),
    ("1,,1", 2, "1,,1"),
])
def test_bad_weights_one_clear_line(models, tmp_path, weights, adapters, fragment):
    out = tmp_path / "out"
    paths = [models["adapter"]] * adapters
    with pytest.raises(UnsupportedError) as info:
        at.merge(models["single"], paths, out, weights=weights)
    assert_library_error(info.value, ["weight", fragment])
    outcome = run_cli("merge", models["single"], *paths, "--out", out, "--weights", weights)
    assert outcome.code in (1, 2), outcome
    assert_cli_error(outcome, ["--weights", fragment], code=outcome.code)
    assert_nothing_written(out)


def test_bad_weights_subprocess(models, tmp_path):
    out = tmp_path / "out"
    outcome = run_cli("merge", models["single"], models["adapter"], "--out", out,
                      "--weights", "0.5,x", how="subprocess")
    assert outcome.code in (1, 2), outcome
    assert_cli_error(outcome, ["--weights", "0.5,x"], code=outcome.code)
    assert_nothing_written(out)


@pytest.mark.parametrize("weights", ["nan", "inf", "-inf"])
def test_non_finite_weights_refused(models, tmp_path, weights):
    out = tmp_path / "out"
    outcome = run_cli("merge", models["single"], models["adapter"], "--out", out,
                      "--weights", weights)
    written_ok = outcome.code == 0
    assert not written_ok, f"merged with --weights {weights}"
    assert_cli_error(outcome, ["--weights"], code=outcome.code)
    assert_nothing_written(out)


def test_out_missing_is_misuse(models, tmp_path):
    before = listing(tmp_path)
    outcome = run_cli("merge", models["single"], models["adapter"], how="subprocess")
    assert_cli_error(outcome, ["--out"], code=2)
    assert listing(tmp_path) == before
    with pytest.raises(UnsupportedError, match="out"):
        at.merge(models["single"], [models["adapter"]])


def test_dry_run_prints_the_plan_and_writes_nothing(models, tmp_path):
    out = tmp_path / "out"
    changed = sorted(n for n, s in SPEC.shapes().items()
                     if len(s) == 2 and "layers" in n)            # the 7 targets of 2 layers
    assert len(changed) == 14

    report = at.merge(models["sharded"], [models["adapter"]], out, dry_run=True)
    assert sorted(row["name"] for row in report["changed"]) == changed
    assert_nothing_written(out)

    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out,
                      "--dry-run", "--json")
    assert outcome.code == 0, outcome.stderr
    plan = json.loads(outcome.stdout)
    assert sorted(row["name"] for row in plan["changed"]) == changed
    assert plan["tensors"] == len(SPEC.shapes())
    assert plan["output_bytes"] == sum((models["reference"] / s).stat().st_size for s in SHARDS)
    assert_nothing_written(out)

    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out,
                      "--dry-run", "--verbose")
    assert outcome.code == 0, outcome.stderr
    assert f"14 of {len(SPEC.shapes())} tensors" in outcome.stdout
    assert "model.layers.0.mlp.down_proj" in outcome.stdout
    assert stderr_lines(outcome) == []
    assert_nothing_written(out)


def test_dry_run_plan_names_every_changed_tensor_in_full(models):
    proc = run_cli("merge", models["sharded"], models["adapter"], "--dry-run", "--verbose",
                   how="subprocess", env={"COLUMNS": "80", "LINES": None})
    assert proc.code == 0, proc.stderr
    missing = [n for n, s in SPEC.shapes().items()
               if len(s) == 2 and "layers" in n and n not in proc.stdout]
    assert missing == []
