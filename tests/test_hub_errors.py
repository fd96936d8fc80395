"""Hub failures against tests/helpers/hub_server.py: one line and exit 1 for a missing repo,
revision or file, 401/403 and a server that is down; offline mode; a hostile listing cannot write
outside the target folder; tokens never appear in output, errors or logs."""

from __future__ import annotations

import json
import logging
import socket

import pytest

import adaptertools as at
from adaptertools import hub as hubmod
from adaptertools.errors import HubError, InputNotFoundError
from adaptertools.tiny import make_adapter, make_base

from helpers.cli import assert_cli_error, assert_nothing_written, run_cli
from helpers.hub_server import READ_TOKEN, WRITE_TOKEN, serve_hub

SECRET = "hf_secret_do_not_print_5e8d1"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    yield from serve_hub(monkeypatch, tmp_path)


@pytest.fixture
def adapter(tmp_path):
    folder = tmp_path / "adapter"
    at.save(make_adapter(), folder, format="peft")
    return folder


@pytest.fixture
def published(hub, adapter) -> str:
    """``me/ad`` on the server: the adapter, public."""
    files = {p.name: p.read_bytes() for p in adapter.iterdir()}
    return hub.state.add_repo("me/ad", files)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def no_token_anywhere(outcome, caplog, secret: str = SECRET) -> None:
    text = outcome.stdout + outcome.stderr + caplog.text
    assert secret not in text
    if outcome.crash is not None:
        assert secret not in str(outcome.crash) + repr(outcome.crash)


@pytest.mark.parametrize("uri, fragments", [
    ("hf://me/nothing", ["hf://me/nothing", "no such repository", "check the id", "token"]),
    ("hf://me/ad@v9", ["hf://me/ad@v9", "no such revision", "check the revision"]),
    ("hf://me/ad/missing.gguf", ["hf://me/ad/missing.gguf", "no file or folder",
                                 "check the path"]),
])
@pytest.mark.parametrize("command", ["pull", "merge"])
def test_missing_repo_revision_or_file(hub, published, uri, fragments, command, caplog,
                                       tmp_path):
    out = tmp_path / "out"
    args = ["pull", uri, "--out", out] if command == "pull" else \
        ["merge", make_base(tmp_path / "base"), uri, "--out", out]
    outcome = run_cli(*args, "--endpoint", hub.endpoint, "--token", READ_TOKEN)
    assert_cli_error(outcome, fragments)
    no_token_anywhere(outcome, caplog, READ_TOKEN)
    assert_nothing_written(out)


def test_unknown_token_is_refused_with_the_hint(hub, published, caplog):
    outcome = run_cli("pull", "hf://me/ad", "--endpoint", hub.endpoint, "--token", SECRET)
    assert_cli_error(outcome, ["hf://me/ad", "access denied", "HTTP 401", "check your token"])
    no_token_anywhere(outcome, caplog)


def test_private_repo_needs_a_token_from_the_option_or_hf_token(hub, adapter, monkeypatch,
                                                              caplog):
    files = {p.name: p.read_bytes() for p in adapter.iterdir()}
    hub.state.add_repo("me/secret", files, private=True)
    outcome = run_cli("inspect", "hf://me/secret", "--endpoint", hub.endpoint)
    assert_cli_error(outcome, ["hf://me/secret", "no such repository", "private",
                               "check your token"])
    outcome = run_cli("inspect", "hf://me/secret", "--endpoint", hub.endpoint,
                      "--token", READ_TOKEN, "--json")
    assert outcome.code == 0, outcome.stderr
    no_token_anywhere(outcome, caplog, READ_TOKEN)
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)          # huggingface_hub's own lookup
    report = at.inspect("hf://me/secret", endpoint=hub.endpoint)
    assert report["hub_inputs"][0]["repo_id"] == "me/secret"
    assert READ_TOKEN not in repr(report)
    assert [auth for _, path, auth in hub.state.log if "/resolve/" in path][-1] == READ_TOKEN


def test_push_without_write_access(hub, adapter, tmp_path, caplog):
    outcome = run_cli("push", adapter, "me/new", "--endpoint", hub.endpoint)
    assert_cli_error(outcome, ["me/new", "access denied", "HTTP 401", "check your token"])
    outcome = run_cli("push", adapter, "me/new", "--endpoint", hub.endpoint,
                      "--token", READ_TOKEN)
    assert_cli_error(outcome, ["me/new", "access denied", "HTTP 403", "check your token"])
    no_token_anywhere(outcome, caplog, READ_TOKEN)
    # convert --push-to with a bad token: the conversion is written, the push fails loudly
    dst = tmp_path / "converted.safetensors"
    outcome = run_cli("convert", adapter, dst, "--to", "safetensors", "--push-to",
                      "me/new", "--token", SECRET, "--endpoint", hub.endpoint)
    assert_cli_error(outcome, ["me/new", "HTTP 401", "check your token", f"{dst} was written",
                               f"adaptertools push {dst} me/new"])
    no_token_anywhere(outcome, caplog)
    assert dst.is_file() and "me/new" not in hub.state.repos


def test_server_down_is_one_line_and_fast(adapter, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    endpoint = f"http://127.0.0.1:{closed_port()}"
    for args in (["pull", "hf://me/ad"], ["merge", "hf://me/base", adapter, "--out",
                                          tmp_path / "m"], ["push", adapter, "me/ad"]):
        outcome = run_cli(*args, "--endpoint", endpoint, "--token", SECRET)
        assert_cli_error(outcome, ["cannot reach", endpoint, "check the endpoint"])
        no_token_anywhere(outcome, caplog)
    assert_nothing_written(tmp_path / "m")


def test_offline_uses_the_cache_only(hub, published, tmp_path, monkeypatch):
    base = make_base(tmp_path / "base")
    base_commit = hub.state.add_repo("me/base", {p.name: p.read_bytes() for p in base.iterdir()})
    online = at.merge("hf://me/base", ["hf://me/ad"], tmp_path / "online",
                      endpoint=hub.endpoint)
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = at.merge("hf://me/base", ["hf://me/ad"], tmp_path / "offline")   # no endpoint
    assert [s["commit"] for s in offline["hub_inputs"]] == [base_commit, published]
    assert [s["commit"] for s in online["hub_inputs"]] == [base_commit, published]
    assert (tmp_path / "offline" / "model.safetensors").read_bytes() == \
        (tmp_path / "online" / "model.safetensors").read_bytes()
    assert at.inspect(f"hf://me/ad@{published}")["hub_inputs"][0]["commit"] == published
    for uri in ("hf://me/other", "hf://me/ad@v2"):
        outcome = run_cli("inspect", uri)
        assert_cli_error(outcome, [uri, "not in the local cache", "HF_HUB_OFFLINE=1"])
    outcome = run_cli("push", tmp_path / "online", "me/x")
    assert_cli_error(outcome, ["me/x", "HF_HUB_OFFLINE=1"])


@pytest.mark.parametrize("include", [[], ["*"]])
def test_hostile_listing_cannot_write_outside(hub, published, tmp_path, include):
    absolute = tmp_path / "abs-target.json"
    hub.state.repos["me/ad"].extra_names += ["../../outside.safetensors", str(absolute),
                                             "sub/../../../escape.json"]
    target = tmp_path / "deep" / "pulled"
    with pytest.raises(HubError, match="unsafe file name '../../outside.safetensors'"):
        at.pull("hf://me/ad", out=target, include=include, endpoint=hub.endpoint)
    with pytest.raises(HubError, match="unsafe file name"):
        hubmod.local_input("hf://me/ad", kind="adapter", endpoint=hub.endpoint)
    written = [p for p in tmp_path.rglob("*") if "outside" in p.name or "escape" in p.name]
    assert written == [] and not absolute.exists()
    assert not (tmp_path / "deep").exists()
    assert not [p for m, p, _ in hub.state.log if "/resolve/" in p]   # nothing was fetched


def test_hostile_index_cannot_name_outside_shards(hub, tmp_path):
    base = make_base(tmp_path / "base")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../../../evil.safetensors"}}
    files = {p.name: p.read_bytes() for p in base.iterdir()}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    hub.state.add_repo("me/evil", files)
    with pytest.raises(HubError, match="evil.safetensors"):
        hubmod.local_input("hf://me/evil", kind="base", endpoint=hub.endpoint)
    assert not list(tmp_path.rglob("evil*"))


def test_tokens_stay_out_of_debug_logs(hub, published, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    outcome = run_cli("push", tmp_path / "adapter", "me/logged", "--token", WRITE_TOKEN,
                      "--endpoint", hub.endpoint, "--json")
    assert outcome.code == 0, outcome.stderr
    outcome2 = run_cli("pull", "hf://me/logged", "--token", WRITE_TOKEN,
                       "--endpoint", hub.endpoint, "--json")
    assert outcome2.code == 0, outcome2.stderr
    for result in (outcome, outcome2):
        no_token_anywhere(result, caplog, WRITE_TOKEN)
    # the token was really sent (so the check above is about a token in use); only the LFS
    # upload goes without it, to the URL the batch answer gave, as with the real Hub
    assert {auth for _, path, auth in hub.state.log
            if not path.startswith("/lfs-upload/")} == {WRITE_TOKEN}


def test_library_errors_are_typed(hub, published):
    with pytest.raises(InputNotFoundError):
        at.load("hf://me/nope", endpoint=hub.endpoint)
    with pytest.raises(HubError) as info:
        at.load("hf://me/ad", endpoint=hub.endpoint, token=SECRET)
    assert isinstance(info.value, ConnectionError) and SECRET not in str(info.value)
