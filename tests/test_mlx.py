"""mlx-lm adapters (formats/mlx.py) against mlx-lm 0.32 itself, on the CPU: mlx-lm makes LoRA
and DoRA adapters on a tiny Llama the way ``mlx_lm.lora`` does, and fuses them the way ``mlx_lm
fuse`` does (helpers/mlx_adapters.py).

- read + merge into the HF base: every weight within the fp32 rounding bound of mlx-lm's fused
  weight (``fp32_bound``: the two sides round the same sums in another order), untouched tensors
  bit-identical;
- MLX -> PEFT: PEFT's logits match mlx-lm's with the adapter; PEFT -> MLX: ``mlx_lm.load(base,
  adapter_path=...)`` gives PEFT's logits; MLX -> ours -> MLX is bit-exact;
- MLX -> GGUF and a merge into a GGUF base: llama.cpp's logits match mlx-lm's;
- an embedding LoRA, and fine_tune_type full (full tensors);
- bad input (num_layers against the tensors, a missing lora_b, what mlx-lm cannot hold, an
  MLX-quantized base) exits 1 with one line naming the tensor or field.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers.cli import assert_cli_error, assert_nothing_written, run_cli
from helpers.mlx_adapters import (
    fused_weights,
    hf_llama,
    load_with_mlx,
    mlx_logits,
    save_adapter,
    with_lora,
)
from helpers.models import LLAMA_ALL, make_model, model_output
from helpers.peft_adapters import load_with_peft, make_adapter
from helpers.quantized_bases import rel_l2
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.adapter import first_difference

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install -e '.[test]': mlx-cpu, "
                                       "mlx, mlx-lm)")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install mlx-lm)")

KINDS = ["lora", "dora"]
U = 2.0 ** -24            # fp32 unit roundoff
# logits through two fp32 computations in different orders (merged vs unmerged, MLX vs torch
# kernels): FORMATS.md's fp32 noise floor is ~1e-6 relative L2; 1e-5 leaves room for the order
LOGITS_REL = 1e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return hf_llama(tmp_path_factory.mktemp("mlx_base") / "llama")


@pytest.fixture(scope="module", params=KINDS)
def case(request, base, tmp_path_factory):
    """(kind, adapter folder as mlx_lm.lora saves it, mlx-lm's logits with the adapter,
    mlx_lm fuse's weights)."""
    dora = request.param == "dora"
    model, params = with_lora(base, dora=dora)
    folder = save_adapter(model, params, tmp_path_factory.mktemp("mlx") / request.param,
                          dora=dora, base=base)
    logits = mlx_logits(model)
    return request.param, folder, logits, fused_weights(model)


def fp32_bound(weight: torch.Tensor, w) -> torch.Tensor:
    """How far two fp32 evaluations of the merged weight may lie apart, per element.

    Each side forms ``V = W + s * B @ A`` from r products (mlx-lm: ``(s * B) @ A``, ours:
    ``s * (B @ A)``): within ``(r + 1) u s |B| @ |A|`` of the exact sum, plus ``u |V|`` for the
    addition. DoRA scales V by ``m / ||V||_row``: a norm of ``cols`` squares (relative error
    ``(cols / 2 + 1) u``), a division and a product. Both sides err, so twice one side's bound.
    """
    a, b, W = w.a.double(), w.b.double(), weight.double()
    V = W + w.scale * (b @ a)
    side = (w.rank + 1) * U * abs(w.scale) * (b.abs() @ a.abs()) + U * V.abs()
    if w.magnitude is not None:
        ratio = (w.magnitude.double() / torch.linalg.norm(V, dim=1)).view(-1, 1)
        side = ratio.abs() * side + (ratio * V).abs() * (V.shape[1] / 2 + 3) * U
    return 2 * side


def test_read_names_scale_and_inspect(case, base):
    kind, folder, _, _ = case
    adapter = at.load(folder)
    hf_names = set(load_file(base / "model.safetensors"))
    assert len(adapter.weights) == 14 and set(adapter.weights) <= hf_names   # 7 per block x 2
    w = adapter.weights["model.layers.1.mlp.down_proj.weight"]
    assert (w.rank, w.scale, w.layer, w.shape) == (4, 2.5, "linear", (32, 48))
    assert (w.magnitude is not None) == (kind == "dora")
    assert adapter.base_model == str(base)
    for path in (folder, folder / "adapters.safetensors"):       # the folder or its weights file
        report = run_cli("inspect", path, "--json", expect=0)
        data = json.loads(report.stdout)
        assert data["format"] == "mlx"
        assert data["storage"] == {"fine_tune_type": kind, "num_layers": 2, "rank": 4,
                                   "scale": 2.5, "keys": None}


def test_merge_into_hf_base_matches_mlx_fuse(case, base, tmp_path):
    """Our merge vs mlx_lm fuse: within fp32_bound everywhere (measured: LoRA 6.0e-8, DoRA
    1.5e-8 max abs; at most 0.44 (LoRA) and 0.26 (DoRA) of the bound); the 7 untouched
    tensors bit-equal."""
    kind, folder, _, fused = case
    run_cli("merge", base, folder, "--out", tmp_path / "merged", expect=0)
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    adapter = at.load(folder)
    assert ours.keys() == fused.keys()
    worst = 0.0
    for name, reference in fused.items():
        if name not in adapter.weights:
            assert torch.equal(ours[name], reference), name
            continue
        diff = (ours[name].double() - reference.double()).abs()
        bound = fp32_bound(original[name], adapter.weights[name])
        assert bool((diff <= bound).all()), (name, float((diff / bound).max()))
        assert float(diff.max()) <= 1e-7, name
        worst = max(worst, float((diff / bound).max()))
        assert not torch.equal(ours[name], original[name]), name        # the adapter matters
    print(f"{kind}: worst |ours - mlx fuse| / fp32_bound = {worst:.3f}")


def test_mlx_to_peft_gives_mlx_logits(case, tmp_path):
    kind, folder, logits, _ = case
    run_cli("convert", folder, tmp_path / "peft", "--to", "peft", expect=0)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (4, 10, kind == "dora")
    peft_logits = model_output(load_with_peft(tmp_path / "peft", "llama"), "llama")
    plain = model_output(make_model("llama"), "llama")
    assert rel_l2(plain, logits) > 1e-2                 # the adapter matters
    assert rel_l2(peft_logits, logits) < LOGITS_REL     # measured ~1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_peft_to_mlx_loaded_by_mlx_lm(kind, base, tmp_path):
    peft_model = make_adapter(make_model("llama"), tmp_path / "peft", r=4, lora_alpha=8,
                              lora_dropout=0.05, target_modules=LLAMA_ALL,
                              use_dora=kind == "dora")
    reference = model_output(peft_model, "llama")
    run_cli("convert", tmp_path / "peft", tmp_path / "mlx", "--to", "mlx", expect=0)
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == kind and config["num_layers"] == -1
    keys = sorted(f"{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}" for m in LLAMA_ALL)
    assert config["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.05, "keys": keys}
    model = load_with_mlx(base, tmp_path / "mlx")
    assert rel_l2(mlx_logits(model), reference) < LOGITS_REL
    # and back: PEFT -> MLX -> ours is the PEFT adapter, factor for factor
    assert first_difference(at.load(tmp_path / "mlx"), at.load(tmp_path / "peft")) is None


def test_round_trips_are_bit_exact(case, tmp_path):
    """MLX -> ours -> MLX: the same tensors (bits, dtypes, names) and the same config;
    MLX -> PEFT -> ours: the same adapter."""
    _, folder, _, _ = case
    run_cli("convert", folder, tmp_path / "again", "--to", "mlx", expect=0)
    before, after = load_file(folder / "adapters.safetensors"), \
        load_file(tmp_path / "again" / "adapters.safetensors")
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        assert tensor.dtype == after[key].dtype and torch.equal(tensor, after[key]), key
    config = json.loads((folder / "adapter_config.json").read_text())
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text()) == config
    run_cli("convert", folder, tmp_path / "peft", "--to", "peft", expect=0)
    assert first_difference(at.load(tmp_path / "peft"), at.load(folder)) is None


def test_keys_and_num_layers_of_the_last_blocks(base, tmp_path):
    """A LoRA on the last block's q_proj and v_proj only (keys, num_layers 1): read, merged,
    and written back with its own keys and num_layers."""
    keys = ["self_attn.q_proj", "self_attn.v_proj"]
    model, params = with_lora(base, num_layers=1, keys=keys)
    folder = save_adapter(model, params, tmp_path / "mlx", num_layers=1)
    fused = fused_weights(model)
    adapter = at.load(folder)
    assert sorted(adapter.weights) == [f"model.layers.1.self_attn.{m}.weight"
                                       for m in ("q_proj", "v_proj")]
    run_cli("merge", base, folder, "--out", tmp_path / "merged", expect=0)
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    for name in adapter.weights:
        assert torch.allclose(ours[name], fused[name], rtol=0, atol=1e-7), name
    at.save(adapter, tmp_path / "again", format="mlx")
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["num_layers"] == 1 and config["lora_parameters"]["keys"] == keys


# ----------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_case(tmp_path_factory):
    """The GGUF tests' tiny Llama (O(1) logits) as HF folder and F32 GGUF, with an mlx-lm LoRA
    on it and mlx-lm's logits for helpers.gguf_base.IDS."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (the llama extra)")
    from helpers.gguf_base import IDS, make_base_model, write_gguf_base

    root = tmp_path_factory.mktemp("mlx_gguf")
    model = make_base_model("llama")
    model.save_pretrained(root / "hf")
    gguf_base = write_gguf_base(model, root / "base.gguf", "llama")
    lora, params = with_lora(root / "hf", scale=1.5)
    folder = save_adapter(lora, params, root / "mlx", base=root / "hf")
    return root, gguf_base, folder, mlx_logits(lora, [IDS])[0].double().numpy()


def test_mlx_to_gguf_runs_in_llama_cpp(gguf_case, tmp_path):
    """llama.cpp's runtime LoRA from our MLX -> GGUF file, and a merge of the MLX adapter into
    the GGUF base: both within llama.cpp's f32 gap to torch (5e-6) of mlx-lm's logits."""
    from helpers.gguf_base import llama_logits, max_diff

    root, gguf_base, folder, reference = gguf_case
    run_cli("convert", folder, tmp_path / "lora.gguf", "--to", "gguf", "--base", root / "hf",
            expect=0)
    run_cli("merge", gguf_base, folder, "--out", tmp_path / "merged.gguf", expect=0)
    assert max_diff(llama_logits(gguf_base), reference) > 0.1        # the adapter matters
    assert max_diff(llama_logits(gguf_base, tmp_path / "lora.gguf"), reference) < 1e-4
    assert max_diff(llama_logits(tmp_path / "merged.gguf"), reference) < 1e-4
    back = at.load(tmp_path / "lora.gguf", base=root / "hf")
    assert first_difference(back, at.load(folder)) is None           # permutation undone exactly


# ----------------------------------------------------------------------------- bad input


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "bad")


def test_num_layers_disagreeing_with_the_tensors(case, base, tmp_path):
    bad = _copy(case[1], tmp_path)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["num_layers"] = 1
    (bad / "adapter_config.json").write_text(json.dumps(config))
    outcome = run_cli("merge", base, bad, "--out", tmp_path / "out")
    assert_cli_error(outcome, ["num_layers is 1", "blocks 0-1",
                               "model.layers.0.mlp.down_proj.lora_a", "set num_layers to 2"])
    assert_nothing_written(tmp_path / "out")


def test_missing_lora_b_is_named(case, base, tmp_path):
    bad = _copy(case[1], tmp_path)
    tensors = load_file(bad / "adapters.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.lora_b"]
    save_file(tensors, bad / "adapters.safetensors", metadata={"format": "mlx"})
    for args in (("inspect", bad), ("convert", bad, tmp_path / "out", "--to", "peft")):
        assert_cli_error(run_cli(*args), ["adapters.safetensors",
                                          "model.layers.0.self_attn.q_proj.lora_b is missing"])
    assert_nothing_written(tmp_path / "out")


def test_config_mlx_lm_would_refuse(case, tmp_path):
    """A rank the factors do not have; a DoRA magnitude in a lora adapter; alpha for scale."""
    kind, folder, _, _ = case
    bad = _copy(folder, tmp_path)
    config = json.loads((bad / "adapter_config.json").read_text())
    changes = [({"lora_parameters": dict(config["lora_parameters"], rank=8)},
                ["model.layers.0.mlp.down_proj.lora_a is (48, 4)", "rank 8"]),
               ({"lora_parameters": {"rank": 4, "alpha": 16, "dropout": 0.0}},
                ["lora_parameters.scale", "no alpha"])]
    if kind == "dora":
        changes.append(({"fine_tune_type": "lora"}, [".m", "set it to dora"]))
    for change, fragments in changes:
        (bad / "adapter_config.json").write_text(json.dumps(dict(config, **change)))
        assert_cli_error(run_cli("inspect", bad), fragments)


def test_what_mlx_lm_cannot_hold_is_refused(tmp_path):
    """Per-module ranks (PEFT's rank_pattern): mlx-lm has one rank; nothing is written."""
    make_adapter(make_model("llama"), tmp_path / "peft", r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    outcome = run_cli("convert", tmp_path / "peft", tmp_path / "mlx", "--to", "mlx")
    assert_cli_error(outcome, ["mlx-lm has one rank for every module", "rank 4", "and 2"])
    assert_nothing_written(tmp_path / "mlx")


def test_peft_reader_points_at_mlx(case):
    outcome = run_cli("inspect", case[1], "--from", "peft")
    assert_cli_error(outcome, ["an MLX (mlx-lm) adapter", "--from mlx"])


def test_mlx_quantized_base_is_refused_by_name(case, base, tmp_path):
    """A base mlx_lm.convert quantized (config.json quantization {group_size, bits}, uint32
    weights with .scales/.biases): refused by name, not as "quant_method None"."""
    from mlx_lm.convert import convert

    convert(str(base), str(tmp_path / "q4"), quantize=True, q_group_size=32, q_bits=4)
    assert "model.layers.0.self_attn.q_proj.scales" in load_file(tmp_path / "q4" /
                                                                 "model.safetensors")
    outcome = run_cli("merge", tmp_path / "q4", case[1], "--out", tmp_path / "out")
    assert_cli_error(outcome, ["an MLX-quantized base (bits=4, group_size=32)",
                               "merge into the unquantized model"])
    assert_nothing_written(tmp_path / "out")


def test_embedding_lora(base, tmp_path):
    """A LoRA on model.embed_tokens (mlx-lm's LoRAEmbedding: W + scale * lora_a @ lora_b, lora_a
    (vocab, r)): merged as mlx_lm fuse does, and PEFT's lora_embedding_A/B give mlx-lm's logits."""
    model, params = with_lora(base, num_layers=1, keys=["self_attn.q_proj", "model.embed_tokens"])
    folder = save_adapter(model, params, tmp_path / "mlx", num_layers=1)
    logits = mlx_logits(model)
    fused = fused_weights(model)
    w = at.load(folder).weights["model.embed_tokens.weight"]
    assert (w.layer, w.shape) == ("embedding", (96, 32))
    run_cli("merge", base, folder, "--out", tmp_path / "merged", expect=0)
    ours = load_file(tmp_path / "merged" / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.allclose(ours, fused["model.embed_tokens.weight"], rtol=0, atol=1e-7)
    run_cli("convert", folder, tmp_path / "peft", "--to", "peft", expect=0)
    peft_logits = model_output(load_with_peft(tmp_path / "peft", "llama"), "llama")
    assert rel_l2(peft_logits, logits) < LOGITS_REL
    run_cli("convert", tmp_path / "peft", tmp_path / "back", "--to", "mlx", expect=0)
    assert rel_l2(mlx_logits(load_with_mlx(base, tmp_path / "back")), logits) < LOGITS_REL


def test_full_fine_tune_replaces_the_trained_tensors(base, tmp_path):
    """fine_tune_type full (mlx_lm.lora unfreezes the last num_layers blocks and saves their
    tensors): read as full tensors; the merge writes them in place of the base's."""
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    model, _ = load_model(base)
    model.freeze()
    model.layers[-1].unfreeze()
    trained = {n: v + 0.01 for n, v in tree_flatten(model.trainable_parameters())}
    folder = tmp_path / "full"
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), trained)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "full", "num_layers": 1, "lora_parameters": None}))
    adapter = at.load(folder)
    assert not adapter.weights and sorted(adapter.replacements) == sorted(trained)
    run_cli("merge", base, folder, "--out", tmp_path / "merged", expect=0)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for name, value in trained.items():
        assert torch.equal(merged[name], torch.from_numpy(np.array(value))), name
    untouched = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged[untouched], load_file(base / "model.safetensors")[untouched])
