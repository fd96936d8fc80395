"""The torch-free light path (adaptertools/light/): ``inspect`` of PEFT and MLX adapters gives
today's torch path's report, without importing torch.

Each case is inspected twice in process, light (the default) and with ADAPTERTOOLS_LIGHT=0
(today's path): every field equal, except the spectra's figures (delta_norm, effective_rank,
total_delta_norm), numpy's float64 LAPACK against torch's, within 1e-12 relative. Both take
the same float64 QRs and SVD of the same exactly widened factors; they differ in rounding
order only: a few ulps of float64 (2.2e-16) per value, far below 1e-12 for these ranks.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import adaptertools as at
from adaptertools.adapter import Adapter, LoraWeight
from adaptertools.light import route
from adaptertools.tiny import TinyLlama, make_adapter

SPECTRA = ("delta_norm", "effective_rank", "total_delta_norm")
RTOL = 1e-12


def _lora(rows: int, cols: int, rank: int = 4, seed: int = 0, dtype=torch.float32, **kw):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(rank, cols, generator=gen) / cols ** 0.5).to(dtype)
    b = (torch.randn(rows, rank, generator=gen) * 0.01).to(dtype)
    return LoraWeight(a=a, b=b, scale=2.0, **kw)


def _cases() -> dict:
    """name -> (Adapter, format): the layer kinds, dtypes, extras and problems inspect reports."""
    plain = make_adapter()
    name = next(iter(plain.weights))
    zero = make_adapter()
    zero.weights[name] = replace(zero.weights[name], b=torch.zeros_like(zero.weights[name].b))
    gen = torch.Generator().manual_seed(5)
    dora = Adapter(weights={
        "model.layers.0.self_attn.q_proj.weight": replace(
            _lora(64, 64), magnitude=torch.rand(64, generator=gen) + 0.5,
            bias=torch.randn(64, generator=gen)),
        "model.layers.0.mlp.up_proj.weight": replace(
            _lora(128, 64, seed=1), magnitude=torch.rand(128, generator=gen) + 0.5,
            bias=torch.randn(128, generator=gen))})
    kinds = Adapter(weights={
        "transformer.h.0.attn.c_attn.weight": _lora(64, 192, layer="conv1d"),   # stored (in, out)
        "model.embed_tokens.weight": _lora(256, 64, seed=2, layer="embedding"),
        "unet.conv_in.weight": _lora(8, 4 * 3 * 3, seed=3, layer="conv", weight_shape=(8, 4, 3, 3)),
    })
    full = make_adapter()
    full.replacements["lm_head.weight"] = torch.randn(256, 64, generator=gen)
    return {
        "fp32": (plain, "peft"),
        "bf16": (make_adapter(dtype=torch.bfloat16), "peft"),
        "fp16": (make_adapter(dtype=torch.float16, rank=4), "peft"),
        "nan": (make_adapter(), "peft"),         # a NaN planted in the file (_plant_nan)
        "zero_b": (zero, "peft"),
        "dora_bias": (dora, "peft"),
        "conv1d_embedding_conv": (kinds, "peft"),
        "modules_to_save": (full, "peft"),
        "mlx": (make_adapter(rank=4), "mlx"),
        "mlx_bf16": (make_adapter(dtype=torch.bfloat16), "mlx"),
        "ours": (dora, "safetensors"),                # our own file (alpha tensors, entries)
        "ours_bf16": (make_adapter(dtype=torch.bfloat16), "safetensors"),
        "ours_kinds": (kinds, "safetensors"),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("light")
    out = {}
    for case, (adapter, fmt) in CASES.items():
        out[case] = root / (case + (".safetensors" if fmt == "safetensors" else ""))
        at.save(adapter, out[case], format=fmt)
    _plant_nan(out["nan"] / "adapter_model.safetensors")
    return out


def _plant_nan(file) -> None:
    """One NaN in the first lora_B (save refuses to write one)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    key = min(k for k in tensors if "lora_B" in k)
    tensors[key].view(-1)[3] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})


def _inspect(path, monkeypatch, *, light: bool, **kw) -> dict:
    monkeypatch.setenv("ADAPTERTOOLS_LIGHT", "1" if light else "0")
    report = at.inspect(path, **kw).to_dict()
    assert route.taken == ["light" if light else "torch"]
    return report


def _assert_same(light, torch_report, where=""):
    """Equal, but for the spectra: within RTOL relative (None where torch's is None)."""
    if isinstance(torch_report, dict):
        assert light.keys() == torch_report.keys(), where
        for key in torch_report:
            if key in SPECTRA and torch_report[key] is not None:
                assert math.isclose(light[key], torch_report[key], rel_tol=RTOL, abs_tol=0), \
                    (where, key, light[key], torch_report[key])
            else:
                _assert_same(light[key], torch_report[key], f"{where}.{key}")
    elif isinstance(torch_report, list):
        assert len(light) == len(torch_report), where
        for i, (x, y) in enumerate(zip(light, torch_report)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert light == torch_report and type(light) is type(torch_report), (where, light)


@pytest.mark.parametrize("case", list(CASES))
def test_light_inspect_is_todays_report(case, written, monkeypatch):
    path = written[case]
    light = _inspect(path, monkeypatch, light=True, layers=True)
    today = _inspect(path, monkeypatch, light=False, layers=True)
    _assert_same(light, today)
    assert light["format"] == CASES[case][1]


def test_the_cases_report_what_they_hold(written, monkeypatch):
    """The cases reach the fields they are for (a parity test of empty fields proves little)."""
    report = {c: _inspect(p, monkeypatch, light=True, layers=True) for c, p in written.items()}
    assert report["bf16"]["dtypes"] == ["bfloat16"] and report["fp16"]["dtypes"] == ["float16"]
    assert report["mlx_bf16"]["dtypes"] == ["bfloat16"]
    assert report["nan"]["total_delta_norm"] is None and "nan/inf" in report["nan"]["layers"][0]["flags"]
    assert any("all-zero B" in p for p in report["zero_b"]["problems"])
    assert report["dora_bias"]["dora"] and report["dora_bias"]["lora_bias"]
    assert report["conv1d_embedding_conv"]["layer_kinds"] == {"conv1d": 1, "embedding": 1, "conv": 1}
    assert report["modules_to_save"]["replaced_tensors"] == ["lm_head.weight"]
    assert report["fp32"]["total_delta_norm"] > 0


def test_fallbacks_give_todays_answer(written, tmp_path, monkeypatch):
    """What the light path does not read (a pickled adapter_model.bin, a --from it has no light
    reader for) goes to the torch path, silently: the same report."""
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    source = written["fp32"]
    (legacy / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    torch.save(load_file(str(source / "adapter_model.safetensors")), legacy / "adapter_model.bin")
    monkeypatch.setenv("ADAPTERTOOLS_LIGHT", "1")
    fallback = at.inspect(legacy).to_dict()
    assert route.taken == ["torch"]
    direct = _inspect(source, monkeypatch, light=False)
    for key in ("adapted_tensors", "parameters", "ranks", "scales", "dtypes"):
        assert fallback[key] == direct[key]


def test_errors_are_todays(written, tmp_path, monkeypatch):
    """A broken adapter fails the light read; the torch path then says what is wrong, in its
    words, and only once."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((written["fp32"] / "adapter_config.json").read_text())
    data = (written["fp32"] / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    messages = {}
    for light in (True, False):
        monkeypatch.setenv("ADAPTERTOOLS_LIGHT", "1" if light else "0")
        with pytest.raises(at.FormatError) as err:
            at.inspect(bad)
        messages[light] = str(err.value)
    assert messages[True] == messages[False] and "adapter_model.safetensors" in messages[True]


def test_format_modules_load_without_torch():
    """The registry finds formats for the light path: every built-in format module (and the
    command line, api) must load without importing torch."""
    code = ("import sys\nfrom adaptertools.registry import formats\nimport adaptertools.api\n"
            "print(sorted(formats()), 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip().endswith("False"), proc.stdout
    assert "'gguf'" in proc.stdout and "'torchtune'" in proc.stdout


@pytest.mark.parametrize("case", ["fp32", "mlx_bf16", "ours"])
def test_inspect_command_does_not_import_torch(case, written):
    stdout, imported = _cli_in_fresh_interpreter("inspect", str(written[case]), "--json")
    assert json.loads(stdout)["adapted_tensors"] > 0
    assert not imported


def _cli_in_fresh_interpreter(*args) -> tuple[str, bool]:
    """``adaptertools ARGS`` in a new interpreter: its stdout, and whether torch got imported."""
    code = ("import sys\nfrom adaptertools.cli import _main\n"
            "try:\n    _main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, "torch imported: True" in proc.stderr


# ----------------------------------------------------------------------------- convert

CONVERT_ARCHS = ("llama", "gpt2", "phi3")     # RoPE-permuted q/k, Conv1D transposes, fused qkv


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    """Per architecture: the HF base folder and a PEFT adapter (real PEFT) on its linear layers,
    also in bf16, and with an rank_pattern (a per-tensor fold: torch's path)."""
    from helpers.models import GGUF_TARGETS, make_causal_lm
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("light_archs")
    dirs = {}
    for arch in CONVERT_ARCHS:
        model = make_causal_lm(arch)
        model.save_pretrained(root / f"hf_{arch}")
        targets = GGUF_TARGETS.get(arch, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"])
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False))
        peft_model.save_pretrained(root / f"peft_{arch}")
        dirs[arch] = (root / f"hf_{arch}", root / f"peft_{arch}")
    base, peft = dirs["llama"]
    bf16 = root / "peft_llama_bf16"
    bf16.mkdir()
    (bf16 / "adapter_config.json").write_text((peft / "adapter_config.json").read_text())
    tensors = load_file(str(peft / "adapter_model.safetensors"))
    save_file({k: t.to(torch.bfloat16) for k, t in tensors.items()},
              str(bf16 / "adapter_model.safetensors"), metadata={"format": "pt"})
    dirs["llama_bf16"] = (base, bf16)
    folded = root / "peft_llama_pattern"
    folded.mkdir()
    config = json.loads((peft / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"q_proj": 16}
    (folded / "adapter_config.json").write_text(json.dumps(config))
    (folded / "adapter_model.safetensors").write_bytes(
        (peft / "adapter_model.safetensors").read_bytes())
    dirs["llama_pattern"] = (base, folded)
    return dirs


def _files(out) -> dict:
    if out.is_file():
        return {"(file)": _content(out)}
    return {p.name: _content(p) for p in sorted(out.iterdir())}


def _content(path) -> bytes:
    return path.read_bytes()


def test_files_with_several_metadata_keys_are_the_same_bytes_every_time(tmp_path):
    """safetensors writes __metadata__ in a Rust HashMap's order, random per map: our own
    format's files (and kohya's, diffusers', through the same writer) differed from one write to the next until
    light.arrays.save_file put the keys in sorted order."""
    adapter = make_adapter(TinyLlama())
    for fmt in ("safetensors",):
        written = set()
        for i in range(4):
            out = tmp_path / f"{fmt}-{i}.safetensors"
            at.save(adapter, out, format=fmt)
            written.add(out.read_bytes())
        assert len(written) == 1, fmt
        length = int.from_bytes(next(iter(written))[:8], "little")
        metadata = json.loads(next(iter(written))[8:8 + length])["__metadata__"]
        assert list(metadata) == sorted(metadata) and len(metadata) > 1, fmt


def _convert_both(src, out_dir, to, monkeypatch, **kw) -> tuple[dict, str]:
    """Converted by the light path (the default) and by today's; the files of each, and the
    path the light run took."""
    files, taken = {}, None
    for light in (True, False):
        monkeypatch.setenv("ADAPTERTOOLS_LIGHT", "1" if light else "0")
        out = out_dir / (("light" if light else "torch") + (".gguf" if to == "gguf" else ""))
        at.convert(src, out, to=to, **kw)
        files[light] = _files(out)
        taken = taken or route.taken[0]
    assert files[True] == files[False]       # byte for byte, every file
    return files[True], taken


# (case, dtype, path the light run takes): a fold rounds in float64 (torch's path)
GGUF_CASES = [(arch, "keep", "light") for arch in CONVERT_ARCHS] + [
    (case, dtype, "light") for case in ("llama", "llama_bf16")
    for dtype in ("fp32", "fp16", "bf16", "q8_0")] + [
    ("llama_bf16", "keep", "light"), ("gpt2", "q8_0", "light"), ("llama_pattern", "keep", "torch")]


@pytest.mark.parametrize(("case", "dtype", "path"), GGUF_CASES)
def test_gguf_both_ways_byte_identical(case, dtype, path, arch_dirs, tmp_path, monkeypatch):
    base, peft = arch_dirs[case]
    files, taken = _convert_both(peft, tmp_path / "to", "gguf", monkeypatch, base=base, dtype=dtype)
    assert taken == path and len(files["(file)"]) > 1000
    gguf_file = tmp_path / "to" / "torch.gguf"
    back, taken = _convert_both(gguf_file, tmp_path / "back", "peft", monkeypatch)
    # back is light unless undoing a fold (the rank_pattern case)
    assert taken == ("torch" if case == "llama_pattern" else "light")
    assert set(back) == {"adapter_config.json", "adapter_model.safetensors"}
    monkeypatch.setenv("ADAPTERTOOLS_LIGHT", "1")
    light = at.inspect(gguf_file, layers=True).to_dict()
    monkeypatch.setenv("ADAPTERTOOLS_LIGHT", "0")
    _assert_same(light, at.inspect(gguf_file, layers=True).to_dict())


@pytest.mark.parametrize("to", ["mlx", "peft", "gguf", "safetensors"])
@pytest.mark.parametrize("case", [c for c in CASES if c != "nan"])
def test_every_case_converts_as_today(case, to, written, tmp_path, monkeypatch):
    """Each inspect case to each format: the same files byte for byte, or the same refusal
    (mlx-lm has no lora_bias, GGUF no DoRA or convolution, ...)."""
    from adaptertools.tiny import TinyLlama

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(TinyLlama().config()))
    kw = {"base": base} if to == "gguf" else {}
    outcome = {}
    for light in (True, False):
        monkeypatch.setenv("ADAPTERTOOLS_LIGHT", "1" if light else "0")
        out = tmp_path / (("light" if light else "torch") +
                          {"gguf": ".gguf", "safetensors": ".safetensors"}.get(to, ""))
        try:
            at.convert(written[case], out, to=to, **kw)
            outcome[light] = _files(out)
        except at.AdapterToolsError as exc:
            outcome[light] = (type(exc), str(exc).replace(str(out), "OUT"))
    assert outcome[True] == outcome[False]
    if case in ("fp32", "bf16", "fp16", "mlx", "mlx_bf16", "zero_b", "ours_bf16"):
        assert isinstance(outcome[True], dict), outcome[True]          # written, not refused


@pytest.mark.parametrize("direction", ["to_gguf", "from_gguf"])
def test_convert_command_does_not_import_torch(direction, arch_dirs, tmp_path):
    base, peft = arch_dirs["llama"]
    gguf_file = tmp_path / "a.gguf"
    if direction == "from_gguf":
        at.convert(peft, gguf_file, to="gguf", base=base)
        args = ["convert", str(gguf_file), str(tmp_path / "back"), "--to", "peft"]
    else:
        args = ["convert", str(peft), str(gguf_file), "--to", "gguf", "--base", str(base)]
    assert not _cli_in_fresh_interpreter(*args)[1]


def test_warnings_are_todays(written, tmp_path, monkeypatch):
    """A light read's warnings (here: the config and the weights disagree) are shown as the
    torch path shows them: the same messages, once each."""
    import warnings

    odd = tmp_path / "odd"
    odd.mkdir()
    config = json.loads((written["fp32"] / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]
    (odd / "adapter_config.json").write_text(json.dumps(config))
    (odd / "adapter_model.safetensors").write_bytes(
        (written["fp32"] / "adapter_model.safetensors").read_bytes())
    shown = {}
    for light in (True, False):
        monkeypatch.setenv("ADAPTERTOOLS_LIGHT", "1" if light else "0")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            at.inspect(odd)
        assert route.taken == ["light" if light else "torch"]
        shown[light] = [(w.category, str(w.message)) for w in caught]
    assert shown[True] == shown[False] and shown[True]


@pytest.mark.parametrize("claims", [False, True])
def test_a_plugin_format_sniffs_first(claims, written, tmp_path, monkeypatch):
    """A plugin may sniff before our formats: the registry decides, as before; a path the
    plugin claims is the plugin's, read by the torch path."""
    import importlib

    from adaptertools import registry

    root = tmp_path / "site"
    info = root / "lightplugin-0.1.dist-info"
    info.mkdir(parents=True)
    (root / "lightplugin_fmt.py").write_text(
        f"SNIFF_ORDER = 1\ndef sniff(path):\n    return {claims}\n"
        "def read(path):\n    from adaptertools.adapter import Adapter\n"
        "    return Adapter(metadata={'source_format': 'plugin'})\n")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lightplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n"
                                           "lightplugin = lightplugin_fmt\n")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    registry.formats.cache_clear()
    monkeypatch.setenv("ADAPTERTOOLS_LIGHT", "1")
    try:
        assert at.inspect(written["fp32"]).format == ("lightplugin" if claims else "peft")
        assert route.taken == ["torch" if claims else "light"]
    finally:
        registry.formats.cache_clear()
        sys.modules.pop("lightplugin_fmt", None)


@pytest.mark.parametrize(("dtype", "value"), [("fp16", 1e5), ("q8_0", 1e7)])   # > 65504, 127 x
def test_too_large_for_the_dtype_is_todays_refusal(dtype, value, written, tmp_path, monkeypatch):
    """Values beyond what the GGUF dtype holds: the light cast refuses them as torch's does."""
    from safetensors.torch import load_file, save_file

    from adaptertools.tiny import TinyLlama

    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text((written["fp32"] / "adapter_config.json").read_text())
    tensors = load_file(str(written["fp32"] / "adapter_model.safetensors"))
    key = min(k for k in tensors if "lora_B" in k)
    tensors[key].view(-1)[5] = value
    save_file(tensors, str(big / "adapter_model.safetensors"), metadata={"format": "pt"})
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(TinyLlama().config()))
    refusals = {}
    for light in (True, False):
        # the light run alone (no fallback that would answer in torch's words)
        monkeypatch.setattr(route, "light_or_torch", lambda run, light=light: run(light))
        with pytest.raises(at.UnsupportedError) as err:
            at.convert(big, tmp_path / f"{light}.gguf", to="gguf", base=base, dtype=dtype)
        refusals[light] = str(err.value)
    assert refusals[True] == refusals[False] and "do not fit" in refusals[True]


def test_cast_rounds_as_tensor_to():
    """light.arrays.cast against torch's Tensor.to, bit for bit: float32 values over every
    magnitude float32 holds (subnormals, overflow to Inf in the narrower types, ties) into
    float16 and bfloat16, and bfloat16 into float16 and float32."""
    import numpy as np

    from adaptertools.light.arrays import Stored, cast

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=gen) * 10.0 ** torch.randint(-45, 39, (200_000,),
                                                                    generator=gen).float()
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 65520.0, 65519.0, 2 ** -25, -0.0, 0.0])
    x = torch.cat([x[torch.isfinite(x)], ties])

    def bits(t):
        return t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy()

    source = Stored(x.numpy(), "float32")
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        assert np.array_equal(cast(source, name).words.view(bits(x.to(dtype)).dtype),
                              bits(x.to(dtype)))
    b16 = x.to(torch.bfloat16)
    stored = Stored(bits(b16).view(np.uint16), "bfloat16")
    for name, dtype in (("float16", torch.float16), ("float32", torch.float32)):
        assert np.array_equal(cast(stored, name).words.view(bits(b16.to(dtype)).dtype),
                              bits(b16.to(dtype)))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("to", ["peft", "mlx", "safetensors"])
@pytest.mark.parametrize("case", ["fp32", "bf16", "mlx_bf16", "ours"])
def test_casts_convert_as_today(case, to, dtype, written, tmp_path, monkeypatch):
    """--dtype to PEFT, MLX and our format on the light path (Stored.to): today's files."""
    outcome = {}
    for light in (True, False):
        monkeypatch.setenv("ADAPTERTOOLS_LIGHT", "1" if light else "0")
        out = tmp_path / (("light" if light else "torch") + (".safetensors" if to == "safetensors"
                                                              else ""))
        try:
            at.convert(written[case], out, to=to, dtype=dtype)
            outcome[light] = _files(out)
        except at.AdapterToolsError as exc:
            outcome[light] = (type(exc), str(exc).replace(str(out), "OUT"))
        if light:
            assert route.taken == ["light"] or isinstance(outcome[light], tuple)
    assert outcome[True] == outcome[False]
    if not (case == "ours" and to == "mlx"):        # mlx-lm has no lora_bias
        assert isinstance(outcome[True], dict), outcome[True]
