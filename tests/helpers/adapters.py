"""adaptertools' own tiny adapters (``adaptertools.tiny``) written as PEFT folders, and copies of
them with one bad value planted."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import adaptertools as at
from adaptertools.tiny import make_adapter


def write_peft(folder: Path, adapter=None) -> Path:
    at.save(adapter or make_adapter(), folder, format="peft")
    return folder


def with_bad_value(adapter, name: str, part: str, value: float):
    """A copy of ``adapter`` whose factor ``part`` ('a' or 'b') of ``name`` holds ``value`` once."""
    w = adapter.weights[name]
    tensor = getattr(w, part).clone()
    tensor.view(-1)[3] = value
    adapter.weights[name] = replace(w, **{part: tensor})
    return adapter
