"""Shard-parallel merges on a real Ray cluster (``ray.cluster_utils.Cluster``: a head without CPUs
and two worker nodes of one CPU each, on this machine): bytes identical to the single-process
merge for a sharded HF base, GGUF bases cut into byte ranges (F32, F16 and a llama.cpp Q4_K_M
kept in its types) and a GGUF whose types change (one piece); a worker node killed while its
piece runs (Ray retries it; same bytes); the driver killed and the command run again (finished
pieces skipped: the manifest says so and their files keep their mtimes)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import adaptertools as at
from adaptertools.errors import UnsupportedError
from adaptertools.merging.bases import open_base
from adaptertools.merging.pieces import split
from adaptertools.parallel import DELAY_ENV
from adaptertools.tiny import make_adapter
from helpers.checkpoints import SHARDS, make_sharded_base
from helpers.cli import cli_argv, run_cli
from helpers.ray_cluster import local_cluster

ray = pytest.importorskip("ray", reason="the Ray extra is not installed: pip install "
                                        "'adaptertools[ray]'")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def cluster():
    yield from local_cluster(2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_inputs")
    base = make_sharded_base(root / "base")
    at.save(make_adapter(), root / "lora", format="peft")
    return root, base, root / "lora"


@pytest.fixture(scope="module")
def gguf_inputs(tmp_path_factory):
    """A tiny Llama as F32, F16 and Q4_K_M GGUF models, and a PEFT adapter of all its linears."""
    from helpers.gguf_base import llama_quantize, make_base_model, write_gguf_base
    from helpers.peft_adapters import perturb_trainables
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("ray_gguf")
    model = make_base_model("llama", hidden=128, intermediate=256)
    f32 = write_gguf_base(model, root / "base-f32.gguf", "llama")
    f16 = write_gguf_base(model, root / "base-f16.gguf", "llama", f16=True)
    q4 = llama_quantize(f16, root / "base-q4_k_m.gguf", "Q4_K_M")
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ALL,
                                                  init_lora_weights=False))
    perturb_trainables(peft_model)
    peft_model.save_pretrained(root / "peft")
    return {"f32": f32, "f16": f16, "q4_k_m": q4, "adapter": root / "peft"}


def hashes(path: Path) -> dict[str, str]:
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_sharded_hf_merge_on_ray_is_the_local_merge(cluster, inputs, tmp_path):
    c, _ = cluster
    root, base, lora = inputs
    at.merge(base, [lora], tmp_path / "local")
    report = at.merge(base, [lora], tmp_path / "ray", executor="ray", address=c.address)
    pieces = dict(report["pieces"])
    assert len(pieces.pop("wall_s")) == 3 and all(w > 0 for w in report["pieces"]["wall_s"])
    assert pieces == {"total": 3, "ran": 3, "already_done": 0, "executor": "ray"}
    assert hashes(tmp_path / "ray") == hashes(tmp_path / "local")
    assert set(hashes(tmp_path / "ray")) >= set(SHARDS)
    assert sorted(os.listdir(tmp_path)) == ["local", "ray"]     # no partial, no manifest left


@pytest.mark.parametrize("kind,requantize", [("f32", "keep"), ("f16", "keep"),
                                             ("q4_k_m", "keep"), ("f16", "q8_0")])
def test_gguf_merge_on_ray_is_the_local_merge(cluster, gguf_inputs, tmp_path, kind, requantize):
    c, _ = cluster
    base, adapter = gguf_inputs[kind], gguf_inputs["adapter"]
    local = at.merge(base, [adapter], tmp_path / "local.gguf", requantize=requantize)
    report = at.merge(base, [adapter], tmp_path / "ray.gguf", requantize=requantize,
                      executor="ray", address=c.address)
    ranges = requantize == "keep"          # a kept layout is cut into byte ranges
    assert report["pieces"]["total"] == (2 if ranges else 1)
    assert hashes(tmp_path / "ray.gguf")["ray.gguf"] == hashes(tmp_path / "local.gguf")["local.gguf"]
    if local.get("survival"):       # quantized tensors: the same scores, whichever worker ran
        assert report["survival"]["rows"] == local["survival"]["rows"]


@pytest.fixture(scope="module")
def nf4_split(tmp_path_factory):
    """A bitsandbytes NF4 Llama in two shards, one weight's absmax in the shard before its
    weight (a companion patched after its shard was written), and a PEFT LoRA."""
    pytest.importorskip("bitsandbytes")
    import transformers
    from helpers.peft_adapters import make_adapter as make_peft
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("ray_nf4")
    torch = pytest.importorskip("torch")
    torch.manual_seed(2024)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=128, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "f32")
    make_peft(model, root / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
              init_lora_weights=False)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=torch.float32)
    transformers.AutoModelForCausalLM.from_pretrained(
        root / "f32", quantization_config=q, device_map="cpu", dtype=torch.float32
    ).save_pretrained(root / "nf4")
    sd = load_file(root / "nf4" / "model.safetensors")
    first = {k: v for k, v in sd.items()
             if ("layers.0." in k and not k.endswith("q_proj.weight"))
             or k.endswith("layers.1.self_attn.v_proj.weight.absmax")}
    second = {k: v for k, v in sd.items() if k not in first}
    base = root / "sharded"
    base.mkdir()
    (base / "config.json").write_bytes((root / "nf4" / "config.json").read_bytes())
    weight_map = {}
    for i, part in enumerate((first, second)):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file(part, base / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return base, root / "lora"


def test_bitsandbytes_companions_across_shards_on_ray(cluster, nf4_split, tmp_path):
    """Quant states re-encoded in a shard another task wrote reach it (the driver writes those
    patches last): the bytes are the local merge's."""
    c, _ = cluster
    base, lora = nf4_split
    at.merge(base, [lora], tmp_path / "local")
    report = at.merge(base, [lora], tmp_path / "ray", executor="ray", address=c.address)
    assert report["pieces"]["ran"] == 2
    assert hashes(tmp_path / "ray") == hashes(tmp_path / "local")


def test_gguf_ranges_cover_the_file_once(gguf_inputs):
    """Ranges start at 0 or at an adapted tensor, touch, and end at the data's end; each
    adapted tensor lies in exactly one."""
    from adaptertools.inputs import load_finite, make_plan

    checkpoint = open_base(gguf_inputs["q4_k_m"])
    adapters = load_finite([gguf_inputs["adapter"]], ["a"], base=checkpoint.info,
                           refusal="refusing")
    plan = make_plan(checkpoint, adapters, ["a"], [1.0], mode="weighted", dtype="keep",
                     requantize="keep", quantize_like=None)
    for count in (1, 2, 3, 5, 1000):
        pieces = split(plan, ranges=count)
        assert pieces[0].start == 0 and pieces[-1].end == checkpoint.data_end
        assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
        changed = [j for j in plan.jobs if j.changed]
        assert len(pieces) == min(count, len(changed))
        for job in changed:
            assert sum(p.start <= job.source.offset < p.end for p in pieces) == 1
        assert len({p.key for p in pieces}) == len(pieces)


def test_a_worker_node_killed_mid_piece_is_retried(cluster, inputs, tmp_path, monkeypatch):
    """Each piece waits 6 s before it writes; 3.5 s in (both worker nodes busy with one piece
    each, Ray's workers start in about 1-2 s here) one node is removed. Ray runs its piece
    again on a node added for it, and the bytes are the local merge's."""
    c, workers = cluster
    root, base, lora = inputs
    at.merge(base, [lora], tmp_path / "local")
    monkeypatch.setenv(DELAY_ENV, "6")
    result: dict = {}

    def run():
        try:
            result["report"] = at.merge(base, [lora], tmp_path / "ray", executor="ray",
                                        address=c.address)
        except BaseException as exc:       # noqa: BLE001  (re-raised below, in the test)
            result["error"] = exc

    driver = threading.Thread(target=run)
    driver.start()
    time.sleep(3.5)
    c.remove_node(workers.pop(0))            # Ray's node processes: main thread only
    workers.append(c.add_node(num_cpus=1))
    driver.join(timeout=180)
    if "error" in result:
        raise result["error"]
    assert result["report"]["pieces"]["ran"] == 3
    assert hashes(tmp_path / "ray") == hashes(tmp_path / "local")
    assert not list(tmp_path.glob(".ray.at-*"))


def _manifest_entries(out: Path) -> dict:
    path = out.parent / f".{out.name}.at-pieces.json"
    return json.loads(path.read_text())["entries"] if path.exists() else {}


def test_driver_killed_then_rerun_skips_finished_pieces(cluster, inputs, tmp_path):
    """The CLI, as its own Ray driver, is killed (SIGKILL) once a piece is recorded; the same
    command again runs only the pieces not recorded, leaves the finished shards' files as
    they were (mtime), and gives the local merge's bytes."""
    c, _ = cluster
    root, base, lora = inputs
    at.merge(base, [lora], tmp_path / "local")
    out = tmp_path / "ray"
    args = cli_argv("merge", base, lora, "--out", out, "--executor", "ray", "--address",
                    c.address, "--json")
    env = {**os.environ, DELAY_ENV: "2"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _manifest_entries(out) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _manifest_entries(out)
    assert 1 <= len(done) < 3, proc.stderr.read()
    partial = tmp_path / ".ray.at-partial"
    mtimes = {k: (partial / k.removeprefix("file ")).stat().st_mtime_ns for k in done}
    assert not out.exists()

    outcome = run_cli("merge", base, lora, "--out", out, "--executor", "ray", "--address",
                      c.address, "--json", how="subprocess", expect=0)
    report = json.loads(outcome.stdout)
    assert report["pieces"]["already_done"] == len(done)
    assert report["pieces"]["ran"] == 3 - len(done)
    assert hashes(out) == hashes(tmp_path / "local")
    for key, mtime in mtimes.items():
        assert (out / key.removeprefix("file ")).stat().st_mtime_ns == mtime, key
    assert not partial.exists() and not _manifest_entries(out)


def test_resume_trusts_only_pieces_of_the_same_inputs(cluster, inputs, tmp_path, monkeypatch):
    """A run that failed after its pieces (here: writing the side files) leaves them recorded.
    The same merge again reuses all three; a merge of another adapter into the same OUT redoes
    all three; either way the bytes are that merge's own."""
    c, _ = cluster
    root, base, _ = inputs
    old, new = tmp_path / "old", tmp_path / "new"
    at.save(make_adapter(seed=3), old, format="peft")
    at.save(make_adapter(seed=4), new, format="peft")
    out = tmp_path / "ray"

    def fail(*args):
        raise OSError("disk went away")

    with monkeypatch.context() as m:
        m.setattr("adaptertools.merging.run.write_side_files", fail)
        with pytest.raises(OSError, match="disk went away"):
            at.merge(base, [old], out, executor="ray", address=c.address)
    assert len(_manifest_entries(out)) == 3 and not out.exists()
    again = at.merge(base, [old], tmp_path / "again", executor="ray", address=c.address)
    assert again["pieces"]["ran"] == 3          # another OUT: its own partial output
    with monkeypatch.context() as m:
        m.setattr("adaptertools.merging.run.write_side_files", fail)
        with pytest.raises(OSError):
            at.merge(base, [old], out, executor="ray", address=c.address)
    report = at.merge(base, [new], out, executor="ray", address=c.address)
    assert (report["pieces"]["ran"], report["pieces"]["already_done"]) == (3, 0)
    at.merge(base, [new], tmp_path / "local")
    assert hashes(out) == hashes(tmp_path / "local")
    with monkeypatch.context() as m:
        m.setattr("adaptertools.merging.run.write_side_files", fail)
        with pytest.raises(OSError):
            at.merge(base, [old], tmp_path / "third", executor="ray", address=c.address)
    resumed = at.merge(base, [old], tmp_path / "third", executor="ray", address=c.address)
    assert resumed["pieces"]["already_done"] == 3
    assert hashes(tmp_path / "third") == hashes(tmp_path / "again")


def test_worker_error_is_the_one_line_error(cluster, inputs, tmp_path, monkeypatch):
    """An error in a worker reaches the driver as the library's own exception and message."""
    c, _ = cluster
    root, base, lora = inputs
    monkeypatch.setattr("adaptertools.merging.pieces.plan_digest", lambda plan: "not-it")
    with pytest.raises(UnsupportedError, match="changed while the merge ran"):
        # the driver's digest is "not-it"; the workers (other processes) compute the real one
        at.merge(base, [lora], tmp_path / "ray", executor="ray", address=c.address)
    assert not (tmp_path / "ray").exists()


def test_without_ray_the_executor_says_how_to_install_it(inputs, tmp_path, monkeypatch):
    root, base, lora = inputs
    monkeypatch.setitem(sys.modules, "ray", None)          # import ray -> ImportError
    with pytest.raises(UnsupportedError, match=r"pip install 'adaptertools\[ray\]'"):
        at.merge(base, [lora], tmp_path / "out", executor="ray")
    assert not (tmp_path / "out").exists()


def test_address_without_ray_executor_is_misuse(inputs, tmp_path):
    root, base, lora = inputs
    outcome = run_cli("merge", base, lora, "--out", tmp_path / "out", "--address", "auto",
                      expect=2)
    assert "--executor ray" in outcome.stderr
