"""The golden corpus's cases: tiny inputs built in code (seeded), one adaptertools call each.

A case is ``Case(name, command, build, run)``: ``build(inputs)`` writes the case's input files
under the folder ``inputs``; ``run(inputs, out)`` calls ``adaptertools`` and leaves its output at
``out`` (a folder or a single file). Each case builds its own inputs, so any case runs
alone (``pytest -k``).

The inputs mirror what the suite builds (tests/test_merge_peft.py, test_validate_merged.py,
test_merge_gguf.py, test_merge_bnb.py, test_combine.py, test_extract.py, test_gguf_format.py,
test_reshard.py) with the suite's own builders, tests/helpers/ (models.py, peft_adapters.py,
gguf_base.py); models are the smallest the suite uses. Nothing here runs at import time.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:     # the helpers package, also when run by regenerate.py
    sys.path.insert(0, str(TESTS))

ROOT_MARK = b"<ROOT>"


@dataclass(frozen=True)
class Case:
    name: str
    command: str            # merge | convert | combine | extract
    build: Callable[[Path], None]
    run: Callable[[Path, Path], None]
    out: str = "out"        # the name of the output (folder, or a file for GGUF/safetensors)


# ----------------------------------------------------------------------------- hashing

def tree_digest(path: Path, root: Path, *, skip: tuple[str, ...] = ()) -> tuple[str, dict]:
    """sha256 of every file under ``path`` (or of the file ``path``), in sorted relative-path
    order, each as ``relpath NUL sha256 NL``; the bytes of ``root`` (the case's temporary folder,
    an absolute path some outputs embed) are replaced by ``<ROOT>`` first. Returns the combined
    digest and the per-file digests; files whose name is in ``skip`` are left out."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    marker = str(root).encode()
    per_file = {}
    for f in files:
        rel = f.name if path.is_file() else f.relative_to(path).as_posix()
        if f.name in skip:
            continue
        data = f.read_bytes()
        if f.suffix == ".safetensors":     # the header's length changes with the path: parse it
            data = canonical_safetensors(data, marker)
        else:
            data = data.replace(marker, ROOT_MARK)
        per_file[rel] = hashlib.sha256(data).hexdigest()
    total = hashlib.sha256()
    for rel in sorted(per_file):
        total.update(f"{rel}\0{per_file[rel]}\n".encode())
    return total.hexdigest(), per_file


def canonical_safetensors(data: bytes, marker: bytes) -> bytes:
    """The file with its ``__metadata__`` keys sorted: the safetensors library (Rust) keeps the
    metadata in a HashMap and writes its keys in an order that changes with every process, so a
    file with more than one metadata key is not byte-identical between two runs. Everything
    else (tensor entries, offsets, data) is hashed as written; ``marker`` (the case's folder)
    becomes ``<ROOT>`` in the header only."""
    import json
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    raw = data[8:8 + length]
    header = json.loads(raw.replace(marker, ROOT_MARK))
    if not isinstance(header.get("__metadata__"), dict) and marker not in raw:
        return data
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


# ----------------------------------------------------------------------------- builders

def _torch():
    import torch

    return torch


def llama_base(dtype_name: str = "fp32", arch: str = "llama"):
    """tests/test_merge_peft.py's base: helpers.models.build_base."""
    from helpers.models import build_base

    dtype = {"fp32": _torch().float32, "bf16": _torch().bfloat16}[dtype_name]
    return build_base(arch, dtype)


def peft_adapter(base, folder: Path, seed: int | None = None, **config) -> None:
    """tests/test_merge_peft.py's adapter (helpers.peft_adapters.make_adapter: PEFT wraps a copy,
    perturbed, saved), its config written in a canonical order."""
    from helpers.peft_adapters import make_adapter

    make_adapter(base, folder, seed, **config)
    canonical_peft_config(folder)


# the module the suite's own model classes (the conv net) lived in when hashes.json was recorded
RECORDED_MODEL_MODULE = "conftest"


def canonical_peft_config(folder: Path) -> None:
    """PEFT writes ``target_modules`` (a set) in string-hash order, which changes with every
    process (PYTHONHASHSEED): sorted here, so that the same case gives the same input bytes.
    For a model class of the suite's own (not a transformers one) PEFT also records the module
    that defines it (``auto_mapping.parent_library``): where a test helper lives is no input of
    the code under test, so it is written as it was recorded, RECORDED_MODEL_MODULE."""
    import json

    from helpers.models import TinyConvNet

    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    mapping = config.get("auto_mapping")
    if isinstance(mapping, dict) and mapping.get("parent_library") == TinyConvNet.__module__:
        mapping["parent_library"] = RECORDED_MODEL_MODULE
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _at():
    import adaptertools

    return adaptertools


# ----------------------------------------------------------------------------- merge: PEFT bases

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# tests/test_merge_peft.py's PEFT_MERGE_CASES, copied on purpose rather than imported: the
# corpus's inputs are frozen with its recorded hashes, and an edit to the suite's own cases
# must not silently turn golden cases into skips (their input hashes would no longer match)
PEFT_MERGE_CASES = {
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL)),
    "rslora": ("llama", dict(r=8, lora_alpha=6, use_rslora=True, target_modules=LLAMA_ALL)),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL,
                               rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
                               alpha_pattern={"layers.1.self_attn.q_proj": 3, "k_proj": 5.5})),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA_ALL)),
    "embedding": ("llama", dict(r=4, lora_alpha=16,
                                target_modules=["embed_tokens", "lm_head", "q_proj"])),
    "dora_embedding": ("llama", dict(r=4, lora_alpha=8, use_dora=True,
                                     target_modules=["embed_tokens", "o_proj"])),
    "gpt2_conv1d_lora_bias": ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True, lora_bias=True,
                                           target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2_conv1d_dora": ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True,
                                      target_modules=["c_attn", "c_fc"])),
    "qwen2_lora_bias": ("qwen2", dict(r=4, lora_alpha=8, lora_bias=True,
                                      target_modules=["q_proj", "k_proj", "v_proj"])),
    "modules_to_save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                      modules_to_save=["lm_head", "model.norm"])),
    "conv": ("conv", dict(r=2, lora_alpha=4, target_modules=["conv2", "conv1", "head"])),
}

# tests/test_merge_peft.py WEIGHTED_ADAPTERS, WEIGHTS
WEIGHTED_ADAPTERS = [
    (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]), 11),
    (dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]), 12),
    (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]), 13),
]
WEIGHTS = [0.7, -0.3, 1.5]
DORA_STACK = [(dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]), 21),
              (dict(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "o_proj"]), 22)]


def _save_base(model, folder: Path) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
    else:   # the conv net: a bare safetensors checkpoint
        from safetensors.torch import save_file

        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  folder / "model.safetensors", metadata={"format": "pt"})


def _peft_merge_case(name: str, dtype_name: str) -> Case:
    arch, config = PEFT_MERGE_CASES[name]

    def build(inputs: Path) -> None:
        base = llama_base(dtype_name, arch)
        _save_base(base, inputs / "base")
        peft_adapter(base, inputs / "adapter", **config)

    def run(inputs: Path, out: Path) -> None:
        _at().merge(inputs / "base", [inputs / "adapter"], out)

    return Case(f"merge-peft-{name}-{dtype_name}", "merge", build, run)


def _multi_merge_case(label: str, dtype_name: str, adapters, run_options: dict) -> Case:
    def build(inputs: Path) -> None:
        base = llama_base(dtype_name)
        base.save_pretrained(inputs / "base")
        for i, (config, seed) in enumerate(adapters):
            peft_adapter(base, inputs / f"a{i}", seed, **config)

    def run(inputs: Path, out: Path) -> None:
        folders = [inputs / f"a{i}" for i in range(len(adapters))]
        _at().merge(inputs / "base", folders, out, **run_options)

    return Case(f"merge-{label}-{dtype_name}", "merge", build, run)


def _option_merge_case(label: str, options: dict, dtype_name: str = "fp32") -> Case:
    """tests/test_reshard.py and the dtype casts: one plain adapter, one merge option."""
    def build(inputs: Path) -> None:
        base = llama_base(dtype_name)
        base.save_pretrained(inputs / "base")
        peft_adapter(base, inputs / "adapter", **PEFT_MERGE_CASES["plain"][1])

    def run(inputs: Path, out: Path) -> None:
        _at().merge(inputs / "base", [inputs / "adapter"], out, **options)

    return Case(f"merge-{label}", "merge", build, run)


# ----------------------------------------------------------------------------- merge: GGUF bases

GGUF_LORA = dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL, init_lora_weights=False,
                 rank_pattern={"v_proj": 4}, alpha_pattern={"layers.1.mlp.down_proj": 5})


def _gguf_inputs(inputs: Path, kind: str, *, f16: bool) -> None:
    """tests/test_merge_gguf.py's setup: HF folder, GGUF base, PEFT adapter."""
    from helpers.gguf_base import make_base_model, write_gguf_base
    from helpers.peft_adapters import perturb_trainables
    from peft import LoraConfig, get_peft_model

    model = make_base_model(kind)
    model.save_pretrained(inputs / "hf")
    write_gguf_base(model, inputs / "base.gguf", kind, f16=f16)
    peft_model = get_peft_model(model, LoraConfig(**GGUF_LORA))
    perturb_trainables(peft_model)
    peft_model.save_pretrained(inputs / "peft")
    canonical_peft_config(inputs / "peft")


def _gguf_merge_case(kind: str, f16: bool, adapter: str) -> Case:
    def build(inputs: Path) -> None:
        _gguf_inputs(inputs, kind, f16=f16)

    def run(inputs: Path, out: Path) -> None:
        at = _at()
        lora = inputs / "peft"
        if adapter == "gguf":       # the adapter converted first (its own output not hashed)
            lora = out.parent / "lora.gguf"
            at.convert(inputs / "peft", lora, to="gguf", base=inputs / "hf")
        at.merge(inputs / "base.gguf", [lora], out)

    label = f"{kind}-{'f16' if f16 else 'f32'}-{adapter}"
    return Case(f"merge-gguf-{label}", "merge", build, run, "out.gguf")


# ----------------------------------------------------------------------------- merge: bitsandbytes

BNB_KINDS = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
             "fp4dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                           bnb_4bit_use_double_quant=True),
             "int8": dict(load_in_8bit=True)}


def _bnb_merge_case(kind: str, requantize: str = "keep") -> Case:
    """tests/test_merge_bnb.py's bnb_case, on helpers.models' tiny Llama."""
    def build(inputs: Path) -> None:
        import transformers

        torch = _torch()
        llama_base("fp32").save_pretrained(inputs / "f32")
        q = transformers.BitsAndBytesConfig(**BNB_KINDS[kind], bnb_4bit_compute_dtype=torch.float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            inputs / "f32", quantization_config=q, device_map="cpu", dtype=torch.float32)
        model.save_pretrained(inputs / "base")
        peft_adapter(llama_base("fp32"), inputs / "lora", 7,
                     r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])

    def run(inputs: Path, out: Path) -> None:
        _at().merge(inputs / "base", [inputs / "lora"], out, requantize=requantize)

    return Case(f"merge-bnb-{kind}-{requantize}", "merge", build, run)


# ----------------------------------------------------------------------------- convert

CONVERT_CASES = ["plain", "rslora", "patterns", "dora", "embedding", "dora_embedding",
                 "gpt2_conv1d_lora_bias", "modules_to_save", "conv"]


def _convert_case(name: str, to: str) -> Case:
    arch, config = PEFT_MERGE_CASES[name]
    suffix = {"safetensors": ".safetensors", "peft": ""}[to]

    def build(inputs: Path) -> None:
        base = llama_base("fp32", arch)
        peft_adapter(base, inputs / "adapter", **config)

    def run(inputs: Path, out: Path) -> None:
        at = _at()
        if to == "peft":        # a round trip: PEFT -> safetensors -> PEFT
            raw = out.parent / "raw.safetensors"
            at.convert(inputs / "adapter", raw, to="safetensors")
            at.convert(raw, out, to="peft")
        else:
            at.convert(inputs / "adapter", out, to=to)

    return Case(f"convert-{name}-to-{to}", "convert", build, run, "out" + suffix)


def _gguf_convert_case(kind: str, route: str, dtype: str = "keep") -> Case:
    """tests/test_gguf_format.py: PEFT -> GGUF (with the HF base), and back."""
    def build(inputs: Path) -> None:
        _gguf_inputs(inputs, kind, f16=False)

    def run(inputs: Path, out: Path) -> None:
        at = _at()
        if route == "to-gguf":
            at.convert(inputs / "peft", out, to="gguf", base=inputs / "hf", dtype=dtype)
            return
        lora = out.parent / "a.gguf"
        at.convert(inputs / "peft", lora, to="gguf", base=inputs / "hf")
        to = "peft" if route == "gguf-to-peft" else "safetensors"
        at.convert(lora, out, to=to)

    out = {"to-gguf": "out.gguf", "gguf-to-peft": "out",
           "gguf-to-safetensors": "out.safetensors"}[route]
    return Case(f"convert-gguf-{kind}-{route}-{dtype}", "convert", build, run, out)


# ----------------------------------------------------------------------------- combine

COMBINE_ADAPTERS = [
    (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), 31),
    (dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"]), 32),
]
COMBINE_CASES = {
    "cat": dict(method="cat", weights=[0.6, 0.4]),
    "svd-rank4": dict(method="svd", weights=[1.0, -0.5], rank=4, svd="exact"),
    "svd-energy": dict(method="svd", energy=0.9, svd="exact"),
    "ties": dict(method="ties", density=0.5, rank=4),
    "dare_ties": dict(method="dare_ties", density=0.5, rank=4, seed=3),
    "dare_linear": dict(method="dare_linear", density=0.5, rank=4, seed=3),
    "magnitude_prune": dict(method="magnitude_prune", density=0.5, rank=4),
    "cat-to-safetensors": dict(method="cat", to="safetensors"),
    "materialize": dict(method="cat", materialize=True),
}


def _combine_case(label: str, options: dict) -> Case:
    def build(inputs: Path) -> None:
        base = llama_base("fp32")
        base.save_pretrained(inputs / "base")
        for i, (config, seed) in enumerate(COMBINE_ADAPTERS):
            peft_adapter(base, inputs / f"a{i}", seed, **config)

    def run(inputs: Path, out: Path) -> None:
        kwargs = dict(options)
        if kwargs.get("materialize"):
            kwargs["base"] = inputs / "base"
        _at().combine([inputs / "a0", inputs / "a1"], out, **kwargs)

    out = "out.safetensors" if options.get("to") == "safetensors" else "out"
    return Case(f"combine-{label}", "combine", build, run, out)


# ----------------------------------------------------------------------------- extract

EXTRACT_CASES = {
    "full": dict(energy=1.0),
    "rank4-exact": dict(rank=4, svd="exact"),
    "qv-energy": dict(energy=0.9, targets="q_proj,v_proj"),
    "rank3-to-safetensors": dict(rank=3, svd="exact", to="safetensors"),
}


def _extract_case(label: str, options: dict) -> Case:
    """tests/test_extract.py's llama fixture: a base and a few Adam steps of fine-tuning."""
    def build(inputs: Path) -> None:
        torch = _torch()
        from helpers.models import make_model

        make_model("llama").save_pretrained(inputs / "base")
        torch.manual_seed(11)
        model = make_model("llama").train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(3)
        for _ in range(4):
            ids = torch.randint(0, 96, (4, 12), generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval().save_pretrained(inputs / "tuned")

    def run(inputs: Path, out: Path) -> None:
        kwargs = dict(options)
        _at().extract(inputs / "base", inputs / "tuned", out, **kwargs)

    out = "out.safetensors" if options.get("to") == "safetensors" else "out"
    return Case(f"extract-{label}", "extract", build, run, out)


# ----------------------------------------------------------------------------- the corpus

def all_cases() -> list[Case]:
    cases = [_peft_merge_case(n, d) for n in PEFT_MERGE_CASES for d in ("fp32", "bf16")
             if not (n == "conv" and d == "bf16")]
    for d in ("fp32", "bf16"):
        cases.append(_multi_merge_case("weighted", d, WEIGHTED_ADAPTERS, dict(weights=WEIGHTS)))
    cases.append(_multi_merge_case("stacked-dora", "fp32", DORA_STACK, dict(mode="stacked")))
    cases += [_option_merge_case("dtype-bf16", dict(dtype="bf16")),
              _option_merge_case("dtype-fp16", dict(dtype="fp16")),
              _option_merge_case("reshard-20KB", dict(max_shard_size="20KB")),
              _option_merge_case("reshard-100KB-fp32", dict(max_shard_size="100KB", dtype="fp32"))]
    for kind in ("llama", "qwen2"):
        cases += [_gguf_merge_case(kind, False, "peft"), _gguf_merge_case(kind, True, "peft")]
    cases.append(_gguf_merge_case("llama", True, "gguf"))
    cases += [_bnb_merge_case("nf4"), _bnb_merge_case("fp4dq"), _bnb_merge_case("int8"),
              _bnb_merge_case("nf4", "bf16")]
    for name in CONVERT_CASES:
        for to in ("safetensors", "peft"):
            cases.append(_convert_case(name, to))
    for kind in ("llama", "qwen2"):
        cases += [_gguf_convert_case(kind, "to-gguf"), _gguf_convert_case(kind, "gguf-to-peft"),
                  _gguf_convert_case(kind, "gguf-to-safetensors")]
    cases += [_gguf_convert_case("llama", "to-gguf", "fp16"),
              _gguf_convert_case("llama", "to-gguf", "q8_0")]
    cases += [_combine_case(k, v) for k, v in COMBINE_CASES.items()]
    cases += [_extract_case(k, v) for k, v in EXTRACT_CASES.items()]
    return cases
