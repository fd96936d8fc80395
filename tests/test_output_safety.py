"""Outputs never destroy inputs or foreign files, and links never leak files (issue 14, items
2 and 3). Every case runs the real command on tiny models built in code; each checks the input
it protects byte for byte, and that nothing is left beside OUT."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import adaptertools as at
import adaptertools.paths as paths
from adaptertools.errors import FormatError, OutputExistsError
from adaptertools.tiny import make_adapter, make_base

from helpers.cli import assert_cli_error, leftovers_beside, run_cli


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (or the file itself) and its bytes: what must not change."""
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_beside(path: Path) -> list[str]:
    """Hidden entries in ``path``'s folder: our temporaries and locks, whatever their cut."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith("."))


@pytest.fixture()
def inputs(tmp_path) -> dict[str, Path]:
    base = make_base(tmp_path / "b")
    adapter = tmp_path / "adapter"
    at.save(make_adapter(), adapter, format="peft")
    return {"base": base, "adapter": adapter}


# ----------------------------------------------------------------------------- item 2: OUT rules

@pytest.mark.parametrize("spell", ["base", "base-dotdot", "adapter", "parent", "inside"])
def test_force_never_replaces_an_input(inputs, tmp_path, spell, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = {"base": "b", "base-dotdot": "b/../b/", "adapter": "adapter", "parent": str(tmp_path),
           "inside": "b/merged"}[spell]
    before = {name: tree(p) for name, p in inputs.items()}
    outcome = run_cli("merge", "b", "adapter", "--out", out, "--force")
    line = assert_cli_error(outcome, [out])
    assert "input" in line or "current folder" in line
    assert {name: tree(p) for name, p in inputs.items()} == before
    assert hidden_beside(inputs["base"]) == []
    assert not (inputs["base"] / "merged").exists()


def test_convert_combine_extract_refuse_their_inputs(inputs, tmp_path):
    adapter = inputs["adapter"]
    before = tree(adapter)
    cases = [("convert", adapter, adapter / "x.safetensors", "--to", "safetensors"),
             ("convert", adapter, tmp_path, "--to", "peft", "--force"),
             ("combine", adapter, adapter, "--out", adapter, "--force"),
             ("extract", inputs["base"], inputs["base"], "--out", inputs["base"] / "lora",
              "--rank", "2")]
    for args in cases:
        outcome = run_cli(*args)
        assert outcome.code == 1, (args, outcome.stderr)
        assert "input" in outcome.stderr or "current folder" in outcome.stderr, outcome.stderr
    assert tree(adapter) == before
    assert not (inputs["base"] / "lora").exists()


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/null"),
                    reason="replacing /dev/null needs root to be a real danger")
def test_force_never_replaces_a_device(tmp_path):
    from helpers.gguf_base import make_base_model, write_gguf_base
    from helpers.peft_adapters import perturb_trainables
    from peft import LoraConfig, get_peft_model

    model = make_base_model("llama")      # a GGUF base: its output is one file, as /dev/null
    base = write_gguf_base(model, tmp_path / "base.gguf", "llama", f16=True)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"],
                                                  init_lora_weights=False))
    perturb_trainables(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    outcome = run_cli("merge", base, tmp_path / "adapter", "--out", "/dev/null", "--force")
    assert_cli_error(outcome, ["/dev/null", "device"])
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("out", ["/", "."])
def test_force_never_replaces_root_or_the_current_folder(inputs, tmp_path, out, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    outcome = run_cli("merge", inputs["base"], inputs["adapter"], "--out", out, "--force")
    assert_cli_error(outcome, ["current folder"])
    assert os.path.isdir("/") and work.is_dir()


def test_force_replaces_only_model_folders(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.pdf").write_bytes(b"%PDF years of work")
    (out / "config.json").write_text("{}")
    before = tree(out)
    outcome = run_cli("merge", inputs["base"], inputs["adapter"], "--out", out, "--force")
    assert_cli_error(outcome, [str(out), "thesis.pdf"])
    assert tree(out) == before
    (out / "thesis.pdf").unlink()            # now a model folder: replaced
    outcome = run_cli("merge", inputs["base"], inputs["adapter"], "--out", out, "--force")
    assert outcome.code == 0, outcome.stderr
    assert "model.safetensors" in tree(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    outcome = run_cli("merge", inputs["base"], inputs["adapter"], "--out", empty, "--force")
    assert outcome.code == 0, outcome.stderr
    assert hidden_beside(out) == []


def test_a_file_output_never_replaces_a_folder(inputs, tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "other.gguf").write_bytes(b"GGUF someone else's model")
    before = tree(out)
    outcome = run_cli("convert", inputs["adapter"], out, "--to", "safetensors", "--force")
    assert_cli_error(outcome, [str(out), "folder"])
    assert tree(out) == before


def test_failed_rename_puts_the_old_output_back(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    at.merge(inputs["base"], [inputs["adapter"]], out)
    before = tree(out)
    real_replace = os.replace

    def failing(src, dst):
        if Path(dst) == out and ".at" in Path(src).name and not str(src).endswith(".old"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(paths.os, "replace", failing)
    with pytest.raises(OSError):
        at.merge(inputs["base"], [inputs["adapter"]], out, weights=[0.5], force=True)
    assert tree(out) == before
    assert hidden_beside(out) == [] and leftovers_beside(out) == []


def test_a_second_run_into_the_same_out_fails_at_once(inputs, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from adaptertools.paths import output_lock
            with output_lock(Path({str(out)!r})):
                print("locked", flush=True)
                sys.stdin.read()
            """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        outcome = run_cli("merge", inputs["base"], inputs["adapter"], "--out", out)
        assert_cli_error(outcome, [str(out), "another adaptertools run", str(holder.pid)])
        assert not out.exists()
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0
    assert hidden_beside(out) == []           # the holder removed its lock file


def test_an_out_that_appears_meanwhile_is_not_replaced_without_force(inputs, tmp_path,
                                                                     monkeypatch):
    import adaptertools.merging.run as merge_run

    out = tmp_path / "out"
    real = merge_run.copy_side_files

    def racing(folder, dst, plan):       # another program creates OUT while we write
        out.mkdir()
        (out / "theirs.txt").write_text("not ours")
        return real(folder, dst, plan)

    monkeypatch.setattr(merge_run, "copy_side_files", racing)
    with pytest.raises(OutputExistsError, match="appeared while"):
        at.merge(inputs["base"], [inputs["adapter"]], out)
    assert tree(out) == {"theirs.txt": b"not ours"}
    assert hidden_beside(out) == []


def test_a_killed_run_is_cleaned_up_by_the_next(inputs, tmp_path):
    """SIGKILL in the middle of writing leaves a temporary; the next run removes it, says so,
    and a replaced OUT that the killed run had moved aside is put back."""
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from adaptertools.paths import atomic_output
        with atomic_output(Path({str(out)!r}), is_dir=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 100000)
            os.kill(os.getpid(), signal.SIGKILL)
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    stale = [n for n in hidden_beside(out) if not n.endswith(".at-lock")]
    assert len(stale) == 1 and stale[0].startswith(".out.at"), hidden_beside(out)
    outcome = run_cli("merge", inputs["base"], inputs["adapter"], "--out", out)
    assert outcome.code == 0, outcome.stderr
    assert "interrupted" in outcome.stderr and stale[0] in outcome.stderr
    assert hidden_beside(out) == []
    # a run killed between moving the old OUT aside and renaming the new one in
    previous = tree(out)
    os.rename(out, tmp_path / ".out.at4194301-abcd.old")
    with pytest.warns(UserWarning, match="put back"):
        with pytest.raises(OutputExistsError):
            at.merge(inputs["base"], [inputs["adapter"]], out)
    assert tree(out) == previous and hidden_beside(out) == []


def test_long_names_fit_and_too_long_ones_are_one_line(inputs, tmp_path):
    name = "m" * 250 + ".safetensors"          # 262 bytes: too long for any file system
    outcome = run_cli("convert", inputs["adapter"], tmp_path / name, "--to", "safetensors")
    assert_cli_error(outcome, ["too long", "255"])
    name = "m" * 243 + ".safetensors"          # 255 bytes: legal, and written
    outcome = run_cli("convert", inputs["adapter"], tmp_path / name, "--to", "safetensors")
    assert outcome.code == 0, outcome.stderr
    assert (tmp_path / name).is_file() and hidden_beside(tmp_path / name) == []


def test_unwritable_destinations_are_one_line(inputs, tmp_path, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file")
    outcome = run_cli("convert", inputs["adapter"], blocker / "sub" / "x.safetensors",
                      "--to", "safetensors")
    assert_cli_error(outcome, [str(blocker), "not a folder"])

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(paths.os, "open", read_only)     # the lock file is the first write
    outcome = run_cli("convert", inputs["adapter"], tmp_path / "ro.safetensors",
                      "--to", "safetensors")
    line = assert_cli_error(outcome, ["ro.safetensors", "read-only"])
    assert "Errno" not in line and ".at" not in line


def test_hub_uri_as_out_is_refused(inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outcome = run_cli("merge", inputs["base"], inputs["adapter"], "--out", "hf://me/x")
    assert_cli_error(outcome, ["hf://me/x", "--push-to"])
    assert not (tmp_path / "hf:").exists()


def test_dry_run_says_out_exists(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    report = at.merge(inputs["base"], [inputs["adapter"]], out, dry_run=True)
    assert any("exists" in w and "--force" in w for w in report["warnings"])


# ----------------------------------------------------------------------------- item 3: links

SECRET = b"root:$6$not-for-the-hub:19000:0:99999:7:::\n"


def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "shadow"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def test_side_file_linking_outside_is_refused(inputs, tmp_path):
    base = inputs["base"]
    (base / "special_tokens_map.json").symlink_to(secret_file(tmp_path))
    out = tmp_path / "merged"
    outcome = run_cli("merge", base, inputs["adapter"], "--out", out)
    assert_cli_error(outcome, ["special_tokens_map.json", str(tmp_path / "outside" / "shadow")])
    assert not out.exists() and hidden_beside(out) == []


def test_links_inside_the_folder_are_followed(inputs, tmp_path):
    base = inputs["base"]
    (base / "real").mkdir()
    (base / "real" / "tokenizer.json").write_text('{"version": "1.0"}')
    (base / "tokenizer.json").symlink_to("real/tokenizer.json")
    out = tmp_path / "merged"
    at.merge(base, [inputs["adapter"]], out)
    copied = out / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_text() == '{"version": "1.0"}'


def test_shards_outside_the_folder_are_refused(inputs, tmp_path):
    base = inputs["base"]
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(base / "model.safetensors", outside)
    index = {"metadata": {}, "weight_map": dict.fromkeys(
        json.loads(outside.read_bytes()[8:8 + int.from_bytes(outside.read_bytes()[:8],
                                                             "little")]).keys() - {"__metadata__"},
        "../elsewhere.safetensors")}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="outside"):
        at.merge(base, [inputs["adapter"]], tmp_path / "m1")
    (base / "model.safetensors.index.json").unlink()
    (base / "model.safetensors").symlink_to(outside)
    outcome = run_cli("merge", base, inputs["adapter"], "--out", tmp_path / "m2")
    assert_cli_error(outcome, ["model.safetensors", "symlink", str(outside)])
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


def test_push_refuses_links_leading_out(inputs, tmp_path):
    from adaptertools.hub import _upload_list

    adapter = inputs["adapter"]
    (adapter / "notes.md").symlink_to(secret_file(tmp_path))
    with pytest.raises(FormatError, match="notes.md"):
        _upload_list(adapter)
    (adapter / "notes.md").unlink()
    (adapter / "card.md").write_text("mine")
    (adapter / "README.md").symlink_to("card.md")       # inside: fine
    assert dict(_upload_list(adapter))["README.md"].read_text() == "mine"


def test_push_with_a_leaking_link_sends_nothing(inputs, tmp_path, monkeypatch):
    from helpers.hub_server import WRITE_TOKEN, serve_hub

    gen = serve_hub(monkeypatch, tmp_path / "hub")
    hub = next(gen)
    try:
        (inputs["adapter"] / "special_tokens_map.json").symlink_to(secret_file(tmp_path))
        outcome = run_cli("push", inputs["adapter"], "me/leak", "--token", WRITE_TOKEN,
                          "--endpoint", hub.endpoint)
        assert_cli_error(outcome, ["special_tokens_map.json", "symlink"])
        assert "me/leak" not in hub.state.repos
        assert not any(SECRET in f.data for repo in hub.state.repos.values()
                       for commit in repo.commits.values() for f in commit.values())
    finally:
        gen.close()


def test_hub_cache_snapshots_may_link_into_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    blob = cache / "models--me--x" / "blobs" / "abc"
    snap = cache / "models--me--x" / "snapshots" / "0123"
    blob.parent.mkdir(parents=True)
    snap.mkdir(parents=True)
    blob.write_text("{}")
    (snap / "config.json").symlink_to("../../blobs/abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    if "huggingface_hub.constants" in sys.modules:
        monkeypatch.setattr(sys.modules["huggingface_hub.constants"], "HF_HUB_CACHE", str(cache))
    assert paths.contained_file(snap, "config.json").read_text() == "{}"
    with pytest.raises(FormatError):
        paths.contained_file(tmp_path / "cache" / "models--me--x" / "blobs", "../../../x")
