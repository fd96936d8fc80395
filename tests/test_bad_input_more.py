"""More bad input, each refused through the CLI with one ``error:`` line, exit 1, nothing written.

Issue 14 item 5, in four groups:

1. results that would hold Inf/NaN: ``merge --weights 1e308`` into F32/F16/BF16 HF bases, GGUF
   Q8_0 bases (torch and Triton kernels) and bitsandbytes NF4/int8 checkpoints; a delta that only
   overflows on the cast to F16 or in Q8_0's fp16 block scales; a base tensor that already holds
   NaN; ``combine`` and ``extract`` results, and ``convert --dtype fp16`` / GGUF casts;
2. configs of the wrong shape: PEFT fields of the wrong type (schema), invalid regexes as pattern
   keys, JSON nested 200,000 deep (adapter config, base config.json, index, safetensors headers),
   our own files' metadata damaged; a fine-tune holding a NaN (``extract``); an adapter that
   honestly declares a 100 GB tensor (refused before loading, saying how big is too big);
3. an int8 / FP8 weight in a checkpoint without a bitsandbytes ``quantization_config``;
4. a pickle whose unpickling would call ``posix.system``: named, and never torch's hint to retry
   with ``weights_only=False``.

Each case failed on the code before this change (a traceback, exit 0 with Inf in the output, or
a message without the tensor or the fix).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.errors import FormatError, UnsupportedError
from adaptertools.tiny import TinyLlama, make_adapter, make_base

from helpers.adapters import with_bad_value, write_peft
from helpers.cli import assert_cli_error, assert_nothing_written, run_cli

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"     # the first adapted tensor in file order
DEEP = "[" * 200_000 + "]" * 200_000


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))
    return folder


def edit_tensors(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def refused(outcome, dst: Path | None, fragments: list[str]) -> str:
    line = assert_cli_error(outcome, fragments)
    if dst is not None:
        assert_nothing_written(dst)
    return line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny Llama bases (F32, F16, BF16) and a PEFT adapter on every linear layer."""
    root = tmp_path_factory.mktemp("bad_more")
    bases = {name: make_base(root / name, dtype=dtype) for name, dtype in
             (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16))}
    return root, bases, write_peft(root / "adapter")


# ============================================================================ 1. Inf/NaN results

@pytest.mark.parametrize("base", ["f32", "f16", "bf16"])
def test_merge_huge_weight_is_refused(tiny, tmp_path, base):
    root, bases, adapter = tiny
    out = tmp_path / "merged"
    line = refused(run_cli("merge", bases[base], adapter, "--out", out, "--weights", "1e308"),
                   out, [DOWN0, "Inf/NaN", "--weights", {"f32": "F32", "f16": "F16",
                                                         "bf16": "BF16"}[base]])
    assert "nothing was written" in line


def test_merge_huge_weight_in_a_subprocess(tiny, tmp_path):
    root, bases, adapter = tiny
    out = tmp_path / "merged"
    refused(run_cli("merge", bases["bf16"], adapter, "--out", out, "--weights", "1e308",
                    how="subprocess"), out, [DOWN0, "Inf/NaN", "lower --weights"])


def test_merge_that_overflows_only_on_the_cast_to_f16(tiny, tmp_path):
    """fp32 arithmetic is finite (about 1e5), the F16 output is not: an F32 base is suggested,
    and into the F32 base the same merge succeeds."""
    root, bases, _ = tiny
    adapter = write_peft(tmp_path / "big", with_bad_value(make_adapter(), Q0, "b", 1e5))
    out = tmp_path / "merged"
    refused(run_cli("merge", bases["f16"], adapter, "--out", out), out,
            [Q0, "Inf/NaN value(s) of 4096", "F16", "F32 copy of the base"])
    ok = run_cli("merge", bases["f32"], adapter, "--out", out)
    assert ok.code == 0, ok.stderr
    assert torch.isfinite(load_file(out / "model.safetensors")[Q0]).all()


def test_merge_with_triton_kernels_is_checked_too(tiny, tmp_path):
    """The fused float fold (here under triton's CPU interpreter) gets the same check."""
    pytest.importorskip("triton")
    root, bases, _ = tiny
    adapter = write_peft(tmp_path / "big", with_bad_value(make_adapter(), Q0, "b", 1e5))
    out = tmp_path / "merged"
    refused(run_cli("merge", bases["f16"], adapter, "--out", out, "--kernels", "triton"),
            out, [Q0, "Inf/NaN value(s) of 4096", "F16"])


def test_merge_into_a_base_tensor_holding_nan(tiny, tmp_path):
    root, bases, adapter = tiny
    base = Path(shutil.copytree(bases["bf16"], tmp_path / "base"))
    edit_tensors(base / "model.safetensors", lambda t: t[Q0].view(-1).__setitem__(5, float("nan")))
    out = tmp_path / "merged"
    refused(run_cli("merge", base, adapter, "--out", out), out,
            [Q0, "base tensor already holds 1 Inf/NaN", "damaged"])


@pytest.fixture(scope="module")
def gguf_q8(tmp_path_factory):
    """A GGUF Q8_0 model (2-D weights quantized by the torch codec) and an HF-named adapter."""
    pytest.importorskip("transformers")
    import gguf
    import numpy as np
    from helpers.gguf_base import make_base_model, rewrite_gguf, write_gguf_base

    from adaptertools.kernels.quant import gguf as codec

    root = tmp_path_factory.mktemp("bad_gguf")
    f32 = write_gguf_base(make_base_model("llama", hidden=64, intermediate=96), root / "f32.gguf",
                          "llama")

    def q8(t):
        data = np.array(t.data)
        if data.ndim != 2 or data.shape[-1] % 32:
            return data, t.tensor_type
        raw = codec.quantize(torch.from_numpy(data.astype(np.float32)), "Q8_0").numpy()
        return raw, gguf.GGMLQuantizationType.Q8_0

    base = rewrite_gguf(f32, root / "q8.gguf", q8)
    adapter = write_peft(root / "adapter", make_adapter(TinyLlama(intermediate=96, vocab=128)))
    return base, adapter


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("weight, fragment", [("1e308", "Inf/NaN"),
                                              # finite fp32 values beyond 127 * 65504: the
                                              # block scales (fp16) overflow
                                              ("1e9", "too large for Q8_0")])
def test_merge_into_gguf_q8_0_is_refused(gguf_q8, tmp_path, kernels, weight, fragment):
    if kernels == "triton":
        pytest.importorskip("triton")
    base, adapter = gguf_q8
    out = tmp_path / "merged.gguf"
    refused(run_cli("merge", base, adapter, "--out", out, "--weights", weight,
                    "--kernels", kernels), out, ["blk.", "Q8_0", fragment])


def _bnb_base(folder: Path, kind: str) -> Path:
    """The tiny F32 base with its q/v weights quantized the bitsandbytes way (our codecs write
    bitsandbytes' own tensors), and config.json saying so."""
    from adaptertools.kernels.quant import bnb as codec
    from adaptertools.kernels.quant.bnb_state import int8_to_tensors, state_to_tensors

    make_base(folder)
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("q_proj.weight", "v_proj.weight"))]:
        weight = tensors.pop(name)
        if kind == "nf4":
            tensors.update(state_to_tensors(*codec.quantize_4bit(weight, quant_type="nf4"), name))
        else:
            tensors.update(int8_to_tensors(*codec.quantize_int8(weight), name))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": kind == "nf4",
                                     "load_in_8bit": kind == "int8", "bnb_4bit_quant_type": "nf4"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("requantize", ["keep", "bf16"])
def test_merge_into_bitsandbytes_is_refused(tiny, tmp_path, kind, requantize):
    _, _, adapter = tiny
    base = _bnb_base(tmp_path / kind, kind)
    out = tmp_path / "merged"
    refused(run_cli("merge", base, adapter, "--out", out, "--weights", "1e308",
                    "--requantize", requantize), out, ["Inf/NaN", "--weights"])


@pytest.mark.parametrize("args, fragments", [
    (["--weights", "1e308,1e308"], [DOWN0, "weighted sum", "overflows", "lower --weights"]),
    (["--method", "svd", "--rank", "4", "--weights", "1e300,1"],
     [DOWN0, "lora_B", "do not fit float32", "lower --weights"]),
    (["--dtype", "fp16", "--weights", "1e6,1"], ["lora_B", "do not fit float16", "--dtype fp32"]),
])
def test_combine_results_must_be_finite(tiny, tmp_path, args, fragments):
    _, _, adapter = tiny
    out = tmp_path / "combined"
    refused(run_cli("combine", adapter, adapter, "--out", out, *args), out, fragments)


@pytest.fixture(scope="module")
def tuned(tiny):
    """Fine-tunes of the F32 base: one with a NaN in q_proj, one whose q_proj moved by ~1e12."""
    root, bases, _ = tiny
    out = {}
    for kind in ("nan", "huge"):
        folder = Path(shutil.copytree(bases["f32"], root / f"tuned-{kind}"))

        def change(t, kind=kind):
            t[Q0] = t[Q0] + (1e12 * torch.randn(t[Q0].shape) if kind == "huge" else 0.01)
            if kind == "nan":
                t[Q0].view(-1)[7] = float("nan")
        edit_tensors(folder / "model.safetensors", change)
        out[kind] = folder
    return out


def test_extract_of_a_fine_tune_holding_nan(tiny, tuned, tmp_path):
    _, bases, _ = tiny
    out = tmp_path / "extracted"
    refused(run_cli("extract", bases["f32"], tuned["nan"], "--out", out, "--rank", "4"), out,
            [str(tuned["nan"] / "model.safetensors"), Q0, "1 NaN/Inf", "damaged"])
    # the same NaN in the base: the base is named
    refused(run_cli("extract", tuned["nan"], bases["f32"], "--out", out, "--rank", "4"), out,
            [str(tuned["nan"] / "model.safetensors"), Q0, "NaN/Inf"])


def test_extract_factors_that_overflow_fp16(tiny, tuned, tmp_path):
    _, bases, _ = tiny
    out = tmp_path / "extracted"
    refused(run_cli("extract", bases["f32"], tuned["huge"], "--out", out, "--rank", "4",
                    "--dtype", "fp16"), out, [Q0, "do not fit float16", "--dtype fp32"])


@pytest.mark.parametrize("to, dtype, fragments", [
    ("peft", "fp16", [Q0 + " (lora_B)", "do not fit float16", "65504"]),
    ("gguf", "fp16", ["blk.0.attn_q.weight.lora_b", "do not fit F16"]),
])
def test_convert_cast_that_overflows(tiny, tmp_path, to, dtype, fragments):
    _, bases, _ = tiny
    src = write_peft(tmp_path / "big", with_bad_value(make_adapter(), Q0, "b", 1e6))
    out = tmp_path / ("converted.gguf" if to == "gguf" else "converted")
    extra = ["--base", bases["f32"]] if to == "gguf" else []
    refused(run_cli("convert", src, out, "--to", to, "--dtype", dtype, *extra), out,
            fragments)


def test_gguf_q8_0_adapter_scales_that_overflow(tiny, tmp_path):
    """Q8_0 holds up to 127 * 65504 (int8 codes times an fp16 scale per block of 32)."""
    _, bases, _ = tiny
    src = write_peft(tmp_path / "big", with_bad_value(make_adapter(), Q0, "a", 1e8))
    out = tmp_path / "converted.gguf"
    refused(run_cli("convert", src, out, "--to", "gguf", "--dtype", "q8_0", "--base",
                    bases["f32"]), out, ["blk.0.attn_q.weight.lora_a", "Q8_0", "at most 8.319"])


# ============================================================================ 2. configs

SCHEMA_CASES = {
    # field: (value, fragments of the message)
    "rank_pattern-string": ("rank_pattern", "abc", ["`rank_pattern`", "a string", "an object"]),
    "rank_pattern-list": ("rank_pattern", [8], ["`rank_pattern`", "a list"]),
    "rank_pattern-value-string": ("rank_pattern", {"q_proj": "x"},
                                  ["`rank_pattern['q_proj']`", "whole number"]),
    "rank_pattern-value-null": ("rank_pattern", {"q_proj": None}, ["`rank_pattern['q_proj']`", "null"]),
    "rank_pattern-value-list": ("rank_pattern", {"q_proj": [8]}, ["`rank_pattern['q_proj']`"]),
    "rank_pattern-value-bool": ("rank_pattern", {"q_proj": True}, ["`rank_pattern['q_proj']`"]),
    "rank_pattern-value-fraction": ("rank_pattern", {"q_proj": 8.5}, ["`rank_pattern['q_proj']`"]),
    "alpha_pattern-string": ("alpha_pattern", "abc", ["`alpha_pattern`", "an object"]),
    "alpha_pattern-value-string": ("alpha_pattern", {"q_proj": "x"},
                                   ["`alpha_pattern['q_proj']`", "a number"]),
    "alpha_pattern-value-null": ("alpha_pattern", {"q_proj": None}, ["`alpha_pattern['q_proj']`"]),
    "alpha_pattern-value-list": ("alpha_pattern", {"q_proj": [1]}, ["`alpha_pattern['q_proj']`"]),
    "rank_pattern-bad-regex": ("rank_pattern", {"(": 8}, ["`rank_pattern` key '('",
                                                          "regular expression"]),
    "alpha_pattern-bad-regex": ("alpha_pattern", {"[": 8}, ["`alpha_pattern` key '['",
                                                            "regular expression"]),
    "target_modules-number": ("target_modules", 5, ["`target_modules`", "a number"]),
    "target_modules-bad-regex": ("target_modules", "(", ["`target_modules`", "regular expression"]),
    "use_rslora-string": ("use_rslora", "yes", ["`use_rslora`", "true or false"]),
    "use_dora-string": ("use_dora", "x", ["`use_dora`", "true or false"]),
    "fan_in_fan_out-string": ("fan_in_fan_out", "no", ["`fan_in_fan_out`", "true or false"]),
    "modules_to_save-number": ("modules_to_save", 3, ["`modules_to_save`", "list"]),
    "r-string": ("r", "8", ["`r`", "a string", "whole number"]),
    "lora_alpha-list": ("lora_alpha", [16], ["`lora_alpha`", "a list"]),
    "peft_type-number": ("peft_type", 5, ["`peft_type`", "a string"]),
    "base_model-number": ("base_model_name_or_path", 5, ["`base_model_name_or_path`"]),
    "init-list": ("init_lora_weights", [1], ["`init_lora_weights`"]),
}


@pytest.mark.parametrize("case", SCHEMA_CASES)
@pytest.mark.parametrize("command", ["inspect", "convert", "merge"])
def test_config_field_of_the_wrong_type(tiny, tmp_path, case, command):
    _, bases, _ = tiny
    field, value, fragments = SCHEMA_CASES[case]
    folder = edit_config(write_peft(tmp_path / "adapter"), **{field: value})
    out = tmp_path / "out"
    args = {"inspect": ["inspect", folder],
            "convert": ["convert", folder, out, "--to", "safetensors"],
            "merge": ["merge", bases["f32"], folder, "--out", out]}[command]
    line = refused(run_cli(*args), out, [str(folder / CONFIG), *fragments, "fix the config"])
    assert "Traceback" not in line


def test_config_schema_in_the_library(tmp_path):
    folder = edit_config(write_peft(tmp_path / "adapter"), rank_pattern={"q_proj": None})
    with pytest.raises(FormatError, match="rank_pattern"):
        at.load(folder)
    # the types PEFT itself writes pass: nulls where LoraConfig allows them, integral floats
    ok = edit_config(write_peft(tmp_path / "ok"), rank_pattern=None, alpha_pattern=None,
                     modules_to_save=None, target_modules="model\\..*_proj", r=8.0,
                     use_dora=False, init_lora_weights="gaussian")
    assert at.load(ok).weights.keys() == make_adapter().weights.keys()


def test_deep_json_in_adapter_config(tiny, tmp_path):
    _, bases, _ = tiny
    folder = write_peft(tmp_path / "adapter")
    (folder / CONFIG).write_text('{"r": ' + DEEP + "}")
    out = tmp_path / "out"
    for args in (["inspect", folder], ["convert", folder, out, "--to", "safetensors"],
                 ["merge", bases["f32"], folder, "--out", out]):
        refused(run_cli(*args), out, [str(folder / CONFIG), "nested too deeply"])


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_deep_json_in_a_base(tiny, tmp_path, name):
    _, bases, adapter = tiny
    base = Path(shutil.copytree(bases["f32"], tmp_path / "base"))
    (base / name).write_text('{"a": ' + DEEP + "}")
    out = tmp_path / "merged"
    refused(run_cli("merge", base, adapter, "--dry-run"), None,
            [str(base / name), "nested too deeply"])
    # a full CLI run first reads the index ahead in _prefetch.py (best effort: silent)
    refused(run_cli("merge", base, adapter, "--out", out), out,
            [str(base / name), "nested too deeply"])
    with pytest.raises(FormatError, match="nested too deeply"):
        at.merge(base, [adapter], out)
    assert_nothing_written(out)


def test_deep_json_in_a_safetensors_header(tiny, tmp_path):
    _, _, adapter = tiny
    base = tmp_path / "base"
    base.mkdir()
    raw = ('{"a": ' + DEEP + "}").encode()
    (base / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    refused(run_cli("merge", base, adapter, "--dry-run"), None,
            [str(base / "model.safetensors"), "corrupt safetensors header"])


def _own_file(tmp_path: Path, change) -> Path:
    """Our own .safetensors adapter with its `adaptertools` metadata entry changed."""
    path = tmp_path / "adapter.safetensors"
    at.save(make_adapter(), path, format="safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    info = json.loads(metadata["adaptertools"])
    metadata["adaptertools"] = change(info)
    save_file(tensors, path, metadata=metadata)
    return path


def _set_entry(field, value):
    def change(info):
        info["tensors"][Q0][field] = value
        return json.dumps(info)
    return change


def _set_metadata(key, value):
    def change(info):
        info["metadata"][key] = value
        return json.dumps(info)
    return change


OWN_FILE_CASES = {
    "scale-string": (_set_entry("scale", "x"), ["`scale` of " + Q0, "a number"]),
    "weight_shape-number": (_set_entry("weight_shape", 5), ["`weight_shape` of " + Q0]),
    "layer-number": (_set_entry("layer", 5), ["`layer` of " + Q0]),
    "entry-list": (lambda info: json.dumps({**info, "tensors": {Q0: [1]}}), [Q0, "a list"]),
    "tensors-list": (lambda info: json.dumps({**info, "tensors": [1]}), ["`tensors`", "a list"]),
    "metadata-list": (lambda info: json.dumps({**info, "metadata": [1]}), ["`metadata`", "a list"]),
    "peft_config-list": (_set_metadata("peft_config", [1]), ["`peft_config`", "a list"]),
    "peft_config-field": (_set_metadata("peft_config", {"use_rslora": "yes"}), ["`use_rslora`"]),
    "gguf_base-incomplete": (_set_metadata("gguf_base", {"arch": "llama"}), ["base model facts"]),
    "deep": (lambda info: '{"tensors": ' + DEEP + "}", ["`adaptertools` metadata", "JSON"]),
}


@pytest.mark.parametrize("case", OWN_FILE_CASES)
def test_own_safetensors_metadata_damaged(tmp_path, case):
    change, fragments = OWN_FILE_CASES[case]
    path = _own_file(tmp_path, change)
    out = tmp_path / "converted"
    refused(run_cli("convert", path, out, "--to", "peft"), out, [str(path), *fragments])


@pytest.fixture(scope="module")
def own_gguf(tiny):
    root, bases, adapter = tiny
    path = root / "own.gguf"
    at.convert(adapter, path, to="gguf", base=bases["f32"])
    return path


def _rewrite_replacing(src: Path, dst: Path, key: str, value) -> Path:
    """A copy of the GGUF file ``src`` whose string field ``key`` holds ``value`` (or, for a
    number, whose float32 field ``key`` does)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.get_field("general.architecture").contents())
    for name, field in reader.fields.items():
        if name.startswith(("GGUF.", "general.architecture")) or name == key:
            continue
        writer.add_key_value(name, field.contents(), field.types[0],
                             field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    if isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_float32(key, value)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _gguf_info(path: Path) -> dict:
    import gguf

    return json.loads(gguf.GGUFReader(str(path)).get_field("adaptertools.lora").contents())


GGUF_CASES = {
    "not-json": (lambda info: "{", ["`adaptertools.lora`", "not a JSON object"]),
    "deep": (lambda info: '{"a": ' + DEEP + "}", ["`adaptertools.lora`", "not a JSON object"]),
    "no-fold": (lambda info: json.dumps({**info, "tensors": {
        k: {kk: vv for kk, vv in v.items() if kk != "fold"} for k, v in info["tensors"].items()}}),
        ["`fold` of blk.", "missing"]),
    "restore-out-of-range": (lambda info: json.dumps({**info, "tensors": {
        k: {**v, "fold": 0.5, "restore": [[10 ** 9, 1]]} for k, v in info["tensors"].items()}}),
        ["blk.", "`restore`", "outside its tensor"]),
    "base-incomplete": (lambda info: json.dumps({**info, "base": {"arch": "llama"}}),
                        ["base model facts"]),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_own_gguf_metadata_damaged(own_gguf, tmp_path, case):
    src = own_gguf
    change, fragments = GGUF_CASES[case]
    path = _rewrite_replacing(src, tmp_path / "changed.gguf", "adaptertools.lora",
                              change(_gguf_info(src)))
    out = tmp_path / "converted"
    refused(run_cli("convert", path, out, "--to", "peft"), out, [str(path), *fragments])


def test_gguf_alpha_of_the_wrong_type(own_gguf, tmp_path):
    src = own_gguf
    path = _rewrite_replacing(src, tmp_path / "changed.gguf", "adapter.lora.alpha", "sixteen")
    out = tmp_path / "converted"
    refused(run_cli("convert", path, out, "--to", "peft"), out,
            [str(path), "adapter.lora.alpha", "not a number"])


def _declares(folder: Path, nbytes: int) -> Path:
    """``folder``'s weights replaced by one lora_A tensor of ``nbytes`` bytes of F32, honestly:
    the file is that long (sparse: nothing is written but the header)."""
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    header = {key: {"dtype": "F32", "shape": [8, nbytes // 32], "data_offsets": [0, nbytes]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = folder / WEIGHTS
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + nbytes)
    return path


def test_adapter_declaring_a_100_gb_tensor(tiny, tmp_path):
    _, bases, _ = tiny
    folder = write_peft(tmp_path / "adapter")
    try:
        path = _declares(folder, 100 * 10 ** 9)
    except OSError as exc:                        # a file system without sparse files
        pytest.skip(f"cannot create a sparse 100 GB file here: {exc}")
    out = tmp_path / "out"
    fragments = [str(path), "100.00 GB", "q_proj.lora_A.weight", "loaded whole", "available"]
    for args in (["inspect", folder], ["convert", folder, out, "--to", "safetensors"],
                 ["merge", bases["f32"], folder, "--out", out]):
        refused(run_cli(*args), out, fragments)


def test_adapter_larger_than_available_memory(tmp_path, monkeypatch):
    """The limit is the memory available, whatever the size: an ordinary adapter is refused when
    less is available, and loads when enough is."""
    import adaptertools._io as _io

    folder = write_peft(tmp_path / "adapter")
    need = sum(t.numel() * t.element_size() for t in load_file(folder / WEIGHTS).values())
    monkeypatch.setattr(_io, "available_memory", lambda: need - 1)
    with pytest.raises(UnsupportedError, match="loaded whole"):
        at.load(folder)
    monkeypatch.setattr(_io, "available_memory", lambda: need)
    assert len(at.load(folder).weights) == len(make_adapter().weights)


# ============================================================================ 3. int8 / FP8 bases

@pytest.mark.parametrize("dtype, fragments", [
    (torch.int8, ["I8 (int8)", "quantization_config"]),
    (torch.float8_e4m3fn, ["F8_E4M3 (float8_e4m3fn)", "FP8"]),
])
def test_merge_into_a_non_float_weight(tiny, tmp_path, dtype, fragments):
    _, bases, adapter = tiny
    base = Path(shutil.copytree(bases["f32"], tmp_path / "base"))
    edit_tensors(base / "model.safetensors", lambda t: t.update({Q0: (t[Q0] * 100).to(dtype)}))
    out = tmp_path / "merged"
    for extra in ([], ["--dry-run"]):
        refused(run_cli("merge", base, adapter, "--out", out, *extra), out,
                [str(base / "model.safetensors"), Q0, *fragments, "F32, F16 and BF16"])


# ============================================================================ 4. pickles

class RunsSystem:
    """Unpickling this calls ``os.system`` (``posix.system``): it must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "PWNED"
    folder = write_peft(tmp_path / "adapter")
    (folder / WEIGHTS).unlink()
    torch.save({"base_model.model.x.lora_A.weight": RunsSystem(marker)},
               folder / "adapter_model.bin")
    out = tmp_path / "out"
    for run in (run_cli, run_cli):
        line = refused(run("convert", folder, out, "--to", "safetensors"), out,
                       [str(folder / "adapter_model.bin"), "posix.system", "would run code",
                        "safetensors", "trusted"])
        assert "weights_only" not in line and "Re-running" not in line
    assert not marker.exists()


def test_gguf_adapter_larger_than_available_memory(own_gguf, monkeypatch):
    """GGUF adapters are loaded whole too (as float32 at most): the same refusal."""
    import adaptertools._io as _io

    monkeypatch.setattr(_io, "available_memory", lambda: 1000)
    with pytest.raises(UnsupportedError, match=f"{own_gguf}: .*loaded whole"):
        at.load(own_gguf)
