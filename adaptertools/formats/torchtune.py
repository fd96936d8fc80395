"""Placeholder while the torchtune format is built (issue 17): sniffs nothing, reads nothing."""

from __future__ import annotations

from pathlib import Path

from ..errors import UnsupportedError

DESCRIPTION = "torchtune adapters (in progress)"
SNIFF_ORDER = 40


def sniff(path: Path) -> bool:
    return False


def read(path: Path, **opts):
    raise UnsupportedError(f"{path}: the torchtune reader is not built yet")
