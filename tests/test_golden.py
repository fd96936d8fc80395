"""The golden corpus: every merge, convert, combine and extract case the suite builds, run and
hashed byte for byte against what the code wrote before the layout refactor (commit ddd4fd8).

The cases and their tiny inputs are in tests/golden/cases.py; the expected hashes in
tests/golden/hashes.json, written by tests/golden/regenerate.py (read its docstring before
running it). For each case the test builds the inputs, hashes them, runs the command and hashes
its output (sha256 of every file, sorted by relative path):

- input hash differs from the recorded one: another torch/transformers/PEFT/bitsandbytes made
  other inputs; the case is SKIPPED, saying so (a dependency moved, not our code);
- input hash matches: the output hash must match exactly.

Normalized before hashing (both explained in cases.py): the case's temporary folder, which
outputs may embed as an absolute path (combine/extract to safetensors record their sources),
becomes ``<ROOT>``; the ``__metadata__`` keys of .safetensors files are sorted, because the
safetensors library writes them in an order that changes with every process. PEFT's
``adapter_config.json`` of the inputs has its ``target_modules`` sorted for the same reason (a
set, written in string-hash order). No output embeds a timestamp today; runner.py's
SKIPPED_OUTPUT_FILES is where one would be left out, by name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))

from cases import all_cases  # noqa: E402
from runner import run_case  # noqa: E402

CASES = {case.name: case for case in all_cases()}     # names and closures only: nothing built


def _recorded() -> dict:
    return json.loads((GOLDEN / "hashes.json").read_text())


def test_every_case_is_recorded():
    recorded = _recorded()["cases"]
    assert set(recorded) == set(CASES), (
        f"not recorded: {sorted(set(CASES) - set(recorded))}; recorded but gone: "
        f"{sorted(set(recorded) - set(CASES))} (tests/golden/regenerate.py --only NAME)")
    counts: dict[str, int] = {}
    for case in CASES.values():
        counts[case.command] = counts.get(case.command, 0) + 1
    assert set(counts) == {"merge", "convert", "combine", "extract"}, counts


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_output(name):
    case = CASES[name]
    if name.startswith("merge-bnb-"):
        pytest.importorskip("bitsandbytes")
    if "gguf" in name:
        pytest.importorskip("gguf")
    expected = _recorded()["cases"].get(name)
    if expected is None:
        pytest.fail(f"{name} has no recorded hashes; run tests/golden/regenerate.py --only {name} "
                    "against the pre-refactor commit")
    got = run_case(case)
    if got["input"] != expected["input"]:
        changed = sorted(f for f in set(got["input_files"]) | set(expected["input_files"])
                         if got["input_files"].get(f) != expected["input_files"].get(f))
        pytest.skip(f"{name}: its INPUT differs from the recorded one ({', '.join(changed)}): "
                    "another torch/transformers/PEFT version built other test inputs, so the "
                    "recorded output says nothing here; regenerate hashes.json from the "
                    "pre-refactor commit under these versions to check it")
    if got["output"] != expected["output"]:
        differ = sorted(f for f in set(got["output_files"]) | set(expected["output_files"])
                        if got["output_files"].get(f) != expected["output_files"].get(f))
        pytest.fail(f"{name}: same input, different output bytes in {differ} "
                    f"(files now: {sorted(got['output_files'])}, recorded: "
                    f"{sorted(expected['output_files'])})")
