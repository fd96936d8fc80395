"""The closed sets of the public functions' string options, as ``typing.Literal`` types.

Types only, for readers and type checkers: the values are still checked at run time where they
always were (named beside each alias), and tests/test_reports.py keeps each alias equal to that
tuple. Format names stay ``str``: formats are a plugin registry (registry.py), open by design.
"""

from __future__ import annotations

from typing import Literal

# merging/plan.py MODES: sum the deltas, or apply the adapters one after another
MergeMode = Literal["weighted", "stacked"]

# adapter_io.py DTYPES: storage dtype of a merge's floating tensors
MergeDtype = Literal["keep", "fp32", "fp16", "bf16"]

# adapter_io.py DTYPES + FORMAT_DTYPES: a written adapter's factors (q8_0 where the format has it,
# GGUF); the CLI's --dtype of convert, combine and extract
AdapterDtype = Literal["keep", "fp32", "fp16", "bf16", "q8_0"]

# merging/run.py resolve_device: where a merge folds (the CLI's --device choices)
Device = Literal["auto", "cpu", "cuda"]
Executor = Literal["local", "ray"]

# kernels/triton/engine.py KERNELS: fused Triton kernels or the torch reference
Kernels = Literal["auto", "torch", "triton"]

# algebra/combine.py METHODS
CombineMethod = Literal["cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]

# kernels/lowrank.py SVD_CHOICES: the SVD of full matrices in combine and extract
SvdChoice = Literal["auto", "exact", "randomized"]
