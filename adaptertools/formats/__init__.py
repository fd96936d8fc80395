"""Built-in adapter formats; each module exposes sniff / read / write (see registry.py)."""

from __future__ import annotations

import os


def check_fits_in_memory(path: str | os.PathLike, sizes: dict[str, int]) -> None:
    """Adapters are loaded whole (eagerly): refuse one whose tensors, ``sizes`` (name -> bytes
    once loaded, from the file's header), need more than the memory available, before any is
    read. A file declaring a 100 GB tensor would otherwise be read until the kernel kills us."""
    from .._io import human_size
    from ..errors import UnsupportedError
    from ..merging.prefetch import available_memory

    total = sum(sizes.values())
    available = available_memory()
    if total <= available:
        return
    largest = max(sizes, key=sizes.get)
    raise UnsupportedError(f"{path}: its tensors need {human_size(total)} of memory ({largest} "
                           f"alone {human_size(sizes[largest])}) but only {human_size(available)} "
                           "is available; adapters are loaded whole, so one can be at most about "
                           "the free memory: free some, or use a larger machine (a LoRA adapter is "
                           "usually MBs to a few GB: check that this file is one)")
