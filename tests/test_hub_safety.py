"""Hub and report odds (issue 14 item 6): credentials inside an endpoint URL are never shown,
malformed hf:// URIs are refused before any request, JSON output is strict, and the model card
escapes everything the user supplied and rounds its figures."""

from __future__ import annotations

import json
import logging
import math
import re
import socket

import pytest
import yaml
from markdown_it import MarkdownIt
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools import _ui
from adaptertools import hub as hubmod
from adaptertools._io import json_text, write_json
from adaptertools.card import _yaml, human_seconds, model_card
from adaptertools.errors import HubError, UnsupportedError
from adaptertools.tiny import make_adapter, make_base

from helpers.cli import assert_cli_error, run_cli
from helpers.hub_server import WRITE_TOKEN, HubHandler, serve_hub

SECRET = "hf_in_the_url_3f9a7c"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    yield from serve_hub(monkeypatch, tmp_path)


@pytest.fixture
def local(tmp_path) -> dict:
    base = make_base(tmp_path / "base")
    adapter = tmp_path / "adapter"
    at.save(make_adapter(base_model="tiny/base"), adapter, format="peft")
    return {"base": base, "adapter": adapter}


@pytest.fixture
def published(hub, local) -> dict:
    for repo_id, folder in (("tiny/base", local["base"]), ("me/ad", local["adapter"])):
        hub.state.add_repo(repo_id, {p.name: p.read_bytes() for p in folder.iterdir()})
    return local


def with_credentials(endpoint: str) -> str:
    return endpoint.replace("http://", f"http://user:{SECRET}@")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def strict_loads(text: str):
    def refuse(token):
        raise AssertionError(f"not strict JSON: {token}")
    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------------------- credentials


def test_endpoint_credentials_never_shown(hub, published, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    endpoint = with_credentials(hub.endpoint)
    shown = hub.endpoint.replace("http://", "http://***@")
    outcome = run_cli("pull", "hf://me/nothing", "--endpoint", endpoint)
    assert_cli_error(outcome, ["hf://me/nothing", "no such repository", f"at {shown} "])
    # the report of a pull and the hub_inputs of a merge record the endpoint, redacted
    outcome = run_cli("pull", "hf://me/ad", "--endpoint", endpoint, "--json")
    assert outcome.code == 0, outcome.stderr
    assert json.loads(outcome.stdout)["endpoint"] == shown
    report = at.merge("hf://tiny/base", ["hf://me/ad"], tmp_path / "m", endpoint=endpoint)
    assert {s["endpoint"] for s in report["hub_inputs"]} == {shown}
    # a push (the URL's credentials replace the bearer token: refused) and a server that is down
    outcome = run_cli("push", published["adapter"], "me/x", "--endpoint", endpoint,
                      "--token", WRITE_TOKEN)
    assert_cli_error(outcome, ["me/x", f"access denied by {shown} "])
    down = with_credentials(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(HubError, match=re.escape("cannot reach http://***@127.0.0.1:")) as info:
        at.pull("hf://me/ad", endpoint=down)
    assert SECRET not in str(info.value) + repr(info.value)
    # the client's own log lines (huggingface_hub's debug lines, httpx's request lines)
    assert SECRET not in caplog.text and "***@" in caplog.text


def test_redacted_in_the_client_retry_warnings(hub, published, monkeypatch, caplog):
    """huggingface_hub logs a WARNING with the request URL when it retries (stderr by default)."""
    original, answered = HubHandler._resolve, []

    def busy_once(self, repo_id, revision, path):
        if self.command == "GET" and not answered:
            answered.append(path)
            return self._send(429, b"{}", {"Retry-After": "0"})
        return original(self, repo_id, revision, path)

    monkeypatch.setattr(HubHandler, "_resolve", busy_once)
    report = at.pull("hf://me/ad", endpoint=with_credentials(hub.endpoint))
    assert answered and report["files"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("429" in w and "***@127.0.0.1" in w for w in warnings), warnings
    assert SECRET not in caplog.text


def test_cli_output_redacts_any_url_credentials(capsys):
    _ui.error(f"could not reach https://me:{SECRET}@mirror.example/api")
    _ui.print_json({"endpoint": f"https://me:{SECRET}@mirror.example", "n": [1]})
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert "https://***@mirror.example/api" in captured.err
    assert json.loads(captured.out)["endpoint"] == "https://***@mirror.example"


# ----------------------------------------------------------------------------- URI rules


@pytest.mark.parametrize("uri, fragments", [
    ("hf://tiny/base@%00", ["hf://tiny/base@%00", "not a git revision",
                            "control character U+0000"]),
    ("hf://tiny/base@a%7Fb", ["not a git revision", "U+007F"]),
    ("hf://tiny/base@%0a", ["not a git revision", "U+000A"]),
    ("hf://tiny/base@v1:x", ["hf://tiny/base@v1:x", "not a git revision", "':'"]),
    ("hf://tiny/base@a..b", ["not a git revision", "'..'"]),
    ("hf://tiny/base@a%20b", ["not a git revision", "a space"]),
    ("hf://tiny/base@x.lock", ["not a git revision", "'.lock'"]),
    ("hf://tiny/base@refs%2F%2Fpr", ["not a git revision", "'//'"]),
    ("hf://tiny/base@%ff", ["hf://tiny/base@%ff", "not percent-encoded UTF-8"]),
    ("hf://tiny/base/sub\x01dir", ["hf://tiny/base/sub\\x01dir", "control character U+0001"]),
    ("hf://me/a..b", ["hf://me/a..b", "'a..b' cannot be a Hub name", "'..'"]),
    ("hf://me/a--b", ["'a--b' cannot be a Hub name", "'--'"]),
    ("hf://me/ad.git", ["cannot be a Hub name", "'.git'"]),
    ("hf://mée/ad", ["'mée' cannot be a Hub name", "ASCII letters"]),
])
def test_malformed_uris_are_refused_before_any_request(hub, published, uri, fragments):
    outcome = run_cli("pull", uri, "--endpoint", hub.endpoint)
    assert_cli_error(outcome, fragments)
    assert hub.state.log == []


def test_a_plain_string_that_breaks_the_rules_is_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hubmod.hub_ref("out/my..model") is None
    assert hubmod.hub_ref("owner/name@v1..2") is None
    outcome = run_cli("inspect", "out/my..model")
    assert_cli_error(outcome, ["out/my..model", "no such file"])


def test_valid_revisions_still_parse_and_print_back():
    for revision in ("v1.0", "refs/pr/3", "feature/x-1_2", "a" * 40, "vé", "a%41"):
        ref = hubmod.HubRef("me/ad", revision, "sub")
        assert hubmod.parse_uri(ref.uri) == ref, ref.uri      # '%' and '/' are quoted
    assert hubmod.parse_uri("hf://me/ad@a%2541").revision == "a%41"


def test_push_refuses_a_malformed_repo_id_or_branch_before_any_request(hub, published):
    outcome = run_cli("push", published["adapter"], "me/a..b", "--endpoint", hub.endpoint,
                      "--token", WRITE_TOKEN)
    assert_cli_error(outcome, ["me/a..b", "cannot be a Hub name"])
    outcome = run_cli("push", published["adapter"], "me/x", "--revision", "dev..1",
                      "--endpoint", hub.endpoint, "--token", WRITE_TOKEN)
    assert_cli_error(outcome, ["me/x", "'dev..1'", "--revision", "not a git revision"])
    with pytest.raises(UnsupportedError, match="U\\+0009"):
        hubmod.check_push("me/x", revision="a\tb")
    assert hub.state.log == []


# ----------------------------------------------------------------------------- strict JSON


def test_write_json_is_strict_and_says_what_was_not_finite(tmp_path):
    finite = {"b": [1.5, 2], "a": {"x": "y"}}
    write_json(tmp_path / "f.json", finite)       # finite data: the same bytes as before
    assert (tmp_path / "f.json").read_text() == json.dumps(finite, indent=2, sort_keys=True) + "\n"
    data = {"rows": [{"name": "a/b~c", "score": math.nan}], "worst": -math.inf, "ok": 1.0}
    write_json(tmp_path / "r.json", data)
    written = strict_loads((tmp_path / "r.json").read_text())
    assert written == {"rows": [{"name": "a/b~c", "score": None}], "worst": None, "ok": 1.0,
                       "nonfinite": {"/rows/0/score": "nan", "/worst": "-inf"}}
    write_json(tmp_path / "loose.json", data, strict=False)   # a copy of an input's own tokens
    assert "NaN" in (tmp_path / "loose.json").read_text()
    assert strict_loads(json_text({"a/b": {"~": math.inf}}))["nonfinite"] == {"/a~1b/~0": "inf"}


def test_validate_json_is_strict_when_a_tensor_is_nan(local, tmp_path):
    broken = tmp_path / "broken"
    at.save(make_adapter(), broken, format="peft")
    tensors = load_file(broken / "adapter_model.safetensors")
    first = min(tensors)
    tensors[first][0, 0] = math.nan
    save_file(tensors, broken / "adapter_model.safetensors")
    outcome = run_cli("validate", broken, "--against", local["adapter"], "--json")
    assert outcome.code == 1 and outcome.crash is None
    report = strict_loads(outcome.stdout)
    pointers = [p for p, v in report["nonfinite"].items() if v == "nan"]
    assert pointers and all(p.startswith("/tensors/") for p in pointers)
    index = int(pointers[0].split("/")[2])
    assert report["tensors"][index]["relative_error"] is None
    # a merged model with a NaN: validate --merged --json, and the validation.json of a merge
    merged = tmp_path / "merged"
    at.merge(local["base"], [local["adapter"]], merged)
    weights = load_file(merged / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"][0, 0] = math.nan
    save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})
    outcome = run_cli("validate", local["base"], local["adapter"], "--merged", merged,
                      "--json")
    assert outcome.code == 1 and outcome.crash is None
    assert "/worst_margin_db" in strict_loads(outcome.stdout)["nonfinite"]


# ----------------------------------------------------------------------------- model cards


def rendered(card: str) -> str:
    body = card.split("\n---\n", 1)[1]
    return MarkdownIt("commonmark", {"html": True}).enable("table").render(body)


HOSTILE = ["lo`ra|<img src=x onerror=alert(1)>", "``a|b\\|c``", " `sp` ", "x\ny", "*b* [l](u)"]


def test_card_escapes_what_the_user_supplied():
    report = {"base": "hf://tiny/base", "adapters": [f"/home/u/{n}" for n in HOSTILE],
              "weights": [1.0] * len(HOSTILE), "mode": "weighted", "format": "<b>st</b>",
              "tensors": 3, "changed": [], "output_bytes": 10, "dtype": "q8_0|<i>",
              "base_model": "tiny/base",
              "hub_inputs": [{"role": "base", "uri": "hf://tiny/base", "revision": "r`|<s>",
                              "commit": "c" * 40}]}
    files = ["a`b.json", "<script>x</script>.md", "p|q.txt"]
    html = rendered(model_card(report, repo_id="me/m", files=files))
    assert "<img" not in html and "<script" not in html and "<b>" not in html
    assert "<i>" not in html and "<s>" not in html and "<a " not in html
    rows = re.findall(r"<tr>(.*?)</tr>", html, re.DOTALL)
    assert len(rows) == 2 + len(HOSTILE) and all(r.count("<td>") in (0, 4) for r in rows)
    codes = [c.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
             for c in re.findall(r"<code>(.*?)</code>", html, re.DOTALL)]
    for name in HOSTILE + files + ["r`|<s>"]:
        assert name.replace("\n", " ") in codes, name       # shown literally, in one piece
    assert "&lt;b&gt;st&lt;/b&gt;" in html and "q8_0|&lt;i&gt;" in html


def test_card_front_matter_values_round_trip_through_yaml():
    meta = {"k": 'x"\n---\nevil: 1 \U0001F600 \u2028 \x85 \u202e', "tags": ["a: b", "# c"]}
    assert yaml.safe_load(_yaml(meta).strip().strip("-")) == meta
    report = {"src": "a", "from": "peft", "to": "gguf", "base_model": "me/x\u2028y"}
    assert "base_model" not in model_card(report, repo_id="me/p", files=["a.gguf"])


def test_card_rounds_figures():
    report = {"src": "/x/ad", "from": "peft", "to": "safetensors", "dtype": "keep",
              "validation": {"passed": True, "wall_s": 0.004389482000078715, "tensors": 14,
                             "worst_margin_db": 12.345678, "seed": 0}}
    card = model_card(report, repo_id="me/p", files=["a.safetensors"])
    assert "Validation: passed (wall_s 4.39 ms, tensors 14, worst_margin_db 12.3, seed 0)" in card
    assert [human_seconds(s) for s in (0.004389, 0.5, 1.0, 61.44, 4321.6)] == \
        ["4.39 ms", "500 ms", "1 s", "61.4 s", "4322 s"]


def test_pushed_card_of_a_local_folder_with_a_backtick(hub, published, tmp_path):
    odd = tmp_path / "lo`ra|<img src=x>"
    at.save(make_adapter(base_model="tiny/base"), odd, format="peft")
    at.merge("hf://tiny/base", [odd], tmp_path / "m", push_to="me/m", endpoint=hub.endpoint,
             token=WRITE_TOKEN)
    repo = hub.state.repos["me/m"]
    card = repo.commits[repo.branches["main"]]["README.md"].data.decode()
    assert "| adapter (weight 1) | local ``lo`ra\\|<img src=x>`` | - | - |" in card
    assert "<img" not in rendered(card)


def test_cli_durations_are_rounded(capsys):
    _ui.validation_summary({"passed": True, "adapted": 3, "tolerance_db": 1.0, "untouched": 2,
                            "worst_margin_db": 4.0, "wall_s": 0.004389482000078715})
    assert "byte-identical; 4.39 ms" in capsys.readouterr().err
