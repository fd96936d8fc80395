"""Every exception stops at the CLI boundary as one ``error:`` line and an exit code.

- an exception no code meant to raise (a bug, RecursionError, MemoryError): exit 1 and
  ``error: internal error in 'adaptertools CMD': TYPE: FIRST LINE; please report it (rerun with
  --debug for the traceback)``; ``--debug`` (or ADAPTERTOOLS_DEBUG=1) prints the traceback too;
- misuse the library finds (OptionError: a --weights count, --rank 0, a missing --rank): exit 2
  with a usage hint, as for click's own usage errors; a failed operation stays exit 1.

Bugs are made by monkeypatching a library function to raise, in process (CliRunner) and in a
subprocess (``main``, the console script's entry).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import adaptertools as at
import adaptertools.api
from adaptertools.errors import AdapterToolsError, OptionError, UnsupportedError
from adaptertools.tiny import TinyLlama, make_adapter, make_base

from helpers.cli import assert_cli_error, assert_nothing_written, run_cli, stderr_lines

REPORT = "please report it (rerun with --debug for the traceback)"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("boundary")
    base = make_base(root / "base", TinyLlama(), dtype=torch.bfloat16)
    at.save(make_adapter(TinyLlama()), root / "adapter", format="peft")
    return {"base": base, "adapter": root / "adapter"}


def raising(exc: BaseException):
    def broken(*args, **kwargs):
        raise exc
    return broken


# ----------------------------------------------------------------------------- internal errors

@pytest.mark.parametrize("exc, what", [
    (RuntimeError("boom\nsecond line"), "RuntimeError: boom"),
    (RecursionError("maximum recursion depth exceeded"),
     "RecursionError: maximum recursion depth exceeded"),
    (MemoryError(), "MemoryError"),
    (KeyError("q_proj"), "KeyError: 'q_proj'"),
    (AttributeError("'NoneType' object has no attribute 'shape'"),
     "AttributeError: 'NoneType' object has no attribute 'shape'"),
])
def test_an_internal_error_is_one_line(models, monkeypatch, exc, what):
    monkeypatch.setattr(adaptertools.api, "inspect", raising(exc))
    outcome = run_cli("inspect", models["adapter"])
    line = assert_cli_error(outcome, [])
    assert line == f"error: internal error in 'adaptertools inspect': {what}; {REPORT}"


def test_an_internal_error_names_its_command(models, monkeypatch, tmp_path):
    monkeypatch.setattr(adaptertools.api, "merge", raising(ZeroDivisionError("division by zero")))
    out = tmp_path / "out"
    outcome = run_cli("merge", models["base"], models["adapter"], "--out", out)
    line = assert_cli_error(outcome, [])
    assert line.startswith("error: internal error in 'adaptertools merge': ZeroDivisionError: ")
    assert_nothing_written(out)


@pytest.mark.parametrize("how", ["option", "env"])
def test_debug_adds_the_traceback(models, monkeypatch, how):
    monkeypatch.setattr(adaptertools.api, "inspect", raising(RuntimeError("boom")))
    args = ["inspect", str(models["adapter"])]
    env = {}
    if how == "option":
        args = ["--debug", *args]
    else:
        env["ADAPTERTOOLS_DEBUG"] = "1"
    result = run_cli(*args, env=env)
    assert result.code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "in broken" in result.stderr and "RuntimeError: boom" in result.stderr
    last = stderr_lines(result)[-1]
    assert last.startswith("error: internal error in 'adaptertools inspect': RuntimeError: boom")


def test_debug_off_by_env_zero(models, monkeypatch):
    monkeypatch.setattr(adaptertools.api, "inspect", raising(RuntimeError("boom")))
    result = run_cli("inspect", models["adapter"], env={"ADAPTERTOOLS_DEBUG": "0"})
    assert result.code == 1 and "Traceback" not in result.stderr


def test_debug_also_shows_where_a_library_error_came_from(models, tmp_path):
    missing = tmp_path / "missing"
    plain = run_cli("inspect", missing)
    assert_cli_error(plain, [str(missing)])
    result = run_cli("--debug", "inspect", missing)
    assert result.code == 1 and "Traceback" in result.stderr
    assert stderr_lines(result)[-1] == stderr_lines(plain)[0]


BROKEN_CLI = """
import sys
import adaptertools.api as api

def broken(*args, **kwargs):
    raise RecursionError("maximum recursion depth exceeded while calling a Python object")

api.inspect = broken
sys.argv = ["adaptertools"] + sys.argv[1:]
from adaptertools.cli import main
main()
"""


@pytest.mark.parametrize("debug", [False, True])
def test_an_internal_error_in_a_subprocess(models, tmp_path, debug):
    script = tmp_path / "broken_cli.py"
    script.write_text(BROKEN_CLI)
    proc = run_cli(*(["--debug"] if debug else []), "inspect", models["adapter"],
                   how="subprocess", launcher=script)
    assert proc.code == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: internal error in 'adaptertools inspect': RecursionError: "
                                "maximum recursion depth exceeded while calling a Python object; "
                                "please report it"), proc.stderr
    if debug:
        assert "Traceback (most recent call last)" in proc.stderr and len(lines) > 1
    else:
        assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""


# ----------------------------------------------------------------------------- misuse: exit 2

def misuse_cases(models, tmp_path) -> list[tuple[list, int, list[str]]]:
    """(arguments, exit code, fragments of the one error line)."""
    base, adapter = str(models["base"]), str(models["adapter"])
    missing, out = str(tmp_path / "missing"), str(tmp_path / "out")
    return [
        (["merge", base, adapter, "--weights", "1,2"], 2, ["--weights has 2 value(s)"]),
        (["merge", base, adapter, adapter, "--weights", "0.5"], 2, ["--weights has 1 value"]),
        (["merge", base, adapter, "--weights", "abc"], 2, ["--weights 'abc'"]),
        (["merge", base, adapter, "--weights", "nan"], 2, ["finite"]),
        (["combine", adapter, "--method", "svd", "--rank", "0"], 2, ["--rank 0"]),
        (["combine", adapter, "--method", "svd", "--energy", "2"], 2, ["--energy 2.0"]),
        (["combine", adapter, "--method", "svd"], 2, ["--rank R or --energy E"]),
        (["combine", adapter, "--method", "ties", "--rank", "2"], 2, ["--density"]),
        (["combine", adapter, "--rank", "4"], 2, ["cat is exact"]),
        (["combine", adapter, "--method", "svd", "--rank", "2", "--density", "0.5"], 2,
         ["--density applies to"]),
        (["combine", adapter, adapter, "--weights", "1"], 2, ["--weights has 1 value"]),
        (["extract", base, base], 2, ["extract needs --rank R or --energy E"]),
        (["extract", base, base, "--rank", "0"], 2, ["--rank 0"]),
        (["extract", base, base, "--rank", "2", "--energy", "0.5"], 2, ["both given"]),
        (["merge", base, adapter], 2, ["--out"]),                         # click's own check
        (["merge", base, adapter, "--mode", "sideways"], 2, ["sideways"]),  # click's Choice
        (["merge", base, adapter, "--out", out, "--quantize-like", base], 2,
         ["--quantize-like", "expected a GGUF model file"]),
        (["merge", base, adapter, "--out", out, "--requantize", "q4_0"], 2,
         ["--requantize q4_0"]),
        (["inspect", adapter, "--scale", "2"], 2, ["--scale only applies"]),
        (["convert", adapter, out, "--to", "safetensors", "--base", base], 2,
         ["--base does not apply"]),
        (["push", adapter, "not/a/repo/id"], 1, ["push to a repo id"]),
        (["merge", base, missing], 1, [missing]),                          # failed: exit 1
        (["combine", missing, "--method", "svd", "--rank", "2"], 1, [missing]),
    ]


def test_misuse_exits_2_with_a_usage_hint_and_failures_exit_1(models, tmp_path):
    out = tmp_path / "out"
    for args, code, fragments in misuse_cases(models, tmp_path):
        takes_out = args[0] in ("merge", "combine", "extract") and "--out" not in args
        extra = [] if not takes_out or args == ["merge", str(models["base"]),
                                                str(models["adapter"])] else ["--out", str(out)]
        line = assert_cli_error(run_cli(*args, *extra, how="main"), fragments, code=code)
        hint = line.endswith(f" {args[0]} --help`)")       # (see `PROG merge --help`)
        assert hint == (code == 2), (args, line)
        assert_nothing_written(out)


def test_option_error_through_click_runner(models, tmp_path):
    outcome = run_cli("combine", models["adapter"], "--method", "svd", "--rank", "0",
                      "--out", tmp_path / "out")
    line = assert_cli_error(outcome, ["--rank 0"], code=2)
    assert line.endswith("(see `cli combine --help`)"), line


def test_misuse_exits_2_in_a_subprocess(models, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("combine", models["adapter"], "--method", "svd", "--rank", "0", "--out", out,
                   how="subprocess")
    assert proc.code == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --rank 0: give a whole number >= 1")
    assert lines[0].endswith("combine --help`)"), lines
    assert_nothing_written(out)


def test_option_error_is_what_callers_caught_before(models, tmp_path):
    with pytest.raises(OptionError) as info:
        at.merge(models["base"], [models["adapter"]], tmp_path / "out", weights="1,2")
    assert isinstance(info.value, UnsupportedError)
    assert isinstance(info.value, AdapterToolsError) and isinstance(info.value, ValueError)
