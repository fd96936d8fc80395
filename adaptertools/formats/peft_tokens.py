"""PEFT trainable tokens (new-token training): ``trainable_token_indices`` beside a LoRA, and the
standalone ``TrainableTokensConfig`` (``peft_type`` TRAINABLE_TOKENS), read into
``adapter.TokenRows`` and written back as PEFT 0.21.2 saves them.

Keys (peft/tuners/trainable_tokens/layer.py, ``adapter_layer_names``; saved without the adapter
name):
    base_model.model.<module>.token_adapter.trainable_tokens_delta   beside a LoRA
    base_model.model.<module>.trainable_tokens_delta                 TRAINABLE_TOKENS
Each is (len(indices), dim): the trained rows themselves (the layer merges with ``index_copy``,
not by adding), in the order of the config's indices:
    trainable_token_indices: [ids]              the input embedding's rows (PEFT resolves it
                                                with ``get_input_embeddings``)
    trainable_token_indices: {module: [ids]}    per module, matched by name suffix
    token_indices: [ids] + target_modules       TRAINABLE_TOKENS
A tied lm_head shares the embedding's layer and is not saved (``_tied_adapter``); the merged,
still tied, embedding serves both.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..adapter import TokenRows
from ..errors import FormatError
from .peft_keys import KEY_PREFIX

if TYPE_CHECKING:      # the light path's tensors are numpy (light.arrays.Stored)
    import torch

DELTA = "trainable_tokens_delta"
WRAPPER = "token_adapter"
TRAINABLE_TOKENS = "TRAINABLE_TOKENS"


def token_module(key: str) -> str | None:
    """The module whose rows ``key`` holds, or None for any other key."""
    stem = key.removeprefix(KEY_PREFIX)
    tokens = [t for t in stem.split(".") if t != "default"]
    if not tokens or tokens[-1] != DELTA:
        return None
    tokens = tokens[:-1]
    if tokens and tokens[-1] == WRAPPER:
        tokens = tokens[:-1]
    return ".".join(tokens)


def _indices_for(config: dict, module: str, where) -> list[int]:
    if str(config.get("peft_type", "")).upper() == TRAINABLE_TOKENS:
        given = config.get("token_indices")
    else:
        given = config.get("trainable_token_indices")
    if isinstance(given, dict):
        matches = [ids for name, ids in given.items()
                   if module == name or module.endswith("." + name)]
        given = matches[0] if len(matches) == 1 else None
    if not isinstance(given, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                              for i in given):
        raise FormatError(f"{where}: {module}: trainable token rows but no list of token ids "
                          "for this module in adapter_config.json (trainable_token_indices / "
                          "token_indices); save the adapter again with PEFT")
    return given


def split(state_dict: dict[str, torch.Tensor], config: dict,
          where: Path) -> tuple[dict[str, torch.Tensor], dict[str, TokenRows]]:
    """(the state dict without its token rows, the rows by base tensor name)."""
    rest, rows = {}, {}
    for key, tensor in state_dict.items():
        module = token_module(key)
        if module is None:
            rest[key] = tensor
            continue
        indices = _indices_for(config, module, where)
        if tensor.dim() != 2 or tensor.shape[0] != len(indices):
            raise FormatError(f"{where}: {key} is {tuple(tensor.shape)} but the config lists "
                              f"{len(indices)} token id(s); one row per id is expected")
        if len(set(indices)) != len(indices):
            raise FormatError(f"{where}: {module}: the token ids repeat; each row needs its own "
                              "id")
        rows[module + ".weight"] = TokenRows(tuple(indices), tensor)
    return rest, rows


def state_dict_entries(rows: dict[str, TokenRows], *, standalone: bool) -> dict[str, torch.Tensor]:
    """The saved keys of ``rows`` (``standalone``: a TRAINABLE_TOKENS adapter's)."""
    out = {}
    for name, r in rows.items():
        module = name.removesuffix(".weight")
        wrapper = "" if standalone else f".{WRAPPER}"
        out[f"{KEY_PREFIX}{module}{wrapper}.{DELTA}"] = r.values.contiguous()
    return out


def config_fields(rows: dict[str, TokenRows]) -> dict:
    """``trainable_token_indices`` for a LoRA config: per module (PEFT's dict form, which
    names each module and so needs no base model to resolve)."""
    return {"trainable_token_indices": {name.removesuffix(".weight"): list(r.indices)
                                        for name, r in rows.items()}}
