"""Tiny models built in code, with seeded random weights: the same kind, the same weights,
every call (transformers Llama / GPT-2 and a small conv net, and one of each GGUF architecture)."""

from __future__ import annotations

import torch

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def build_base(arch: str, dtype: torch.dtype) -> torch.nn.Module:
    """A tiny seeded model in ``dtype``; Qwen2 gets random q/k/v biases (its init zeroes them)."""
    if arch == "qwen2":
        model = make_causal_lm("qwen2")
        with torch.no_grad():
            gen = torch.Generator().manual_seed(5)
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    else:
        model = make_model(arch)
    return model.to(dtype).eval()


class TinyLinearConv(torch.nn.Module):
    """Linear -> Conv2d k=3 -> Linear, each a layer LoHa/LoKr adapt (the forward never runs):
    tests/test_delta_engine.py and tests/test_peft_lycoris.py."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 48)
        self.c2 = torch.nn.Conv2d(16, 32, 3)
        self.out = torch.nn.Linear(48, 40)


# Architectures llama.cpp's convert_lora_to_gguf.py handles beyond GGUF_ARCHS (issue 19):
# name -> (transformers model class, config class, config kwargs beyond ``ARCH_SMALL``)
ARCH_SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
              "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
MORE_GGUF_ARCHS = {
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {"head_dim": 16}),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", {}),
    "olmo": ("OlmoForCausalLM", "OlmoConfig", {}),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {}),
    "granite": ("GraniteForCausalLM", "GraniteConfig", {}),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", {}),
    # MHA with a 4x feed-forward, as phi-2: llama.cpp's Phi2Model writes head_count_kv =
    # head_count and feed_forward_length = 4 * n_embd whatever the config says
    "phi": ("PhiForCausalLM", "PhiConfig", {"num_key_value_heads": 4, "intermediate_size": 256}),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {}),
    # the new decoder layout with 2 kv groups of 2 q heads: llama.cpp regroups its fused rows
    "falcon": ("FalconForCausalLM", "FalconConfig", {"new_decoder_architecture": True,
                                                     "num_kv_heads": 2}),
    "cohere": ("CohereForCausalLM", "CohereConfig", {}),
    "smollm3": ("SmolLM3ForCausalLM", "SmolLM3Config", {}),
    "exaone4": ("Exaone4ForCausalLM", "Exaone4Config", {}),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 48}),
    "granitemoe": ("GraniteMoeForCausalLM", "GraniteMoeConfig",
                   {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "glm4": ("Glm4ForCausalLM", "Glm4Config", {}),
    "nemotron": ("NemotronForCausalLM", "NemotronConfig", {}),
    "ernie4_5": ("Ernie4_5ForCausalLM", "Ernie4_5Config", {}),
    "cohere2": ("Cohere2ForCausalLM", "Cohere2Config", {}),
    "arcee": ("ArceeForCausalLM", "ArceeConfig", {}),
    "seed_oss": ("SeedOssForCausalLM", "SeedOssConfig", {}),
    "olmo3": ("Olmo3ForCausalLM", "Olmo3Config", {}),
    "apertus": ("ApertusForCausalLM", "ApertusConfig", {}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "head_dim": 16, "norm_topk_prob": True}),    # as the released models
    # MHA, as OLMoE-1B-7B: llama.cpp's olmoe sizes k_norm by head_count, not head_count_kv
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2,
                                                  "num_key_value_heads": 4}),
    # saved by transformers 5 as block_sparse_moe.experts.{e}.w1/w2/w3, which LlamaModel stacks
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", {"num_local_experts": 4,
                                                        "num_experts_per_tok": 2}),
    "hunyuan_v1_dense": ("HunYuanDenseV1ForCausalLM", "HunYuanDenseV1Config", {"head_dim": 16}),
    # MLA (q_lora_rank, kv_lora_rank) and MHA, as MiniCPM3-4B
    "minicpm3": ("MiniCPM3ForCausalLM", "MiniCPM3Config", {
        "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8, "v_head_dim": 16}),
    # layer 0 dense, layer 1 routed + one shared expert (first_k_dense_replace), as GLM-4.5
    "glm4_moe": ("Glm4MoeForCausalLM", "Glm4MoeConfig", {
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "n_shared_experts": 1, "first_k_dense_replace": 1, "head_dim": 16}),
    # MHA as dots.llm1 (with 2 kv heads llama.cpp finds attn_k the wrong shape). scoring_func:
    # transformers' Dots1 gates with a sigmoid but does not write it, and without it llama.cpp's
    # converter writes no gating function and llama.cpp aborts in build_moe_ffn
    "dots1": ("Dots1ForCausalLM", "Dots1Config", {
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
        "moe_intermediate_size": 32, "first_k_dense_replace": 1, "num_key_value_heads": 4,
        "scoring_func": "sigmoid"}),
    # two shared experts of 24 = intermediate_size / num_key_value_heads, the shared size
    # llama.cpp's Ernie4_5MoeModel writes (as ERNIE-4.5-21B-A3B: 12288 / 4 = 2 * 1536)
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", "Ernie4_5_MoeConfig", {
        "moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 24,
        "moe_num_shared_experts": 2, "moe_layer_start_index": 1}),
    "granitemoeshared": ("GraniteMoeSharedForCausalLM", "GraniteMoeSharedConfig", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "shared_intermediate_size": 48}),
}
# what the arch's LoRA targets where "all-linear" would reach the fused routed experts (PEFT
# wraps their 3-D parameters; llama.cpp's converter refuses those: "Unprocessed experts")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ARCH_TARGETS = {"qwen3_moe": ATTENTION, "olmoe": ATTENTION, "mixtral": ATTENTION,
                "glm4_moe": ATTENTION, "dots1": ATTENTION, "ernie4_5_moe": ATTENTION,
                # the MLA projections take no runtime LoRA in llama.cpp (names.NO_RUNTIME_LORA)
                "minicpm3": ["o_proj", "gate_proj", "up_proj", "down_proj"],
                # shared_mlp.input_linear (fused gate/up, split by llama.cpp's converter) has no
                # mapping here yet
                "granitemoeshared": [*ATTENTION, "output_linear"]}
# MoE architectures whose routed experts (and router) take a LoRA in GGUF (tests/test_moe_gguf.py)
MOE_GGUF_ARCHS = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "glm4_moe",
                  "dots1", "ernie4_5_moe")
# MoE architectures tested in tests/test_moe_gguf.py only: PEFT 0.21.2 on transformers 5 remaps
# any gate_proj / up_proj / down_proj target of deepseek_v3 to its fused experts' parameters
# (peft/utils/transformers_weight_conversion.py _convert_peft_config_moe), so no LoRA reaches
# its dense and shared-expert MLPs, and llama.cpp applies none to its MLA projections: the
# all-linear matrix of tests/test_gguf_archs.py has nothing to compare there
MOE_ONLY_ARCHS = {
    # MLA (q_lora_rank, kv_lora_rank), layer 0 dense, layer 1 routed + shared experts; MHA as
    # the released models. scoring_func as DeepSeek-V3's config.json has it: transformers 5
    # does not write it, and llama.cpp's converter (base.py) otherwise leaves llama.cpp on
    # softmax gating where DeepSeek-V3 is sigmoid (3e-3 off transformers on this model)
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config", {
        "num_key_value_heads": 4, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1,
        "topk_group": 1, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16, "v_head_dim": 16, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc"}),
}


def make_arch_model(arch: str, **overrides) -> torch.nn.Module:
    """A tiny seeded transformers model of MORE_GGUF_ARCHS[arch], float32, eval mode;
    ``overrides``: config kwargs over the table's (K-quant tests: sizes multiples of 256)."""
    import transformers as tf

    model_cls, config_cls, extra = MORE_GGUF_ARCHS.get(arch) or MOE_ONLY_ARCHS[arch]
    torch.manual_seed(4321)
    config = getattr(tf, config_cls)(**{**ARCH_SMALL, **extra, **overrides})
    return getattr(tf, model_cls)(config).float().eval()
