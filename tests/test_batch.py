"""``adaptertools batch``: the issue's minimal file as written, schema errors all at once (exit
2), matrix and named outputs, resume (cached jobs keep their outputs' mtimes), overwrite rules,
failure isolation (a broken adapter fails its job, its dependants are skipped, exit 1)."""

from __future__ import annotations

import json
import os

import pytest

import adaptertools as at
from adaptertools.batch import JobsFileError, run_batch
from helpers.batch_inputs import make_inputs, merges_and_validations, mtimes, tree_hashes, \
    write_jobs
from helpers.cli import run_cli


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("batch_inputs"))


@pytest.fixture
def work(root, tmp_path):
    for name in ("base", "lora_0", "lora_1", "broken"):
        os.symlink(root / name, tmp_path / name)
    return tmp_path


MINIMAL = """jobs:
  - merge: {base: ./base, adapters: [./lora_a], out: ./merged_a}
  - merge: {base: ./base, adapters: [./lora_a, ./lora_b], weights: [0.7, 0.3], out: ./merged_ab, validate: true}
  - convert: {src: ./lora_a, dst: ./lora_a.gguf, to: gguf, base: ./base}
"""


def test_the_issues_minimal_file_works_as_written(work):
    os.symlink(work / "lora_0", work / "lora_a")
    os.symlink(work / "lora_1", work / "lora_b")
    (work / "jobs.yaml").write_text(MINIMAL)
    outcome = run_cli("batch", work / "jobs.yaml", "--json", how="main", expect=0)
    report = json.loads(outcome.stdout)
    assert [j["status"] for j in report["jobs"]] == ["done"] * 3
    assert all(j["wall_s"] > 0 and j["peak_rss_bytes"] > 50 << 20 for j in report["jobs"])
    at.merge(work / "base", [work / "lora_a"], work / "direct")
    assert tree_hashes(work / "merged_a") == tree_hashes(work / "direct")
    assert (work / "lora_a.gguf").is_file() and (work / "merged_ab" / "validation.json").is_file()
    assert (work / "jobs.yaml.manifest.json").is_file()


def test_schema_errors_are_listed_at_once(work):
    jobs = [{"merge": {"base": "./base", "adapter": ["./lora_0"], "out": "./o"}},
            {"frobnicate": {}},
            {"validate": {"base": "./base", "adapters": ["./lora_0"], "merged": "${nope}"}},
            {"name": "x", "convert": {"src": "./lora_0", "dst": "./o", "to": "gguf"}}]
    path = write_jobs(work / "bad.json", jobs)
    with pytest.raises(JobsFileError) as info:
        run_batch(path)
    problems = info.value.problems
    assert any("job 0 merge: unknown key 'adapter'; valid keys: base, adapters" in p
               for p in problems)
    assert any("job 0 merge: missing key 'adapters'" in p for p in problems)
    assert any(p.startswith("job 1:") and "frobnicate" in p for p in problems)
    assert any("job 2 validate merged: ${nope} names no job" in p for p in problems)
    assert any("also written by another job" in p for p in problems)
    outcome = run_cli("batch", path, how="main", expect=2)
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == len(problems) and all(line.startswith("error: ") for line in lines)
    assert not (work / "o").exists()


def test_matrix_and_named_outputs_in_dependency_order(work):
    """A validate written before the merges it takes runs after them; a matrix job's name
    takes the matrix's ${var.name} (m_lora_0, m_lora_1)."""
    jobs = [{"validate": {"base": "./base", "adapters": ["./lora_0"], "merged": "${m_lora_0}"}},
            {"name": "m_${lora.name}", "matrix": {"lora": ["./lora_0", "./lora_1"]},
             "merge": {"base": "./base", "adapters": ["${lora}"], "out": "./out/${lora.name}"}}]
    path = write_jobs(work / "jobs.json", jobs)
    plan = run_batch(path, dry_run=True)
    assert [(j["kind"], j["status"]) for j in plan.jobs] == [("validate", "planned"),
                                                             ("merge", "planned"),
                                                             ("merge", "planned")]
    assert plan.jobs[0]["after"] == [1] and plan.jobs[0]["kwargs"]["merged"] == \
        str(work / "out" / "lora_0")
    assert not (work / "out").exists()
    report = run_batch(path)
    assert report.counts == {"done": 3}
    assert set(os.listdir(work / "out")) == {"lora_0", "lora_1"}


def test_rerun_skips_finished_jobs_and_redoes_changed_ones(work):
    path = write_jobs(work / "jobs.json", merges_and_validations(2))
    assert run_batch(path).counts == {"done": 4}
    before = mtimes(work / "out")
    again = run_batch(path)
    assert again.counts == {"cached": 4} and mtimes(work / "out") == before
    entries = json.loads((work / "jobs.json.manifest.json").read_text())["entries"]
    assert len(entries) == 4
    # a changed option redoes that merge (its own earlier output: replaced without --force)
    jobs = merges_and_validations(2)
    jobs[2]["merge"]["weights"] = [0.5]
    jobs[3]["validate"]["weights"] = [0.5]
    write_jobs(path, jobs)
    third = run_batch(path)
    assert [j["status"] for j in third.jobs] == ["cached", "cached", "done", "done"]
    after = mtimes(work / "out")
    assert all(after[k] == v for k, v in before.items() if k.startswith("m0/"))
    assert after["m1/model.safetensors"] != before["m1/model.safetensors"]
    assert run_batch(path, force=True).counts == {"done": 4}


def test_a_users_file_is_not_overwritten_without_force(work):
    (work / "out").mkdir()
    (work / "out" / "m0").mkdir()
    (work / "out" / "m0" / "config.json").write_text("{}")
    path = write_jobs(work / "jobs.json", merges_and_validations(1))
    report = run_batch(path)
    assert report.jobs[0]["status"] == "failed" and "already exists" in report.jobs[0]["error"]
    assert report.jobs[1]["status"] == "skipped"
    assert (work / "out" / "m0" / "config.json").read_text() == "{}"
    assert run_batch(path, force=True).counts == {"done": 2}


def test_a_broken_adapter_fails_its_job_and_the_rest_go_on(work):
    path = write_jobs(work / "jobs.json", merges_and_validations(3, broken=1))
    outcome = run_cli("batch", path, how="main", expect=1)
    assert "broken" in outcome.stdout and "failed" in outcome.stdout
    report = json.loads(run_cli("batch", path, "--json", how="main", expect=1).stdout)
    status = [j["status"] for j in report["jobs"]]
    assert status == ["cached", "cached", "failed", "skipped", "cached", "cached"]
    assert "broken" in report["jobs"][2]["error"] and "\n" not in report["jobs"][2]["error"]
    assert "job 2" in report["jobs"][3]["error"]


def test_executor_ray_without_ray_says_how_to_install(work, monkeypatch):
    import sys

    from adaptertools.errors import UnsupportedError

    monkeypatch.setitem(sys.modules, "ray", None)
    path = write_jobs(work / "jobs.json", merges_and_validations(1))
    with pytest.raises(UnsupportedError, match=r"pip install 'adaptertools\[ray\]'"):
        run_batch(path, executor="ray")
