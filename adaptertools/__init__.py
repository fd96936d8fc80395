"""adaptertools: convert, merge and validate LoRA adapters.

Library use::

    import adaptertools as at
    adapter = at.load("path/to/peft_adapter")          # -> Adapter
    at.save(adapter, "adapter.safetensors", format="safetensors")
    at.convert("peft_dir", "out.safetensors", to="safetensors")
    info = at.inspect("peft_dir", layers=True)         # -> InspectReport
    at.merge("hf://owner/base", ["hf://owner/adapter@v1"], "out", push_to="me/merged")

Results are reports (``reports.py``): frozen dataclasses whose ``to_dict()`` is the ``--json``
output; they still read as dicts (``info["ranks"]``).

Imports are lazy: ``import adaptertools`` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "load": "api", "save": "api", "convert": "api", "inspect": "api", "merge": "api",
    "combine": "api", "extract": "api", "validate": "api",
    "Adapter": "adapter", "LoraWeight": "adapter",
    "AdapterToolsError": "errors", "FormatError": "errors", "UnsupportedError": "errors",
    "InputNotFoundError": "errors", "OutputExistsError": "errors", "HubError": "errors",
    "AdapterToolsWarning": "errors", "OptionError": "errors", "LlamaCppError": "errors",
    "validate_against": "api",
    "pull": "hub", "push": "hub",
    "Report": "reports", "InspectReport": "reports", "ConvertReport": "reports",
    "MergeReport": "reports", "MergePlanReport": "reports", "ValidationReport": "reports",
    "ComparisonReport": "reports", "CombineReport": "reports", "ExtractReport": "reports",
    "PushReport": "reports", "PullReport": "reports",
}
__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import Adapter, LoraWeight
    from .api import (combine, convert, extract, inspect, load, merge, save, validate,
                      validate_against)
    from .errors import (AdapterToolsError, AdapterToolsWarning, FormatError, HubError,
                         InputNotFoundError, LlamaCppError, OptionError, OutputExistsError,
                         UnsupportedError)
    from .hub import pull, push
    from .reports import (CombineReport, ComparisonReport, ConvertReport, ExtractReport,
                          InspectReport, MergePlanReport, MergeReport, PullReport, PushReport,
                          Report, ValidationReport)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adaptertools' has no attribute {name!r}")
