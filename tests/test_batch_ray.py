"""``batch --executor ray`` on a real Ray cluster (``ray.cluster_utils.Cluster``: a head without
CPUs and two worker nodes of one CPU each): 8 merges + validations give the local executor's
bytes; a worker node removed while jobs run (Ray retries them; same bytes); the driver killed
(SIGKILL) and the batch run again (finished jobs cached: manifest and mtimes); a broken adapter
fails its job only (exit 1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from adaptertools.batch import run_batch
from adaptertools.batch.run import DELAY_ENV
from helpers.batch_inputs import make_inputs, merges_and_validations, mtimes, tree_hashes, \
    write_jobs
from helpers.cli import cli_argv, run_cli

ray = pytest.importorskip("ray", reason="the Ray extra is not installed: pip install "
                                        "'adaptertools[ray]'")
from helpers.ray_cluster import local_cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    yield from local_cluster(workers=2)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The 8 merges + validations under --executor local: the reference outputs."""
    root = make_inputs(tmp_path_factory.mktemp("batch_local"))
    report = run_batch(write_jobs(root / "jobs.json", merges_and_validations(8)))
    assert report.counts == {"done": 16}
    return tree_hashes(root / "out")


@pytest.fixture
def work(tmp_path):
    return make_inputs(tmp_path)


def test_eight_merges_and_validations_on_ray_are_the_local_outputs(cluster, local, work):
    c, _ = cluster
    report = run_batch(write_jobs(work / "jobs.json", merges_and_validations(8)),
                       executor="ray", address=c.address)
    assert report.counts == {"done": 16}, [j["error"] for j in report.jobs]
    assert tree_hashes(work / "out") == local
    assert all(j["peak_rss_bytes"] > 50 << 20 for j in report.jobs)


def test_a_worker_node_removed_mid_batch_is_retried(cluster, local, work, monkeypatch):
    c, workers = cluster
    monkeypatch.setenv(DELAY_ENV, "4")
    path = write_jobs(work / "jobs.json", merges_and_validations(2))
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(
        report=run_batch(path, executor="ray", address=c.address)))
    driver.start()
    time.sleep(3)
    c.remove_node(workers.pop(0))
    workers.append(c.add_node(num_cpus=1))
    driver.join(timeout=150)
    report = result["report"]
    assert report.counts == {"done": 4}, [j["error"] for j in report.jobs]
    expected = {k: v for k, v in local.items() if k.split("/")[0] in ("m0", "m1")}
    assert tree_hashes(work / "out") == expected


def test_driver_killed_then_rerun_skips_finished_jobs(cluster, work):
    c, _ = cluster
    path = write_jobs(work / "jobs.json", merges_and_validations(3))
    manifest = work / "jobs.json.manifest.json"
    args = cli_argv("batch", path, "--executor", "ray", "--address", c.address, "--json")
    proc = subprocess.Popen(args, env={**os.environ, DELAY_ENV: "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120

    def done() -> dict:
        try:
            return json.loads(manifest.read_text())["entries"]
        except (OSError, ValueError):
            return {}
    while len(done()) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = done()
    assert 2 <= len(finished) < 6, proc.stderr.read()
    merged = [k.split(" ", 1)[1] for k in finished if k.startswith("merge ")]
    before = {m: mtimes(work / "out" / os.path.basename(m)) for m in merged}
    outcome = run_cli("batch", path, "--executor", "ray", "--address", c.address, "--json",
                      how="subprocess", expect=0, timeout=150)
    report = json.loads(outcome.stdout)
    cached = {j["key"] for j in report["jobs"] if j["status"] == "cached"}
    assert set(finished) <= cached
    assert report["counts"]["cached"] + report["counts"].get("done", 0) == 6
    for m, times in before.items():
        assert mtimes(work / "out" / os.path.basename(m)) == times


def test_a_broken_adapter_fails_its_job_while_the_others_finish(cluster, work):
    c, _ = cluster
    path = write_jobs(work / "jobs.json", merges_and_validations(3, broken=1))
    outcome = run_cli("batch", path, "--executor", "ray", "--address", c.address, "--json",
                      how="main", expect=1)
    report = json.loads(outcome.stdout)
    assert [j["status"] for j in report["jobs"]] == ["done", "done", "failed", "skipped",
                                                     "done", "done"]
    assert "broken" in report["jobs"][2]["error"]
