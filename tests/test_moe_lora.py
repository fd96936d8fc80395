"""PEFT ``target_parameters`` LoRAs (formats/peft_params.py, kernels/param_lora.py): LoRA on a plain
2-D ``nn.Parameter`` and on the fused 3-D expert tensors of transformers-5 Qwen3-MoE, Mixtral
and gpt-oss (stored (E, in, out)), as PEFT 0.21.2's save_pretrained writes them. PEFT is the
oracle: the streaming merge equals ``merge_and_unload`` bit for bit (fp32 and bf16), every other
tensor is byte-identical, ``validate`` passes; PEFT -> PEFT is bit-exact and PEFT merges the
written folder the same; other formats refuse naming the tensor; an expert count that differs
from the base's is one line and nothing written.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers.cli import run_cli
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.errors import FormatError, UnsupportedError

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


class TinyParams(torch.nn.Module):
    """A custom module whose Linear is targeted through its parameter (``lin0.weight``)."""

    def __init__(self):
        super().__init__()
        self.lin0 = torch.nn.Linear(6, 10)
        self.lin1 = torch.nn.Linear(10, 4)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=6,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1))


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=10, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=3,
        num_experts_per_tok=2))


def _deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(DeepseekV3Config(   # layer 0 dense, layer 1 MoE + shared
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=6,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
        num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        n_group=1, topk_group=1, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=4))


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=6,
        shared_expert_intermediate_size=10, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_experts=4, num_experts_per_tok=2))


def _gpt_oss(intermediate: int = 6):
    from transformers import GptOssConfig, GptOssForCausalLM

    return GptOssForCausalLM(GptOssConfig(
        vocab_size=64, hidden_size=16, intermediate_size=intermediate, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=3,
        num_experts_per_tok=2, layer_types=["full_attention"]))


CASES = {
    "param-2d": (TinyParams, lambda: LoraConfig(r=2, lora_alpha=5,
                                                target_parameters=["lin0.weight"])),
    "qwen3-moe": (_qwen3_moe, lambda: LoraConfig(r=2, lora_alpha=3, target_parameters=EXPERTS,
                                                 rank_pattern={"layers.1.mlp.experts.down_proj":
                                                               3})),
    "mixtral": (_mixtral, lambda: LoraConfig(r=3, lora_alpha=4, use_rslora=True,
                                             target_parameters=EXPERTS)),
    "gpt-oss": (_gpt_oss, lambda: LoraConfig(r=2, lora_alpha=2, target_parameters=EXPERTS)),
    # PEFT on transformers 5 turns "all-linear" into target_modules + target_parameters
    "qwen3-moe-all-linear": (_qwen3_moe, lambda: LoraConfig(r=2, lora_alpha=4,
                                                            target_modules="all-linear")),
    "deepseek-v3-all-linear": (_deepseek_v3, lambda: LoraConfig(r=2, lora_alpha=4,
                                                                target_modules="all-linear")),
    # PEFT 0.21.2's all-linear leaves Qwen2-MoE's experts out: named here, with its shared expert
    "qwen2-moe-mixed": (_qwen2_moe, lambda: LoraConfig(r=2, lora_alpha=4,
                                                       target_modules=["gate_proj"],
                                                       target_parameters=EXPERTS)),
    "mixtral-mixed": (_mixtral, lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                   target_parameters=EXPERTS[1:])),
    # gate_up_proj (E, 16, 2*8) square: only config.json's model_type says it is (E, in, out)
    "gpt-oss-square": (lambda: _gpt_oss(8),
                       lambda: LoraConfig(r=2, lora_alpha=2, target_parameters=EXPERTS)),
}


def _base(tmp_path, make, dtype: torch.dtype):
    """(the model, its saved base folder, its state dict), seeded."""
    torch.manual_seed(0)
    model = make().to(dtype)
    base = tmp_path / "base"
    base.mkdir()
    model_type = getattr(getattr(model, "config", None), "model_type", "tiny")
    (base / "config.json").write_text(json.dumps({"model_type": model_type}))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, base / "model.safetensors")
    return model, base, state


def _trained(peft_model, tmp_path, *, seed: int):
    """The PEFT model's LoRA factors set to seeded noise (B too, so the delta is not zero),
    saved by PEFT's save_pretrained; the folder."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(peft_model.named_parameters()):
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    return adapter


def _case(tmp_path, name: str, dtype: torch.dtype):
    """(base folder, PEFT adapter folder, PEFT's merged state) for one case."""
    make, config = CASES[name]
    model, base, _ = _base(tmp_path, make, dtype)
    peft_model = get_peft_model(model, config())
    adapter = _trained(peft_model, tmp_path, seed=sum(map(ord, name)))
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return base, adapter, merged, make


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_merge_equals_peft(name, dtype, tmp_path):
    base, adapter, reference = _case(tmp_path, name, dtype)[:3]
    loaded = at.load(adapter)
    original = load_file(base / "model.safetensors")
    assert loaded.weights and all(n in original for n in loaded.weights)
    at.merge(base, [adapter], tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(merged) == sorted(original)
    changed = 0
    for key, tensor in merged.items():
        assert tensor.dtype == original[key].dtype
        assert torch.equal(tensor, reference[key]), key              # bit for bit
        if key not in loaded.weights:
            assert torch.equal(tensor, original[key]), key           # untouched: same bytes
        else:
            changed += not torch.equal(tensor, original[key])
    assert changed == len(loaded.weights)
    outcome = run_cli("validate", base, adapter, "--merged", tmp_path / "out", "--json")
    assert outcome.code == 0, outcome.stderr
    assert json.loads(outcome.stdout)["passed"]


@pytest.mark.parametrize("name", ["param-2d", "qwen3-moe", "gpt-oss", "qwen3-moe-all-linear"])
def test_peft_round_trip_is_bit_exact_and_peft_merges_it(name, tmp_path):
    base, adapter, reference, make = _case(tmp_path, name, torch.float32)
    at.convert(adapter, tmp_path / "again", to="peft")
    first = load_file(adapter / "adapter_model.safetensors")
    second = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(first) == sorted(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    torch.manual_seed(0)
    model = make()
    model.load_state_dict(load_file(base / "model.safetensors"))
    merged = PeftModel.from_pretrained(model, tmp_path / "again").merge_and_unload().state_dict()
    for key, tensor in reference.items():
        assert torch.equal(merged[key], tensor), key


@pytest.mark.parametrize("to", ["mlx", "kohya"])     # GGUF holds them: tests/test_moe_gguf.py
def test_other_formats_refuse_naming_the_tensor(to, tmp_path):
    adapter = _case(tmp_path, "qwen3-moe", torch.float32)[1]
    dst = tmp_path / ("out.gguf" if to == "gguf" else "out")
    with pytest.raises(UnsupportedError, match=r"experts\.(gate_up|down)_proj: .*target_parameters"):
        at.convert(adapter, dst, to=to)
    assert not dst.exists()


def test_expert_count_differing_from_the_base_is_refused(tmp_path):
    base, adapter, _, _ = _case(tmp_path, "qwen3-moe", torch.float32)
    state = load_file(base / "model.safetensors")
    state = {k: (v[:3].contiguous() if ".experts." in k else v) for k, v in state.items()}
    save_file(state, base / "model.safetensors")
    with pytest.raises(FormatError, match=r"experts\.gate_up_proj .*adapter delta \(4, 12, 16\), "
                                          r"base \(3, 12, 16\)"):
        at.merge(base, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rank_that_does_not_divide_is_named(tmp_path):
    adapter = _case(tmp_path, "qwen3-moe", torch.float32)[1]
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 5
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=r"gate_up_proj: lora_A \(8, 16\) is not \(r\*E, in\)"):
        at.load(adapter)


# -- per-expert 2-D LoRAs merged into a fused checkpoint (merging/expert_slices.py) -------------

OLD_NAMES = {"qwen3-moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
             "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}


def _per_expert_model(fused: dict, layers: int, block: str, names: tuple[str, str, str]):
    """The transformers-4 layout of a fused model's experts: one Linear module per expert and
    projection (``model.layers.{l}.<block>.experts.{e}.<name>``), holding transformers 5's
    slices (gate_up_proj [e, :inter] gate, [e, inter:] up; down_proj [e])."""
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = torch.nn.ModuleList()
    for layer in range(layers):
        gate_up = fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = fused[f"model.layers.{layer}.mlp.experts.down_proj"]
        inter = gate_up.shape[1] // 2
        experts = torch.nn.ModuleList()
        for e in range(gate_up.shape[0]):
            expert = torch.nn.Module()
            for name, weight in zip(names, (gate_up[e, :inter], gate_up[e, inter:], down[e])):
                linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False,
                                         dtype=weight.dtype)
                linear.weight.data.copy_(weight)
                setattr(expert, name, linear)
            experts.append(expert)
        moe = torch.nn.Module()
        moe.experts = experts
        holder = torch.nn.Module()
        setattr(holder, block, moe)
        root.model.layers.append(holder)
    return root


def _per_expert_case(tmp_path, name: str, dtype: torch.dtype):
    """(fused base folder, per-expert PEFT adapter folder, PEFT's merge re-fused)."""
    model, base, fused = _base(tmp_path, CASES[name][0], dtype)
    block, *names = OLD_NAMES[name]
    layers = model.config.num_hidden_layers
    old = _per_expert_model(fused, layers, block, tuple(names))
    peft_model = get_peft_model(old, LoraConfig(r=2, lora_alpha=6, target_modules=names))
    adapter = _trained(peft_model, tmp_path, seed=7)
    merged = peft_model.merge_and_unload().model.layers
    expected = dict(fused)
    for layer in range(layers):
        experts = getattr(merged[layer], block).experts
        gate, up, down = ([getattr(x, n).weight.detach() for x in experts] for n in names)
        stem = f"model.layers.{layer}.mlp.experts"
        expected[f"{stem}.gate_up_proj"] = torch.stack([torch.cat(p) for p in zip(gate, up)])
        expected[f"{stem}.down_proj"] = torch.stack(down)
    return base, adapter, expected, fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(OLD_NAMES))
def test_per_expert_loras_fold_into_the_fused_slices(name, dtype, tmp_path):
    base, adapter, expected, fused = _per_expert_case(tmp_path, name, dtype)
    at.merge(base, [adapter], tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(merged) == sorted(fused)
    for key, tensor in merged.items():
        assert torch.equal(tensor, expected[key]), key               # bit for bit
        assert torch.equal(tensor, fused[key]) == (".experts." not in key), key
    outcome = run_cli("validate", base, adapter, "--merged", tmp_path / "out", "--json")
    assert outcome.code == 0, outcome.stderr
    assert json.loads(outcome.stdout)["passed"]


def test_per_expert_loras_for_fewer_experts_are_refused(tmp_path):
    base, adapter, _, _ = _per_expert_case(tmp_path, "qwen3-moe", torch.float32)
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".experts.3." not in k},
              adapter / "adapter_model.safetensors")
    outcome = run_cli("merge", base, adapter, "--out", tmp_path / "out")
    assert outcome.code == 1
    assert re.search(r"experts\.(gate_up|down)_proj: the adapter .* has \w+ LoRAs for 3 "
                     r"expert\(s\) \(0\.\.2\) but the base fuses 4", outcome.stderr)
    assert outcome.stderr.count("\n") == 1                           # one line
    assert not (tmp_path / "out").exists()


def test_end_to_end_logits_equal_peft_unmerged(tmp_path):
    """``validate --e2e``: transformers + PEFT (the LoRA unmerged, its ParamWrapper forward)
    against transformers on our merge. Dimensions are multiples of 4: transformers' grouped_mm
    experts forward needs 16-byte strides (moe_intermediate_size 6 fails inside torch)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=24,
                            moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=8, num_experts=4,
                            num_experts_per_tok=2)
    model, base, _ = _base(tmp_path, lambda: Qwen3MoeForCausalLM(config), torch.float32)
    config.to_json_file(base / "config.json")
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS))
    adapter = _trained(peft_model, tmp_path, seed=3)
    at.merge(base, [adapter], tmp_path / "out")
    outcome = run_cli("validate", base, adapter, "--merged", tmp_path / "out", "--e2e", "--json")
    assert outcome.code == 0, outcome.stderr
    report = json.loads(outcome.stdout)
    assert report["passed"] and report["e2e"]["passed"], report["e2e"]


def test_combine_refuses_them(tmp_path):
    """combine would re-factor the (E, d1 * d2) view of a 3-D delta as one 2-D LoRA."""
    adapter = _case(tmp_path, "qwen3-moe", torch.float32)[1]
    with pytest.raises(UnsupportedError, match=r"experts\.\w+_proj: .*target_parameters LoRA.*"
                                               r"adaptertools merge"):
        at.combine([adapter], tmp_path / "c", method="svd", rank=4)
    assert not (tmp_path / "c").exists()
