"""The format registry: every format, built-in or plugin, comes in through one entry-point group.

A format is a module with plain functions (DESIGN.md, convention 1):

    sniff(path: Path) -> bool                 # cheap: is this path in my format? (needed to read)
    read(path: Path, **opts) -> Adapter       # optional
    write(adapter: Adapter, path: Path, **opts) -> None   # optional; writes into ``path``
    describe(path: Path) -> dict              # optional: storage facts for ``inspect``
    DESCRIPTION: str                          # one line for ``adaptertools formats``
    SNIFF_ORDER: int = 100                    # lower sniffs first (a PEFT dir before a bare file)
    OUTPUT_IS_DIR: bool = False               # write() fills a directory instead of one file
    BASE_AS_PATH: bool = False                # read/write get --base as the path given
                                              # (kohya, peft), not a GGUF BaseInfo
    PIPELINE_KEYS: bool = False               # keys may be "<component>.<name>" (diffusers)
    uses_base(path) -> bool                   # optional: does --base mean anything for this
                                              # input (convert refuses it as misuse otherwise)

Options, always by keyword, each only when the user gave it (``--scale``, ``--base``) or, for
``dtype``, always:

    read:   scale: float      the effective scale (``--scale``), for files that carry none
            base: BaseInfo    the base model (``--base``: an HF folder, its config.json or a GGUF
                              model, parsed by ``formats.names.load_base_info``)
    write:  dtype: str        ``keep``, ``fp32``, ``fp16``, ``bf16`` or a format type such as
                              ``q8_0``; a writer that takes it casts (or quantizes) itself, one
                              that does not is handed factors already cast
            base: BaseInfo    as for read

A function that takes ``**opts`` (or ``**kwargs``) receives every option of its call; one with
named parameters receives only those it names, and a ``--scale`` its reader does not take is
refused. Options added later follow the same rule, so a ``**opts`` function must ignore
options it does not know.

Third-party packages add formats with::

    [project.entry-points."adaptertools.formats"]
    myformat = "mypackage.myformat"

A plugin that cannot be used (its module raises on import, the entry point names a missing
module, the module lacks ``read``/``write``, or reads without ``sniff``) is skipped with one
AdapterToolsWarning naming it, its distribution and the reason; the other formats keep
working and ``adaptertools formats`` lists it as unavailable.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType

from .errors import AdapterToolsError, AdapterToolsWarning, FormatError, UnsupportedError

ENTRY_POINT_GROUP = "adaptertools.formats"


@dataclass(frozen=True)
class Format:
    name: str
    module: ModuleType | None     # None when the plugin is unavailable
    package: str                  # the distribution that registers it
    error: str | None = None      # why it is unavailable

    @property
    def available(self) -> bool:
        return self.error is None

    @property
    def can_read(self) -> bool:
        return callable(getattr(self.module, "read", None))

    @property
    def can_write(self) -> bool:
        return callable(getattr(self.module, "write", None))

    @property
    def description(self) -> str:
        if self.error is not None:
            return f"unavailable: {self.error}"
        return str(getattr(self.module, "DESCRIPTION", ""))

    @property
    def sniff_order(self) -> int:
        return int(getattr(self.module, "SNIFF_ORDER", 100))

    @property
    def output_is_dir(self) -> bool:
        return bool(getattr(self.module, "OUTPUT_IS_DIR", False))


def _problem(module) -> str | None:
    """Why ``module`` cannot serve as a format, or None."""
    has = {name: callable(getattr(module, name, None)) for name in ("sniff", "read", "write")}
    where = getattr(module, "__name__", repr(module))
    if not (has["read"] or has["write"]):
        return f"{where} defines neither read() nor write()"
    if has["read"] and not has["sniff"]:
        return f"{where} defines read() but no sniff()"
    try:
        int(getattr(module, "SNIFF_ORDER", 100))
    except (TypeError, ValueError):
        return f"{where}.SNIFF_ORDER is {module.SNIFF_ORDER!r}, not a whole number"
    return None


def _load(ep: EntryPoint) -> Format:
    """The format ``ep`` names; an unusable one comes back with ``error`` set and a warning."""
    dist = getattr(ep, "dist", None)
    package = (dist.name if dist is not None else None) or "?"
    try:
        module = ep.load()
    except Exception as exc:  # a broken plugin must not take the built-ins down with it
        reason = f"importing {ep.value} failed: {type(exc).__name__}: {exc}"
    else:
        reason = _problem(module)
        if reason is None:
            return Format(ep.name, module, package)
    warnings.warn(f"format plugin {ep.name!r} (distribution {package!r}) skipped: {reason}; "
                  f"fix or uninstall {package}", AdapterToolsWarning, stacklevel=3)
    return Format(ep.name, None, package, error=reason)


@functools.cache
def formats() -> dict[str, Format]:
    """Every registered format by name, in sniffing order; plugins that failed to load are
    included with ``available`` False (``error`` says why) so that they can be listed."""
    found: dict[str, Format] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].available:
            continue  # the first distribution on the path wins, as with console scripts
        fmt = _load(ep)
        if ep.name not in found or fmt.available:   # a broken one does not hide a later one
            found[ep.name] = fmt
    if not found:
        raise AdapterToolsError("no adapter formats are registered: adaptertools is not installed "
                                "as a package; run `pip install -e .` in its source folder")
    return dict(sorted(found.items(), key=lambda kv: (kv[1].sniff_order, kv[0])))


def usable() -> dict[str, Format]:
    """The formats that loaded, in sniffing order."""
    return {name: fmt for name, fmt in formats().items() if fmt.available}


def get_format(name: str) -> Format:
    known = formats()
    if name not in known:
        raise UnsupportedError(f"unknown format {name!r}; known formats: {', '.join(usable())}")
    fmt = known[name]
    if not fmt.available:
        raise UnsupportedError(f"format {name!r} (from {fmt.package}) is unavailable: "
                               f"{fmt.error}; fix or uninstall {fmt.package}")
    return fmt


def detect_format(path: Path) -> Format:
    """The first format, in sniffing order, that recognises ``path``."""
    for fmt in usable().values():
        if fmt.can_read and _sniffs(fmt, path):
            return fmt
    from .formats.foreign import hint_for

    raise FormatError(f"{path}: not a recognised adapter (formats tried: {', '.join(usable())}): "
                      f"{hint_for(path)}; pass --from FORMAT if you know what it is")


def _sniffs(fmt: Format, path: Path) -> bool:
    """``fmt.module.sniff(path)``; a plugin's sniff that raises counts as "not mine", with a
    warning, so that it cannot stop the other formats from recognising ``path``."""
    try:
        return bool(fmt.module.sniff(path))
    except Exception as exc:
        if fmt.package == "adaptertools":
            raise
        warnings.warn(f"format plugin {fmt.name!r} (distribution {fmt.package!r}): sniff({path}) "
                      f"raised {type(exc).__name__}: {exc}; taken as not its format, fix or "
                      f"uninstall {fmt.package}", AdapterToolsWarning, stacklevel=3)
        return False
