"""What merge, combine and the validator take in: weights parsed (``parse_weights``), adapters
listed (``adapter_list``, ``adapter_inputs``), Hub inputs fetched and the base and adapters opened
(``open_inputs``, ``load_finite``). Below api.py and the validators, which both use it.
"""

from __future__ import annotations

import math
import os

from .adapter import Adapter, nonfinite_tensors
from .adapter_io import load, local_input_path
from .errors import FormatError, OptionError, UnsupportedError


def parse_weights(weights, count: int) -> list[float]:
    """``"0.5,0.5"``, a number or a sequence -> one finite float per adapter (default 1 each)."""
    if weights is None:
        return [1.0] * count
    given = weights
    try:
        if isinstance(weights, str):
            items = weights.split(",")
        elif isinstance(weights, (int, float)):
            items = [weights]
        else:
            items = list(weights)
        weights = [float(w) for w in items]
    except (TypeError, ValueError):
        raise OptionError(f"--weights {given!r}: expected numbers separated by commas, "
                          "one per adapter") from None
    bad = [item for item, w in zip(items, weights) if not math.isfinite(w)]
    if bad:
        raise OptionError(f"--weights {given!r}: {str(bad[0]).strip()!r} is not a finite "
                          "number; give finite weights, one per adapter")
    if len(weights) != count:
        raise OptionError(f"--weights has {len(weights)} value(s) for {count} adapter(s); "
                          "give one weight per adapter")
    return weights


def adapter_list(adapters) -> list:
    """One adapter path (str or PathLike) or a sequence of them, as a list."""
    return [adapters] if isinstance(adapters, (str, os.PathLike)) else list(adapters)


def adapter_inputs(adapters, weights, mode: str) -> tuple[list, list[float]]:
    """The adapters as given, as a list, and one weight each; the ``mode`` checked (merge and
    the validator)."""
    from .merging.plan import MODES

    if mode not in MODES:
        raise OptionError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    paths = adapter_list(adapters)
    if not paths:
        raise OptionError("no adapters given; pass at least one")
    return paths, parse_weights(weights, len(paths))


def open_inputs(base, paths: list, hub: dict, sources: list, *, refusal: str,
                scale: float | None = None):
    """Hub inputs fetched (their provenance appended to ``sources``), the base opened and the
    adapters loaded through it (GGUF adapters map names through the base; errors name the
    adapters as given; ``scale`` as for ``load``). Returns (local base, base checkpoint, local
    adapter paths, adapters)."""
    from .merging.bases import open_base

    local_base = local_input_path(base, "base", hub, sources)
    local_paths = [local_input_path(p, "adapter", hub, sources) for p in paths]
    checkpoint = open_base(local_base)
    # a GGUF base's names and shapes come from the header open_base already parsed
    loaded = load_finite(local_paths, paths, refusal=refusal, scale=scale,
                         base=checkpoint.info if checkpoint.kind == "gguf" else local_base)
    if checkpoint.kind == "safetensors":   # one diffusers component's folder: "unet." dropped
        from .formats.diffusers import for_component

        entries = checkpoint.entries()
        loaded = [for_component(a, entries, base, str(p)) for a, p in zip(loaded, paths)]
    return local_base, checkpoint, local_paths, loaded


def load_finite(paths, names, *, base, refusal: str, scale: float | None = None) -> list[Adapter]:
    """``load`` each adapter (``names``: how errors call them; ``scale`` for bare factor files,
    refused for any other) to be merged or combined: one holding NaN or Inf values, or an
    activated LoRA, is refused with an error ending in ``refusal``."""
    from .formats.accounting import invocation_tokens

    loaded = [load(p, base=base, scale=scale) for p in paths]
    for name, adapter in zip(names, loaded):
        bad = nonfinite_tensors(adapter)
        if bad:
            raise FormatError(f"{name}: {bad[0]} holds NaN or Inf values; {refusal}")
        tokens = invocation_tokens(adapter)
        if tokens:
            raise UnsupportedError(f"{name}: an activated LoRA (aLoRA, invocation tokens "
                                   f"{tokens}) changes only the tokens after its invocation "
                                   "sequence, which no merged weight can do (PEFT: \"aLoRA does "
                                   f"not support merging\"); {refusal} (convert keeps it: GGUF "
                                   "stores adapter.alora.invocation_tokens)")
    return loaded


def make_plan(checkpoint, loaded, names, factors, *, mode, dtype, requantize, quantize_like,
              max_shard_size=None, allow_modified_base=False):
    """``plan_for`` with ``quantize_like`` (a path) opened as a GGUF model."""
    from ._io import require_exists
    from .merging.bases import open_base
    from .merging.plan import plan_for

    like = None
    if quantize_like is not None:
        like = open_base(require_exists(quantize_like))
        if like.kind != "gguf":
            raise OptionError(f"--quantize-like {quantize_like}: expected a GGUF model file")
    return plan_for(checkpoint, loaded, names, factors, mode=mode, dtype=dtype,
                    requantize=requantize, quantize_like=like, max_shard_size=max_shard_size,
                    allow_modified_base=allow_modified_base)
