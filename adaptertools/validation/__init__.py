"""Validators: prove that merged and converted weights compute what the unmerged adapters compute.

- ``adapters``: two adapters give the same delta (``validate ADAPTER --against OTHER``).
- ``merged``: per tensor, a merged checkpoint against its base and adapters (probes, SQNR
  against the output dtype's own noise floor; untouched tensors byte for byte).
- ``e2e``: logits of the merged model against the unmerged base + adapters (transformers +
  PEFT, or llama.cpp with a runtime LoRA).
- ``plot``: per-layer SQNR against its floor, as a PNG (matplotlib).

(A package, not ``adaptertools/validate.py``: a submodule of that name would shadow the public
function ``adaptertools.validate`` once imported.)
"""
