"""The merge engine against the real PEFT and against an independent float64 reference.

Tiny models built in code with seeded weights; each base saved with ``save_pretrained``, each
adapter made, perturbed and saved by PEFT, merged with ``adaptertools.merge`` and read back with
safetensors:

1. one adapter: bit-identical, tensor by tensor, to PEFT's ``merge_and_unload`` on fp32 and bf16
   bases (plain, rsLoRA, patterns, DoRA, embedding, GPT-2 Conv1D, lora_bias, modules_to_save),
   and the merged folder loaded by transformers gives PEFT's merged logits exactly;
2. weighted sums of several adapters equal ``W + sum(w * s * B @ A)`` computed in float64 from the
   raw PEFT files and rounded once (bf16: a tiny fraction off by exactly one ulp; fp32: within a
   derived rounding bound);
3. stacked DoRA equals PEFT merging the adapters one after another; weighted DoRA sums are refused;
4. tied embeddings are untied, keeping the unmerged model's logits;
5. dtype casts, shard layouts, determinism, dry runs and untouched bytes.

What PEFT 0.21.2 does that these tests pin down (read in peft/tuners/lora/layer.py, variants.py):
- ``Embedding.merge`` adds ``delta.to(orig_dtype)``: a bf16 embedding delta is rounded before the
  add (two roundings); a merge of one adapter does the same, so it stays bit-identical.
- ``merge_and_unload`` on a tied model changes the shared tensor, i.e. lm_head too: its merged
  logits are far from the unmerged model's. Ours unties and keeps the unmerged logits.
- ``merge_and_unload(adapter_names=[a, b])`` on one model takes each DoRA norm on the UNMERGED
  base; "one after another" (stacked) is merging a, wrapping the result with b, merging again.
- PEFT saves a targeted embedding's base weight with each adapter; loading it into an already
  merged model would undo the earlier adapters' embedding change, so the stacked reference is
  built from factors-only saves.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.errors import UnsupportedError

from helpers.models import LLAMA_ALL, build_base, make_causal_lm
from helpers.peft_adapters import make_adapter

INDEX = "model.safetensors.index.json"
FP32_UNIT_ROUNDOFF = 2.0 ** -24
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- helpers

def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def raw_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header (parsed here, not by the code under test) and data start."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length)), 8 + length


def raw_tensors(path: Path) -> dict[str, bytes]:
    """Each tensor's stored bytes, straight from the file."""
    header, start = raw_header(path)
    data = path.read_bytes()
    return {name: data[start + info["data_offsets"][0]: start + info["data_offsets"][1]]
            for name, info in header.items() if name != "__metadata__"}


def tensor_order(path: Path) -> list[str]:
    header, _ = raw_header(path)
    names = [n for n in header if n != "__metadata__"]
    return sorted(names, key=lambda n: header[n]["data_offsets"][0])


def logits(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(ids).logits


def load_merged(folder: Path, **options) -> torch.nn.Module:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, **options).eval()


# ----------------------------------------------------------------------------- 1. one adapter vs PEFT

LINEAR_TARGETS = ["q_proj", "v_proj", "down_proj"]
# case -> (architecture, LoraConfig kwargs)
PEFT_MERGE_CASES = {
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL)),
    "rslora": ("llama", dict(r=8, lora_alpha=6, use_rslora=True, target_modules=LLAMA_ALL)),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL,
                               rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
                               alpha_pattern={"layers.1.self_attn.q_proj": 3, "k_proj": 5.5})),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA_ALL)),
    # lm_head as a plain Linear target of an untied model, next to the embedding LoRA
    "embedding": ("llama", dict(r=4, lora_alpha=16,
                                target_modules=["embed_tokens", "lm_head", "q_proj"])),
    "dora_embedding": ("llama", dict(r=4, lora_alpha=8, use_dora=True,
                                     target_modules=["embed_tokens", "o_proj"])),
    "gpt2_conv1d_lora_bias": ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True, lora_bias=True,
                                           target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2_conv1d_dora": ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True,
                                      target_modules=["c_attn", "c_fc"])),
    # Qwen2's q/k/v have biases (o_proj has none: PEFT cannot merge lora_bias there)
    "qwen2_lora_bias": ("qwen2", dict(r=4, lora_alpha=8, lora_bias=True,
                                      target_modules=["q_proj", "k_proj", "v_proj"])),
    "modules_to_save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                      modules_to_save=["lm_head", "model.norm"])),
}


@pytest.fixture(scope="module", params=[(c, d) for c in PEFT_MERGE_CASES for d in DTYPES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def peft_merge(request, tmp_path_factory):
    """(case name, base folder, out folder, report, PEFT merged model) for one case and dtype."""
    name, dtype_name = request.param
    arch, config = PEFT_MERGE_CASES[name]
    root = tmp_path_factory.mktemp(f"{name}_{dtype_name}")
    base = build_base(arch, DTYPES[dtype_name])
    base.save_pretrained(root / "base")
    peft_model = make_adapter(base, root / "adapter", **config)
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    report = at.merge(root / "base", [root / "adapter"], root / "out")
    return name, root / "base", root / "out", report, merged


def test_merge_is_bit_identical_to_peft(peft_merge):
    name, base_dir, out_dir, report, merged = peft_merge
    ours, base = read_folder(out_dir), read_folder(base_dir)
    assert ours.keys() == base.keys()
    expected = merged.state_dict()
    for key, tensor in ours.items():
        assert tensor.dtype == expected[key].dtype, key
        assert torch.equal(tensor, expected[key]), \
            f"{key}: {int((tensor != expected[key]).sum())} of {tensor.numel()} elements differ"
    # the adapter did something, and the report names exactly what
    changed = {k for k in ours if not torch.equal(ours[k], base[k])}
    assert changed and changed == {c["name"] for c in report["changed"]}
    if "bias" in name:
        assert any(k.endswith(".bias") for k in changed)
    if name == "modules_to_save":
        assert {"lm_head.weight", "model.norm.weight"} <= changed


def peft_merged_from_files(base_dir: Path, *adapters: Path) -> torch.nn.Module:
    """The user's PEFT route: load the saved base, then each adapter, merging it in turn.

    (A model cast in memory with ``.to(bfloat16)`` also casts RoPE's ``inv_freq`` buffer, which
    ``from_pretrained`` keeps in fp32: its logits differ, so the reference is loaded from files.)
    """
    from peft import PeftModel

    model = load_merged(base_dir)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def test_merged_folder_gives_peft_merged_logits(peft_merge):
    name, base_dir, out_dir, _, merged = peft_merge
    model = load_merged(out_dir)
    reference = peft_merged_from_files(base_dir, base_dir.parent / "adapter")
    assert model.dtype == reference.dtype == merged.dtype
    vocab = model.config.vocab_size
    assert torch.equal(logits(model, vocab), logits(reference, vocab))
    assert not torch.equal(logits(model, vocab), logits(load_merged(base_dir), vocab))


# ----------------------------------------------------------------------------- 2. weighted sums

# (LoraConfig kwargs, seed): different ranks, one rsLoRA, overlapping targets; the embedding has
# one contribution only: a multi-adapter weighted merge rounds it once too (a merge of a single
# adapter follows PEFT instead, which rounds an embedding delta before adding it)
WEIGHTED_ADAPTERS = [
    (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]), 11),
    (dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]), 12),
    (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]), 13),
]
WEIGHTS = [0.7, -0.3, 1.5]


def reference_deltas(folder: Path, weight: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Straight from PEFT's files, in float64: base tensor name -> (w * s * B @ A, |w * s| |B| @ |A|),
    both in the stored layout, and bias name -> (w * s * lora_B.bias, its absolute value); an
    independent reading of the adapter (no adaptertools code)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(folder / "adapter_model.safetensors")
    r, alpha = config["r"], config["lora_alpha"]
    scale = weight * (alpha / math.sqrt(r) if config["use_rslora"] else alpha / r)
    out = {}
    for key, a in state.items():
        for a_name, b_name, transposed in (
                (".lora_A.weight", ".lora_B.weight", config["fan_in_fan_out"]),
                (".lora_embedding_A", ".lora_embedding_B", True)):
            if key.endswith(a_name):
                stem = key[: -len(a_name)]
                b = state[stem + b_name].double()
                a = a.double()
                delta, bound = scale * (b @ a), abs(scale) * (b.abs() @ a.abs())   # (out, in)
                if transposed:          # embedding (vocab, dim), GPT-2 Conv1D (in, out) stored
                    delta, bound = delta.T, bound.T
                module = stem.removeprefix("base_model.model.")
                out[module + ".weight"] = (delta, bound)
                if stem + ".lora_B.bias" in state:
                    bias = scale * state[stem + ".lora_B.bias"].double()
                    out[module + ".bias"] = (bias, bias.abs())
    return out


def reference_merge(base_state: dict, folders: list[Path], weights: list[float]):
    """float64 ``W + sum(w * s * B @ A)`` per changed tensor, the bound M = |W| + sum |w s| |B| @ |A|
    of the fp32 error analysis below, and the number of terms summed into each tensor."""
    reference, bound, terms = {}, {}, {}
    for folder, w in zip(folders, weights):
        for name, (delta, size) in reference_deltas(folder, w).items():
            reference[name] = reference.get(name, base_state[name].double()) + delta
            bound[name] = bound.get(name, base_state[name].double().abs()) + size
            terms[name] = terms.get(name, 0) + 1
    return reference, bound, terms


def check_fp32_bound(ours: dict, base: dict, reference: dict, bound: dict, terms: dict,
                     r_sum: int) -> float:
    """fp32: the engine folds K adapters as one product of combined factors, [w_i s_i B_i] @
    [A_i]: each B_i scaled (u), a dot product over R = sum r_i terms (error <= R u sum|b||a|),
    W added (u) and the float64 reference rounded once for comparison (u |exact|); bias terms
    are K scaled additions (K + 1 u). With M = |W| + sum_i |w_i s_i| |B_i| @ |A_i| this gives
    |ours - exact| <= (R + K + 3) u M elementwise, u = 2^-24 (R taken over all adapters, an
    upper bound for every tensor). Returns the worst error as a fraction of that bound."""
    worst = 0.0
    for name, exact in reference.items():
        err = (ours[name].double() - exact).abs()
        limit = (r_sum + terms[name] + 3) * FP32_UNIT_ROUNDOFF * bound[name]
        assert (err <= limit).all(), name
        worst = max(worst, float((err / limit).max()))
        assert not torch.equal(ours[name], base[name]), name
    return worst


@pytest.fixture(scope="module", params=list(DTYPES))
def weighted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"weighted_{request.param}")
    base = build_base("llama", DTYPES[request.param])
    base.save_pretrained(root / "base")
    folders = []
    for i, (config, seed) in enumerate(WEIGHTED_ADAPTERS):
        make_adapter(base, root / f"a{i}", seed, **config)
        folders.append(root / f"a{i}")
    report = at.merge(root / "base", folders, root / "out", weights=WEIGHTS)
    base_state = read_folder(root / "base")
    reference, bound, terms = reference_merge(base_state, folders, WEIGHTS)
    return request.param, read_folder(root / "out"), base_state, reference, bound, terms, report


def test_weighted_merge_equals_float64_reference(weighted):
    dtype_name, ours, base, reference, bound, terms, report = weighted
    assert {c["name"] for c in report["changed"]} == reference.keys()
    assert max(terms.values()) == 3 and "model.embed_tokens.weight" in reference
    assert all(torch.equal(ours[k], base[k]) for k in ours if k not in reference)
    if dtype_name == "bf16":
        differing = total = 0
        for name, exact in reference.items():
            expected = exact.to(torch.bfloat16)          # rounded once, from float64
            got = ours[name]
            off = got != expected
            differing, total = differing + int(off.sum()), total + got.numel()
            if off.any():
                # exactly one bf16 ulp: neighbouring bit patterns of the same sign
                g, e = got[off].view(torch.int16).int(), expected[off].view(torch.int16).int()
                assert ((g < 0) == (e < 0)).all() and ((g - e).abs() == 1).all(), name
        # fp32 accumulation only flips a bf16 rounding when the exact value lies within a few
        # fp32 ulps of a bf16 halfway point: a fraction of order 2^-16 per addition (measured:
        # 1 element of 15360)
        print(f"weighted bf16: {differing} of {total} elements one ulp off")
        assert differing <= 1e-3 * total
    else:
        r_sum = sum(c["r"] for c, _ in WEIGHTED_ADAPTERS)
        worst = check_fp32_bound(ours, base, reference, bound, terms, r_sum)
        print(f"weighted fp32: worst error {worst:.3f} of the bound")


def test_weighted_gpt2_conv1d_with_lora_bias(tmp_path):
    """Transposed (fan_in_fan_out) factors and lora_bias terms summed with weights, fp32."""
    base = build_base("gpt2", torch.float32)
    base.save_pretrained(tmp_path / "base")
    config = dict(fan_in_fan_out=True, lora_bias=True, target_modules=["c_attn", "c_proj"])
    make_adapter(base, tmp_path / "a0", 51, r=4, lora_alpha=8, **config)
    make_adapter(base, tmp_path / "a1", 52, r=2, lora_alpha=2, use_rslora=True, **config)
    folders, weights = [tmp_path / "a0", tmp_path / "a1"], [0.7, -0.3]
    at.merge(tmp_path / "base", folders, tmp_path / "out", weights=weights)
    ours, base_state = read_folder(tmp_path / "out"), read_folder(tmp_path / "base")
    reference, bound, terms = reference_merge(base_state, folders, weights)
    assert any(n.endswith(".bias") for n in reference) and set(terms.values()) == {2}
    assert all(torch.equal(ours[k], base_state[k]) for k in ours if k not in reference)
    check_fp32_bound(ours, base_state, reference, bound, terms, r_sum=4 + 2)


# ----------------------------------------------------------------------------- 3. stacked DoRA

DORA_ADAPTERS = [
    (dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"]), 21),
    (dict(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "o_proj", "embed_tokens"]), 22),
]


@pytest.fixture(scope="module", params=list(DTYPES))
def two_doras(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"dora_{request.param}")
    base = build_base("llama", DTYPES[request.param])
    base.save_pretrained(root / "base")
    for i, (config, seed) in enumerate(DORA_ADAPTERS):
        peft_model = make_adapter(base, root / f"d{i}", seed, **config)
        # PEFT's default save also stores the base embedding (`base_layer.weight`), and loading
        # that into an already merged model would overwrite the first adapter's embedding change:
        # PEFT's own one-after-another reference is made from factors-only copies
        peft_model.save_pretrained(root / f"factors{i}", save_embedding_layers=False)
    return root, base


def test_stacked_dora_equals_peft_merging_one_after_another(two_doras):
    """Stacked = merge the first adapter, then merge the second into THAT model (PEFT's DoRA
    norm of the second is then taken on the first merge's result, as if trained on it)."""
    from peft import PeftModel

    root, base = two_doras
    at.merge(root / "base", [root / "d0", root / "d1"], root / "stacked", mode="stacked")
    ours = read_folder(root / "stacked")
    first = PeftModel.from_pretrained(copy.deepcopy(base), root / "factors0").merge_and_unload()
    second = PeftModel.from_pretrained(first, root / "factors1").merge_and_unload().eval()
    expected = second.state_dict()
    assert ours.keys() == read_folder(root / "base").keys()
    for key, tensor in ours.items():
        assert torch.equal(tensor, expected[key]), key
    reference = peft_merged_from_files(root / "base", root / "factors0", root / "factors1")
    assert torch.equal(logits(load_merged(root / "stacked"), 96), logits(reference, 96))

    at.merge(root / "base", [root / "d1", root / "d0"], root / "reversed", mode="stacked")
    reverse = read_folder(root / "reversed")
    both = ["model.embed_tokens.weight"] + [f"model.layers.{i}.self_attn.q_proj.weight"
                                            for i in range(2)]
    for key in both:                      # order matters where both adapters meet
        assert not torch.equal(reverse[key], ours[key]), key
    only_one = "model.layers.0.self_attn.v_proj.weight"
    assert torch.equal(reverse[only_one], ours[only_one])


def test_stacked_lora_bias_equals_peft_merging_one_after_another(tmp_path):
    """bf16 GPT-2, Conv1D layers with lora_bias: weights and biases rounded after each adapter."""
    from peft import PeftModel

    base = build_base("gpt2", torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    config = dict(fan_in_fan_out=True, lora_bias=True, target_modules=["c_attn", "c_fc"])
    make_adapter(base, tmp_path / "a0", 61, r=4, lora_alpha=8, **config)
    make_adapter(base, tmp_path / "a1", 62, r=2, lora_alpha=8, **config)
    at.merge(tmp_path / "base", [tmp_path / "a0", tmp_path / "a1"], tmp_path / "out",
             mode="stacked")
    ours = read_folder(tmp_path / "out")
    first = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a0").merge_and_unload()
    expected = PeftModel.from_pretrained(first, tmp_path / "a1").merge_and_unload().state_dict()
    assert any(k.endswith("c_attn.bias") for k in ours)
    for key, tensor in ours.items():
        assert torch.equal(tensor, expected[key]), key


def test_weighted_mode_refuses_two_doras_on_one_tensor(two_doras):
    root, _ = two_doras
    with pytest.raises(UnsupportedError, match="stacked"):
        at.merge(root / "base", [root / "d0", root / "d1"], root / "refused", mode="weighted")
    assert not (root / "refused").exists()
    assert not list(root.glob(".refused*"))


# ----------------------------------------------------------------------------- 4. tied embeddings

@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    base = make_causal_lm("gemma2")                       # ties lm_head to embed_tokens
    assert base.config.tie_word_embeddings
    base.save_pretrained(root / "base", max_shard_size="40KB")
    peft_model = make_adapter(base, root / "adapter", 31, r=4, lora_alpha=8,
                              target_modules=["embed_tokens", "q_proj"])
    report = at.merge(root / "base", [root / "adapter"], root / "out")
    return root, base, peft_model, report


def test_adapter_on_tied_embedding_unties(tied):
    root, base, peft_model, report = tied
    base_files = read_folder(root / "base")
    assert "lm_head.weight" not in base_files and (root / "base" / INDEX).exists()
    ours = read_folder(root / "out")
    embedding = base.model.embed_tokens.weight.detach()
    assert torch.equal(ours["lm_head.weight"], embedding)
    assert not torch.equal(ours["model.embed_tokens.weight"], embedding)
    config = json.loads((root / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    index = json.loads((root / "out" / INDEX).read_text())
    base_index = json.loads((root / "base" / INDEX).read_text())
    owner = base_index["weight_map"]["model.embed_tokens.weight"]
    assert index["weight_map"] == dict(base_index["weight_map"], **{"lm_head.weight": owner})
    assert index["metadata"]["total_size"] == \
        base_index["metadata"]["total_size"] + embedding.numel() * 4
    assert "lm_head.weight" in load_file(root / "out" / owner)
    assert any("tie" in w for w in report["warnings"])

    model = load_merged(root / "out")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    vocab = base.config.vocab_size
    unmerged, merged = logits(peft_model, vocab), logits(model, vocab)
    # fp32 merged vs unmerged: relative L2 at fp32 noise (FORMATS.md: ~1e-6); the adapter's own
    # effect is many orders larger, and PEFT's merge_and_unload, which also changes the tied
    # lm_head, lands far away
    assert (merged - unmerged).norm() / unmerged.norm() < 1e-5
    assert (logits(base, vocab) - unmerged).norm() / unmerged.norm() > 1e-2
    peft_merged = logits(copy.deepcopy(peft_model).merge_and_unload(), vocab)
    assert (peft_merged - unmerged).norm() / unmerged.norm() > 1e-3


def test_tied_config_with_stored_lm_head_is_untied_too(tied, tmp_path):
    """A tied base that stores lm_head anyway: the config must still say untied, else
    transformers would tie the stored lm_head back to the merged embedding on load."""
    root, base, peft_model, _ = tied
    state = {k: v.contiguous() for k, v in read_folder(root / "base").items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    (tmp_path / "base").mkdir()
    save_file(state, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "base" / "config.json").write_text((root / "base" / "config.json").read_text())
    at.merge(tmp_path / "base", [root / "adapter"], tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    vocab = base.config.vocab_size
    unmerged, merged = logits(peft_model, vocab), logits(load_merged(tmp_path / "out"), vocab)
    assert (merged - unmerged).norm() / unmerged.norm() < 1e-5


# ----------------------------------------------------------------------------- 5. files

@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A sharded fp32 Llama and a LoRA on some of its tensors."""
    root = tmp_path_factory.mktemp("sharded")
    base = build_base("llama", torch.float32)
    base.save_pretrained(root / "base", max_shard_size="20KB")
    peft_model = make_adapter(base, root / "adapter", 41, r=4, lora_alpha=8,
                              target_modules=LINEAR_TARGETS)
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    return root, merged


def shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def test_sharded_layout_is_kept_and_untouched_bytes_copied(sharded, tmp_path):
    root, merged = sharded
    at.merge(root / "base", [root / "adapter"], tmp_path / "out")
    names = shards(root / "base")
    assert len(names) > 2 and shards(tmp_path / "out") == names
    assert (tmp_path / "out" / INDEX).read_bytes() == (root / "base" / INDEX).read_bytes()
    expected = merged.state_dict()
    touched = 0
    for name in names:
        base_file, out_file = root / "base" / name, tmp_path / "out" / name
        assert tensor_order(out_file) == tensor_order(base_file)
        assert raw_header(out_file)[0] == raw_header(base_file)[0]
        base_bytes, out_bytes = raw_tensors(base_file), raw_tensors(out_file)
        for key, tensor in load_file(out_file).items():
            assert torch.equal(tensor, expected[key]), key
            if not any(t in key for t in LINEAR_TARGETS):
                assert out_bytes[key] == base_bytes[key], key
            else:
                touched += out_bytes[key] != base_bytes[key]
    assert touched == 2 * len(LINEAR_TARGETS)


def test_index_is_copied_as_it_is_when_sizes_do_not_change(sharded, tmp_path):
    """An index written by another tool (compact, unsorted, extra keys) comes out unchanged."""
    import shutil

    root, _ = sharded
    shutil.copytree(root / "base", tmp_path / "base")
    index = json.loads((tmp_path / "base" / INDEX).read_text())
    index["metadata"]["written_by"] = "another tool"
    raw = json.dumps({"weight_map": index["weight_map"], "metadata": index["metadata"]})
    (tmp_path / "base" / INDEX).write_text(raw)
    at.merge(tmp_path / "base", [root / "adapter"], tmp_path / "out")
    assert (tmp_path / "out" / INDEX).read_text() == raw


def test_bf16_output_from_fp32_base(sharded, tmp_path):
    root, merged = sharded
    report = at.merge(root / "base", [root / "adapter"], tmp_path / "out", dtype="bf16")
    names = shards(root / "base")
    assert shards(tmp_path / "out") == names
    expected = merged.state_dict()
    sizes = 0
    for name in names:
        assert tensor_order(tmp_path / "out" / name) == tensor_order(root / "base" / name)
        for key, tensor in load_file(tmp_path / "out" / name).items():
            assert tensor.dtype == torch.bfloat16, key
            # PEFT's fp32 merge, then one cast: the merge itself rounds to fp32 first
            assert torch.equal(tensor, expected[key].to(torch.bfloat16)), key
            sizes += tensor.numel() * 2
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    base_config = json.loads((root / "base" / "config.json").read_text())
    assert base_config["dtype"] == "float32" and config["dtype"] == "bfloat16"
    assert {k: v for k, v in config.items() if k != "dtype"} == \
        {k: v for k, v in base_config.items() if k != "dtype"}
    index, base_index = (json.loads((f / INDEX).read_text()) for f in (tmp_path / "out", root / "base"))
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == sizes == base_index["metadata"]["total_size"] // 2
    assert report["output_bytes"] == sum((tmp_path / "out" / n).stat().st_size for n in names)
    model = load_merged(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    reference = load_merged(root / "base", dtype=torch.bfloat16)   # RoPE buffers stay fp32
    reference.load_state_dict({k: v.to(torch.bfloat16) for k, v in expected.items()})
    assert torch.equal(logits(model, 96), logits(reference, 96))


def test_merge_stays_callable_once_the_engine_is_imported(sharded, tmp_path):
    """Importing the engine's subpackage (as the first merge does) must not rebind the public
    function ``adaptertools.merge``: ``at.merge(...)`` must still merge, every time."""
    import importlib

    root, _ = sharded
    importlib.import_module("adaptertools.merging.plan")
    for out in ("first", "second"):
        at.merge(root / "base", [root / "adapter"], tmp_path / out)
        assert shards(tmp_path / out) == shards(root / "base")


def test_same_inputs_give_byte_identical_outputs(sharded, tmp_path):
    root, _ = sharded
    for out in ("one", "two"):
        at.merge(root / "base", [root / "adapter"], tmp_path / out, weights=[0.6], dtype="bf16")
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len(files) > 3
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_dry_run_writes_nothing_and_lists_the_changed_tensors(sharded, tmp_path):
    root, _ = sharded
    report = at.merge(root / "base", [root / "adapter"], tmp_path / "out", dry_run=True)
    assert list(tmp_path.iterdir()) == []
    at.merge(root / "base", [root / "adapter"], tmp_path / "real")
    base, real = read_folder(root / "base"), read_folder(tmp_path / "real")
    changed = sorted(k for k in real if not torch.equal(real[k], base[k]))
    assert len(changed) == 2 * len(LINEAR_TARGETS)
    assert sorted(c["name"] for c in report["changed"]) == changed
    assert report["output_bytes"] == sum(p.stat().st_size
                                         for p in (tmp_path / "real").glob("*.safetensors"))
