"""``merge --max-shard-size``: the output resharded as ``save_pretrained(max_shard_size=...)``
writes it.

Bases are tiny bf16 Llamas built in code (three shards with an index, or one file). Each
resharded merge (to one file, to fewer shards, to more, with tensors larger than the limit alone
in their shards, a size in GiB, an int of bytes) loads in transformers with a state dict equal,
tensor for tensor and bit for bit, to the default merge's; its files and index are what
huggingface_hub's ``split_torch_state_dict_into_shards`` makes of that state dict in the order
transformers' ``save_pretrained`` sorts it (``dot_natural_key``), and what a real
``save_pretrained(max_shard_size=...)`` of the merged model writes; it passes ``validate``.
Without the option the base's files are kept as before. Bad sizes are misuse (exit 2, one line);
a GGUF base refuses the option; ``--dry-run`` shows the shards. A bitsandbytes checkpoint whose
quantized weights and quant states land in different new shards (the base storing quant states
first, or weights first) gives the same tensors as its default merge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.errors import OptionError, UnsupportedError
from adaptertools.merging.shards import parse_size
from adaptertools.tensor_index import read_safetensors_header
from adaptertools.tiny import TinyLlama, make_adapter, make_base

from helpers.checkpoints import SHARDS, SPEC, make_sharded_base
from helpers.cli import assert_cli_error, assert_nothing_written, run_cli, stderr_lines

INDEX = "model.safetensors.index.json"
TOTAL = 213_632          # bytes of SPEC's tensors in bf16; the largest (embeddings) 32_768
SIZES = {"one file": "1MB", "fewer": "150KB", "more": "40KB", "tensors over the limit": "20KB",
         "binary unit": "36KiB", "int of bytes": 100_000}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reshard")
    paths = {"sharded": make_sharded_base(root / "sharded"),
             "single": make_base(root / "single", SPEC, dtype=torch.bfloat16)}
    at.save(make_adapter(SPEC), root / "adapter", format="peft")
    paths["adapter"] = root / "adapter"
    for kind in ("sharded", "single"):
        at.merge(paths[kind], [paths["adapter"]], root / f"default-{kind}")
        paths[f"default-{kind}"] = root / f"default-{kind}"
    return paths


def stream_order(folder: Path) -> list[str]:
    """Tensor names in the base's order: shards by name, each in file order."""
    return [t.name for path in sorted(folder.glob("*.safetensors"))
            for t in read_safetensors_header(path).tensors]


def save_order(names) -> list[str]:
    """The order transformers 5's save_pretrained hands a state dict to the splitter in."""
    transformers = pytest.importorskip("transformers")
    key = transformers.core_model_loading.dot_natural_key
    return sorted(names, key=key)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def file_tensors(folder: Path) -> dict[str, list[str]]:
    """Each weight file's tensor names, in data order."""
    return {p.name: [t.name for t in read_safetensors_header(p).tensors]
            for p in sorted(folder.glob("*.safetensors"))}


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name


def hf_split(default: Path, max_bytes: int):
    """huggingface_hub's split of the default merge's state dict, in save_pretrained's order."""
    from huggingface_hub import split_torch_state_dict_into_shards

    merged = tensors(default)
    state = {name: merged[name] for name in save_order(merged)}
    return state, split_torch_state_dict_into_shards(state, max_shard_size=max_bytes)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_resharded_output_loads_equal_and_is_split_as_huggingface_hub_does(models, tmp_path,
                                                                           size):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    report = at.merge(models["sharded"], [models["adapter"]], out, max_shard_size=size)
    max_bytes = parse_size(size)
    default = models["default-sharded"]

    # the same tensors, bit for bit: as files and as transformers loads them
    assert_bit_identical(tensors(out), tensors(default))
    load = transformers.AutoModelForCausalLM.from_pretrained
    want = load(default, dtype=torch.bfloat16).state_dict()
    assert_bit_identical(load(out, dtype=torch.bfloat16).state_dict(), want)

    # the grouping and names of huggingface_hub's own function, and each shard's size
    state, split = hf_split(default, max_bytes)
    assert {k: sorted(v) for k, v in file_tensors(out).items()} == \
        {k: sorted(v) for k, v in split.filename_to_tensors.items()}
    assert [s["file"] for s in report["shards"]] == list(split.filename_to_tensors)
    for shard in report["shards"]:
        assert (out / shard["file"]).stat().st_size == shard["bytes"]
        names = split.filename_to_tensors[shard["file"]]
        data = sum(state[n].numel() * state[n].element_size() for n in names)
        assert data <= max_bytes or len(names) == 1
    side = sorted(p.name for p in out.iterdir() if not p.name.endswith(".safetensors"))
    if not split.is_sharded:
        assert list(split.filename_to_tensors) == ["model.safetensors"]
        assert side == ["config.json"]                      # no index, as HF writes one file
    else:
        assert side == ["config.json", INDEX]
        index = json.loads((out / INDEX).read_text())
        assert index["weight_map"] == split.tensor_to_filename
        assert index["metadata"]["total_size"] == split.metadata["total_size"] == TOTAL
    assert (out / "config.json").read_bytes() == (default / "config.json").read_bytes()

    # what a real save_pretrained of the merged model writes: same files, same index
    saved = tmp_path / "saved"
    load(default, dtype=torch.bfloat16).save_pretrained(saved, max_shard_size=max_bytes)
    assert file_tensors(saved).keys() == file_tensors(out).keys()
    assert {k: sorted(v) for k, v in file_tensors(saved).items()} == \
        {k: sorted(v) for k, v in file_tensors(out).items()}
    assert (saved / INDEX).exists() == split.is_sharded
    if split.is_sharded:
        theirs, ours = (json.loads((f / INDEX).read_text()) for f in (saved, out))
        assert ours["weight_map"] == theirs["weight_map"]
        assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"]

    check = at.validate(models["sharded"], [models["adapter"]], out)
    assert check["passed"], [r for r in check["tensors"] if not r["passed"]][:3]


def test_shard_counts_one_more_fewer(models, tmp_path):
    """Three base shards become one file, two, seven; one base file becomes several."""
    counts = {}
    for kind, size in (("sharded", "1MB"), ("sharded", "150KB"), ("sharded", "40KB"),
                       ("single", "40KB")):
        out = tmp_path / f"{kind}-{size}"
        at.merge(models[kind], [models["adapter"]], out, max_shard_size=size)
        counts[kind, size] = sorted(p.name for p in out.glob("*.safetensors"))
        assert_bit_identical(tensors(out), tensors(models[f"default-{kind}"]))
    assert counts["sharded", "1MB"] == ["model.safetensors"]
    assert counts["sharded", "150KB"] == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert counts["sharded", "40KB"] == [f"model-0000{i}-of-00007.safetensors"
                                         for i in range(1, 8)]
    assert len(counts["single", "40KB"]) > 1


def test_tensors_come_from_several_base_files_and_out_of_order(models, tmp_path):
    """A tensor larger than the limit is alone in its shard; new shards take their tensors out
    of the base's order and from several base files, each file in the base's order."""
    out = tmp_path / "out"
    at.merge(models["sharded"], [models["adapter"]], out, max_shard_size="20KB")
    files = file_tensors(out)
    base = json.loads((models["sharded"] / INDEX).read_text())["weight_map"]
    big = {n for n, s in SPEC.shapes().items() if 2 * torch.Size(s).numel() > 20_000}
    assert big == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(names == [n] for n in big for names in files.values() if n in names)
    assert any(len({base[n] for n in names}) > 1 for names in files.values())
    order = [n for names in files.values() for n in names]
    assert order != stream_order(models["sharded"]) and sorted(order) == sorted(base)
    position = {n: i for i, n in enumerate(stream_order(models["sharded"]))}
    assert all(names == sorted(names, key=position.get) for names in files.values())


def test_natural_key_is_transformers_dot_natural_key():
    transformers = pytest.importorskip("transformers")
    from adaptertools.merging.shards import natural_key

    names = ["model.layers.10.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight",
             "model.layers.2.mlp", "lm_head.weight", "h.0.attn", "h0.attn", "h10.attn", "h2",
             "blocks.3.w.absmax", "blocks.3.w", "blocks.3.w.quant_state.bitsandbytes__nf4",
             "x.007", "x.7", "x.7a", "a..b", "", "experts.12.w1", "experts.12.w10", "experts.12.w2"]
    assert [natural_key(n) for n in names] == \
        [transformers.core_model_loading.dot_natural_key(n) for n in names]
    assert sorted(names, key=natural_key) == save_order(names)


def test_dtype_change_is_grouped_by_output_sizes(models, tmp_path):
    out = tmp_path / "out"
    at.merge(models["sharded"], [models["adapter"]], out, dtype="fp32", max_shard_size="100KB")
    default = tmp_path / "default"
    at.merge(models["sharded"], [models["adapter"]], default, dtype="fp32")
    assert_bit_identical(tensors(out), tensors(default))
    _, split = hf_split(default, 100_000)
    assert json.loads((out / INDEX).read_text())["weight_map"] == split.tensor_to_filename
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_without_the_option_the_base_files_are_kept(models):
    default = models["default-sharded"]
    assert sorted(p.name for p in default.glob("*.safetensors")) == SHARDS
    assert (default / INDEX).read_bytes() == (models["sharded"] / INDEX).read_bytes()
    for shard in SHARDS:
        assert read_safetensors_header(default / shard).header == \
            read_safetensors_header(models["sharded"] / shard).header


def test_one_file_kept_whole_is_byte_identical_to_the_default(models, tmp_path):
    out = tmp_path / "out"
    at.merge(models["single"], [models["adapter"]], out, max_shard_size="5GB")
    default = models["default-single"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in default.iterdir())
    for path in default.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


# ----------------------------------------------------------------------------- sizes, misuse

@pytest.mark.parametrize("given, size", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 << 30), ("1.5GB", 1_500_000_000),
    (" 7 kb ", 7000), ("64kib", 64 << 10), ("1TB", 10**12), ("123", 123), (4096, 4096)])
def test_sizes(given, size):
    assert parse_size(given) == size


BAD_SIZES = ["5XB", "0", "-5", "-1GB", "0GB", "1.5", "GB", "", "5 G B", "nanGB", "0.0001KB"]


@pytest.mark.parametrize("size", BAD_SIZES)
def test_bad_size_is_misuse_one_line(models, tmp_path, size):
    out = tmp_path / "out"
    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out,
                      f"--max-shard-size={size}")
    assert_cli_error(outcome, ["--max-shard-size", "5GB"], code=2)
    assert_nothing_written(out)


@pytest.mark.parametrize("size", [0, -1, True, 1.5, "5XB"])
def test_bad_size_library(models, tmp_path, size):
    with pytest.raises(OptionError, match="--max-shard-size"):
        at.merge(models["sharded"], [models["adapter"]], tmp_path / "out", max_shard_size=size)
    assert_nothing_written(tmp_path / "out")


def test_gguf_base_refuses_the_option(models, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from helpers.gguf_base import make_base_model, write_gguf_base

    base = write_gguf_base(make_base_model("llama", hidden=64, intermediate=96),
                           tmp_path / "base.gguf", "llama")
    out = tmp_path / "merged.gguf"
    with pytest.raises(UnsupportedError, match="llama-gguf-split"):
        at.merge(base, [models["adapter"]], out, max_shard_size="5GB")
    outcome = run_cli("merge", base, models["adapter"], "--out", out,
                      "--max-shard-size", "5GB")
    assert_cli_error(outcome, ["--max-shard-size", "llama-gguf-split", str(base)], code=2)
    assert_nothing_written(out)


def test_dry_run_shows_the_shards(models, tmp_path):
    out = tmp_path / "out"
    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out,
                      "--dry-run", "--json", "--max-shard-size", "150KB")
    assert outcome.code == 0, outcome.stderr
    plan = json.loads(outcome.stdout)
    names = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert [s["file"] for s in plan["shards"]] == names
    assert sum(s["tensors"] for s in plan["shards"]) == len(SPEC.shapes())
    assert sum(s["bytes"] for s in plan["shards"]) == plan["output_bytes"]
    assert plan["max_shard_size"] == 150_000
    assert_nothing_written(out)

    outcome = run_cli("merge", models["sharded"], models["adapter"], "--out", out,
                      "--dry-run", "--max-shard-size", "150KB")
    assert outcome.code == 0, outcome.stderr
    assert all(name in outcome.stdout for name in names)
    assert stderr_lines(outcome) == []
    assert_nothing_written(out)

    report = at.merge(models["sharded"], [models["adapter"]], out, dry_run=True)
    assert "shards" not in report                # without the option: the base's own files


# ----------------------------------------------------------------------------- bitsandbytes

@pytest.fixture(scope="module")
def nf4(tmp_path_factory):
    """An NF4 checkpoint saved by transformers (one file: quant states before the weights) and
    the same tensors in two shards, packed weights first (quant states after them)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("reshard_nf4")
    spec = TinyLlama(vocab=128)
    make_base(root / "f32", spec)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        root / "f32", quantization_config=q, device_map="cpu", dtype=torch.float32)
    model.save_pretrained(root / "single")
    sd = load_file(root / "single" / "model.safetensors")
    first = {k: v for k, v in sd.items() if v.dtype == torch.uint8}
    parts = (first, {k: v for k, v in sd.items() if k not in first})
    (root / "sharded").mkdir()
    shutil.copy(root / "single" / "config.json", root / "sharded" / "config.json")
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file(part, root / "sharded" / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (root / "sharded" / INDEX).write_text(json.dumps({"metadata": {"total_size": 0},
                                                      "weight_map": weight_map}))
    at.save(make_adapter(spec, targets=("q_proj", "v_proj", "down_proj")), root / "adapter",
            format="peft")
    return root


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_bitsandbytes_groups_split_across_new_shards(nf4, tmp_path, kind):
    base, adapter = nf4 / kind, nf4 / "adapter"
    at.merge(base, [adapter], tmp_path / "default")
    at.merge(base, [adapter], tmp_path / "out", max_shard_size="6KB")
    where = {t.name: path.name for path in sorted((tmp_path / "out").glob("*.safetensors"))
             for t in read_safetensors_header(path).tensors}
    apart = [n for n in where if n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))
             and where[n] != where[f"{n}.absmax"]]
    assert apart                          # patched quant states in another shard than the weight
    assert_bit_identical(tensors(tmp_path / "out"), tensors(tmp_path / "default"))
