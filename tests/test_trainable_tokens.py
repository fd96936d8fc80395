"""PEFT trainable tokens (``trainable_token_indices`` beside a LoRA, and TRAINABLE_TOKENS alone)
with PEFT 0.21.2 as producer and consumer: read, merged bit-identical to ``merge_and_unload``
(tied and untied embeddings, bf16), PEFT -> ours -> PEFT bit-exact and loaded by PEFT, the
validator's check, GGUF bases, and the refusals (formats that cannot hold the rows, ids outside
the base's vocabulary, combine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adaptertools
from adaptertools.adapter import first_difference
from adaptertools.errors import FormatError, UnsupportedError
from helpers.cli import assert_cli_error, run_cli

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = [3, 5, 9, 60]


def _base(folder: Path, *, tied: bool) -> Path:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, tie_word_embeddings=tied)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _load_base(folder: Path):
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)


def _adapter(base: Path, folder: Path, *, standalone: bool) -> Path:
    """An adapter made and saved by PEFT, its token rows (and LoRA B) trained away from init."""
    config = peft.TrainableTokensConfig(token_indices=IDS, target_modules=["embed_tokens"]) \
        if standalone else peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                           trainable_token_indices=IDS, init_lora_weights=False)
    model = peft.get_peft_model(_load_base(base), config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))
    model.save_pretrained(folder)
    return folder


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    merged = peft.PeftModel.from_pretrained(_load_base(base), adapter).merge_and_unload()
    return merged.state_dict()


def _assert_merge_is_peft(base: Path, adapter: Path, out: Path) -> None:
    adaptertools.merge(base, adapter, out=out)
    ours = load_file(out / "model.safetensors")
    theirs = _peft_merged(base, adapter)
    assert set(ours) <= set(theirs)
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differ, differ
    # the rows did change (the test would pass on a no-op merge otherwise)
    embed = "model.embed_tokens.weight"
    assert not torch.equal(ours[embed], load_file(base / "model.safetensors")[embed])


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("standalone", [False, True], ids=["with-lora", "trainable-tokens"])
def test_merge_and_round_trip_match_peft(tmp_path, tied, standalone):
    base = _base(tmp_path / "base", tied=tied)
    adapter = _adapter(base, tmp_path / "adapter", standalone=standalone)
    read = adaptertools.load(adapter)
    rows = read.token_rows["model.embed_tokens.weight"]
    assert rows.indices == tuple(IDS) and rows.values.shape == (len(IDS), 16)
    assert len(read.weights) == (0 if standalone else 2)

    _assert_merge_is_peft(base, adapter, tmp_path / "merged")
    report = adaptertools.validate(base, adapter, tmp_path / "merged")
    assert report.passed
    assert any(r["kind"] == "tokens" and r["passed"] for r in report.tensors)

    # PEFT -> ours -> PEFT: the same adapter, and PEFT merges our folder as its own
    adaptertools.convert(adapter, tmp_path / "again", to="peft")
    assert first_difference(read, adaptertools.load(tmp_path / "again")) is None
    again = _peft_merged(base, tmp_path / "again")
    theirs = _peft_merged(base, adapter)
    assert all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_a_written_config_names_the_module_when_the_original_is_gone(tmp_path):
    base = _base(tmp_path / "base", tied=False)
    read = adaptertools.load(_adapter(base, tmp_path / "adapter", standalone=False))
    read.metadata = {}
    adaptertools.save(read, tmp_path / "fresh", format="peft")
    config = json.loads((tmp_path / "fresh" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"model.embed_tokens": IDS}
    ours = _peft_merged(base, tmp_path / "fresh")
    theirs = _peft_merged(base, tmp_path / "adapter")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_weight_moves_the_rows_part_way(tmp_path):
    base = _base(tmp_path / "base", tied=False)
    adapter = _adapter(base, tmp_path / "adapter", standalone=True)
    adaptertools.merge(base, adapter, out=tmp_path / "half", weights=[0.5])
    half = load_file(tmp_path / "half" / "model.safetensors")["model.embed_tokens.weight"]
    source = load_file(base / "model.safetensors")["model.embed_tokens.weight"].float()
    values = adaptertools.load(adapter).token_rows["model.embed_tokens.weight"].values.float()
    expected = source.clone()
    expected[IDS] += 0.5 * (values - source[IDS])
    assert torch.equal(half, expected.to(torch.bfloat16))


def test_gguf_base_gets_the_rows(tmp_path):
    gguf = pytest.importorskip("gguf")
    from helpers.gguf_base import make_base_model, write_gguf_base

    model = make_base_model("llama")
    model.save_pretrained(tmp_path / "hf")
    base_gguf = write_gguf_base(model, tmp_path / "base.gguf", "llama")
    config = peft.TrainableTokensConfig(token_indices=[1, 7], target_modules=["embed_tokens"])
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(1.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    values = adaptertools.load(tmp_path / "adapter").token_rows["model.embed_tokens.weight"].values
    adaptertools.merge(base_gguf, tmp_path / "adapter", out=tmp_path / "merged.gguf")

    def token_embd(path):
        tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
        return torch.from_numpy(tensor.data.copy()).reshape(128, -1)

    before, after = token_embd(base_gguf), token_embd(tmp_path / "merged.gguf")
    assert torch.equal(after[[1, 7]], values.float())
    keep = [i for i in range(128) if i not in (1, 7)]
    assert torch.equal(after[keep], before[keep])


def test_formats_that_cannot_hold_the_rows_refuse(tmp_path):
    base = _base(tmp_path / "base", tied=False)
    adapter = _adapter(base, tmp_path / "adapter", standalone=False)
    for to, out in (("gguf", tmp_path / "a.gguf"), ("safetensors", tmp_path / "a.safetensors"),
                    ("mlx", tmp_path / "mlx")):
        outcome = run_cli("convert", adapter, out, "--to", to,
                          *(("--base", base) if to == "gguf" else ()))
        assert_cli_error(outcome, ["model.embed_tokens.weight", "trained token row",
                                   "merge the adapter"])
        assert not out.exists()
    with pytest.raises(UnsupportedError, match="trained token rows"):
        adaptertools.combine([adapter, adapter], tmp_path / "c", method="cat")


def test_ids_outside_the_vocabulary_and_rows_that_do_not_match_the_ids(tmp_path):
    base = _base(tmp_path / "base", tied=False)
    adapter = _adapter(base, tmp_path / "adapter", standalone=True)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["token_indices"] = [3, 5, 9, 64]
    config_path.write_text(json.dumps(config))
    outcome = run_cli("merge", base, adapter, "--out", tmp_path / "m")
    assert_cli_error(outcome, ["model.embed_tokens.weight", "token index 64",
                               "64 rows", "resize the vocabulary"])
    assert not (tmp_path / "m").exists()
    config["token_indices"] = [3, 5, 9]
    config_path.write_text(json.dumps(config))
    with pytest.raises(FormatError, match=r"\(4, 16\) but the config lists 3 token id"):
        adaptertools.load(adapter)


def test_inspect_lists_the_rows(tmp_path):
    base = _base(tmp_path / "base", tied=False)
    adapter = _adapter(base, tmp_path / "adapter", standalone=False)
    report = adaptertools.inspect(adapter)
    assert report.trained_token_rows == {"model.embed_tokens.weight": IDS}
    outcome = run_cli("inspect", adapter, expect=0)
    assert "trained token rows" in outcome.stdout and "4 token(s)" in outcome.stdout


def test_a_weighted_fold_leaves_its_input_alone():
    from adaptertools.adapter import TokenRows
    from adaptertools.kernels.token_rows import apply_token_rows

    weight = torch.zeros(6, 3)
    rows = TokenRows((1, 4), torch.ones(2, 3))
    for stacked in (True, False):
        out = apply_token_rows(weight, [(rows, 0.5, 0)], stacked=stacked, out_dtype=torch.float32)
        assert torch.equal(out[[1, 4]], torch.full((2, 3), 0.5))
        assert not weight.any()                  # the fp32 input is not written through
