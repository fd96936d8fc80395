"""Third-party format plugins, installed through a real entry point (issue 15 item 5).

Each test writes a tiny distribution into a folder at test time: a module plus a
``NAME-0.1.dist-info`` folder (METADATA, entry_points.txt registering it under
``adaptertools.formats``). The folder goes on ``sys.path`` (and on PYTHONPATH for the CLI run in
a subprocess), so ``importlib.metadata.entry_points()`` really finds it.

- a plugin whose functions take ``**opts`` receives scale / base / dtype (``inspect``,
  ``convert``), in the library and the CLI; the built-ins keep their refusals;
- a plugin that raises on import, names a missing module, lacks its functions or whose sniff
  raises is skipped with one warning (plugin, distribution, reason); the built-ins keep working
  and ``formats`` lists it as unavailable with the reason.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import adaptertools as at
from adaptertools import registry
from adaptertools.errors import AdapterToolsWarning, UnsupportedError
from adaptertools.tiny import make_adapter, make_base

from helpers.cli import Outcome, run_cli

# A working format whose functions take only ``**opts``: it records what it was given beside
# the file it read or wrote (``X.read.json``; the written file itself holds ``opts``).
ECHO = '''
import dataclasses, json
from pathlib import Path

DESCRIPTION = "echo: a test plugin that records its options"


def _record(opts):
    out = {}
    for key, value in opts.items():
        out[key] = getattr(value, "arch", value)     # a BaseInfo as its architecture
    return out


def sniff(path):
    return Path(path).suffix == ".echo" and Path(path).is_file()


def read(path, **opts):
    from adaptertools.tiny import make_adapter

    Path(str(path) + ".read.json").write_text(json.dumps(_record(opts)))
    adapter = make_adapter(rank=2, targets=("q_proj",))
    scale = opts.get("scale", 1.0)
    weights = {k: dataclasses.replace(w, scale=scale) for k, w in adapter.weights.items()}
    return dataclasses.replace(adapter, weights=weights)


def write(adapter, path, **opts):
    dtypes = sorted({str(w.a.dtype) for w in adapter.weights.values()})
    Path(path).write_text(json.dumps({"opts": _record(opts), "tensors": len(adapter.weights),
                                      "factor_dtypes": dtypes}))
'''

RAISES = 'raise RuntimeError("boom: this plugin is broken on purpose")\n'
NO_FUNCTIONS = '''
DESCRIPTION = "a plugin that forgot its functions"


def sniff(path):
    return False
'''
NO_SNIFF = 'def read(path, **opts):\n    raise AssertionError("never called")\n'
BAD_SNIFF = '''
SNIFF_ORDER = 1     # before every built-in


def sniff(path):
    raise OSError("sniffing failed on purpose")


def read(path, **opts):
    raise AssertionError("never called")
'''


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(dist, module, source, entry=None)`` -> the folder now on sys.path holding the
    distribution ``dist`` whose entry point ``dist`` -> ``entry`` (default: ``module``) is
    registered under ``adaptertools.formats``."""
    modules: list[str] = []
    roots: list[Path] = []

    def install_one(dist: str, module: str, source: str, entry: str | None = None) -> Path:
        root = tmp_path / f"site-{dist}"
        info = root / f"{dist}-0.1.dist-info"
        info.mkdir(parents=True)
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n"
                                               f"{dist} = {entry or module}\n")
        monkeypatch.syspath_prepend(str(root))
        importlib.invalidate_caches()
        registry.formats.cache_clear()
        modules.append(module)
        roots.insert(0, root)
        return root

    install_one.roots = roots
    registry.formats.cache_clear()
    yield install_one
    registry.formats.cache_clear()
    for module in modules:
        sys.modules.pop(module, None)


@pytest.fixture
def peft_dir(tmp_path) -> Path:
    folder = tmp_path / "adapter"
    at.save(make_adapter(), folder, format="peft")
    return folder


@pytest.fixture
def base_dir(tmp_path) -> Path:
    return make_base(tmp_path / "base")


def run_with_plugins(roots: list[Path], *args) -> Outcome:
    """``adaptertools ARGS`` in a fresh interpreter that sees the plugins in ``roots``."""
    path = [str(r) for r in roots] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return run_cli(*args, how="subprocess", timeout=180,
                   env={"PYTHONPATH": os.pathsep.join(path), "NO_COLOR": "1"})


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def assert_one_warning(stderr: str, *fragments: str) -> None:
    lines = warning_lines(stderr)
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ----------------------------------------------------------------------------- **opts plugins

def test_entry_point_is_really_found(install):
    install("atplug-echo", "atplug_echo", ECHO)
    names = {ep.name: ep.dist.name for ep in importlib.metadata.entry_points(
        group=registry.ENTRY_POINT_GROUP)}
    assert names["atplug-echo"] == "atplug-echo"
    fmt = registry.get_format("atplug-echo")
    assert fmt.available and fmt.can_read and fmt.can_write and fmt.package == "atplug-echo"
    assert {"peft", "safetensors", "gguf"} <= set(registry.formats())


def test_opts_plugin_receives_every_option(install, tmp_path, peft_dir, base_dir):
    install("atplug-echo", "atplug_echo", ECHO)
    src = tmp_path / "in.echo"
    src.write_text("{}")

    report = at.inspect(src, scale=0.25, base=base_dir)
    assert report["format"] == "atplug-echo"
    assert json.loads(Path(f"{src}.read.json").read_text()) == {"scale": 0.25, "base": "llama"}
    assert set(report["scales"]) == {"0.25"}          # the scale the plugin was given

    at.inspect(src)                                  # no options given: none passed
    assert json.loads(Path(f"{src}.read.json").read_text()) == {}

    out = tmp_path / "out.echo"
    at.convert(peft_dir, out, to="atplug-echo", dtype="fp16", base=base_dir)
    written = json.loads(out.read_text())
    assert written["opts"] == {"dtype": "fp16", "base": "llama"}
    assert written["factor_dtypes"] == ["torch.float32"]   # it takes dtype: it casts itself

    back = tmp_path / "back"
    result = at.convert(src, back, to="peft", scale=0.5, base=base_dir)
    assert result["from"] == "atplug-echo"
    assert json.loads(Path(f"{src}.read.json").read_text()) == {"scale": 0.5, "base": "llama"}
    assert {w.scale for w in at.load(back).weights.values()} == {0.5}


def test_builtins_keep_their_option_rules(install, tmp_path, peft_dir, base_dir):
    install("atplug-echo", "atplug_echo", ECHO)
    with pytest.raises(UnsupportedError, match="--scale only applies to files without a config; "
                                               "peft adapters carry their own scale, drop --scale"):
        at.inspect(peft_dir, scale=2.0)
    with pytest.raises(UnsupportedError, match="--base does not apply to peft -> safetensors"):
        at.convert(peft_dir, tmp_path / "x.safetensors", to="safetensors", base=base_dir)
    at.convert(peft_dir, tmp_path / "x.safetensors", to="safetensors", dtype="bf16")
    assert {str(w.a.dtype) for w in at.load(tmp_path / "x.safetensors").weights.values()} == \
        {"torch.bfloat16"}


def test_opts_plugin_through_the_cli(install, tmp_path, peft_dir, base_dir):
    install("atplug-echo", "atplug_echo", ECHO)
    src = tmp_path / "in.echo"
    src.write_text("{}")
    proc = run_with_plugins(install.roots, "inspect", src, "--scale", "0.25", "--base", base_dir,
                            "--json")
    assert proc.code == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "atplug-echo"
    assert json.loads(Path(f"{src}.read.json").read_text()) == {"scale": 0.25, "base": "llama"}
    assert warning_lines(proc.stderr) == []

    out = tmp_path / "out.echo"
    proc = run_with_plugins(install.roots, "convert", peft_dir, out, "--to", "atplug-echo",
                            "--dtype", "bf16", "--base", base_dir, "--json")
    assert proc.code == 0, proc.stderr
    assert json.loads(out.read_text())["opts"] == {"dtype": "bf16", "base": "llama"}

    proc = run_with_plugins(install.roots, "formats", "--json")
    row = {r["name"]: r for r in json.loads(proc.stdout)}["atplug-echo"]
    assert row["read"] is True and row["write"] is True and row["package"] == "atplug-echo"


# ----------------------------------------------------------------------------- broken plugins

def test_plugin_raising_on_import_leaves_the_cli_working(install, tmp_path, peft_dir):
    install("atplug-raises", "atplug_raises", RAISES)
    reason = ("atplug-raises", "RuntimeError", "boom: this plugin is broken on purpose")

    proc = run_with_plugins(install.roots, "formats", "--json")
    assert proc.code == 0, proc.stderr
    assert_one_warning(proc.stderr, *reason)
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert {"peft", "safetensors", "gguf"} <= set(rows)
    broken = rows["atplug-raises"]
    assert broken["read"] is False and broken["write"] is False
    assert broken["package"] == "atplug-raises"
    assert broken["description"].startswith("unavailable:") and "boom" in broken["description"]
    assert broken["available"] is False and "boom" in broken["error"]
    assert rows["peft"]["available"] is True and rows["peft"]["error"] is None

    proc = run_with_plugins(install.roots, "formats")
    assert proc.code == 0, proc.stderr
    assert "atplug-raises" in proc.stdout and "unavailable" in proc.stdout

    proc = run_with_plugins(install.roots, "inspect", peft_dir, "--json")
    assert proc.code == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "peft"
    assert_one_warning(proc.stderr, *reason)

    out = tmp_path / "out.safetensors"
    proc = run_with_plugins(install.roots, "convert", peft_dir, out, "--to", "safetensors")
    assert proc.code == 0, proc.stderr
    assert_one_warning(proc.stderr, *reason)
    with pytest.warns(AdapterToolsWarning, match="atplug-raises"):   # in this process too
        assert set(at.load(out).weights) == set(at.load(peft_dir).weights)


def test_plugin_raising_on_import_in_the_library(install, peft_dir):
    install("atplug-raises", "atplug_raises", RAISES)
    with pytest.warns(AdapterToolsWarning) as caught:
        known = registry.formats()
    messages = [str(w.message) for w in caught if issubclass(w.category, AdapterToolsWarning)]
    assert len(messages) == 1
    assert "'atplug-raises'" in messages[0] and "RuntimeError: boom" in messages[0]
    assert not known["atplug-raises"].available
    assert at.inspect(peft_dir)["format"] == "peft"        # cached: no second warning
    with pytest.raises(UnsupportedError, match="unavailable: importing atplug_raises failed"):
        registry.get_format("atplug-raises")


@pytest.mark.parametrize("source, entry, reason", [
    (NO_FUNCTIONS, None, "atplug_bad defines neither read() nor write()"),
    (NO_SNIFF, None, "atplug_bad defines read() but no sniff()"),
    (ECHO, "atplug_no_such_module", "ModuleNotFoundError"),
    (ECHO, "atplug_bad:missing_attribute", "AttributeError"),
], ids=["no-functions", "no-sniff", "missing-module", "missing-attribute"])
def test_unusable_plugin_is_reported(install, peft_dir, source, entry, reason):
    install("atplug-bad", "atplug_bad", source, entry)
    result = run_cli("formats", "--json")
    assert result.code == 0, result.stderr
    assert_one_warning(result.stderr, "'atplug-bad'", "distribution 'atplug-bad'", reason)
    row = {r["name"]: r for r in json.loads(result.stdout)}["atplug-bad"]
    assert row["read"] is False and row["write"] is False
    assert row["description"].startswith("unavailable:") and reason in row["description"]

    result = run_cli("inspect", peft_dir, "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["format"] == "peft"


def test_plugin_whose_sniff_raises_does_not_hide_the_builtins(install, peft_dir, tmp_path):
    install("atplug-sniff", "atplug_sniff", BAD_SNIFF)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert at.inspect(peft_dir)["format"] == "peft"
    messages = [str(w.message) for w in caught if issubclass(w.category, AdapterToolsWarning)]
    assert len(messages) == 1 and "sniffing failed on purpose" in messages[0]
    assert "'atplug-sniff'" in messages[0]


def test_formats_table_shows_the_reason_literally(install):
    """An unavailable plugin's reason is printed as text: rich markup in it is not read."""
    install("atplug-markup", "atplug_markup", 'raise ValueError("[bold]x[/bold] [/oops]")\n')
    result = run_cli("formats")
    assert result.code == 0, result.stderr
    assert_one_warning(result.stderr, "atplug-markup", "[bold]x[/bold] [/oops]")
    for text in ("peft", "safetensors", "gguf", "atplug-markup", "unavailable", "[/oops]",
                 "[bold]x[/bold]"):
        assert text in result.stdout, text
