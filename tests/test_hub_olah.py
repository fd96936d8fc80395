"""An independent check of pulls: olah (a Hub mirror written by others, from PyPI) serves local git
repositories offline, and ``adaptertools pull`` and ``merge hf://...`` work against it, in
subprocesses that find the endpoint through ``HF_ENDPOINT`` alone. (olah has no upload endpoints;
pushes are checked against tests/helpers/hub_server.py.)"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import adaptertools as at
from adaptertools.tiny import make_adapter, make_base

from helpers.cli import Outcome, run_cli

OLAH = shutil.which("olah-cli") or str(Path(sys.executable).with_name("olah-cli"))
pytestmark = [
    pytest.mark.skipif(not Path(OLAH).is_file(), reason="olah is not installed "
                       "(pip install -e '.[test]' installs it)"),
    pytest.mark.skipif(shutil.which("git") is None, reason="git is needed for olah's mirrors"),
]


def git_repo(folder: Path) -> str:
    """Commit everything in ``folder`` as a git repository; returns the commit hash."""
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "init"]):
        subprocess.run(["git", *args], cwd=folder, env=env, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, check=True,
                          capture_output=True, text=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def olah(tmp_path_factory):
    """olah serving ``me/base`` (a tiny Llama) and ``me/ad`` (a PEFT adapter) from git mirrors."""
    root = tmp_path_factory.mktemp("olah")
    mirrors = root / "mirrors" / "models" / "me"
    commits = {"base": git_repo(make_base(mirrors / "base"))}
    at.save(make_adapter(), mirrors / "ad", format="peft")
    commits["ad"] = git_repo(mirrors / "ad")
    port = free_port()
    (root / "olah.toml").write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{root / "repos"}"\n'
        f'mirrors-path = ["{root / "mirrors"}"]\n[accessibility]\noffline = true\n')
    with open(root / "olah.log", "wb") as log:     # the child keeps its own handle
        proc = subprocess.Popen([OLAH, "-c", str(root / "olah.toml")], cwd=root, stdout=log,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"olah did not start: {(root / 'olah.log').read_text()[-2000:]}")
    yield {"endpoint": f"http://127.0.0.1:{port}", "mirrors": mirrors, "commits": commits,
           "root": root}
    proc.terminate()
    proc.wait(timeout=10)


def adaptertools(*args, endpoint: str, cache: Path) -> Outcome:
    """The CLI in a fresh interpreter that sees none of this machine's HF_* settings, only the
    mirror at ``endpoint`` and a cache of its own."""
    env = {k: None for k in os.environ if k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HOME=str(cache.parent / "hf-home"))
    return run_cli(*args, how="subprocess", env=env)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_pull_from_olah_is_byte_identical(olah, tmp_path):
    out = tmp_path / "pulled"
    proc = adaptertools("pull", "hf://me/ad", "--out", out, endpoint=olah["endpoint"],
                        cache=tmp_path / "cache")
    assert proc.code == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert files(out) == files(olah["mirrors"] / "ad")
    assert olah["commits"]["ad"] in proc.stderr        # the git commit olah serves


def test_merge_hub_inputs_from_olah_matches_the_local_merge(olah, tmp_path):
    local = tmp_path / "local"
    at.merge(olah["mirrors"] / "base", [olah["mirrors"] / "ad"], local)
    out = tmp_path / "from_hub"
    proc = adaptertools("merge", "hf://me/base", "hf://me/ad@main", "--out", out, "--json",
                        endpoint=olah["endpoint"], cache=tmp_path / "cache")
    assert proc.code == 0, proc.stderr
    assert files(out) == files(local)
    report = json.loads(proc.stdout)
    assert [(s["role"], s["commit"], s["endpoint"]) for s in report["hub_inputs"]] == [
        ("base", olah["commits"]["base"], olah["endpoint"]),
        ("adapter", olah["commits"]["ad"], olah["endpoint"])]
