"""Tiny models built in code (seeded random weights) and PEFT adapters made with the real PEFT."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# triton's CPU interpreter must be on before anything imports triton (bitsandbytes does, and
# triton.language's own functions are built at import): tests/test_triton_kernels.py runs under it
os.environ.setdefault("TRITON_INTERPRET", "1")


class TinyConvNet(torch.nn.Module):
    """Conv2d -> Conv1d -> Linear: the conv layers PEFT can put LoRA on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = torch.nn.Conv2d(3, 8, kernel_size=3)
        self.conv1 = torch.nn.Conv1d(8, 6, kernel_size=5)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x (batch, 3, 12, 12)
        h = self.conv2(x).mean(dim=-1)                     # (batch, 8, 10)
        return self.head(self.conv1(h).mean(dim=-1))       # (batch, 4)


def make_model(kind: str) -> torch.nn.Module:
    """A deterministic tiny model: same kind, same weights, every call."""
    import transformers

    torch.manual_seed(1234)
    if kind == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
            tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96,
                                         n_positions=64, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "conv":
        model = TinyConvNet()
    else:
        raise ValueError(kind)
    # random, non-trivial biases so lora_bias and merges are exercised on real values
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


def model_input(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if kind == "conv":
        return torch.randn(2, 3, 12, 12, generator=gen)
    return torch.randint(0, 96, (2, 9), generator=gen)


def model_output(model: torch.nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(model_input(kind))
    return out if kind == "conv" else out.logits


@dataclass
class PeftCase:
    name: str
    kind: str
    folder: Path            # what save_pretrained wrote (the adapter folder itself)
    reference: torch.Tensor  # the PEFT model's output on model_input(kind)
    base_state: dict         # base model weights before PEFT wrapped it
    merged_state: dict       # PEFT's merge_and_unload() weights


def perturb_trainables(peft_model: torch.nn.Module, *, seed: int = 99, spread: float = 0.1,
                       modules_to_save: bool = True) -> None:
    """Make every LoRA tensor (and modules_to_save copy) non-trivial, as training would; DoRA
    magnitudes are scaled by up to ``1 + spread``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + spread * torch.rand(p.shape, generator=gen))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "modules_to_save" in name and modules_to_save:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def build_peft_case(tmp_path: Path, name: str, kind: str, config_kwargs: dict, *,
                    adapter_name: str = "default", safe_serialization: bool = True) -> PeftCase:
    from peft import LoraConfig, get_peft_model

    model = make_model(kind)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(**config_kwargs), adapter_name=adapter_name)
    perturb_trainables(peft_model)
    peft_model.eval()
    reference = model_output(peft_model, kind)
    out = tmp_path / f"peft_{name}"
    peft_model.save_pretrained(out, safe_serialization=safe_serialization)
    folder = out if adapter_name == "default" else out / adapter_name
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged_state = {k: v.clone() for k, v in merged.state_dict().items()}
    return PeftCase(name, kind, folder, reference, base_state, merged_state)


def load_with_peft(folder: Path, kind: str) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(make_model(kind), folder).eval()


LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# One case per PEFT feature the foundation issue lists; (kind, LoraConfig kwargs, extra options).
PEFT_CASES = {
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL), {}),
    "rslora": ("llama", dict(r=8, lora_alpha=6, use_rslora=True, target_modules=LLAMA_ALL), {}),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL,
                               rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
                               alpha_pattern={"layers.1.self_attn.q_proj": 3, "k_proj": 5.5}), {}),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA_ALL), {}),
    "embedding_and_modules_to_save": (
        "llama", dict(r=4, lora_alpha=16, target_modules=["embed_tokens", "q_proj", "v_proj"],
                      modules_to_save=["lm_head"]), {}),
    "dora_embedding": ("llama", dict(r=4, lora_alpha=8, use_dora=True,
                                     target_modules=["embed_tokens", "o_proj"]), {}),
    "gpt2_conv1d_lora_bias": ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True, lora_bias=True,
                                           target_modules=["c_attn", "c_proj", "c_fc"]), {}),
    "gpt2_conv1d_dora": ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True,
                                      target_modules=["c_attn", "c_fc"]), {}),
    "conv": ("conv", dict(r=2, lora_alpha=4, target_modules=["conv2", "conv1", "head"]), {}),
    "conv_dora": ("conv", dict(r=3, lora_alpha=3, use_dora=True,
                               target_modules=["conv2", "conv1"]), {}),
    "named_subfolder": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                        {"adapter_name": "mine"}),
    "legacy_bin": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
                   {"safe_serialization": False}),
}


@pytest.fixture(scope="session")
def peft_cases(tmp_path_factory) -> dict[str, PeftCase]:
    """Every case built once per session (building them is the slow part)."""
    root = tmp_path_factory.mktemp("peft_cases")
    return {name: build_peft_case(root, name, kind, kwargs, **options)
            for name, (kind, kwargs, options) in PEFT_CASES.items()}


# ----------------------------------------------------------------------------- GGUF architectures

def make_causal_lm(arch: str, *, tied: bool | None = None) -> torch.nn.Module:
    """A tiny seeded transformers model of each architecture the GGUF format supports."""
    import transformers as tf

    torch.manual_seed(4321)
    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-6)
    configs = {
        "llama": lambda: (tf.LlamaForCausalLM, tf.LlamaConfig(**small, tie_word_embeddings=False)),
        "mistral": lambda: (tf.MistralForCausalLM, tf.MistralConfig(**small, tie_word_embeddings=False)),
        "qwen2": lambda: (tf.Qwen2ForCausalLM, tf.Qwen2Config(**small, tie_word_embeddings=False)),
        "qwen3": lambda: (tf.Qwen3ForCausalLM, tf.Qwen3Config(**small, head_dim=16,
                                                              tie_word_embeddings=False)),
        "gemma2": lambda: (tf.Gemma2ForCausalLM, tf.Gemma2Config(**small, head_dim=16)),
        "gemma3": lambda: (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**small, head_dim=16)),
        "phi3": lambda: (tf.Phi3ForCausalLM, tf.Phi3Config(**small, tie_word_embeddings=False)),
        "gpt2": lambda: (tf.GPT2LMHeadModel, tf.GPT2Config(n_embd=64, n_layer=2, n_head=4,
                                                           vocab_size=128, n_positions=64,
                                                           bos_token_id=1, eos_token_id=2)),
    }
    cls, config = configs[arch]()
    if tied is not None:
        config.tie_word_embeddings = tied
    return cls(config).eval()


GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2")
# every linear layer of the blocks, by each architecture's own module names
GGUF_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


@pytest.fixture(scope="session")
def llama_cpp_converter(tmp_path_factory) -> Path:
    """llama.cpp's own ``convert_lora_to_gguf.py``, from the llama-cpp-python sdist that matches
    the installed llama-cpp-python (downloaded once from PyPI into a cache folder)."""
    import importlib.metadata
    import subprocess
    import sys
    import tarfile

    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed; CI installs the `llama` extra")
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[test,llama]')")
    cache = Path(os.environ.get("ADAPTERTOOLS_TEST_CACHE",
                                Path.home() / ".cache" / "adaptertools-tests"))
    root = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    script = root / "convert_lora_to_gguf.py"
    if script.exists():
        return script
    download = tmp_path_factory.mktemp("sdist")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                             "--no-binary", ":all:", f"llama-cpp-python=={version}",
                             "-d", str(download)], capture_output=True, text=True)
    sdists = list(download.glob("*.tar.gz"))
    if result.returncode or not sdists:
        message = f"cannot fetch the llama-cpp-python {version} sdist: {result.stderr[-300:]}"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    wanted = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers()
                   if "/vendor/llama.cpp/" in m.name
                   and m.name.split("/vendor/llama.cpp/", 1)[1].startswith(wanted)]
        tar.extractall(cache, members=members, filter="data")
    assert script.exists(), f"{script} missing from the sdist"
    return script
