"""The CLI a person reads (issue 15 item 6): a merge summary instead of one row per tensor,
adapter names instead of indices, --verbose/--quiet, oracles that keep quiet during
``validate --e2e``, a GGUF conversion that finds its base in adapter_config.json, an extracted
adapter naming its base by absolute path or Hub id, file-like OUT refused for folder outputs,
whole target-module names, clear messages, and a README synopsis that agrees with the CLI.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import click
import pytest
import torch
from safetensors.torch import load_file

import adaptertools as at
from adaptertools.adapter import Adapter, LoraWeight
from adaptertools.cli import cli
from adaptertools.errors import OptionError
from adaptertools.tiny import TinyLlama, make_adapter, make_base

from helpers.cli import assert_cli_error, assert_nothing_written, run_cli

SPEC = TinyLlama(layers=4)
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer tiny Llama, two adapters with distinct last components, two that share one."""
    root = tmp_path_factory.mktemp("reading")
    paths = {"base": make_base(root / "base", SPEC)}
    adapters = {"math": make_adapter(SPEC, base_model=str(paths["base"])),
                "code": make_adapter(SPEC, targets=("q_proj",), seed=5),
                "a": make_adapter(SPEC, targets=("v_proj",), seed=6),
                "b": make_adapter(SPEC, targets=("v_proj",), seed=7)}
    places = {"math": root / "runs" / "lora-math", "code": root / "runs" / "lora-code",
              "a": root / "a" / "adapter", "b": root / "b" / "adapter"}
    for key, adapter in adapters.items():
        at.save(adapter, places[key], format="peft")
    paths.update(places)
    return paths


def table_rows(text: str) -> list[list[str]]:
    """The cells of every body row of the rich tables in ``text``."""
    return [[cell.strip() for cell in line.strip("│").split("│")]
            for line in text.splitlines() if line.startswith("│")]


# ----------------------------------------------------------------------------- merge report

def test_merge_prints_one_row_per_kind_with_adapter_names(tiny, tmp_path):
    outcome = run_cli("merge", tiny["base"], tiny["math"], tiny["code"], "--out",
                      tmp_path / "out")
    assert outcome.code == 0, outcome.stderr
    rows = table_rows(outcome.stdout)
    assert len(rows) == 7, outcome.stdout            # 28 changed tensors, 7 kinds
    by_name = {row[0]: row for row in rows}
    q = by_name["model.layers.*.self_attn.q_proj.weight"]
    assert q[1] == "4" and q[3] == "lora-math, lora-code", q
    assert by_name["model.layers.*.mlp.down_proj.weight"][3] == "lora-math"
    assert "model.layers.0." not in outcome.stdout
    assert "28 of 39 tensors change" in outcome.stdout
    assert "adapters lora-math (x1), lora-code (x1)" in outcome.stdout
    assert "--verbose" in outcome.stdout


def test_merge_verbose_lists_every_tensor(tiny, tmp_path):
    outcome = run_cli("merge", tiny["base"], tiny["math"], tiny["code"], "--out",
                      tmp_path / "out", "--verbose")
    assert outcome.code == 0, outcome.stderr
    rows = table_rows(outcome.stdout)
    assert len(rows) == 28
    q0 = next(r for r in rows if r[0] == "model.layers.0.self_attn.q_proj.weight")
    assert q0[3] == "lora-math, lora-code"


def test_ambiguous_last_components_show_whole_paths(tiny, tmp_path):
    outcome = run_cli("merge", tiny["base"], tiny["a"], tiny["b"], "--dry-run")
    assert outcome.code == 0, outcome.stderr
    rows = table_rows(outcome.stdout)
    assert rows[0][3] == f"{tiny['a']}, {tiny['b']}"


def test_merge_json_keeps_every_row(tiny, tmp_path):
    outcome = run_cli("merge", tiny["base"], tiny["math"], "--out", tmp_path / "out",
                      "--json")
    report = json.loads(outcome.stdout)
    assert len(report["changed"]) == 28 and report["changed"][0]["adapters"] == [0]


def test_merge_quiet_prints_only_warnings(tiny, tmp_path):
    base = tmp_path / "base"
    make_base(base, SPEC)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"_name_or_path": "someone/else"}))
    outcome = run_cli("merge", base, tiny["math"], "--out", tmp_path / "out", "--quiet",
                      "--validate")
    assert outcome.code == 0, outcome.stderr
    assert outcome.stdout == ""
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("warning:") for line in lines), lines
    clean = run_cli("merge", tiny["base"], tiny["code"], "--out", tmp_path / "o2", "-q")
    assert clean.code == 0 and clean.stdout == "" and clean.stderr == ""
    both = run_cli("merge", tiny["base"], tiny["code"], "--dry-run", "-q", "-v")
    assert both.code == 2 and "--verbose and --quiet" in both.stderr


def test_merge_validate_failure_shows_the_failures(tiny, tmp_path, monkeypatch):
    import adaptertools.validation.run as validation_run

    real = validation_run.summary

    def failing(report):
        out = real(report)
        out.update(passed=False, failed=1, failures=[{"name": "model.layers.0.mlp.up_proj.weight",
                                                      "problem": "SQNR 3 dB below its floor"}])
        return out

    monkeypatch.setattr(validation_run, "summary", failing)
    outcome = run_cli("merge", tiny["base"], tiny["code"], "--out", tmp_path / "out",
                      "--validate")
    assert outcome.code == 1
    assert ["model.layers.0.mlp.up_proj.weight", "SQNR 3 dB below its floor"] in \
        table_rows(outcome.stdout)
    assert "39 tensors checked, 1 failed" in outcome.stderr


def test_validation_summary_reads_well(capsys):
    from adaptertools import _ui

    report = {"passed": False, "failed": 0, "checked": 21, "adapted": 14, "untouched": 7,
              "tolerance_db": 1.0, "worst_margin_db": 3.0, "wall_s": 0.5,
              "e2e": {"passed": False}}
    _ui.validation_summary(report)
    line = capsys.readouterr().err.strip()
    assert "21 tensors checked, all passed; end-to-end: FAILED" in line, line
    assert "or the end-to-end" not in line
    _ui.validation_summary(report | {"passed": True, "e2e": {"passed": True}})
    assert "end-to-end: passed" in capsys.readouterr().err


# ----------------------------------------------------------------------------- library

def test_library_refuses_dry_run_with_validate(tiny):
    with pytest.raises(OptionError, match="--validate"):
        at.merge(tiny["base"], [tiny["math"]], dry_run=True, validate=True)


def test_library_lowercases_requantize(tiny, tmp_path):
    report = at.merge(tiny["base"], [tiny["math"]], tmp_path / "out", requantize="KEEP")
    assert len(report["changed"]) == 28


# ----------------------------------------------------------------------------- OUT names

@pytest.mark.parametrize("name", ["x.gguf", "x.safetensors", "x.bin", "x.JSON"])
def test_hf_merge_refuses_a_file_looking_out(tiny, tmp_path, name):
    out = tmp_path / name
    outcome = run_cli("merge", tiny["base"], tiny["math"], "--out", out)
    line = assert_cli_error(outcome, [str(out), "folder"], code=2)
    assert "HF checkpoint" in line
    assert_nothing_written(out)
    with pytest.raises(OptionError):
        at.merge(tiny["base"], [tiny["math"]], out)
    assert_cli_error(run_cli("merge", tiny["base"], tiny["math"], "--out", out,
                             "--dry-run"), [str(out)], code=2)


# ----------------------------------------------------------------------------- convert

def test_convert_to_gguf_takes_the_base_the_adapter_names(tiny, tmp_path):
    dst = tmp_path / "out.gguf"
    outcome = run_cli("convert", tiny["math"], dst, "--to", "gguf")
    assert outcome.code == 0, outcome.stderr
    assert dst.is_file()
    assert str(tiny["base"]) in outcome.stderr and "base_model_name_or_path" in outcome.stderr
    report = json.loads(run_cli("convert", tiny["math"], tmp_path / "o2.gguf", "--to",
                                "gguf", "--json").stdout)
    assert report["base"] == str(tiny["base"])
    # a Hub id (or a path that does not exist) is not fetched: --base is still asked for
    at.save(make_adapter(SPEC, base_model="someone/model"), tmp_path / "hub", format="peft")
    assert_cli_error(run_cli("convert", tmp_path / "hub", tmp_path / "o3.gguf", "--to",
                             "gguf"), ["--base"])


def test_convert_to_gguf_says_unchanged_copies_were_dropped(tiny, tmp_path):
    embed = load_file(tiny["base"] / "model.safetensors")["model.embed_tokens.weight"]
    adapter = make_adapter(SPEC, base_model=str(tiny["base"]))
    adapter.replacements["model.embed_tokens.weight"] = embed.clone()
    at.save(adapter, tmp_path / "ad", format="peft")
    outcome = run_cli("convert", tmp_path / "ad", tmp_path / "out.gguf", "--to", "gguf",
                      "--base", tiny["base"])
    assert outcome.code == 0, outcome.stderr
    assert "1 full tensor(s) dropped: unchanged copies of the base" in outcome.stdout
    assert "1 full tensors" not in outcome.stdout
    report = at.convert(tmp_path / "ad", tmp_path / "o2.gguf", to="gguf", base=tiny["base"])
    assert report["dropped_tensors"] == 1 and report["replaced_tensors"] == 0


# ----------------------------------------------------------------------------- extract

def _fine_tune(base: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    tensors = load_file(base / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] += 0.01
    from safetensors.torch import save_file

    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text((base / "config.json").read_text())
    return dst


def test_extract_records_an_absolute_base(tiny, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny["base"], tmp_path / "base")
    _fine_tune(tmp_path / "base", tmp_path / "tuned")
    monkeypatch.chdir(tmp_path)
    outcome = run_cli("extract", "base", "tuned", "--out", "lora", "--rank", "2")
    assert outcome.code == 0, outcome.stderr
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")


def test_extract_records_the_hub_id_of_a_hub_snapshot(tiny, tmp_path):
    import shutil

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("c" * 40)
    shutil.copytree(tiny["base"], snapshot)
    tuned = _fine_tune(snapshot, tmp_path / "tuned")
    at.extract(snapshot, tuned, tmp_path / "lora", rank=2)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "someone/tiny"


# ----------------------------------------------------------------------------- inspect

DIFFUSERS = ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "ff.net.0.proj", "ff.net.2")


def _diffusers_adapter(config_targets=None) -> Adapter:
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for block in range(2):
        for module in DIFFUSERS:
            name = f"down_blocks.{block}.attentions.0.transformer_blocks.0.{module}.weight"
            weights[name] = LoraWeight(a=torch.randn(2, 8, generator=gen),
                                       b=torch.randn(8, 2, generator=gen), scale=1.0)
    metadata = {"source_format": "test"}
    if config_targets:
        metadata["peft_config"] = {"target_modules": config_targets, "r": 2, "lora_alpha": 2}
    return Adapter(weights=weights, metadata=metadata)


def test_inspect_shows_whole_target_module_names(tmp_path):
    at.save(_diffusers_adapter(), tmp_path / "raw.safetensors", format="safetensors")
    report = at.inspect(tmp_path / "raw.safetensors")
    assert report["target_modules"] == ["net.0.proj", "net.2", "to_k", "to_out.0", "to_q"]
    targets = ["to_q", "to_k", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    at.save(_diffusers_adapter(targets), tmp_path / "peft", format="peft")
    report = at.inspect(tmp_path / "peft")
    assert report["target_modules"] == ["ff.net.0.proj", "ff.net.2", "to_k", "to_out.0", "to_q"]
    outcome = run_cli("inspect", tmp_path / "peft")
    assert "ff.net.0.proj, ff.net.2, to_k, to_out.0, to_q" in outcome.stdout


def test_inspect_llama_targets_stay_short(tiny):
    assert at.inspect(tiny["math"])["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_inspect_a_folder_as_a_one_file_format(tiny):
    outcome = run_cli("inspect", tiny["math"], "--from", "safetensors")
    line = assert_cli_error(outcome, [str(tiny["math"]), "folder",
                                      "adapter_model.safetensors"])
    assert "corrupt" not in line and "os error" not in line


# ----------------------------------------------------------------------------- e2e noise

def test_validate_e2e_is_not_buried_in_oracle_noise(tiny, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "merged"
    at.merge(tiny["base"], [tiny["math"]], out)
    proc = run_cli("validate", tiny["base"], tiny["math"], "--merged", out, "--e2e",
                   how="subprocess", timeout=300)
    assert proc.code == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("validation passed"), proc.stderr
    assert "end-to-end: passed" in lines[0]


def test_quiet_oracles_restores_everything_and_yields_to_debug(monkeypatch):
    pytest.importorskip("transformers")
    import logging

    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    from adaptertools.validation.e2e import quiet_oracles

    monkeypatch.delenv("ADAPTERTOOLS_DEBUG", raising=False)
    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
              hub_utils.are_progress_bars_disabled(), logging.getLogger("bitsandbytes").level)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_oracles():
            warnings.warn("deprecated", FutureWarning)
            assert hf_logging.get_verbosity() == logging.ERROR
            assert not hf_logging.is_progress_bar_enabled()
            assert logging.getLogger("bitsandbytes").level == logging.ERROR
        assert caught == []
        monkeypatch.setenv("ADAPTERTOOLS_DEBUG", "1")
        with quiet_oracles():
            warnings.warn("deprecated", FutureWarning)
        assert len(caught) == 1
    after = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
             hub_utils.are_progress_bars_disabled(), logging.getLogger("bitsandbytes").level)
    assert after == before


# ----------------------------------------------------------------------------- help and README

def _long(param: click.Parameter) -> str:
    return next(o for o in param.opts if o.startswith("--"))


def synopsis(name: str, command: click.Command) -> str:
    """The command's synopsis from its click definition: arguments, options, choice lists."""
    words = [f"adaptertools {name}".strip()]
    for param in command.params:
        if isinstance(param, click.Argument):
            words.append(param.human_readable_name)
        elif _long(param) != "--help":
            value = "|".join(param.type.choices) if isinstance(param.type, click.Choice) else \
                ("" if param.is_flag else (param.metavar or param.type.name.upper()))
            words.append(f"[{_long(param)}{' ' + value if value else ''}]")
    return " ".join(words)


def readme_synopses() -> dict[str, str]:
    """Command -> its README synopsis lines joined (PUSH and HUB expanded); "" is the group."""
    section = README.read_text().split("## Commands", 1)[1]
    block = section.split("```text", 1)[1].split("```", 1)[0]
    entries: list[list[str]] = []
    groups: dict[str, str] = {}
    for line in block.splitlines():
        if line.startswith("adaptertools"):
            entries.append([line])
        elif re.match(r"[A-Z]+:", line):
            key, text = line.split(":", 1)
            groups[key] = text
        elif line.startswith(" ") and line.strip() and entries:
            entries[-1].append(line)
    out: dict[str, str] = {}
    for lines in entries:
        text = re.sub(r"\|\s+", "|", " ".join(part.strip() for part in lines))
        for key, expansion in groups.items():
            text = text.replace(f"[{key}]", expansion)
        word = text.split()[1] if len(text.split()) > 1 else ""
        name = word if word in cli.commands else ""
        out[name] = (out.get(name, "") + " " + text).strip()
    return out


def test_readme_has_a_synopsis_for_every_command():
    assert set(readme_synopses()) == set(cli.commands) | {""}


@pytest.mark.parametrize("name", ["", *sorted(cli.commands)])
def test_readme_synopsis_agrees_with_the_cli(name):
    command = cli if name == "" else cli.commands[name]
    params = [p for p in command.params if isinstance(p, click.Option) and _long(p) != "--help"]
    text = readme_synopses()[name]
    generated = synopsis(name, command)
    shown = set(re.findall(r"--[a-z][a-z0-9-]*", text))
    missing = sorted({_long(p) for p in params} - shown)
    assert not missing, f"README lacks {missing}; the CLI's synopsis is:\n{generated}"
    stale = sorted(shown - {_long(p) for p in params})
    assert not stale, f"README names {stale}, which `{name}` lacks:\n{generated}"
    for param in params:
        if isinstance(param.type, click.Choice):
            found = re.search(re.escape(_long(param)) + r"[ =]([\w.|-]+)", text)
            assert found, f"README gives no choices for {_long(param)}:\n{generated}"
            assert found.group(1).split("|") == list(param.type.choices), \
                f"{_long(param)}: README {found.group(1)}, CLI {'|'.join(param.type.choices)}"


def test_top_level_help_shows_whole_summaries():
    result = run_cli("--help", terminal_width=80)
    commands = result.output.split("Commands:", 1)[1].splitlines()
    summaries = [line.split(None, 1)[1] for line in commands if line.strip()]
    assert len(summaries) == len(cli.commands)
    assert not [s for s in summaries if s.endswith("...")], summaries


def test_help_texts_say_what_each_command_does():
    extract = {_long(p): p.help for p in cli.commands["extract"].params if p.help}
    assert "DARE" not in extract["--seed"]
    combine = {_long(p): p.help for p in cli.commands["combine"].params if p.help}
    assert "DARE" in combine["--seed"]
    push = {_long(p): p.help for p in cli.commands["push"].params if p.help}
    assert "--push-to" not in push["--private"]
