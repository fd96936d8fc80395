"""Saved copies of the training base: an embedding / lm_head LoRA merged as PEFT merges it.

PEFT saves a targeted embedding's and lm_head's weight beside the adapter
(``<module>.base_layer.weight``, ``save_embedding_layers="auto"``), in the dtype the adapter was
trained on. Merged into a checkpoint of another dtype, that copy is the same weight as the base's
tensor, only rounded differently: the merge must fold into the base's own tensor with PEFT's
roundings, not into the copy (which gave an fp32-trained adapter merged into the bf16 checkpoint
one bf16 ulp off PEFT on about a third of the elements, and a bf16-trained one merged into the
fp32 checkpoint bf16 precision). A copy that really differs (a resized vocabulary, new tokens, a
trained embedding) is what the adapter needs, and is used with a warning.

1. Adapters trained on fp32, fp16 and bf16 copies of one tiny Llama, merged into each of those
   three checkpoints: bit-identical to PEFT's ``merge_and_unload`` of the adapter on the base's
   own tensors; no replacement, no warning; ``validate`` passes.
2. ``same_weight``: its definition, element by element.
3. A resized vocabulary (new rows in the copies) and a trained embedding: the copy is folded into,
   with a warning naming the tensor and the shapes; bit-identical to PEFT loading the adapter;
   config.json gets the new vocab_size; validate passes.
4. ``validate`` FAILS a merge folded into the wrong copy (made by hand).
5. ``inspect`` lists saved copies apart from replaced tensors.
6. GGUF bases (F32, F16, Q8_0): the same rule, with the base's codec.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.formats.peft import WEIGHTS_NAME
from adaptertools.kernels.reference import Contribution, merge_step

from helpers.peft_adapters import perturb_trainables

pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VOCAB, HIDDEN, EXTRA = 256, 64, 16
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
TARGETS = ["embed_tokens", "lm_head", "q_proj"]


# ----------------------------------------------------------------------------- helpers

def tiny_llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """One seeded fp32 model (same weights every call), cast to ``dtype``."""
    import transformers

    torch.manual_seed(2024)
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def load_model(folder: Path) -> torch.nn.Module:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def train_adapter(model: torch.nn.Module, folder: Path, seed: int = 99):
    """A perturbed ('trained') PEFT LoRA on embed_tokens, lm_head and q_proj of a COPY of
    ``model``, saved by PEFT (with its saved copies of the embedding and lm_head)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model),
                                LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS))
    perturb_trainables(peft_model, seed=seed)
    peft_model.eval().save_pretrained(folder)
    return peft_model


def without_copies(adapter: Path, dst: Path) -> Path:
    """The adapter folder without its ``base_layer`` tensors: PEFT then loads the factors onto
    the base's own weights (loading the copies would overwrite them with the copies' values)."""
    shutil.copytree(adapter, dst)
    state = load_file(dst / WEIGHTS_NAME)
    save_file({k: v for k, v in state.items() if ".base_layer." not in k}, dst / WEIGHTS_NAME,
              metadata={"format": "pt"})
    return dst


def peft_merged(base_dir: Path, adapter: Path, *, resize: int | None = None) -> dict:
    """PEFT's merge_and_unload of ``adapter`` loaded onto the checkpoint at ``base_dir``."""
    from peft import PeftModel

    model = load_model(base_dir)
    if resize is not None:
        model.resize_token_embeddings(resize)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def differing(ours: dict, reference: dict) -> dict[str, int]:
    """{name: elements that differ} over every tensor (0 everywhere: bit-identical)."""
    assert ours.keys() <= reference.keys(), sorted(ours.keys() - reference.keys())
    out = {}
    for name, tensor in ours.items():
        expected = reference[name]
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, name
        out[name] = int((tensor.view(-1) != expected.view(-1)).sum()) if \
            not torch.equal(tensor, expected) else 0
    return out


def copy_warnings(report: dict) -> list[str]:
    return [w for w in report["warnings"] if "carries its own copy" in w]


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("saved_copies")


@pytest.fixture(scope="module")
def bases(root) -> dict[str, Path]:
    """The checkpoint in each dtype: one model, cast."""
    out = {}
    for name, dtype in DTYPES.items():
        tiny_llama(dtype).save_pretrained(root / f"base_{name}")
        out[name] = root / f"base_{name}"
    return out


@pytest.fixture(scope="module")
def adapters(root) -> dict[str, Path]:
    """An adapter trained on each dtype's copy of the model (its saved copies in that dtype)."""
    out = {}
    for name, dtype in DTYPES.items():
        train_adapter(tiny_llama(dtype), root / f"adapter_{name}")
        out[name] = root / f"adapter_{name}"
    return out


COMBOS = [(t, b) for t in DTYPES for b in DTYPES]


@pytest.fixture(scope="module", params=COMBOS, ids=lambda p: f"trained_{p[0]}-into_{p[1]}")
def merged(request, root, bases, adapters):
    trained, into = request.param
    out = root / f"merged_{trained}_{into}"
    report = at.merge(bases[into], [adapters[trained]], out)
    reference = peft_merged(bases[into], without_copies(adapters[trained],
                                                        root / f"factors_{trained}_{into}"))
    return trained, into, out, report, reference


# ----------------------------------------------------------------------------- 1. PEFT agreement

def test_adapters_carry_copies_in_their_training_dtype(adapters):
    for name, dtype in DTYPES.items():
        state = load_file(adapters[name] / WEIGHTS_NAME)
        copies = {k: v for k, v in state.items() if ".base_layer." in k}
        assert set(copies) == {f"base_model.model.{EMBED[:-7]}.base_layer.weight",
                               f"base_model.model.{HEAD[:-7]}.base_layer.weight"}
        assert {v.dtype for v in copies.values()} == {dtype}


def test_merge_folds_into_the_base_tensor_bit_identical_to_peft(merged):
    trained, into, out, report, reference = merged
    ours = read_folder(out)
    diff = differing(ours, reference)
    assert not any(diff.values()), f"trained {trained}, into {into}: {diff}"
    changed = {row["name"]: row for row in report["changed"]}
    for name in (EMBED, HEAD):
        assert not changed[name]["replaced"], name
        assert ours[name].dtype == DTYPES[into]
    assert not copy_warnings(report), report["warnings"]


def test_merged_logits_are_peft_merged_logits(merged, root, adapters, bases):
    """transformers loading our folder computes what PEFT's merged model computes."""
    from peft import PeftModel

    trained, into, out, _, _ = merged
    factors = root / f"factors_{trained}_{into}"
    reference = PeftModel.from_pretrained(load_model(bases[into]), factors).merge_and_unload()
    assert torch.equal(logits(load_model(out)), logits(reference.eval()))


def test_validate_passes_the_correct_merges(merged, bases, adapters):
    trained, into, out, _, _ = merged
    report = at.validate(bases[into], [adapters[trained]], out)
    assert report["passed"], [(r["name"], r["problem"]) for r in report["tensors"]
                              if not r["passed"]]
    rows = {r["name"]: r for r in report["tensors"]}
    for name in (EMBED, HEAD):
        assert rows[name]["kind"] == "adapted" and rows[name]["identical_to_floor"], rows[name]


def test_peft_route_with_the_copies_agrees_where_they_round_to_the_base(bases, adapters, root):
    """Loading the adapter WITH its copies (PEFT's own route) writes them into the base layer;
    where the copy rounds to exactly the base (trained on the same or a finer dtype) that
    changes nothing, and our merge is PEFT's, bit for bit."""
    for trained, into in (("fp32", "bf16"), ("fp32", "fp16"), ("bf16", "bf16")):
        out = root / f"route_{trained}_{into}"
        at.merge(bases[into], [adapters[trained]], out)
        diff = differing(read_folder(out), peft_merged(bases[into], adapters[trained]))
        assert not any(diff.values()), (trained, into, diff)


# ----------------------------------------------------------------------------- 2. same_weight

def test_same_weight_definition():
    from adaptertools.copies import same_weight

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 32, generator=gen) * 0.02
    x[0, :4] = torch.tensor([1e-7, -3e-6, 0.0, 70000.0 / 65536])    # tiny (fp16 subnormal), zero
    for fine in DTYPES.values():
        for coarse in DTYPES.values():
            assert same_weight(x.to(fine), x.to(coarse)), (fine, coarse)
    # one changed element is another weight, in every dtype pairing
    changed = x.clone()
    changed[5, 7] += 0.004
    for a in DTYPES.values():
        for b in DTYPES.values():
            assert not same_weight(changed.to(a), x.to(b)), (a, b)
    # fp32 vs bf16: exactly the rounding, not one ulp beside it
    w = x.to(torch.bfloat16)
    off = x.clone()
    off[2, 2] = torch.nextafter(w[2, 2].float(), torch.tensor(1.0)) + \
        (w[2, 2].float().abs() * 2 ** -7)
    assert not same_weight(off, w)
    # shapes and non-float tensors never match
    assert not same_weight(x[:-1], x)
    assert not same_weight(x.to(torch.int32), x.to(torch.int32))


# ----------------------------------------------------------------------------- 3. real differences

@pytest.fixture(scope="module")
def resized(root, bases):
    """An adapter trained after resize_token_embeddings(VOCAB + EXTRA): its copies have new rows."""
    model = load_model(bases["fp32"])
    torch.manual_seed(11)
    model.resize_token_embeddings(VOCAB + EXTRA)
    train_adapter(model, root / "adapter_resized", seed=5)
    return root / "adapter_resized"


@pytest.mark.parametrize("into", ["fp32", "bf16"])
def test_resized_vocabulary_uses_the_copies_with_a_warning(resized, bases, root, into):
    out = root / f"merged_resized_{into}"
    report = at.merge(bases[into], [resized], out)
    notes = copy_warnings(report)
    assert len(notes) == 2, report["warnings"]
    for name, note in zip(sorted((EMBED, HEAD)), sorted(notes, key=lambda n: n.split(":")[0])):
        assert note.startswith(name) and "resized vocabulary" in note
        assert f"({VOCAB + EXTRA}, {HIDDEN})" in note and f"({VOCAB}, {HIDDEN})" in note
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == VOCAB + EXTRA
    ours = read_folder(out)
    assert ours[EMBED].shape == ours[HEAD].shape == (VOCAB + EXTRA, HIDDEN)
    reference = peft_merged(bases[into], resized, resize=VOCAB + EXTRA)
    diff = differing(ours, reference)
    assert not any(diff.values()), diff
    model = load_model(out)
    assert model.config.vocab_size == VOCAB + EXTRA
    from peft import PeftModel

    peft_model = load_model(bases[into])
    peft_model.resize_token_embeddings(VOCAB + EXTRA)
    peft_model = PeftModel.from_pretrained(peft_model, resized).merge_and_unload().eval()
    assert torch.equal(logits(model), logits(peft_model))
    checked = at.validate(bases[into], [resized], out)
    assert checked["passed"], [(r["name"], r["problem"]) for r in checked["tensors"]
                               if not r["passed"]]


def test_resized_embedding_without_lm_head_is_refused(resized, bases, root):
    """Only the embedding's copy resized, lm_head's not: the merged model would not fit."""
    adapter = root / "adapter_resized_embed_only"
    shutil.copytree(resized, adapter)
    state = load_file(adapter / WEIGHTS_NAME)
    state = {k: v for k, v in state.items() if not k.startswith("base_model.model.lm_head.")}
    save_file(state, adapter / WEIGHTS_NAME, metadata={"format": "pt"})
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["embed_tokens", "q_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(at.errors.UnsupportedError, match="resized base"):
        at.merge(bases["fp32"], [adapter], root / "never", dry_run=True)


def test_trained_embedding_copy_is_used_with_a_warning(adapters, bases, root):
    """A copy whose values differ (new token rows written into it): PEFT loads it into the base
    layer and folds into it; so do we, and say so."""
    adapter = root / "adapter_new_tokens"
    shutil.copytree(adapters["fp32"], adapter)
    state = load_file(adapter / WEIGHTS_NAME)
    key = f"base_model.model.{EMBED[:-7]}.base_layer.weight"
    state[key][-8:] = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(1)) * 0.02
    save_file(state, adapter / WEIGHTS_NAME, metadata={"format": "pt"})
    out = root / "merged_new_tokens"
    report = at.merge(bases["bf16"], [adapter], out)
    notes = copy_warnings(report)
    assert len(notes) == 1 and notes[0].startswith(EMBED) and "different values" in notes[0]
    assert f"({VOCAB}, {HIDDEN}) float32" in notes[0] and "BF16" in notes[0]
    changed = {row["name"]: row for row in report["changed"]}
    assert changed[EMBED]["replaced"] and not changed[HEAD]["replaced"]
    diff = differing(read_folder(out), peft_merged(bases["bf16"], adapter))
    assert not any(diff.values()), diff
    assert at.validate(bases["bf16"], [adapter], out)["passed"]


# ----------------------------------------------------------------------------- 4. wrong copy

def fold_into_copy(adapter: Path, name: str, out_dtype: torch.dtype) -> torch.Tensor:
    """What a merge that folds into the adapter's saved copy writes (the old behaviour)."""
    loaded = at.load(adapter)
    copy_tensor = loaded.replacements[name]
    return merge_step(copy_tensor, Contribution(loaded.weights[name])).to(out_dtype)


# The wrong fold into a coarser copy (bf16 or fp16 precision in an fp32 checkpoint, bf16's in an
# fp16 one) is far below the output dtype's floor. An fp32 copy folded into and rounded once into
# a bf16 checkpoint is off PEFT by one ulp on a third of the elements: for the Linear lm_head
# that is above the floor (PEFT rounds once, from the base's bf16 weight); for the embedding,
# whose delta PEFT itself rounds before adding, its noise is the floor's (both are one bf16
# rounding of the sum), so only lm_head is caught there.
WRONG_COPIES = [("bf16", "fp32", {EMBED, HEAD}), ("fp16", "fp32", {EMBED, HEAD}),
                ("bf16", "fp16", {EMBED, HEAD}), ("fp32", "bf16", {HEAD})]


@pytest.mark.parametrize("trained,into,caught", WRONG_COPIES,
                         ids=[f"trained_{t}-into_{i}" for t, i, _ in WRONG_COPIES])
def test_validate_fails_a_merge_folded_into_the_wrong_copy(bases, adapters, root, trained, into,
                                                          caught):
    correct = root / f"wrong_base_{trained}_{into}"
    at.merge(bases[into], [adapters[trained]], correct)
    wrong = root / f"wrong_{trained}_{into}"
    shutil.copytree(correct, wrong)
    state = load_file(wrong / "model.safetensors")
    for name in (EMBED, HEAD):
        state[name] = fold_into_copy(adapters[trained], name, DTYPES[into])
        assert not torch.equal(state[name], load_file(correct / "model.safetensors")[name])
    save_file(state, wrong / "model.safetensors", metadata={"format": "pt"})
    assert at.validate(bases[into], [adapters[trained]], correct)["passed"]
    report = at.validate(bases[into], [adapters[trained]], wrong)
    assert not report["passed"]
    assert {r["name"] for r in report["tensors"] if not r["passed"]} == caught


# ----------------------------------------------------------------------------- 5. inspect

def test_inspect_lists_saved_copies_apart_from_replacements(adapters):
    report = at.inspect(adapters["fp32"])
    assert report["replaced_tensors"] == []
    assert report["saved_base_copies"] == sorted([EMBED, HEAD])


def test_modules_to_save_are_still_replacements(root, bases):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                  modules_to_save=["lm_head"]))
    perturb_trainables(peft_model)
    peft_model.save_pretrained(root / "adapter_mts")
    report = at.inspect(root / "adapter_mts")
    assert report["replaced_tensors"] == [HEAD] and report["saved_base_copies"] == []
    merged_report = at.merge(bases["bf16"], [root / "adapter_mts"], root / "merged_mts")
    assert {r["name"]: r for r in merged_report["changed"]}[HEAD]["replaced"]
    assert not copy_warnings(merged_report)


def test_combine_accepts_copies_of_one_base_in_two_dtypes(adapters, bases, root):
    """Adapters trained on the fp32 and the bf16 copy of one model carry copies that are the
    same weight: combining them is no conflict (the finer copy is kept), and the combination
    merges as the two adapters merged together do."""
    out = root / "combined"
    report = at.combine([adapters["fp32"], adapters["bf16"]], out, method="cat")
    assert sorted(report["replaced"]) == sorted([EMBED, HEAD])
    state = load_file(out / WEIGHTS_NAME)
    assert state[f"base_model.model.{EMBED[:-7]}.base_layer.weight"].dtype == torch.float32
    at.merge(bases["bf16"], [out], root / "combined_merged")
    at.merge(bases["bf16"], [adapters["fp32"], adapters["bf16"]], root / "both_merged")
    ours, both = read_folder(root / "combined_merged"), read_folder(root / "both_merged")
    for name in (EMBED, HEAD):      # one adapter rounds as PEFT does, two are summed: bf16 noise
        torch.testing.assert_close(ours[name].float(), both[name].float(), rtol=2 ** -7, atol=2 ** -11)
    assert not ours[HEAD].equal(load_file(bases["bf16"] / "model.safetensors")[HEAD])
    assert at.validate(bases["bf16"], [out], root / "combined_merged")["passed"]


# ----------------------------------------------------------------------------- 6. GGUF bases

@pytest.fixture(scope="module")
def gguf_bases(tmp_path_factory):
    """A tiny Llama as F32 and F16 GGUF models (and Q8_0, quantized by llama.cpp, when it is
    installed), its HF folder, and adapters trained on its fp32 and bf16 copies."""
    import importlib.util

    from helpers.gguf_base import make_base_model, write_gguf_base

    root = tmp_path_factory.mktemp("saved_copies_gguf")
    model = make_base_model("llama")
    bases = {"F32": write_gguf_base(model, root / "f32.gguf", "llama"),
             "F16": write_gguf_base(model, root / "f16.gguf", "llama", f16=True)}
    if importlib.util.find_spec("llama_cpp") is not None:
        from helpers.gguf_base import llama_quantize

        bases["Q8_0"] = llama_quantize(bases["F32"], root / "q8_0.gguf", "Q8_0")
    adapters = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        train_adapter(copy.deepcopy(model).to(dtype), root / f"adapter_{name}")
        adapters[name] = root / f"adapter_{name}"
    return root, bases, adapters


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0"])
@pytest.mark.parametrize("trained", ["fp32", "bf16"])
def test_gguf_base_folds_into_its_own_tensor(gguf_bases, kind, trained):
    root, bases, adapters = gguf_bases
    if kind not in bases:
        pytest.skip("llama-cpp-python is not installed")
    out = root / f"merged_{trained}_{kind}.gguf"
    report = at.merge(bases[kind], [adapters[trained]], out)
    changed = {row["name"]: row for row in report["changed"]}
    assert not changed["token_embd.weight"]["replaced"] and not changed["output.weight"]["replaced"]
    assert not copy_warnings(report)
    # the same as merging the factors alone (which can only fold into the base)
    factors = without_copies(adapters[trained], root / f"factors_{trained}_{kind}")
    at.merge(bases[kind], [factors], root / f"factors_{trained}_{kind}.gguf")
    assert out.read_bytes() == (root / f"factors_{trained}_{kind}.gguf").read_bytes()


@pytest.mark.parametrize("kind", ["F16", "Q8_0"])
def test_gguf_base_uses_a_trained_copy(gguf_bases, kind):
    root, bases, adapters = gguf_bases
    if kind not in bases:
        pytest.skip("llama-cpp-python is not installed")
    adapter = root / f"adapter_trained_copy_{kind}"
    shutil.copytree(adapters["fp32"], adapter)
    state = load_file(adapter / WEIGHTS_NAME)
    key = f"base_model.model.{EMBED[:-7]}.base_layer.weight"
    state[key][-4:] += 0.5 * torch.randn(4, state[key].shape[1],
                                         generator=torch.Generator().manual_seed(2))
    save_file(state, adapter / WEIGHTS_NAME, metadata={"format": "pt"})
    report = at.merge(bases[kind], [adapter], root / f"trained_copy_{kind}.gguf", dry_run=True)
    notes = copy_warnings(report)
    assert len(notes) == 1 and notes[0].startswith("token_embd.weight"), report["warnings"]
    assert {row["name"]: row for row in report["changed"]}["token_embd.weight"]["replaced"]


@pytest.mark.parametrize("trained, into", [("fp32", "bf16"), ("bf16", "fp32"), ("fp16", "bf16")])
def test_gguf_conversion_drops_copies_of_the_base_in_another_dtype(adapters, bases, tmp_path,
                                                                   trained, into):
    """A GGUF LoRA cannot hold full tensors; saved copies that are the base's own weight in
    another dtype (copies.same_weight) change nothing and are dropped, as same-dtype
    ones always were; the converted factors are the adapter's."""
    out = tmp_path / "adapter.gguf"
    at.convert(adapters[trained], out, to="gguf", base=bases[into])
    back = at.load(out, base=bases[into])
    source = at.load(adapters[trained])
    assert not back.replacements
    for name in (EMBED, HEAD):
        assert torch.equal(back.weights[name].b, source.weights[name].b), name


def test_gguf_conversion_refuses_a_trained_copy(adapters, bases, tmp_path):
    adapter = tmp_path / "trained"
    shutil.copytree(adapters["fp32"], adapter)
    state = load_file(adapter / WEIGHTS_NAME)
    key = next(k for k in state if k.endswith("embed_tokens.base_layer.weight"))
    state[key] = state[key] + 0.01
    save_file(state, adapter / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(at.UnsupportedError, match="cannot be stored in a GGUF LoRA"):
        at.convert(adapter, tmp_path / "a.gguf", to="gguf", base=bases["bf16"])
