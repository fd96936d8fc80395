"""Write a tiny transformers model as an F32 GGUF *model* that llama.cpp loads (test helper).

What llama.cpp's own converter (``convert_hf_to_gguf.py``, conversion/llama.py and qwen.py of the
tree vendored by llama-cpp-python 0.3.36) writes for these architectures, reduced to what a tiny
model needs: the hparams of ``TextModel.set_gguf_parameters`` (conversion/base.py), the Llama
RoPE row permutation of q/k (``LlamaModel.permute``, arch "llama" only), and a dummy SentencePiece
("llama") vocabulary, without which llama.cpp refuses the file. Tensor names come from the
project's own map (``hf_to_gguf_name``), so a wrong name there shows up as a failing load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from adaptertools.formats.names import (
    BaseInfo,
    hf_to_gguf_name,
    permute_rows,
    rope_heads,
)

# HF architecture class -> llama.cpp architecture this helper can write
SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
             "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def write_gguf_base(model: torch.nn.Module, path: str | Path, arch: str, *,
                    f16: bool = False) -> Path:
    """Write ``model`` (a float32 ``*ForCausalLM`` of SUPPORTED) to ``path``, GGUF arch ``arch``.

    ``f16``: 2-D weights in F16, 1-D tensors (norms, biases) kept F32, as llama.cpp's converter
    does for ``--outtype f16``."""
    import gguf

    cfg = model.config
    if SUPPORTED.get(type(model).__name__) != arch:
        raise ValueError(f"{type(model).__name__} is not written as {arch!r} by this helper")
    n_head, n_head_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    tied = bool(cfg.tie_word_embeddings)
    base = BaseInfo(arch=arch, n_blocks=cfg.num_hidden_layers, n_head=n_head, n_head_kv=n_head_kv,
                    tied_embeddings=tied)
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if rope.get("rope_type", "default") != "default" or rope_theta is None:
        raise ValueError(f"only plain RoPE with an explicit rope_theta is written; got {rope}")

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-test-model")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    # hparams, as TextModel.set_gguf_parameters writes them (keys are "<arch>.<key>")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_rope_dimension_count(head_dim)      # LlamaModel writes it; harmless for Qwen
    if arch == "llama":
        writer.add_vocab_size(cfg.vocab_size)
    writer.add_key_length(head_dim)                # base.py writes these when config has head_dim
    writer.add_value_length(head_dim)

    # vocabulary: <unk> <s> </s>, the newline byte SPM looks up, then plain pieces
    n_vocab = cfg.vocab_size
    tokens = ["<unk>", "<s>", "</s>", "<0x0A>"] + [f"t{i}" for i in range(4, n_vocab)]
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
              gguf.TokenType.BYTE] + [gguf.TokenType.NORMAL] * (n_vocab - 4))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types([int(t) for t in types])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)

    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue                                # llama.cpp reuses token_embd.weight
        data = tensor.detach().to(torch.float32)
        # shapes (numpy order, HF layout): embed_tokens / lm_head (vocab, hidden);
        # q_proj (heads*hd, hidden), k/v_proj (kv_heads*hd, hidden) and their Qwen2 biases
        # (rows,); o_proj (hidden, heads*hd); gate/up (ff, hidden), down (hidden, ff);
        # norms (hidden,), Qwen3 q_norm/k_norm (hd,)
        heads = rope_heads(name.removesuffix(".bias").removesuffix(".weight") + ".weight", base)
        if heads is not None:                       # arch "llama": rows of q/k (and biases)
            data = permute_rows(data, heads)
        array = np.ascontiguousarray(data.numpy())
        if f16 and array.ndim == 2:
            array = array.astype(np.float16)
        writer.add_tensor(hf_to_gguf_name(name, base), array)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


IDS = [5, 17, 99, 3, 42, 7, 64, 120, 1, 88, 23, 56]   # fixed token ids, no BOS
# kind -> (transformers model class, config class, llama.cpp arch, extra config kwargs)
ARCHS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", "llama", dict(tie_word_embeddings=False)),
    "mistral": ("MistralForCausalLM", "MistralConfig", "llama", dict(tie_word_embeddings=False)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", "qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", "qwen3", dict(tie_word_embeddings=True,
                                                               head_dim=16)),
}


def make_base_model(kind: str, *, hidden: int = 64, intermediate: int = 96) -> torch.nn.Module:
    """A tiny seeded model; K-quant tests need ``hidden`` and ``intermediate`` multiples of 256."""
    import transformers

    model_cls, config_cls, _, extra = ARCHS[kind]
    config = getattr(transformers, config_cls)(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, attn_implementation="eager", **extra)
    torch.manual_seed(2024)
    model = getattr(transformers, model_cls)(config).float().eval()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():   # larger than HF's 0.02 init, so logits are O(1) and far from uniform
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model


def llama_logits(model_path: Path, lora_path: Path | None = None) -> np.ndarray:
    """llama.cpp's logits for every position of IDS (F32 KV cache), (len(IDS), vocab) float64;
    in a child process with the extra buffer types off (``adaptertools.llamacpp``)."""
    from adaptertools.llamacpp import logits

    (rows,) = logits(model_path, [IDS], lora=lora_path, n_ctx=64, n_threads=2)
    return rows.astype(np.float64)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# llama.cpp's file types (llama.h enum llama_ftype) the tests quantize to
FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def llama_quantize(src: Path, dst: Path, ftype: str, *, allow_requantize: bool = False) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize`` in the libllama of llama-cpp-python),
    what ``llama-quantize SRC DST TYPE`` does."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = 2
    params.allow_requantize = allow_requantize
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src}, {ftype}) returned {rc}")
    return dst


def rewrite_gguf(src: Path, dst: Path, tensor=None, extra=None) -> Path:
    """A copy of the GGUF model ``src`` with its metadata, where ``tensor(t)`` may return
    ``(array, raw_dtype)`` to store another tensor under ``t.name`` (None: skip the tensor,
    default: as it is) and ``extra(writer)`` may add keys."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.get_field("general.architecture").contents())
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "general.architecture")):
            continue
        writer.add_key_value(key, field.contents(), field.types[0],
                             field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    if extra is not None:
        extra(writer)
    for t in reader.tensors:
        stored = (np.array(t.data), t.tensor_type) if tensor is None else tensor(t)
        if stored is not None:
            writer.add_tensor(t.name, stored[0], raw_dtype=stored[1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


# Runs one of llama.cpp's converter scripts once per job in a single interpreter (its imports of
# torch, transformers and the vendored gguf-py cost more than a tiny conversion). With
# dummy_vocab, convert_hf_to_gguf.py gets the dummy SentencePiece vocabulary write_gguf_base
# writes in place of each model class's set_vocab (the tiny HF folders have no tokenizer, and
# logits are compared on token ids), and the config's ``rotary_pct`` that GPTNeoXModel and
# Cohere2Model read,
# which transformers 5's AutoConfig folds into rope_parameters.partial_rotary_factor. A failing job is reported and the others still run.
_DRIVER = r"""
import json, runpy, sys
script, jobs, dummy_vocab = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
here = script.rsplit("/", 1)[0]
sys.path[:0] = [here, here + "/gguf-py"]      # what the scripts import: conversion/, gguf-py
failed = []
if dummy_vocab:
    import gguf
    import conversion

    def set_vocab(self):
        n, w = self.hparams["vocab_size"], self.gguf_writer
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>", "<0x0A>"] + [f"t{i}" for i in range(4, n)])
        w.add_token_scores([0.0] * n)
        T = gguf.TokenType
        w.add_token_types([int(T.UNKNOWN), int(T.CONTROL), int(T.CONTROL), int(T.BYTE)]
                          + [int(T.NORMAL)] * (n - 4))
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)

    _get = conversion.get_model_class

    def get_model_class(*args, **kwargs):
        cls = _get(*args, **kwargs)
        cls.set_vocab = set_vocab
        return cls
    conversion.get_model_class = get_model_class
    from conversion.base import ModelBase

    _load = ModelBase.load_hparams

    def load_hparams(*args, **kwargs):
        config = _load(*args, **kwargs)
        rope = config.get("rope_parameters") or {}
        # the pre-v5 key GPTNeoXModel and Cohere2Model read (no factor: full rotary, as in HF)
        config.setdefault("rotary_pct", rope.get("partial_rotary_factor", 1.0))
        return config
    ModelBase.load_hparams = staticmethod(load_hparams)
for argv in jobs:
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    except BaseException as exc:
        failed.append(f"{argv[-1]}: {type(exc).__name__}: {exc}")
print(json.dumps(failed))
"""


def run_llama_cpp_script(script: Path, jobs: list[list[str]], *, dummy_vocab: bool = False,
                         timeout: int = 600) -> list[str]:
    """Run ``script`` (convert_lora_to_gguf.py / convert_hf_to_gguf.py of the sdist) with each
    argument list of ``jobs``; returns one line per failed job."""
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _DRIVER, str(script), json.dumps(jobs),
                          "1" if dummy_vocab else "0"], capture_output=True, text=True,
                         timeout=timeout, check=False)
    if run.returncode != 0 or not run.stdout.strip():
        raise RuntimeError(f"{script.name} driver failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def llama_cpp_bases(converter: Path, hf_dirs: dict[str, Path]) -> dict[str, Path]:
    """name -> the F32 GGUF model llama.cpp's convert_hf_to_gguf.py (beside ``converter``, the
    sdist's convert_lora_to_gguf.py) writes of each HF folder, with the dummy vocabulary, all
    in one interpreter; written beside each folder as ``base_<name>.gguf``."""
    script = converter.with_name("convert_hf_to_gguf.py")
    outputs = {name: folder.parent / f"base_{name}.gguf" for name, folder in hf_dirs.items()}
    failed = run_llama_cpp_script(script, [["--outtype", "f32", "--outfile", str(out),
                                            str(hf_dirs[name])] for name, out in outputs.items()],
                                  dummy_vocab=True)
    assert not failed, failed
    return outputs


def gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a GGUF file: name -> (type name, raw data as gguf-py reads it)."""
    import gguf

    return {t.name: (t.tensor_type.name, np.array(t.data))
            for t in gguf.GGUFReader(str(path)).tensors}


def lora_folder(model: torch.nn.Module, folder: Path, targets) -> np.ndarray:
    """An r = 4, alpha 8 PEFT LoRA on ``targets`` of ``model`` (random A and B, as
    helpers.peft_adapters.perturb_trainables makes them) saved to ``folder``; returns PEFT's
    logits with it on IDS, (len(IDS), vocab) float64."""
    from peft import LoraConfig, get_peft_model

    from helpers.peft_adapters import perturb_trainables

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  init_lora_weights=False))
    perturb_trainables(peft_model)
    peft_model.save_pretrained(folder)
    with torch.no_grad():
        return peft_model.eval()(torch.tensor([IDS])).logits[0].double().numpy()


def runtime_loras(root: Path, folders: dict[str, tuple[Path, Path]], bases: dict[str, Path]):
    """get(name) -> (our GGUF adapter of the PEFT folder, llama.cpp's logits of the GGUF base
    with it as the runtime LoRA), each computed once; ``folders``: name -> (HF base folder, PEFT
    adapter folder), ``bases``: name -> GGUF base."""
    import adaptertools as at

    done: dict[str, tuple[Path, np.ndarray]] = {}

    def get(name: str) -> tuple[Path, np.ndarray]:
        if name not in done:
            ours = root / f"{name}.gguf"
            at.convert(folders[name][1], ours, to="gguf", base=folders[name][0])
            done[name] = ours, llama_logits(bases[name], ours)
        return done[name]
    return get


def decoded(kind: str, data: np.ndarray) -> np.ndarray:
    """A GGUF tensor's values in float64 (gguf-py's dequantization for block types)."""
    import gguf

    if kind in ("F32", "F16"):
        return data.astype(np.float64)
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]).astype(np.float64)


def q8_0_steps(data: np.ndarray) -> np.ndarray:
    """Each value's Q8_0 step d (its block's fp16 scale), the shape of the decoded tensor:
    a block is 2 bytes of d and 32 int8 values, x = d * q."""
    blocks = data.reshape(*data.shape[:-1], -1, 34)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float64)
    return np.repeat(d, 32, axis=-1)


def check_q8_0_keep_merge(base_f32: Path, merged_f32: Path, base_q8_0: Path,
                          merged_q8_0: Path) -> tuple[set[str], float]:
    """A keep-type merge into the Q8_0 base ``base_q8_0`` (llama.cpp's quantization of the F32
    base ``base_f32``), against the same adapter merged into ``base_f32``: every tensor keeps
    its type, untouched ones their bytes, and each adapted one holds (the Q8_0 base decoded +
    the F32 merge's delta) to one Q8_0 rounding. Q8_0 (ggml's quantize_row_q8_0_ref, gguf-py's
    numpy copy) rounds q = round(x / d) with d = amax / 127 in fp32 and stores d in fp16, so
    |x - fp16(d) q| <= d / 2 + 127 |d - fp16(d)| <= (1/2 + 127 * 2^-11) d per value, d its
    block's step (2^-10 relative slack for the fp32 fold); F32 / F16 tensors llama.cpp left
    unquantized hold it to one rounding of their type. Each delta must be over 10 steps, so a
    misplaced or missing one cannot pass. Returns (adapted tensors, worst error in steps)."""
    base32, merged32 = gguf_tensors(base_f32), gguf_tensors(merged_f32)
    qbase, ours = gguf_tensors(base_q8_0), gguf_tensors(merged_q8_0)
    assert {n: t for n, (t, _) in ours.items()} == {n: t for n, (t, _) in qbase.items()}
    touched = {n for n in base32 if not np.array_equal(base32[n][1], merged32[n][1])}
    assert any(qbase[n][0] == "Q8_0" for n in touched)    # (llama.cpp keeps routers in F32)
    worst = 0.0
    for name, (kind, data) in ours.items():
        if name not in touched:
            assert np.array_equal(data, qbase[name][1]), name
            continue
        delta = merged32[name][1].astype(np.float64) - base32[name][1]
        want = decoded(qbase[name][0], qbase[name][1]) + delta
        err = np.abs(decoded(kind, data) - want)
        if kind == "Q8_0":
            step = q8_0_steps(data)
            assert np.all(err <= (0.5 + 127 * 2.0**-11) * step * (1 + 2**-10)), name
            worst = max(worst, float((err / step).max()))
            assert np.abs(delta).max() > 10 * step.max(), name
        else:
            ulp = 2.0**-23 if kind == "F32" else 2.0**-10
            assert np.all(err <= ulp * np.abs(want) + 2.0**-24), (name, kind)
    return touched, worst
