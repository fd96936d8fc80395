"""Hub pull and push through the real huggingface_hub client, against tests/helpers/hub_server.py
on 127.0.0.1 (Xet and telemetry off): round trips byte for byte, revisions, subfolders, only the
files an input needs, model cards, and the pure parts (URI parsing, file choice)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import adaptertools as at
from adaptertools import hub as hubmod
from adaptertools.api import validate_against
from adaptertools.card import model_card
from adaptertools.errors import InputNotFoundError, UnsupportedError
from adaptertools.tiny import make_adapter, make_base

from helpers.cli import run_cli
from helpers.hub_server import WRITE_TOKEN, serve_hub


@pytest.fixture
def hub(monkeypatch, tmp_path):
    yield from serve_hub(monkeypatch, tmp_path)


def fresh_cache(monkeypatch, folder: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def server_files(hub, repo_id: str, revision: str = "main") -> dict[str, bytes]:
    repo = hub.state.repos[repo_id]
    return {path: f.data for path, f in repo.commits[repo.resolve(revision)].items()}


def ok(*args) -> str:
    outcome = run_cli(*args)
    assert outcome.crash is None, outcome.crash
    assert outcome.code == 0, outcome.stderr
    return outcome.stdout


@pytest.fixture
def local(tmp_path) -> dict[str, Path]:
    """A tiny base and a PEFT adapter trained on ``tiny/base`` (a Hub-style id)."""
    base = make_base(tmp_path / "base")
    adapter = tmp_path / "adapter"
    at.save(make_adapter(base_model="tiny/base"), adapter, format="peft")
    return {"base": base, "adapter": adapter}


# ----------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("text, expected", [
    ("hf://me/ad", ("me/ad", None, "")),
    ("hf://me/ad@v1.0/sub/dir/", ("me/ad", "v1.0", "sub/dir")),
    ("hf://me/ad@refs%2Fpr%2F3/x.gguf", ("me/ad", "refs/pr/3", "x.gguf")),
    ("Org-1/Llama-3.1-8B@" + "a" * 40, ("Org-1/Llama-3.1-8B", "a" * 40, "")),
])
def test_parse_uri(text, expected):
    ref = hubmod.parse_uri(text)
    assert (ref.repo_id, ref.revision, ref.path) == expected
    assert hubmod.parse_uri(ref.uri) == ref          # the URI it prints parses back


@pytest.mark.parametrize("text", ["hf://justone", "hf://me/ad/../../etc", "hf://datasets/a/b",
                                  "hf://-bad/name", "hf://me/ad@"])
def test_parse_uri_refuses(text):
    with pytest.raises(UnsupportedError):
        hubmod.parse_uri(text)


def test_plain_ids_mean_the_hub_only_when_no_such_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hubmod.hub_ref("owner/name") == hubmod.HubRef("owner/name")
    assert hubmod.hub_ref("owner/name@dev").revision == "dev"
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert hubmod.hub_ref("owner/name") is None                # an existing local folder wins
    assert hubmod.hub_ref("out/adapter.safetensors") is None   # a file name, not a repo
    assert hubmod.hub_ref("./x/y") is None and hubmod.hub_ref("/abs/path") is None
    assert hubmod.hub_ref(Path("a/b")) is None                 # Path objects are always local


LISTING = ["README.md", ".gitattributes", "adapter_config.json", "adapter_model.safetensors",
           "adapter_model.bin", "optimizer.pt", "training_args.bin", "config.json",
           "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "model-00001-of-00002.safetensors",
           "model-00002-of-00002.safetensors", "model.safetensors.index.json",
           "pytorch_model.bin", "gguf/a.gguf", "gguf/b.gguf", "only_bin/adapter_config.json",
           "only_bin/adapter_model.bin", "raw/adapter.safetensors"]


def test_select_files_takes_only_what_each_input_needs():
    ref = hubmod.HubRef("o/n")
    assert hubmod.select_files(LISTING, ref, "adapter") == ["adapter_config.json",
                                                            "adapter_model.safetensors"]
    base = hubmod.select_files(LISTING, ref, "base")   # shards come from the index later
    assert base == ["config.json", "generation_config.json", "model.safetensors.index.json",
                    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert hubmod.select_files(LISTING, ref, "config") == ["config.json"]
    pulled = hubmod.select_files(LISTING, ref, "any")
    assert not [f for f in pulled if f.endswith((".bin", ".pt"))]
    assert {"gguf/a.gguf", "raw/adapter.safetensors", "README.md"} <= set(pulled)
    asked = hubmod.select_files(LISTING, ref, "any", include=["*.bin"])
    assert set(asked) - set(pulled) == {"adapter_model.bin", "training_args.bin",
                                        "pytorch_model.bin", "only_bin/adapter_model.bin"}
    assert hubmod.select_files(LISTING, hubmod.HubRef("o/n", None, "raw"), "adapter") == \
        ["raw/adapter.safetensors"]
    assert hubmod.select_files(LISTING, hubmod.HubRef("o/n", None, "gguf/b.gguf"), "adapter") \
        == ["gguf/b.gguf"]


def test_select_files_explains_what_it_cannot_choose():
    with pytest.raises(UnsupportedError, match=r"2 candidate files .*hf://o/n/gguf/a\.gguf"):
        hubmod.select_files(LISTING, hubmod.HubRef("o/n", None, "gguf"), "adapter")
    with pytest.raises(UnsupportedError, match=r"--include '\*\.bin'"):
        hubmod.select_files(LISTING, hubmod.HubRef("o/n", None, "only_bin"), "adapter")
    with pytest.raises(InputNotFoundError, match="no file or folder .nope."):
        hubmod.select_files(LISTING, hubmod.HubRef("o/n", None, "nope"), "adapter")


# ----------------------------------------------------------------------------- round trips


def test_push_converted_adapter_and_pull_it_back_byte_identical(hub, local, tmp_path,
                                                                monkeypatch):
    dst = tmp_path / "converted"
    out = ok("convert", local["adapter"], dst, "--to", "peft", "--dtype", "bf16",
             "--push-to", "me/converted", "--token", WRITE_TOKEN, "--endpoint", hub.endpoint)
    assert f"me/converted@main: {hub.endpoint}/me/converted/commit/" in out
    stored = server_files(hub, "me/converted")
    assert stored["adapter_model.safetensors"] == (dst / "adapter_model.safetensors").read_bytes()
    # the weights went through the LFS batch API (upload + verify), as on the real Hub
    assert [m for m, p, _ in hub.state.log if p.startswith("/lfs-upload/")] == ["PUT"]
    assert hub.state.repos["me/converted"].commits[hub.state.repos["me/converted"].branches[
        "main"]]["adapter_model.safetensors"].lfs

    fresh_cache(monkeypatch, tmp_path / "fresh-cache")
    pulled = tmp_path / "pulled"
    out = ok("pull", "hf://me/converted", "--out", pulled, "--endpoint", hub.endpoint)
    assert out.strip() == str(pulled)
    files = tree_bytes(pulled)
    assert files.pop("README.md") == stored["README.md"]
    assert files == tree_bytes(dst)                     # byte-identical to what was written
    assert (tmp_path / "fresh-cache" / "models--me--converted").is_dir()
    # and the pulled copy still is the adapter: same deltas as the source
    assert validate_against(pulled, local["adapter"])["passed"]


def test_push_merged_model_then_merge_from_hub_inputs(hub, local, tmp_path, monkeypatch):
    merged = tmp_path / "merged"
    report = at.merge(local["base"], [local["adapter"]], merged, push_to="me/merged",
                      endpoint=hub.endpoint, token=WRITE_TOKEN)
    assert report["pushed"]["commit"] == hub.state.repos["me/merged"].branches["main"]
    stored = server_files(hub, "me/merged")
    assert stored["model.safetensors"] == (merged / "model.safetensors").read_bytes()

    # the inputs on the Hub: base on a branch, adapter in a subfolder, next to files no input
    # needs (pickles, optimizer state), which must never be downloaded
    base_commit = hub.state.add_repo("me/base", {**tree_bytes(local["base"]),
                                                 "pytorch_model.bin": b"pickle"}, branch="dev")
    hub.state.add_repo("me/adapters", {f"run1/{k}": v for k, v in
                                       tree_bytes(local["adapter"]).items()}
                       | {"run1/optimizer.pt": b"state", "run1/adapter_model.bin": b"pickle"})
    fresh_cache(monkeypatch, tmp_path / "fresh-cache")
    again = tmp_path / "merged_from_hub"
    out = ok("merge", "hf://me/base@dev", "hf://me/adapters/run1", "--out", again, "--json",
             "--endpoint", hub.endpoint)
    assert tree_bytes(again) == tree_bytes(merged)      # the same bytes as the local merge
    report = json.loads(out)
    commits = {s["role"]: s["commit"] for s in report["hub_inputs"]}
    assert commits == {"base": base_commit,
                       "adapter": hub.state.repos["me/adapters"].branches["main"]}
    fetched = [p for m, p, _ in hub.state.log if m == "GET" and "/resolve/" in p]
    assert sorted(p.rsplit("/", 1)[1] for p in fetched) == [
        "adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors"]


def test_validate_takes_hub_inputs(hub, local, tmp_path):
    """validate BASE ADAPTER --merged MERGED with all three on the Hub, each at its commit."""
    merged = tmp_path / "merged"
    at.merge(local["base"], [local["adapter"]], merged)
    commits = {"base": hub.state.add_repo("me/base", tree_bytes(local["base"])),
               "adapter": hub.state.add_repo("me/ad", tree_bytes(local["adapter"])),
               "merged": hub.state.add_repo("me/merged", tree_bytes(merged))}
    out = ok("validate", "hf://me/base", "hf://me/ad", "--merged", "hf://me/merged", "--json",
             "--endpoint", hub.endpoint)
    report = json.loads(out)
    assert report["passed"]
    assert {s["role"]: s["commit"] for s in report["hub_inputs"]} == commits
    # a merge of another adapter on the Hub fails the check, as it would locally
    other = tmp_path / "other"
    at.save(make_adapter(seed=9), other, format="peft")
    hub.state.add_repo("me/other", tree_bytes(other))
    outcome = run_cli("validate", "hf://me/base", "hf://me/other", "--merged",
                      "hf://me/merged", "--endpoint", hub.endpoint)
    assert outcome.code == 1


def test_revisions_resolve_to_commits(hub, local, tmp_path):
    adapter_bytes = tree_bytes(local["adapter"])
    first = hub.state.add_repo("me/ad", adapter_bytes)
    other = tmp_path / "other"
    at.save(make_adapter(seed=5), other, format="peft")
    second = hub.state.add_repo("me/ad", tree_bytes(other), message="retrained")
    hub.state.repos["me/ad"].branches["v1"] = first
    endpoint = {"endpoint": hub.endpoint}
    newest = at.inspect("hf://me/ad", **endpoint)
    assert newest["hub_inputs"][0]["commit"] == second
    for revision in ("v1", first):
        path, source = hubmod.local_input(f"hf://me/ad@{revision}", **endpoint)
        assert source["commit"] == first and source["revision"] == revision
        assert tree_bytes(path) == adapter_bytes
    assert validate_against("hf://me/ad@v1", local["adapter"], **endpoint)["passed"]
    assert not validate_against("hf://me/ad", local["adapter"], **endpoint)["passed"]


def test_pull_a_single_file_and_a_subfolder(hub, local, tmp_path):
    single = tmp_path / "adapter.safetensors"
    at.convert(local["adapter"], single, to="safetensors")
    hub.state.add_repo("me/mixed", {"exports/adapter.safetensors": single.read_bytes(),
                                    "exports/notes.txt": b"hi", "top.json": b"{}"})
    report = at.pull("hf://me/mixed/exports/adapter.safetensors", endpoint=hub.endpoint)
    assert report["files"] == ["adapter.safetensors"]
    assert Path(report["path"]).read_bytes() == single.read_bytes()
    report = at.pull("hf://me/mixed/exports", out=tmp_path / "exports", endpoint=hub.endpoint)
    assert tree_bytes(tmp_path / "exports") == {"adapter.safetensors": single.read_bytes(),
                                                "notes.txt": b"hi"}
    # an adapter input given as the subfolder finds its one weights file
    assert at.load("hf://me/mixed/exports", endpoint=hub.endpoint).weights.keys() == \
        at.load(single).weights.keys()


def test_push_folder_private_branch_and_message(hub, local):
    out = ok("push", local["adapter"], "me/private-ad", "--private", "--revision", "dev",
             "--commit-message", "first cut", "--token", WRITE_TOKEN, "--endpoint",
             hub.endpoint, "--json")
    report = json.loads(out)
    repo = hub.state.repos["me/private-ad"]
    assert repo.private and report["private"] and report["revision"] == "dev"
    assert report["commit"] == repo.branches["dev"] != repo.branches["main"]
    assert "adapter_config.json" not in server_files(hub, "me/private-ad", "main")
    assert set(server_files(hub, "me/private-ad", "dev")) == {
        ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"}
    commit_bodies = [p for m, p, _ in hub.state.log if "/commit/" in p]
    assert commit_bodies == ["/api/models/me/private-ad/commit/dev"]
    # a folder with its own README keeps it
    (local["adapter"] / "README.md").write_text("my own card\n")
    at.push(local["adapter"], "me/private-ad", revision="dev", endpoint=hub.endpoint,
            token=WRITE_TOKEN)
    assert server_files(hub, "me/private-ad", "dev")["README.md"] == b"my own card\n"


# ----------------------------------------------------------------------------- model cards


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_model_card_of_a_merge_pushed_from_hub_inputs(hub, local, tmp_path):
    base_commit = hub.state.add_repo("tiny/base", tree_bytes(local["base"]))
    report = at.merge("hf://tiny/base", [local["adapter"]], tmp_path / "m", weights="0.5",
                      dtype="bf16", push_to="me/m", endpoint=hub.endpoint, token=WRITE_TOKEN)
    meta, body = split_card(server_files(hub, "me/m")["README.md"].decode())
    assert meta == {"base_model": "tiny/base", "library_name": "transformers",
                    "tags": ["adaptertools", "lora", "merge"]}
    assert f"| base | `hf://tiny/base` | `main` | `{base_commit}` |" in body
    assert "| adapter (weight 0.5) | local `adapter` | - | - |" in body
    assert str(tmp_path) not in body                    # local paths: last component only
    assert "Mode: `weighted`; weights: 0.5" in body and "Requantization: cast to bf16" in body
    assert f"adaptertools {at.__version__}" in body
    assert report["pushed"]["files"] == ["README.md", "config.json", "model.safetensors"]


def test_model_card_of_conversions_and_validation():
    report = {"src": "hf://me/ad@v2", "dst": "/x/out.gguf", "from": "peft", "to": "gguf",
              "dtype": "q8_0", "adapted_tensors": 14, "replaced_tensors": 0,
              "base_model": "meta-llama/Llama-3.2-1B",
              "hub_inputs": [{"role": "adapter", "uri": "hf://me/ad@v2", "revision": "v2",
                              "commit": "c" * 40}],
              "validation": {"passed": True, "tensors": 14, "worst_sqnr_db": 61.5,
                             "report": "/home/me/out/validation.json"}}
    meta, body = split_card(model_card(report, repo_id="me/gguf", files=["out.gguf"]))
    assert meta == {"base_model": "meta-llama/Llama-3.2-1B", "library_name": "adaptertools",
                    "tags": ["adaptertools", "lora", "gguf"]}
    assert f"| adapter | `hf://me/ad@v2` | `v2` | `{'c' * 40}` |" in body
    assert "Requantization: requantized to q8_0" in body
    assert "Validation: passed (tensors 14, worst_sqnr_db 61.5)" in body
    peft_meta, _ = split_card(model_card(dict(report, to="peft", dtype="keep",
                                              base_model="/home/me/llama"),
                                         repo_id="me/p", files=["adapter_config.json"]))
    assert peft_meta == {"library_name": "peft", "tags": ["adaptertools", "lora", "peft"]}
