"""One exception base and its few subclasses.

Each subclass also inherits the matching builtin, so callers that catch ``ValueError`` or
``FileNotFoundError`` keep working. Messages name the file or tensor and say what to do next.
"""

from __future__ import annotations


class AdapterToolsError(Exception):
    """Base of every error adaptertools raises on purpose."""


class FormatError(AdapterToolsError, ValueError):
    """An input file is malformed or inconsistent (bad config, missing factor, bad shapes)."""


class TruncatedFileError(FormatError):
    """A stored file ends before the bytes its header promises: a short read of a tensor (or a
    header shorter than its length prefix), i.e. a download or copy cut short. One class for
    every reader (tensor_index.read_entry, the header index); a FormatError, so the CLI exits 1.
    ``file`` and ``tensor`` (None: the header itself) are kept for callers and tests."""

    def __init__(self, file, tensor: str | None, detail: str = "", where: str | None = None) -> None:
        self.file, self.tensor, self.detail, self.where = str(file), tensor, detail, where
        where = where or ("its header" if tensor is None else f"tensor {tensor}")
        super().__init__(f"{file}: ends inside {where}{detail}; the file is truncated; "
                         "download it again")

    def __reduce__(self):        # (pickled with its own arguments, not the message)
        return type(self), (self.file, self.tensor, self.detail, self.where)


class UnsupportedError(AdapterToolsError, ValueError):
    """The input is valid but uses something adaptertools (or the target format) cannot express."""


class OptionError(UnsupportedError):
    """Misuse: an option or argument that cannot work whatever the inputs hold (``--rank 0``,
    one ``--weights`` value for two adapters, ``--method ties`` without ``--density``). The CLI
    exits 2 for it, as for its own usage errors. An AdapterToolsError and a ValueError like every
    UnsupportedError, which these errors were before, so callers catching that keep working."""


class InputNotFoundError(AdapterToolsError, FileNotFoundError):
    """A path given as input does not exist."""


class OutputExistsError(AdapterToolsError, FileExistsError):
    """The destination exists and ``force`` was not given."""


class HubError(AdapterToolsError, ConnectionError):
    """The Hub (or a Hub-compatible server) refused a request, failed, or could not be reached."""


class LlamaCppError(AdapterToolsError, RuntimeError):
    """llama.cpp crashed (a signal), failed or timed out in its child process (``llamacpp.py``)."""


class AdapterToolsWarning(UserWarning):
    """Loud warnings the CLI shows on stderr (base-modifying init methods, guessed scales)."""
