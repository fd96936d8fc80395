"""``hf://`` URIs and their rules, which files of a Hub repo an input needs, and which names are
safe to write.

Pure functions (no network, no huggingface_hub): ``parse_uri`` refuses a malformed id or revision
(or a control character) before any request; ``redact`` hides the user info of a URL (an
endpoint's ``user:TOKEN@``) wherever one is shown. From a repo listing, ``select_files`` picks an
adapter's config and weights, a base's weights, index, config, tokenizer and generation files, or
for ``pull`` all of those; pickles and optimizer state only when asked for. A listing with a name
that could leave the target folder (absolute, ``..``) is refused whole.
"""

from __future__ import annotations

import fnmatch
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from .errors import HubError, InputNotFoundError, UnsupportedError

SCHEME = "hf://"
KINDS = ("adapter", "base", "config", "any")
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
INDEX_NAME = "model.safetensors.index.json"
# a base folder's non-weight files that loading it with transformers needs
BASE_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                   "added_tokens.json", "vocab.*", "merges.txt", "*.model", "chat_template*",
                   "*.tiktoken", "preprocessor_config.json")
# pickles, optimizer and trainer state: downloaded only when asked for with ``include``
NEVER_BY_DEFAULT = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack", "*.h5", "*.ot",
                    "optimizer*", "scheduler*", "rng_state*", "trainer_state*")


@dataclass(frozen=True)
class HubRef:
    """``hf://owner/name[@revision][/path]``: a model repo, a revision, a folder or file in it."""

    repo_id: str
    revision: str | None = None     # None: the default branch
    path: str = ""                  # subfolder or file inside the repo, "" for the root

    @property
    def uri(self) -> str:
        rev = "" if self.revision is None else \
            "@" + self.revision.replace("%", "%25").replace("/", "%2F")
        return f"{SCHEME}{self.repo_id}{rev}" + (f"/{self.path}" if self.path else "")


# ----------------------------------------------------------------------------- URIs and their rules

# a Hub id part (huggingface_hub's validate_repo_id): ASCII letters, digits, '-', '_', '.', at
# most 96, not starting or ending with '-' or '.'; '--', '..' and a '.git' end are refused too
ID_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?"
_URI = re.compile(r"([^/@]+)/([^/@]+)(?:@([^/]+))?(?:/(.*))?")
# what git check-ref-format refuses in a branch or tag name, besides control characters
_NOT_IN_REVISION = re.compile(r"[\s~^:?*\[\\]|\.\.|@\{")
# ``scheme://user:password@``: the user info of a URL
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/\s?#]*@")
URI_FORM = "write hf://owner/name[@revision][/subfolder]"


def redact(text: str) -> str:
    """``text`` with the user info of every URL in it (``http://user:TOKEN@host``) written
    ``***@``: what messages, reports and cards show of an endpoint."""
    return _USERINFO.sub(r"\1***@", str(text))


def _control(text: str) -> str | None:
    """The first control, format or line-separator character of ``text`` (None when none)."""
    return next((c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)


def shown(text: str) -> str:
    """``text`` for a one-line message: control characters as ``\\x..`` / ``\\u....`` escapes."""
    return "".join(c.encode("unicode_escape").decode() if _control(c) else c for c in text)


def name_problem(part: str) -> str | None:
    """Why ``part`` (an owner or a repo name) cannot be one, or None."""
    if not re.fullmatch(ID_PART, part):
        return ("a Hub name holds only ASCII letters, digits, '-', '_' and '.' (1 to 96), and "
                "starts and ends with a letter or digit")
    for bad in ("--", ".."):
        if bad in part:
            return f"it holds {bad!r}"
    return "it ends with '.git'" if part.endswith(".git") else None


def revision_problem(revision: str) -> str | None:
    """Why ``revision`` cannot name a git branch, tag or commit (git check-ref-format's rules),
    or None."""
    bad = _control(revision)
    if bad is not None:
        return f"it holds the control character U+{ord(bad):04X}"
    found = _NOT_IN_REVISION.search(revision)
    if found is not None:
        what = "a space" if found.group().isspace() else repr(found.group())
        return f"it holds {what}; git revisions cannot hold spaces, '..', '@{{' or ~^:?*[\\"
    parts = revision.split("/")
    if revision == "@" or "" in parts:
        return "it is '@', or starts or ends with '/' or holds '//'"
    if any(p.startswith(".") or p.endswith((".", ".lock")) for p in parts):
        return "a part of it starts with '.' or ends with '.' or '.lock'"
    return None


def split_uri(text: str) -> tuple[str, str, str | None, str | None] | None:
    """``hf://owner/name[@revision][/path]`` -> its four parts as written (None: not that
    shape); ``parse_uri`` checks them."""
    match = _URI.fullmatch(text.removeprefix(SCHEME).strip("/"))
    return None if match is None else match.groups()


def parse_uri(text: str) -> HubRef:
    """``hf://owner/name[@revision][/subfolder]`` -> HubRef (a revision with ``/`` is written
    ``%2F``, e.g. ``@refs%2Fpr%2F1``); plain ``owner/name[@revision]`` works too. A control
    character anywhere, a malformed id or revision is refused before any request."""
    bad = _control(text)
    if bad is not None:
        raise UnsupportedError(f"{shown(text)}: holds the control character U+{ord(bad):04X}, "
                               f"which no Hub id, revision or path can hold; {URI_FORM}")
    parts = split_uri(text)
    if parts is None:
        raise UnsupportedError(f"{text}: not a Hub model id; {URI_FORM}")
    owner, name, revision, path = parts
    if owner in ("datasets", "spaces"):
        raise UnsupportedError(f"{text}: only model repos are supported; use hf://owner/name")
    for part in (owner, name):
        problem = name_problem(part)
        if problem is not None:
            raise UnsupportedError(f"{text}: {part!r} cannot be a Hub name: {problem}; "
                                   f"{URI_FORM}")
    if revision is not None:
        revision = _revision(text, revision)
    path = (path or "").strip("/")
    if path and is_unsafe_name(path):
        raise UnsupportedError(f"{text}: the subfolder {path!r} leaves the repo; drop '..' from it")
    return HubRef(f"{owner}/{name}", revision, path)


def _revision(text: str, raw: str) -> str:
    """The revision of ``text``, percent-decoded and checked."""
    try:
        revision = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise UnsupportedError(f"{text}: the revision {raw!r} is not percent-encoded UTF-8; "
                               "check the revision") from None
    problem = revision_problem(revision)
    if problem is not None:
        raise UnsupportedError(f"{text}: the revision '{shown(revision)}' is not a git revision: "
                               f"{problem}; check the revision (a '/' in it is written %2F)")
    return revision


def is_unsafe_name(name: str) -> bool:
    """A repo file name that could write outside its folder: absolute, ``..``, backslash, empty."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return True
    return any(part in ("", ".", "..") for part in name.split("/"))


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _scope(names: list[str], folder: str, *, recursive: bool) -> dict[str, str]:
    """Repo names under ``folder`` -> their path relative to it (direct children only unless
    ``recursive``)."""
    prefix = folder + "/" if folder else ""
    out = {}
    for name in names:
        if name.startswith(prefix):
            rel = name[len(prefix):]
            if recursive or "/" not in rel:
                out[name] = rel
    return out


def _one_file(ref: HubRef, candidates: list[str], what: str) -> list[str]:
    if len(candidates) == 1:
        return candidates
    if not candidates:
        raise InputNotFoundError(f"{ref.uri}: no {what} here; check the subfolder")
    shown = ", ".join(candidates[:4]) + (" ..." if len(candidates) > 4 else "")
    raise UnsupportedError(f"{ref.uri}: {len(candidates)} candidate files ({shown}); name one, "
                           f"e.g. {HubRef(ref.repo_id, ref.revision, candidates[0]).uri}")


def _adapter_files(ref: HubRef, scope: dict[str, str]) -> list[str]:
    by_rel = {rel: name for name, rel in scope.items()}
    if "adapter_config.json" in by_rel:
        for weights in ("adapter_model.safetensors", "adapter_model.bin"):
            if weights in by_rel:
                break
        else:
            raise InputNotFoundError(f"{ref.uri}: adapter_config.json but no adapter weights; "
                                     "check the repo")
        if weights.endswith(".bin"):
            raise UnsupportedError(f"{ref.uri}: only adapter_model.bin (a pickle, downloaded only "
                                   f"when asked); run `adaptertools pull {ref.uri} --include "
                                   "'*.bin' --out DIR` and pass DIR")
        return [by_rel["adapter_config.json"], by_rel[weights]]
    files = sorted(n for n, rel in scope.items() if rel.endswith(WEIGHT_SUFFIXES))
    return _one_file(ref, files, "adapter (adapter_config.json, *.safetensors or *.gguf)")


def _base_files(ref: HubRef, scope: dict[str, str]) -> list[str]:
    weights = sorted(n for n, rel in scope.items() if rel.endswith(".safetensors"))
    if not weights:
        ggufs = sorted(n for n, rel in scope.items() if rel.endswith(".gguf"))
        if ggufs or not any(rel.endswith(".bin") for rel in scope.values()):
            return _one_file(ref, ggufs, "model weights (*.safetensors or *.gguf)")
        raise UnsupportedError(f"{ref.uri}: only pickle weights (*.bin), which are not read; "
                               "use a repo or revision with safetensors weights")
    side = [n for n, rel in scope.items() if _matches(rel, BASE_SIDE_FILES)
            and not _matches(rel, NEVER_BY_DEFAULT)]
    if any(rel == INDEX_NAME for rel in scope.values()):
        # the shards come from the index once it is downloaded (see _index_shards)
        return sorted(side + [n for n, rel in scope.items() if rel == INDEX_NAME])
    return sorted(side + weights)


def _config_files(ref: HubRef, scope: dict[str, str]) -> list[str]:
    config = [n for n, rel in scope.items() if rel == "config.json"]
    return config or _one_file(ref, sorted(n for n, rel in scope.items()
                                           if rel.endswith(".gguf")), "config.json or *.gguf")


ANY_FILES = ("*.json", "*.safetensors", "*.gguf", "*.md", "*.txt", "*.model", "*.jinja",
             "*.tiktoken", "tokenizer*")


def select_files(names: list[str], ref: HubRef, kind: str, include=()) -> list[str]:
    """The repo files an input of ``kind`` needs, from the repo's listing ``names``.

    A listing with an unsafe name (absolute, ``..``) is refused whole. ``ref.path`` naming a
    file selects that file; else its folder's files: adapter -> config + weights (or the one
    .safetensors/.gguf file); base -> safetensors (+ index), config, tokenizer and generation
    files; config -> config.json; any -> all of those, in subfolders too. ``include`` patterns
    (matched against the path below ``ref.path``) add files, pickles included.
    """
    unsafe = [n for n in names if is_unsafe_name(n)]
    if unsafe:
        raise HubError(f"{ref.uri}: the server lists an unsafe file name {unsafe[0]!r} (absolute "
                       "or with '..'); refusing to download from it, check the endpoint")
    if ref.path in names:
        return [ref.path]
    scope = _scope(names, ref.path, recursive=kind == "any")
    if not scope:
        what = f"no file or folder {ref.path!r}" if ref.path else "no files"
        raise InputNotFoundError(f"{ref.uri}: {what} in {ref.repo_id} at this revision; check "
                                 "the path after the repo id, and the revision")
    if kind == "adapter":
        chosen = _adapter_files(ref, scope)
    elif kind == "base":
        chosen = _base_files(ref, scope)
    elif kind == "config":
        chosen = _config_files(ref, scope)
    elif kind == "any":
        chosen = [n for n, rel in scope.items() if _matches(PurePosixPath(rel).name, ANY_FILES)
                  and not _matches(PurePosixPath(rel).name, NEVER_BY_DEFAULT)]
    else:
        raise UnsupportedError(f"unknown input kind {kind!r}; choose one of {', '.join(KINDS)}")
    extra = [n for n, rel in _scope(names, ref.path, recursive=True).items()
             if include and _matches(rel, include)]
    return sorted(set(chosen) | set(extra))


def index_shards(ref: HubRef, index_path: Path, names: list[str]) -> list[str]:
    """The shards ``model.safetensors.index.json`` names, as repo paths (checked against the
    listing, and for safety)."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError, RecursionError):
        weight_map = None
    if not isinstance(weight_map, dict):
        raise HubError(f"{ref.uri}: {INDEX_NAME} has no readable weight_map; the repo's index "
                       "is damaged")
    folder = ref.path + "/" if ref.path and ref.path not in names else ""
    shards = sorted({folder + str(s) for s in weight_map.values()})
    bad = [s for s in shards if is_unsafe_name(s) or s not in names]
    if bad:
        raise HubError(f"{ref.uri}: {INDEX_NAME} names {bad[0]!r}, which the repo does not hold "
                       "(or which leaves the repo); the repo is damaged")
    return shards
