"""llama.cpp as the oracle: our GGUF LoRA applied by llama.cpp gives PEFT's logits.

For tiny Llama / Mistral / Qwen2 / Qwen3 models (seeded random weights, float32) and adapters made
by the real PEFT, the adapter converted by ``adaptertools.convert(..., to="gguf")`` and loaded by
llama.cpp (llama-cpp-python) on a GGUF copy of the base (tests/helpers/gguf_base.py) must
reproduce the unmerged PeftModel's logits within 1e-4 (measured: a few 1e-6, FORMATS.md "Noise
floors"). Every case also checks that the adapter matters (logits without it are far off), so a converter that
dropped or mangled the LoRA could not pass.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import adaptertools as at
from adaptertools.errors import UnsupportedError

from helpers.gguf_base import ARCHS, IDS, llama_logits, make_base_model, max_diff, write_gguf_base

# Without llama-cpp-python the file is skipped, except under CI, where it must run: there the
# fixtures import llama_cpp and fail loudly.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None and not os.environ.get("CI"),
    reason="llama-cpp-python is not installed (it is the oracle of these tests)")

TOL = 1e-4                    # ours vs PEFT, max abs over all logits
LORA_MATTERS = 1e-2           # base alone vs PEFT must be at least this far apart
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTN + ["gate_proj", "up_proj", "down_proj"]

PATTERNS = dict(rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
                alpha_pattern={"layers.1.self_attn.q_proj": 3, "k_proj": 5.5})
EMBED_LM_HEAD = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"])
# case -> (model kind, LoraConfig kwargs, save_pretrained kwargs)
CASES = {
    "llama-plain": ("llama", dict(r=4, lora_alpha=8, target_modules=ALL), {}),
    "llama-rslora": ("llama", dict(r=8, lora_alpha=6, use_rslora=True, target_modules=ALL), {}),
    "llama-patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=ALL, **PATTERNS), {}),
    # PEFT's default save (save_embedding_layers "auto") also stores the untouched base
    # embedding and lm_head as `base_layer.weight`; without them, only the LoRA factors
    "llama-embed-lm_head": ("llama", EMBED_LM_HEAD, {}),
    "llama-embed-lm_head-factors-only": ("llama", EMBED_LM_HEAD, dict(save_embedding_layers=False)),
    "mistral-plain": ("mistral", dict(r=4, lora_alpha=8, target_modules=ALL), {}),
    "qwen2-plain": ("qwen2", dict(r=4, lora_alpha=8, target_modules=ALL), {}),
    "qwen2-rslora": ("qwen2", dict(r=8, lora_alpha=6, use_rslora=True, target_modules=ATTN), {}),
    "qwen2-patterns": ("qwen2", dict(r=4, lora_alpha=8, target_modules=ALL, **PATTERNS), {}),
    "qwen3-plain": ("qwen3", dict(r=4, lora_alpha=8, target_modules=ALL), {}),
}
# built like CASES, but llama.cpp must never load them
EXTRA_CASES = {
    "qwen2-tied-embed": ("qwen2",
                         dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
                         dict(save_embedding_layers=False)),
}


@dataclass
class Base:
    model: torch.nn.Module    # the float32 transformers model
    hf_dir: Path              # save_pretrained of it (config.json + model.safetensors)
    gguf: Path                # the same weights as a GGUF model (tests/helpers/gguf_base.py)


@dataclass
class Case:
    base: Base
    peft_dir: Path            # PEFT save_pretrained
    ours: Path                # where adaptertools.convert(peft_dir, ..., to="gguf") writes
    reference: np.ndarray     # unmerged PeftModel logits on IDS, (len(IDS), vocab)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """kind -> Base, each built (and written twice) once per module, on first use."""
    if importlib.util.find_spec("llama_cpp") is None:   # only reached under CI (pytestmark)
        pytest.fail("llama-cpp-python is not installed; CI must install it for these tests")

    root, built = tmp_path_factory.mktemp("gguf_bases"), {}

    def get(kind: str) -> Base:
        if kind not in built:
            model = make_base_model(kind)
            hf_dir = root / kind
            model.save_pretrained(hf_dir, safe_serialization=True)
            gguf_path = write_gguf_base(model, root / f"{kind}.gguf", ARCHS[kind][2])
            built[kind] = Base(model, hf_dir, gguf_path)
        return built[kind]
    return get


@pytest.fixture(scope="module")
def cases(bases, tmp_path_factory):
    """case name -> Case: PEFT adapter saved, PEFT reference logits, our GGUF conversion."""
    from peft import LoraConfig, get_peft_model

    root, built = tmp_path_factory.mktemp("gguf_adapters"), {}

    def get(name: str, convert: bool = True) -> Case:
        if name not in built:
            kind, kwargs, save_kwargs = {**CASES, **EXTRA_CASES}[name]
            base = bases(kind)
            peft_model = get_peft_model(copy.deepcopy(base.model),
                                        LoraConfig(init_lora_weights=False, **kwargs))
            gen = torch.Generator().manual_seed(sum(map(ord, name)))
            with torch.no_grad():   # trained-looking factors: a visible, not dominant, change
                for pname, p in peft_model.named_parameters():
                    if "lora_" in pname:
                        p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            peft_model.eval()
            with torch.no_grad():
                reference = peft_model(torch.tensor([IDS])).logits[0].double().numpy()
            peft_dir = root / f"peft_{name}"
            peft_model.save_pretrained(peft_dir, **save_kwargs)
            built[name] = Case(base, peft_dir, root / f"{name}.gguf", reference)
        case = built[name]
        if convert and not case.ours.exists():
            at.convert(case.peft_dir, case.ours, to="gguf", base=case.base.hf_dir)
        return case
    return get


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_gguf_base_matches_transformers(bases, kind):
    """The helper's GGUF base is faithful by itself (else every LoRA comparison is moot)."""
    base = bases(kind)
    with torch.no_grad():
        expected = base.model(torch.tensor([IDS])).logits[0].double().numpy()
    assert max_diff(llama_logits(base.gguf), expected) <= TOL


@pytest.mark.parametrize("name", list(CASES))
def test_llamacpp_applies_our_adapter_like_peft(cases, name):
    case = cases(name)
    ours = max_diff(llama_logits(case.base.gguf, case.ours), case.reference)
    without = max_diff(llama_logits(case.base.gguf), case.reference)
    print(f"{name}: ours {ours:.3g}, without the adapter {without:.3g}")
    assert ours <= TOL, f"llama.cpp with our GGUF LoRA is {ours:.3g} off PEFT"
    assert without > LORA_MATTERS, f"the adapter barely matters ({without:.3g}); test is moot"


@pytest.mark.parametrize("name", ["llama-rslora"])
def test_llamacpp_converter_ignores_rslora_we_do_not(cases, name, llama_cpp_converter, tmp_path):
    """llama.cpp's convert_lora_to_gguf.py writes alpha / r for an rsLoRA adapter (alpha / sqrt(r)
    in PEFT): its file is visibly wrong in llama.cpp, ours is not."""
    case = cases(name)
    theirs_path = tmp_path / "theirs.gguf"
    run = subprocess.run([sys.executable, str(llama_cpp_converter), "--outtype", "f32",
                          "--base", str(case.base.hf_dir), "--outfile", str(theirs_path),
                          str(case.peft_dir)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = max_diff(llama_logits(case.base.gguf, theirs_path), case.reference)
    ours = max_diff(llama_logits(case.base.gguf, case.ours), case.reference)
    print(f"{name}: llama.cpp's converter {theirs:.3g}, ours {ours:.3g}")
    assert ours <= TOL
    assert theirs > 1e-3, f"llama.cpp's converter is now right too ({theirs:.3g}): update the docs"


def test_embedding_lora_on_tied_base_is_refused(cases):
    """Never run llama.cpp on this file (it aborts): the conversion itself must refuse."""
    case = cases("qwen2-tied-embed", convert=False)
    with pytest.raises(UnsupportedError, match="tie"):
        at.convert(case.peft_dir, case.ours, to="gguf", base=case.base.hf_dir)
