"""The format registry: every format, built-in or plugin, comes in through one entry-point group.

A format is a module with plain functions (DESIGN.md, convention 1):

    sniff(path: Path) -> bool                 # cheap: is this path in my format?
    read(path: Path, **opts) -> Adapter       # optional
    write(adapter: Adapter, path: Path, **opts) -> None   # optional; writes into ``path``
    DESCRIPTION: str                          # one line for ``adaptertools formats``
    SNIFF_ORDER: int = 100                    # lower sniffs first (a PEFT dir before a bare file)
    OUTPUT_IS_DIR: bool = False               # write() fills a directory instead of one file

Third-party packages add formats with::

    [project.entry-points."adaptertools.formats"]
    myformat = "mypackage.myformat"
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from .errors import AdapterToolsError, FormatError, UnsupportedError

ENTRY_POINT_GROUP = "adaptertools.formats"


@dataclass(frozen=True)
class Format:
    name: str
    module: ModuleType
    package: str

    @property
    def can_read(self) -> bool:
        return callable(getattr(self.module, "read", None))

    @property
    def can_write(self) -> bool:
        return callable(getattr(self.module, "write", None))

    @property
    def description(self) -> str:
        return getattr(self.module, "DESCRIPTION", "")

    @property
    def sniff_order(self) -> int:
        return int(getattr(self.module, "SNIFF_ORDER", 100))

    @property
    def output_is_dir(self) -> bool:
        return bool(getattr(self.module, "OUTPUT_IS_DIR", False))


@functools.cache
def formats() -> dict[str, Format]:
    """Every registered format by name, in sniffing order."""
    found: dict[str, Format] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            continue  # the first distribution on the path wins, as with console scripts
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not take the built-ins down with it
            raise AdapterToolsError(f"format plugin {ep.name!r} ({ep.value}) failed to import: "
                                    f"{exc}; fix or uninstall that package") from exc
        package = ep.dist.name if ep.dist is not None else "?"
        found[ep.name] = Format(ep.name, module, package)
    if not found:
        raise AdapterToolsError("no adapter formats are registered: adaptertools is not installed "
                                "as a package; run `pip install -e .` in its source folder")
    return dict(sorted(found.items(), key=lambda kv: (kv[1].sniff_order, kv[0])))


def get_format(name: str) -> Format:
    known = formats()
    if name not in known:
        raise UnsupportedError(f"unknown format {name!r}; known formats: {', '.join(known)}")
    return known[name]


def detect_format(path: Path) -> Format:
    """The first format, in sniffing order, that recognises ``path``."""
    for fmt in formats().values():
        if fmt.can_read and fmt.module.sniff(path):
            return fmt
    raise FormatError(f"{path}: not a recognised adapter (formats tried: {', '.join(formats())}); "
                      "pass --from FORMAT if you know what it is")
