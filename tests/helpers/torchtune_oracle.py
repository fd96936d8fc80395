"""Run by the torchtune oracle environment's own python (helpers/torchtune_env.py), not imported
by the tests: makes one LoRA / DoRA checkpoint the way torchtune 0.6.1's
recipes/lora_finetune_single_device.py does, on a tiny HF base folder.

    python torchtune_oracle.py '[{"base": DIR, "out": DIR, "model": "llama"|"qwen2"|"gemma2",
                                  "dora": false, "rank": 4, "alpha": 8.0, "seed": 0}, ...]'

- base weights: FullModelHFCheckpointer(model_type LLAMA3 | QWEN2).load_checkpoint() (HF ->
  torchtune names, q/k rows permuted for LLAMA3 only), loaded into torchtune's own LoRA model
  (``lora_llama3`` / ``lora_qwen2`` component builders, tiny sizes from the base's config.json);
  DoRA magnitudes initialised by ``initialize_dora_magnitude`` as the recipe does;
- "training": every lora_b (zero at init) drawn at random, DoRA magnitudes scaled away from the
  base's norms;
- saved as the recipe's save_checkpoint does: the adapter state dict (get_adapter_state_dict),
  torchtune's own merge (get_merged_lora_ckpt) as the model, and the adapter config, through the
  checkpointer's save_checkpoint: ``out/epoch_0/`` holds adapter_model.pt, the PEFT-form
  adapter_config.json + adapter_model.safetensors, and the merged HF model (the reference).
"""

import json
import sys
from pathlib import Path

import torch


def main(spec: dict) -> None:
    from torchtune import training
    from torchtune.modules.peft import (
        get_adapter_params,
        get_adapter_state_dict,
        get_lora_module_names,
        get_merged_lora_ckpt,
    )

    base, out = Path(spec["base"]), Path(spec["out"])
    config = json.loads((base / "config.json").read_text())
    if spec["model"] == "llama":
        from torchtune.models.llama3._component_builders import lora_llama3 as builder
        model_type, extra = "LLAMA3", {}
    elif spec["model"] == "qwen2":
        from torchtune.models.qwen2._component_builders import lora_qwen2 as builder
        model_type, extra = "QWEN2", {"tie_word_embeddings": False}
    else:             # gemma2: tied embeddings, so no LoRA on the output
        from torchtune.models.gemma2._component_builders import lora_gemma2 as builder
        model_type = "GEMMA2"
        extra = {"head_dim": config["head_dim"], "sliding_window_size": config["sliding_window"],
                 "query_pre_attn_scalar": config["query_pre_attn_scalar"]}
    checkpointer = training.FullModelHFCheckpointer(
        checkpoint_dir=str(base), checkpoint_files=["model.safetensors"], model_type=model_type,
        output_dir=str(out))
    base_state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    attn, mlp = ["q_proj", "k_proj", "v_proj", "output_proj"], True
    output = spec["model"] != "gemma2"      # lora_gemma2 has no output LoRA (tied embeddings)
    if output:
        extra["apply_lora_to_output"] = True
    rank, alpha = spec["rank"], spec["alpha"]
    model = builder(lora_attn_modules=attn, apply_lora_to_mlp=mlp,
                    vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
                    num_heads=config["num_attention_heads"],
                    num_kv_heads=config["num_key_value_heads"], embed_dim=config["hidden_size"],
                    intermediate_dim=config["intermediate_size"],
                    max_seq_len=config["max_position_embeddings"],
                    norm_eps=config["rms_norm_eps"], lora_rank=rank, lora_alpha=alpha,
                    use_dora=spec["dora"], **extra)
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    assert not unexpected and all("lora" in k or "magnitude" in k for k in missing), unexpected
    if spec["dora"]:
        for m in model.modules():
            if hasattr(m, "initialize_dora_magnitude"):
                m.initialize_dora_magnitude()
    if spec.get("adapter"):
        state = torch.load(spec["adapter"], map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        lost = [k for k in get_adapter_params(model) if k in missing]
        assert not lost, f"adapter tensors missing from {spec['adapter']}: {lost[:3]}"
        merged = get_merged_lora_ckpt({k: v.cpu() for k, v in model.state_dict().items()},
                                      rank=rank, alpha=alpha)
        checkpointer.save_checkpoint({training.MODEL_KEY: merged}, epoch=0)
        return
    gen = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for name, p in get_adapter_params(model).items():
            if name.endswith("lora_b.weight"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("magnitude"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    adapter = get_adapter_state_dict(model.state_dict())
    merged = get_merged_lora_ckpt({k: v.cpu() for k, v in model.state_dict().items()},
                                  rank=rank, alpha=alpha)
    adapter_config = {"r": rank, "lora_alpha": alpha,
                      "target_modules": get_lora_module_names(attn, mlp, output),
                      "peft_type": "LORA"}
    checkpointer.save_checkpoint({training.MODEL_KEY: merged, training.ADAPTER_KEY: adapter,
                                  training.ADAPTER_CONFIG: adapter_config}, epoch=0)


if __name__ == "__main__":
    for one in json.loads(sys.argv[1]):         # one interpreter: torchtune imports once
        main(one)
