"""HF <-> GGUF tensor names and the per-architecture factor transforms llama.cpp applies.

Names come from gguf-py's own ``TensorNameMap`` (never retyped here). The tables below are the
few facts gguf-py does not hold, each row citing where it comes from in llama.cpp's converter
(``conversion/*.py`` of the tree vendored by llama-cpp-python 0.3.36).

Transforms act on the factors, never on ``B @ A``:
- Llama-family RoPE permutation of q_proj / k_proj rows (``LlamaModel.permute``): rows of the
  delta are rows of B, so B alone is permuted.
- GPT-2 Conv1D weights are stored (in, out) in HF and (out, in) in GGUF (``GPT2Model``
  ``modify_tensors`` transposes them): the delta transposes, i.e. A and B swap and transpose.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .._io import read_json, require_exists
from ..errors import FormatError, UnsupportedError

if TYPE_CHECKING:     # imported where used: a PEFT reader without torch (light/) imports this
    import torch

# HF architecture class -> llama.cpp architecture (``@ModelBase.register`` in conversion/*.py),
# one row per class, naming the llama.cpp model class whose ``modify_tensors`` the factor
# transforms below follow.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",          # llama.py LlamaModel (RoPE permute)
    "MistralForCausalLM": "llama",        # llama.py LlamaModel (RoPE permute)
    "Qwen2ForCausalLM": "qwen2",          # qwen.py Qwen2Model
    "Qwen3ForCausalLM": "qwen3",          # qwen.py Qwen3Model
    "Gemma2ForCausalLM": "gemma2",        # gemma.py Gemma2Model (norm +1: norms only)
    "Gemma3ForCausalLM": "gemma3",        # gemma.py Gemma3Model (norm +1: norms only)
    "Phi3ForCausalLM": "phi3",            # phi.py Phi3MiniModel (fused qkv / gate_up as stored)
    "GPT2LMHeadModel": "gpt2",            # gpt2.py GPT2Model (Conv1D transposed)
    "GemmaForCausalLM": "gemma",          # gemma.py GemmaModel (norm +1: norms only, lm_head dropped)
    "Starcoder2ForCausalLM": "starcoder2",  # starcoder.py StarCoder2Model (no transform)
    "OlmoForCausalLM": "olmo",            # olmo.py OlmoModel (its own copy of LlamaModel.permute)
    "Olmo2ForCausalLM": "olmo2",          # olmo.py Olmo2Model (no transform)
    "GraniteForCausalLM": "granite",      # granite.py GraniteModel(LlamaModel) (RoPE permute)
    "StableLmForCausalLM": "stablelm",    # stablelm.py StableLMModel (q/k norms stacked: norms only)
    "PhiForCausalLM": "phi2",             # phi.py Phi2Model (no transform)
    "GPTNeoXForCausalLM": "gptneox",      # gptneox.py GPTNeoXModel (qkv rows regrouped, below)
    "FalconForCausalLM": "falcon",        # falcon.py FalconModel (qkv rows regrouped, below)
    "CohereForCausalLM": "command-r",     # command_r.py CommandR2Model (no transform)
    "SmolLM3ForCausalLM": "smollm3",      # llama.py SmolLM3Model(LlamaModel) (RoPE permute)
    "Exaone4ForCausalLM": "exaone4",      # exaone.py Exaone4Model (no transform)
    # qwen.py Qwen2MoeModel: attention, shared expert and its gate as stored; the routed experts
    # and the router as gguf_experts.py lays them (gate_up_proj rows split at inter)
    "Qwen2MoeForCausalLM": "qwen2moe",
    # granite.py GraniteMoeModel(GraniteModel(LlamaModel)) (RoPE permute; attention only, the
    # experts are fused 3-D tensors with no LoRA mapping)
    "GraniteMoeForCausalLM": "granitemoe",
    "Glm4ForCausalLM": "glm4",            # glm.py Glm4Model (q/k reordered only for M-RoPE configs)
    "NemotronForCausalLM": "nemotron",    # nemotron.py NemotronModel (norm +1: norms only)
    "Ernie4_5ForCausalLM": "ernie4_5",    # ernie.py Ernie4_5Model (splits fused qkv/up_gate only)
    "Cohere2ForCausalLM": "cohere2",      # command_r.py Cohere2Model (zero biases dropped)
    "ArceeForCausalLM": "arcee",          # llama.py ArceeModel(LlamaModel) (RoPE permute)
    "SeedOssForCausalLM": "seed_oss",     # olmo.py SeedOssModel (no transform)
    "Olmo3ForCausalLM": "olmo2",          # olmo.py Olmo2Model, registered for Olmo3 (no transform)
    "ApertusForCausalLM": "apertus",      # llama.py ApertusModel(LlamaModel), undo_permute False
    # qwen.py Qwen3MoeModel(Qwen2MoeModel), olmo.py OlmoeModel (experts stacked): attention as
    # stored, routed experts and router by gguf_experts.py
    "Qwen3MoeForCausalLM": "qwen3moe",
    "OlmoeForCausalLM": "olmoe",
    # llama.py LlamaModel (RoPE permute; block_sparse_moe.experts.{e}.w1/w3/w2 stacked into
    # ffn_gate_exps / ffn_up_exps / ffn_down_exps; expert LoRAs: gguf_experts.py)
    "MixtralForCausalLM": "llama",
    # deepseek.py DeepseekV2Model (no q/k permute; experts stacked; kv_b_proj split into
    # attn_k_b / attn_v_b). Its MLA projections take no runtime LoRA: NO_RUNTIME_LORA
    "DeepseekV3ForCausalLM": "deepseek2",
    "HunYuanDenseV1ForCausalLM": "hunyuan-dense",  # hunyuan.py HunYuanModel (no transform)
    # minicpm.py MiniCPM3Model (no transform; kv_b_proj stored whole). Its MLA projections take
    # no runtime LoRA: NO_RUNTIME_LORA
    "MiniCPM3ForCausalLM": "minicpm3",
    # glm.py Glm4MoeModel (no q/k permute: "GLM4V_MOE uses Neox ordering already"), qwen.py
    # Dots1Model(Qwen2MoeModel) (shared experts as stored), ernie.py Ernie4_5MoeModel
    # (Ernie4_5Model: splits fused qkv/up_gate only): attention and shared experts as stored,
    # routed experts (stacked per expert) and router by gguf_experts.py
    "Glm4MoeForCausalLM": "glm4moe",
    "Dots1ForCausalLM": "dots1",
    "Ernie4_5_MoeForCausalLM": "ernie4_5-moe",
    # granite.py GraniteMoeModel, registered for GraniteMoeShared too (RoPE permute; the shared
    # MLP's output_linear as stored; its fused input_linear, which the converter splits at
    # shared_intermediate_size into ffn_gate_shexp / ffn_up_shexp, has no mapping here yet)
    "GraniteMoeSharedForCausalLM": "granitemoe",
}
# transformers' default of ``tie_word_embeddings`` per model_type, for configs that omit it.
TIED_BY_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False,
                   "gemma2": True, "gemma3_text": True, "gemma3": True, "phi3": False, "gpt2": True,
                   "gemma": True, "starcoder2": True, "olmo": False, "olmo2": False,
                   "granite": False, "stablelm": False, "phi": False, "gpt_neox": False,
                   "falcon": True, "cohere": True, "smollm3": True, "exaone4": False,
                   "qwen2_moe": False, "granitemoe": False, "glm4": False, "nemotron": False,
                   "ernie4_5": True, "cohere2": True, "arcee": False, "seed_oss": False,
                   "olmo3": False, "apertus": False, "qwen3_moe": False, "olmoe": False,
                   "mixtral": False, "deepseek_v3": False, "hunyuan_v1_dense": False,
                   "minicpm3": True, "glm4_moe": False, "dots1": False, "ernie4_5_moe": True,
                   "granitemoeshared": False}
# llama.cpp permutes q/k rows for RoPE (``LlamaModel.permute``, ``undo_permute`` True in
# conversion/llama.py LlamaModel and its subclasses GraniteModel, GraniteMoeModel, SmolLM3Model
# and ArceeModel; OlmoModel
# calls it itself); the other converters store q/k as HF does.
ROPE_PERMUTED_ARCHS = frozenset({"llama", "granite", "granitemoe", "smollm3", "arcee", "olmo"})
# GPT-2 Conv1D tensors llama.cpp transposes (conversion/gpt2.py).
TRANSPOSED_ARCHS = frozenset({"gpt2"})
# Fused query_key_value rows llama.cpp regroups as all q, then all k, then all v (a row
# permutation, so B alone moves): GPTNeoXModel.modify_tensors reshapes the rows as
# (n_head, 3, head_dim); FalconModel.modify_tensors as (n_head_kv, n_head / n_head_kv + 2,
# head_dim), each kv group holding its q heads, then one k and one v.
FUSED_QKV_ROWS = {"gptneox": "per_head", "falcon": "per_kv_group"}
# Layers llama.cpp loads a LoRA for but never applies one to: its graph multiplies their weights
# with a plain ggml_mul_mat, not build_lora_mm (src/models/deepseek2.cpp 501-517: wq_a, wq_b,
# wq, wkv_a_mqa; 560 and 592-594: wk_b, wv_b, wkv_b), so a GGUF LoRA there is silently dropped;
# kv_b_proj is moreover split per head into attn_k_b (transposed) and attn_v_b by the converter.
# minicpm3 likewise (measured: llama.cpp's logits with its own converter's LoRA on these four are
# the base's; tests/test_gguf_archs.py), its kv_b_proj stored whole.
NO_RUNTIME_LORA = {"deepseek2": ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa",
                                 "kv_b_proj"),
                   "minicpm3": ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")}
# why, as the refusal says it
NO_RUNTIME_LORA_WHY = {
    "deepseek2": ("multiplies this MLA projection with a plain ggml_mul_mat, not its LoRA hook "
                  "(src/models/deepseek2.cpp)"),
    "minicpm3": ("applies no LoRA to this MLA projection (measured: its logits with its own "
                 "converter's LoRA there are the base's)")}
# llama.cpp's FalconModel reads n_head_kv from num_kv_heads / n_head_kv, else 1 (multi-query)
KV_HEADS_DEFAULT_ONE = frozenset({"falcon"})
# The HF naming each architecture's transformers class uses; picks one of gguf-py's many HF
# aliases when mapping GGUF names back and no base checkpoint names are at hand.
_LLAMA_NAMING = (r"model\.(layers\.\d+\.(self_attn\.(q|k|v|o|qkv)_proj|mlp\.(gate|up|down|gate_up)_proj)"
                 r"|embed_tokens)|lm_head")
HF_NAMING = {
    "llama": _LLAMA_NAMING,
    "gpt2": r"transformer\.(h\.\d+\.(attn\.c_(attn|proj)|mlp\.c_(fc|proj))|wte|wpe)|lm_head",
    "starcoder2": (r"model\.(layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.c_(fc|proj))"
                   r"|embed_tokens)|lm_head"),
    "phi2": (r"model\.(layers\.\d+\.(self_attn\.((q|k|v)_proj|dense)|mlp\.fc(1|2))"
             r"|embed_tokens)|lm_head"),
    "gptneox": (r"gpt_neox\.(layers\.\d+\.(attention\.(query_key_value|dense)"
                r"|mlp\.dense_(h_to_4h|4h_to_h))|embed_in)|embed_out"),
    "falcon": (r"transformer\.(h\.\d+\.(self_attention\.(query_key_value|dense)"
               r"|mlp\.dense_(h_to_4h|4h_to_h))|word_embeddings)|lm_head"),
    "deepseek2": (r"model\.(layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|q_proj"
                  r"|kv_a_proj_with_mqa|kv_b_proj|o_proj)|mlp\.(gate|up|down)_proj"
                  r"|mlp\.shared_experts\.(gate|up|down)_proj|mlp\.gate)|embed_tokens)|lm_head"),
    "minicpm3": (r"model\.(layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa"
                 r"|kv_b_proj|o_proj)|mlp\.(gate|up|down)_proj)|embed_tokens)|lm_head"),
    "granitemoe": (r"model\.(layers\.\d+\.(self_attn\.(q|k|v|o)_proj|shared_mlp\.output_linear)"
                   r"|embed_tokens)|lm_head"),
    "qwen2moe": (r"model\.(layers\.\d+\.(self_attn\.(q|k|v|o)_proj"
                 r"|mlp\.shared_expert\.(gate|up|down)_proj|mlp\.shared_expert_gate)"
                 r"|embed_tokens)|lm_head"),
}
for _arch in ("qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gemma", "olmo", "olmo2", "granite",
              "stablelm", "command-r", "smollm3", "exaone4", "glm4", "nemotron",
              "ernie4_5", "cohere2", "arcee", "seed_oss", "apertus", "qwen3moe", "olmoe",
              "hunyuan-dense"):
    HF_NAMING[_arch] = _LLAMA_NAMING
# DeepSeek-style MoE blocks: attention, dense MLPs, shared experts and the router
_SHARED_EXPERTS_NAMING = (r"model\.(layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj"
                          r"|mlp\.shared_experts\.(gate|up|down)_proj|mlp\.gate)|embed_tokens)"
                          r"|lm_head")
for _arch in ("glm4moe", "dots1", "ernie4_5-moe"):
    HF_NAMING[_arch] = _SHARED_EXPERTS_NAMING


@dataclass(frozen=True)
class BaseInfo:
    """What the GGUF mapping needs to know of the base model."""

    arch: str                   # llama.cpp architecture, e.g. "llama"
    n_blocks: int
    n_head: int
    n_head_kv: int
    tied_embeddings: bool
    # HF tensor name -> stored shape, when the base's weights are at hand; else None
    hf_shapes: dict[str, tuple[int, ...]] | None = None
    source: str = ""
    # the HF folder whose *.safetensors hold the base weights, when they are at hand
    weights_folder: str | None = None

    def to_json(self) -> dict:
        return {"arch": self.arch, "n_blocks": self.n_blocks, "n_head": self.n_head,
                "n_head_kv": self.n_head_kv, "tied_embeddings": self.tied_embeddings}

    @staticmethod
    def from_json(data: dict, source: str) -> "BaseInfo":
        """The inverse of ``to_json``; a FormatError naming ``source`` for anything else."""
        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        fields = {"arch": lambda v: isinstance(v, str), "n_blocks": whole, "n_head": whole,
                  "n_head_kv": whole, "tied_embeddings": lambda v: isinstance(v, bool)}
        bad = next((k for k, ok in fields.items() if not isinstance(data, dict) or k not in data
                    or not ok(data[k])), None)
        if bad is not None:
            raise FormatError(f"{source}: the stored base model facts ({', '.join(fields)}) are "
                              f"incomplete or mistyped (`{bad}`); the file was damaged, convert "
                              "it again (or pass --base)")
        return BaseInfo(arch=data["arch"], n_blocks=data["n_blocks"], n_head=data["n_head"],
                        n_head_kv=data["n_head_kv"], tied_embeddings=data["tied_embeddings"],
                        source=source)


# ----------------------------------------------------------------------------- base info

def unsupported_message(arch: str) -> str:
    """The one refusal for an architecture without a row above (HF class or llama.cpp name)."""
    return (f"architecture {arch}: no GGUF mapping; supported: "
            f"{', '.join(sorted(set(HF_ARCHITECTURES.values())))} "
            f"(HF {', '.join(HF_ARCHITECTURES)})")


def load_base_info(path: str | Path) -> BaseInfo:
    """From an HF model folder, its config.json, or a GGUF model file."""
    path = require_exists(path)
    if path.suffix == ".gguf":
        return base_info_from_gguf(open_gguf(path), path)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise FormatError(f"{path}: no config.json here; --base takes the HF model folder, its "
                          "config.json, or a GGUF model file")
    config = read_json(config_path)
    return _base_info_from_config(config, config_path, config_path.parent)


def _base_info_from_config(config: dict, where: Path, folder: Path) -> BaseInfo:
    architectures = config.get("architectures") or []
    known = [a for a in architectures if a in HF_ARCHITECTURES]
    if not known:
        shown = ", ".join(architectures) if architectures else config.get("model_type")
        raise UnsupportedError(f"{where}: {unsupported_message(shown)}")
    text = config.get("text_config") or config

    def field(*names, default=None):
        for name in names:
            if text.get(name) is not None:
                return text[name]
        if default is None:
            raise FormatError(f"{where}: none of {names} is set; is this a model config.json?")
        return default

    n_head = int(field("num_attention_heads", "n_head"))
    model_type = config.get("model_type", "")
    tied = config.get("tie_word_embeddings", TIED_BY_DEFAULT.get(model_type, True))
    shapes = _header_shapes(folder)
    arch = HF_ARCHITECTURES[known[0]]
    kv_default = 1 if arch in KV_HEADS_DEFAULT_ONE else n_head
    return BaseInfo(arch=arch,
                    n_blocks=int(field("num_hidden_layers", "n_layer")), n_head=n_head,
                    n_head_kv=int(field("num_key_value_heads", "num_kv_heads", "n_head_kv",
                                        default=kv_default)),
                    tied_embeddings=bool(tied), hf_shapes=shapes, source=str(where),
                    weights_folder=str(folder) if shapes is not None else None)


def read_base_tensor(base: BaseInfo, name: str) -> torch.Tensor | None:
    """One tensor of the base's HF weights, or None when the weights are not at hand."""
    from safetensors import safe_open

    if base.weights_folder is None:
        return None
    for file in sorted(Path(base.weights_folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            if name in fh.keys():
                return fh.get_tensor(name)
    return None


def _header_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes from the safetensors headers of an HF folder (no tensor data is read; no
    torch: safe_open's framework="pt" imports it, the light path converts without it)."""
    from ..tensor_index import read_safetensors_header

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    shapes = {}
    for file in files:
        for entry in sorted(read_safetensors_header(file).tensors, key=lambda e: e.name):
            shapes[entry.name] = tuple(entry.shape)
    return shapes


def base_info_from_gguf(reader, path: Path) -> BaseInfo:
    """The BaseInfo of the GGUF model ``path`` from its already-parsed gguf-py ``reader``
    (merging/bases.GGUFBase.info hands it the one it opened the base with)."""
    arch = field_value(reader, "general.architecture")
    if field_value(reader, "general.type", "model") == "adapter":
        raise FormatError(f"{path}: is a GGUF adapter, not a model; --base takes the base model")
    if arch not in HF_NAMING:
        raise UnsupportedError(f"{path}: {unsupported_message(arch)}")

    def number(key: str, default=None):
        value = field_value(reader, f"{arch}.{key}", default)
        if value is None:
            raise FormatError(f"{path}: GGUF model has no `{arch}.{key}`; it is incomplete")
        return int(value)

    names = {t.name for t in reader.tensors}
    n_head = number("attention.head_count")
    return BaseInfo(arch=arch, n_blocks=number("block_count"), n_head=n_head,
                    n_head_kv=number("attention.head_count_kv", n_head),
                    tied_embeddings="output.weight" not in names, source=str(path))


def open_gguf(path: Path):
    """A gguf-py reader of ``path``, parsed once per file version: parsing a model's metadata
    (a 32000-token vocabulary) takes 1-2 s in gguf-py, and one merge needs it three times (the
    base, its names, a GGUF adapter's mapping). Readers are only read from."""
    stat = os.stat(path)
    return _reader(str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _reader(path: str, inode: int, size: int, mtime_ns: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError, struct errors, numpy errors...
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise FormatError(f"{path}: not a readable GGUF file ({reason}); it is truncated or "
                          "corrupt, write or download it again") from None


def field_value(reader, key: str, default=None):
    """A scalar, string or array field of a GGUF file, or ``default`` when absent."""
    field = reader.get_field(key)
    if field is None:
        return default
    value = field.contents()
    return value


# ----------------------------------------------------------------------------- names

def _tensor_map(base: BaseInfo):
    return _tensor_map_for(base.arch, base.n_blocks)


@functools.cache
def _tensor_map_for(arch: str, n_blocks: int):
    import gguf

    arch_ids = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in arch_ids or arch not in HF_NAMING:
        raise UnsupportedError(unsupported_message(arch))
    return gguf.get_tensor_name_map(arch_ids[arch], n_blocks)


def check_runtime_lora(name: str, base: BaseInfo) -> None:
    """An UnsupportedError naming ``name`` when llama.cpp would load its LoRA and drop it."""
    layer = name.removesuffix(".weight").rpartition(".")[2]
    if layer in NO_RUNTIME_LORA.get(base.arch, ()):
        split = (" (and llama.cpp's converter splits kv_b_proj per head into attn_k_b, "
                 "transposed, and attn_v_b)") if (layer, base.arch) == ("kv_b_proj",
                                                                         "deepseek2") else ""
        raise UnsupportedError(
            f"{name}: llama.cpp's {base.arch} {NO_RUNTIME_LORA_WHY[base.arch]}, so a GGUF "
            f"LoRA on it would be silently ignored{split}; merge the adapter into the base instead "
            "(adaptertools merge), or train without it")


def hf_to_gguf_name(name: str, base: BaseInfo) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``."""
    gguf_name = _tensor_map(base).get_name(name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise UnsupportedError(f"{name}: no GGUF tensor corresponds to it in architecture "
                               f"{base.arch!r}; llama.cpp cannot apply a LoRA there")
    return gguf_name


def gguf_to_hf_name(gguf_name: str, base: BaseInfo) -> str:
    """The inverse of hf_to_gguf_name, choosing the HF alias this architecture really uses."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        stem, suffix = gguf_name, "weight"
    candidates = _hf_aliases(base.arch, base.n_blocks).get(stem, [])
    full = [f"{c}.{suffix}" for c in candidates]
    if base.hf_shapes is not None:
        chosen = [f for f in full if f in base.hf_shapes]
    else:
        pattern = re.compile(rf"(?:{HF_NAMING[base.arch]})")
        chosen = sorted((f for f, c in zip(full, candidates) if pattern.fullmatch(c)), key=len)[:1]
    if not chosen:
        raise UnsupportedError(f"{gguf_name}: no HF tensor of architecture {base.arch!r} maps to "
                               "it; the adapter does not fit this base")
    return chosen[0]


@functools.cache
def _hf_aliases(arch: str, n_blocks: int) -> dict[str, list[str]]:
    """GGUF tensor stem -> every HF module name gguf-py maps onto it (the reverse of its map)."""
    aliases: dict[str, list[str]] = {}
    for key, (_, name) in _tensor_map_for(arch, n_blocks).mapping.items():
        if key != name:
            aliases.setdefault(name, []).append(key)
    return aliases


# ----------------------------------------------------------------------------- transforms

def rope_heads(hf_name: str, base: BaseInfo) -> int | None:
    """Head count of llama.cpp's RoPE row permutation for this tensor, or None if it has none."""
    if base.arch not in ROPE_PERMUTED_ARCHS:
        return None
    if hf_name.endswith("q_proj.weight"):
        return base.n_head
    if hf_name.endswith("k_proj.weight"):
        return base.n_head_kv
    return None


def qkv_row_order(hf_name: str, base: BaseInfo, rows: int) -> torch.Tensor | None:
    """For a fused query_key_value weight of an arch in FUSED_QKV_ROWS: the index ``order``
    with GGUF row ``j`` = HF row ``order[j]`` (all q heads, then all k, then all v); else None.

    gptneox (GPTNeoXModel): HF rows (n_head, 3, head_dim) -> the three slices [:, i].
    falcon (FalconModel): HF rows (n_head_kv, n_head / n_head_kv + 2, head_dim): per kv group
    its q heads, one k, one v -> q of every group, then k, then v."""
    layout = FUSED_QKV_ROWS.get(base.arch)
    if layout is None or not hf_name.endswith("query_key_value.weight"):
        return None
    groups, per = ((base.n_head, 3) if layout == "per_head"
                   else (base.n_head_kv, base.n_head // max(base.n_head_kv, 1) + 2))
    if base.n_head_kv < 1 or rows % (groups * per):
        raise FormatError(f"{hf_name}: {rows} fused q/k/v rows cannot be split into {groups} "
                          f"groups of {per} heads; the adapter does not fit this base (check --base)")
    import torch

    index = torch.arange(rows).reshape(groups, per, rows // groups // per)
    if layout == "per_head":
        return index.transpose(0, 1).reshape(-1)
    return torch.cat([index[:, :-2].reshape(-1), index[:, -2].reshape(-1),
                      index[:, -1].reshape(-1)])


def to_gguf_rows(hf_name: str, base: BaseInfo, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (out, ...) of the HF tensor ``hf_name`` (a delta's B, a DoRA magnitude, a bias)
    in the row order llama.cpp stores that tensor in: the RoPE permutation, the regrouped fused
    q/k/v rows; ``rows`` itself for every other tensor."""
    heads = rope_heads(hf_name, base)
    if heads is not None:
        rows = permute_rows(rows, heads)
    order = qkv_row_order(hf_name, base, int(rows.shape[0]))
    return rows[order] if order is not None else rows


def from_gguf_rows(hf_name: str, base: BaseInfo, rows: torch.Tensor) -> torch.Tensor:
    """The exact inverse of to_gguf_rows."""
    order = qkv_row_order(hf_name, base, int(rows.shape[0]))
    if order is not None:
        rows = rows[inverse_order(order)]
    heads = rope_heads(hf_name, base)
    return unpermute_rows(rows, heads) if heads is not None else rows


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """``inverse`` with ``x[order][inverse] == x``."""
    import torch

    return torch.argsort(order)


def permute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` on the rows of ``rows`` (out, ...): per head, the two
    interleaved RoPE halves become contiguous."""
    out = rows.shape[0]
    if out % (2 * n_head):
        raise FormatError(f"{out} rows cannot be split into {n_head} RoPE heads; the adapter does "
                          "not fit this base (check --base)")
    return (rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def unpermute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """The exact inverse of permute_rows."""
    out = rows.shape[0]
    if out % (2 * n_head):
        raise FormatError(f"{out} rows cannot be split into {n_head} RoPE heads; the adapter does "
                          "not fit this base (check --base)")
    return (rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def dumps_base(base: BaseInfo) -> str:
    return json.dumps(base.to_json(), sort_keys=True)
