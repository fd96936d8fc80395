"""`extract BASE FINETUNED`: a LoRA of a fine-tune, checked with the real PEFT.

Tiny Llama and GPT-2 models are fine-tuned in code (a few Adam steps on random tokens, every
parameter trainable), both checkpoints saved with ``save_pretrained``; the extracted adapter is
loaded by PEFT onto the base and its logits compared with the fine-tuned model's, and each
tensor's reported error with the Eckart-Young optimum of the true difference.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import adaptertools as at

from helpers.cli import assert_cli_error, assert_nothing_written, run_cli
from helpers.models import make_model, model_output
from helpers.peft_adapters import load_with_peft

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fine_tune(kind: str, *, steps: int = 4, frozen: tuple[str, ...] = ()) -> torch.nn.Module:
    torch.manual_seed(11)
    model = make_model(kind).train()
    params = [p for n, p in model.named_parameters() if not any(f in n for f in frozen)]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        ids = torch.randint(0, 96, (4, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    make_model("llama").save_pretrained(root / "base")
    tuned = fine_tune("llama")
    tuned.save_pretrained(root / "tuned")
    with torch.no_grad():
        return root, model_output(tuned, "llama"), model_output(make_model("llama"), "llama")


def true_deltas(root) -> dict[str, torch.Tensor]:
    base, tuned = load_file(root / "base" / "model.safetensors"), \
        load_file(root / "tuned" / "model.safetensors")
    return {n: tuned[n].double() - base[n].double() for n in tuned if not torch.equal(tuned[n], base[n])}


def peft_logits(folder, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model_output(load_with_peft(folder, kind), kind)


def test_full_rank_reproduces_the_fine_tune(llama, tmp_path):
    root, tuned_logits, _ = llama
    report = at.extract(root / "base", root / "tuned", tmp_path / "full", energy=1.0)
    assert report["total"]["relative_error"] < 1e-6
    logits = peft_logits(tmp_path / "full", "llama")
    assert torch.allclose(logits, tuned_logits, rtol=0, atol=1e-4), \
        (logits - tuned_logits).abs().max()
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["model.embed_tokens.weight"]["rank"] is None       # kept whole
    assert rows["model.norm.weight"]["rank"] is None
    assert rows["lm_head.weight"]["rank"] == 32                     # (96, 32): full rank
    assert len(rows) == len(true_deltas(root))
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert "model.embed_tokens" in config["modules_to_save"] and config["task_type"] == "CAUSAL_LM"


def eckart_young(delta: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(delta)
    return float((s[k:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_low_rank_error_is_optimal_and_bounds_the_logits(llama, tmp_path, svd):
    root, tuned_logits, base_logits = llama
    report = at.extract(root / "base", root / "tuned", tmp_path / svd, rank=4, svd=svd)
    deltas = true_deltas(root)
    for row in report["tensors"]:
        if row["rank"] is None:
            assert row["relative_error"] == 0
            continue
        optimum = eckart_young(deltas[row["name"]], 4)
        assert row["rank"] == 4
        if svd == "exact":
            assert row["relative_error"] == pytest.approx(optimum, rel=1e-4, abs=1e-6)
        else:
            assert optimum - 1e-6 <= row["relative_error"] <= optimum * 1.02
    total = report["total"]["relative_error"]
    assert 0.05 < total < 1
    logits = peft_logits(tmp_path / svd, "llama")
    # a first-order effect of the weight errors: the logit change misses at most about that much
    missed = float(torch.linalg.vector_norm(logits - tuned_logits) /
                   torch.linalg.vector_norm(tuned_logits - base_logits))
    assert missed <= total, (missed, total)


def test_same_seed_same_bytes(llama, tmp_path):
    root, _, _ = llama
    outputs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        at.extract(root / "base", root / "tuned", tmp_path / name, rank=3, svd="randomized",
                   seed=seed)
        outputs.append((tmp_path / name / "adapter_model.safetensors").read_bytes())
    assert outputs[0] == outputs[1] != outputs[2]


def test_targets_choose_modules_and_the_rest_is_reported(llama, tmp_path):
    root, _, _ = llama
    report = at.extract(root / "base", root / "tuned", tmp_path / "qv", energy=0.9,
                        targets="q_proj,v_proj")
    rows = {r["name"]: r for r in report["tensors"]}
    lora = {n for n, r in rows.items() if r["rank"]}
    assert lora == {f"model.layers.{i}.self_attn.{m}.weight" for i in (0, 1)
                    for m in ("q_proj", "v_proj")}
    dropped = [r for r in rows.values() if r["rank"] == 0]
    assert len(dropped) == 2 * 5 + 1 and all(r["relative_error"] == 1 for r in dropped)  # + lm_head
    assert report["warnings"] and "left out" in report["warnings"][0]
    assert all(rows[n]["energy_kept"] >= 0.9 - 1e-6 for n in lora)
    assert report["total"]["energy_kept"] < 0.9
    load_with_peft(tmp_path / "qv", "llama")      # PEFT accepts it


def test_gpt2_conv1d_and_biases(tmp_path):
    """GPT-2 stores its Linear-like weights (in, out); biases and layer norms differ too."""
    make_model("gpt2").save_pretrained(tmp_path / "base")
    tuned = fine_tune("gpt2", frozen=("wte",))     # wte is tied to the output layer
    tuned.save_pretrained(tmp_path / "tuned")
    report = at.extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", energy=1.0)
    assert report["total"]["relative_error"] < 1e-6
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"]
    with torch.no_grad():
        expected = model_output(tuned, "gpt2")
    logits = peft_logits(tmp_path / "out", "gpt2")
    assert torch.allclose(logits, expected, rtol=0, atol=1e-4), (logits - expected).abs().max()


def test_bad_input_gives_one_line_errors(llama, tmp_path):
    root, _, _ = llama
    make_model("gpt2").save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "out"
    base, tuned = str(root / "base"), str(root / "tuned")
    for args, code, fragments in [          # 2: misuse of the options, 1: bad input
        ([base, tuned, "--rank", "0"], 2, ["--rank 0"]),
        ([base, tuned, "--energy", "1.5"], 2, ["--energy 1.5", "0 < E <= 1"]),
        ([base, tuned, "--energy", "0"], 2, ["--energy 0"]),
        ([base, tuned], 2, ["--rank R or --energy E"]),
        ([base, tuned, "--rank", "2", "--energy", "0.5"], 2, ["both given"]),
        ([base, base, "--rank", "2"], 1, ["nothing to extract"]),
        ([base, tuned, "--rank", "2", "--targets", "nope"], 1, ["--targets nope", "q_proj"]),
        ([base, str(tmp_path / "missing"), "--rank", "2"], 1, ["missing"]),
    ]:
        assert_cli_error(run_cli("extract", *args, "--out", out), fragments, code=code)
        assert_nothing_written(out)
    # same tensor names are not required; a shape clash is named
    (tmp_path / "wide").mkdir()
    wide = make_model("llama")
    state = {k: v.clone() for k, v in wide.state_dict().items()}
    state["lm_head.weight"] = torch.zeros(97, 32)
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "wide" / "model.safetensors"))
    assert_cli_error(run_cli("extract", base, tmp_path / "wide", "--rank", "2", "--out", out),
                     ["lm_head.weight", "(97, 32)", "(96, 32)"])
    assert_nothing_written(out)


def test_cli_table_and_json(llama, tmp_path):
    root, _, _ = llama
    text = run_cli("extract", root / "base", root / "tuned", "--out", tmp_path / "t",
                   "--rank", "2")
    assert text.code == 0, text.stderr
    assert "model.layers.1.mlp.down_proj.weight" in text.stdout and "total:" in text.stdout
    as_json = run_cli("extract", root / "base", root / "tuned", "--out", tmp_path / "j.st",
                      "--rank", "2", "--json", "--to", "safetensors")
    report = json.loads(as_json.stdout)
    assert report["format"] == "safetensors" and 0 < report["total"]["energy_kept"] < 1
    assert at.load(tmp_path / "j.st", format="safetensors").weights["model.layers.0.self_attn.q_proj.weight"].rank == 2
