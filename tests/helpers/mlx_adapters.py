"""mlx-lm as producer and consumer of MLX adapters, on the CPU (tests/test_mlx.py).

A tiny transformers Llama is saved as an HF folder (with a tiny word-level tokenizer, so that
``mlx_lm.load`` takes it); mlx-lm loads the same weights from it. Adapters are made the way
``mlx_lm.lora`` makes them (``model.freeze()``, ``linear_to_lora_layers``, the trainable
parameters saved with ``mx.save_safetensors``, the training arguments with ``save_config``) and
fused the way ``mlx_lm fuse`` fuses them (each LoRA layer's own ``fuse()``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .models import make_model, model_input

TOKENS = 96         # make_model("llama")'s vocabulary


def _mx():
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    return mx


def hf_llama(folder: Path) -> Path:
    """make_model("llama") saved as an HF folder mlx-lm and transformers both load."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    make_model("llama").save_pretrained(folder)
    vocab = Tokenizer(models.WordLevel({f"t{i}": i for i in range(TOKENS)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=vocab, unk_token="t0",
                            eos_token="t1").save_pretrained(folder)
    return folder


def with_lora(base: Path, *, dora: bool = False, num_layers: int = 2, rank: int = 4,
              scale: float = 2.5, keys: list[str] | None = None, seed: int = 3):
    """(mlx-lm model with LoRA / DoRA layers, their lora_parameters); lora_b and m perturbed."""
    mx = _mx()
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    mx.random.seed(seed)
    model, _ = load_model(Path(base))
    model.freeze()                       # as mlx_lm.lora's train_model
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys is not None:
        params["keys"] = keys
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    trained = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith(".lora_b"):      # zero at init: the adapter would do nothing
            trained[name] = 0.2 * mx.random.normal(value.shape)
        elif name.endswith(".m"):        # DoRA: magnitudes away from the base's own norms
            trained[name] = value * (1 + 0.1 * mx.random.normal(value.shape))
    model.update(tree_unflatten(list(trained.items())))
    mx.eval(model.parameters())
    return model, params


def save_adapter(model, params: dict, folder: Path, *, dora: bool = False,
                 num_layers: int = 2, base: Path | None = None) -> Path:
    """What mlx_lm.lora writes: adapters.safetensors + adapter_config.json (its arguments)."""
    mx = _mx()
    from mlx.utils import tree_flatten
    from mlx_lm.lora import CONFIG_DEFAULTS
    from mlx_lm.utils import save_config

    folder.mkdir(parents=True, exist_ok=True)
    args = dict(CONFIG_DEFAULTS, fine_tune_type="dora" if dora else "lora",
                num_layers=num_layers, lora_parameters=params, adapter_path=str(folder),
                model=str(base) if base else CONFIG_DEFAULTS["model"])
    save_config(args, folder / "adapter_config.json")
    mx.save_safetensors(str(folder / "adapters.safetensors"),
                        dict(tree_flatten(model.trainable_parameters())))
    return folder


def fused_weights(model) -> dict[str, torch.Tensor]:
    """mlx_lm fuse: every LoRA layer replaced by its own ``fuse()``, then the parameters."""
    from mlx.utils import tree_flatten, tree_unflatten

    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    return {name: to_torch(value) for name, value in tree_flatten(model.parameters())}


def to_torch(value) -> torch.Tensor:
    return torch.from_numpy(np.array(value, copy=True))


def mlx_logits(model, ids=None) -> torch.Tensor:
    """The model's fp32 logits, (batch, seq, vocab), for token ids (batch, seq): by default
    model_input("llama"), what helpers.models.model_output feeds the transformers model."""
    mx = _mx()
    ids = model_input("llama").numpy() if ids is None else np.asarray(ids)
    return to_torch(model(mx.array(ids)))


def load_with_mlx(base: Path, adapter: Path):
    """``mlx_lm.load(base, adapter_path=adapter)``: the model, adapter applied."""
    _mx()
    import mlx_lm

    model, _ = mlx_lm.load(str(base), adapter_path=str(adapter))
    return model
