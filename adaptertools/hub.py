"""Hugging Face Hub inputs and outputs: ``hf://`` URIs, pull (only the files an input needs) and
push (create_repo + one commit with a model card).

Every call builds its own ``HfApi(endpoint=..., token=...)``: the endpoint is the argument, else
``HF_ENDPOINT`` read at call time, else huggingface.co; the token is the argument, else
huggingface_hub's own lookup (``HF_TOKEN``, then the stored login). Tokens never appear in a
message, a report or a log line. ``HF_HUB_OFFLINE=1`` reads the local cache only.
huggingface_hub is imported inside the functions, so ``import adaptertools`` stays light.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ._io import require_exists
from .paths import atomic_output, contained_file
from .errors import HubError, InputNotFoundError, UnsupportedError
from .hub_files import (
    ID_PART,
    INDEX_NAME,
    SCHEME,
    WEIGHT_SUFFIXES,
    HubRef,
    index_shards,
    is_unsafe_name,
    parse_uri,
    redact,
    revision_problem,
    select_files,
    shown,
    split_uri,
)

DEFAULT_ENDPOINT = "https://huggingface.co"
_PLAIN_ID = re.compile(rf"({ID_PART})/({ID_PART})(?:@([^/\s]+))?")
# plain ``owner/name`` strings with these endings are paths that do not exist, not Hub ids
_FILE_SUFFIXES = (".safetensors", ".gguf", ".json", ".bin", ".pt", ".pth")
_HEX40 = re.compile(r"[0-9a-f]{40}")


def hub_ref(path) -> HubRef | None:
    """The Hub reference ``path`` stands for, or None when it is a local path.

    ``hf://...`` always means the Hub (a malformed one is refused); a plain
    ``owner/name[@revision]`` means it only when no such local path exists, it does not end like
    a file name (e.g. ``.safetensors``) and it is a well-formed id and revision.
    """
    if not isinstance(path, str):
        return None                   # Path objects (and BaseInfo values) are local by design
    if path.startswith(SCHEME):
        return parse_uri(path)
    if _PLAIN_ID.fullmatch(path) and not path.endswith(_FILE_SUFFIXES) \
            and not os.path.lexists(path):
        try:
            return parse_uri(path)
        except UnsupportedError:      # e.g. ``out/my..model``: a missing local path
            return None
    return None


def endpoint_url(endpoint: str | None = None) -> str:
    """The endpoint to use: the argument, else ``HF_ENDPOINT`` (read now), else huggingface.co."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (read now, like every switch of ours; huggingface_hub reads it once)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _api(endpoint: str, token):
    from huggingface_hub import HfApi

    _redact_client_logs()
    return HfApi(endpoint=endpoint, token=token, library_name="adaptertools")


class _RedactUrls(logging.Filter):
    """Log records with every URL's user info written ``***@``: huggingface_hub logs request
    URLs (warnings on retries reach stderr through its own handler, debug lines name each
    request) and so does httpx (info), so an endpoint ``http://user:TOKEN@host`` would put the
    token there."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_REDACT_URLS = _RedactUrls()


_CLIENT_LOGGERS = ("huggingface_hub", "httpx", "httpx2")


def _redact_client_logs() -> None:
    """Put ``_REDACT_URLS`` on every logger of the Hub client and its HTTP library (a logger's
    filters do not apply to its children's records, so each one needs it)."""
    names = [n for n in list(logging.root.manager.loggerDict)
             if n.split(".")[0] in _CLIENT_LOGGERS]
    for name in names:
        logger = logging.getLogger(name)
        if _REDACT_URLS not in logger.filters:
            logger.addFilter(_REDACT_URLS)


# ----------------------------------------------------------------------------- errors


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


_TRANSPORT = {"ConnectError", "ConnectionError", "TransportError", "TimeoutException", "Timeout",
              "NetworkError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError"}
TOKEN_HINT = "check your token (--token, HF_TOKEN or `hf auth login`)"


def hub_error(exc: BaseException, what: str, endpoint: str) -> Exception | None:
    """A one-line error for an exception huggingface_hub raised about ``what`` (a URI or repo id),
    or None when ``exc`` is not a Hub failure. The client's own message is never quoted: it
    spans lines and may carry request details. The endpoint is shown without its user info."""
    endpoint = redact(endpoint)
    names = _class_names(exc)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if "GatedRepoError" in names:
        return HubError(f"{what}: gated repo at {endpoint}; accept its conditions on the Hub, "
                        f"then {TOKEN_HINT}")
    if "RepositoryNotFoundError" in names:
        return InputNotFoundError(f"{what}: no such repository at {endpoint} (or it is private "
                                  f"and the token has no access); check the id, or {TOKEN_HINT}")
    if "RevisionNotFoundError" in names:
        return InputNotFoundError(f"{what}: no such revision at {endpoint}; check the revision "
                                  "(a branch, tag or commit hash)")
    if "EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names:
        return InputNotFoundError(f"{what}: no such file in the repo at {endpoint}; check the "
                                  "path after the repo id")
    if "OfflineModeIsEnabled" in names or "LocalEntryNotFoundError" in names:
        return InputNotFoundError(f"{what}: not in the local cache, and HF_HUB_OFFLINE=1 forbids "
                                  "downloads; pull it once online (adaptertools pull) or unset "
                                  "HF_HUB_OFFLINE")
    if status in (401, 403):
        return HubError(f"{what}: access denied by {endpoint} (HTTP {status}); {TOKEN_HINT}")
    if status is not None and "HfHubHTTPError" in names:
        return HubError(f"{what}: {endpoint} answered HTTP {status}; try again later, or check "
                        "the id and the endpoint")
    if names & _TRANSPORT:
        return HubError(f"{what}: cannot reach {endpoint} ({type(exc).__name__}); check the "
                        "endpoint (--endpoint, HF_ENDPOINT) and your network, or set "
                        "HF_HUB_OFFLINE=1 to use the cache")
    return None


def _call(func, what: str, endpoint: str, *args, **kwargs):
    """``func(*args, **kwargs)`` with huggingface_hub's failures turned into one-line errors;
    any other failure passes through unless its message holds a URL's user info (a token)."""
    try:
        return func(*args, **kwargs)
    except Exception as exc:
        error = hub_error(exc, what, endpoint)
        if error is None and redact(str(exc)) != str(exc):
            error = HubError(f"{what}: the request to {redact(endpoint)} failed "
                             f"({type(exc).__name__}); check the endpoint (--endpoint, "
                             "HF_ENDPOINT)")
        if error is None:
            raise
        raise error from None


# ----------------------------------------------------------------------------- pull


@dataclass(frozen=True)
class Snapshot:
    """Files of one commit of a Hub repo, in the local cache."""

    ref: HubRef
    commit: str                 # the 40-hex commit the revision resolved to
    root: Path                  # the cache's snapshot folder of that commit
    files: tuple[str, ...]      # repo paths fetched (all present under ``root``)
    endpoint: str

    def provenance(self, role: str) -> dict:
        """What a report (and the model card) records about this input; never the token."""
        return {"role": role, "uri": self.ref.uri, "repo_id": self.ref.repo_id,
                "revision": self.ref.revision or "main", "commit": self.commit,
                "repo_path": self.ref.path, "endpoint": redact(self.endpoint),
                "files": list(self.files)}


def fetch(ref: HubRef, *, kind: str = "any", include=(), endpoint: str | None = None,
          token=None) -> Snapshot:
    """Resolve ``ref``'s revision to a commit and download the files ``kind`` needs (see
    ``select_files``) into the huggingface_hub cache; offline, find them there."""
    endpoint = endpoint_url(endpoint)
    if offline():
        return _cached(ref, kind, include, endpoint)
    api = _api(endpoint, token)
    # an explicit "main" (the client's own default): some mirrors (olah) need the revision path
    info = _call(api.model_info, ref.uri, endpoint, ref.repo_id, revision=ref.revision or "main")
    names = [s.rfilename for s in info.siblings or []]
    files = select_files(names, ref, kind, include)
    root = _download(api, ref, info.sha, files, endpoint)
    index = [f for f in files if PurePosixPath(f).name == INDEX_NAME and kind == "base"]
    if index:
        shards = index_shards(ref, root / index[0], names)
        _download(api, ref, info.sha, shards, endpoint)
        files = sorted(set(files) | set(shards))
    return Snapshot(ref, info.sha, root, tuple(files), endpoint)


def _download(api, ref: HubRef, commit: str, files: list[str], endpoint: str) -> Path:
    # by the requested revision (so the cache records it for offline use), exact names only
    folder = _call(api.snapshot_download, ref.uri, endpoint, ref.repo_id, revision=ref.revision,
                   allow_patterns=[glob.escape(f) for f in files])
    folder = Path(folder)
    if folder.name != commit:
        raise HubError(f"{ref.uri}: the revision moved from {commit[:12]} to {folder.name[:12]} "
                       "while downloading; run again, or pin a commit with @<hash>")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise HubError(f"{ref.uri}: {missing[0]} was listed but not downloaded; check the "
                       "endpoint and run again")
    return folder


def _cached(ref: HubRef, kind: str, include, endpoint: str) -> Snapshot:
    """The offline path: the commit from the cache's refs, the files from its snapshot."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=ref.repo_id,
                                                               repo_type="model")
    revision = ref.revision or "main"
    commit = revision
    if not _HEX40.fullmatch(revision):
        ref_file = storage / "refs" / revision
        commit = ref_file.read_text().strip() if ref_file.is_file() else ""
    root = storage / "snapshots" / commit
    not_cached = InputNotFoundError(f"{ref.uri}: not in the local cache, and HF_HUB_OFFLINE=1 "
                                    "forbids downloads; pull it once online (adaptertools pull) "
                                    "or unset HF_HUB_OFFLINE")
    if not commit or not root.is_dir():
        raise not_cached
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    try:
        files = select_files(names, ref, kind, include)
    except InputNotFoundError:
        raise not_cached from None
    if kind == "base":
        for index in [f for f in files if PurePosixPath(f).name == INDEX_NAME]:
            try:
                files = sorted(set(files) | set(index_shards(ref, root / index, names)))
            except HubError:
                raise not_cached from None
    return Snapshot(ref, commit, root, tuple(files), endpoint)


def _entry(snapshot: Snapshot) -> Path:
    """The local path an input stands for: the file the URI names or the one weights file
    chosen, else the (sub)folder."""
    files, ref = snapshot.files, snapshot.ref
    if ref.path in files:
        return snapshot.root / ref.path
    if len(files) == 1 and files[0].endswith(WEIGHT_SUFFIXES):
        return snapshot.root / files[0]
    return snapshot.root / ref.path if ref.path else snapshot.root


def local_input(path, *, kind: str = "adapter", endpoint: str | None = None,
                token=None) -> tuple:
    """``path`` as a local path plus its provenance (None for local paths): Hub URIs and plain
    ``owner/name`` ids are fetched (only what ``kind`` needs), anything else passes through."""
    ref = hub_ref(path)
    if ref is None:
        return path, None
    snapshot = fetch(ref, kind=kind, endpoint=endpoint, token=token)
    return _entry(snapshot), snapshot.provenance(kind)


def pull(uri: str, *, out: str | os.PathLike | None = None, include=(), force: bool = False,
         endpoint: str | None = None, token=None) -> dict:
    """Fetch a Hub input (model, adapter or a file of one) into the cache, and copy it to ``out``
    when given. Weights, configs, tokenizer and cards are fetched; pickles and optimizer state
    only when ``include`` patterns ask for them. Returns a ``PullReport`` (path, commit, files)."""
    ref = hub_ref(uri) if isinstance(uri, str) else None
    if ref is None:
        raise UnsupportedError(f"{uri}: not a Hub id (or a local path exists with that name); "
                               "write hf://owner/name[@revision][/subfolder]")
    include = [include] if isinstance(include, str) else list(include)
    snapshot = fetch(ref, kind="any", include=include, endpoint=endpoint, token=token)
    folder = str(PurePosixPath(ref.path).parent) if ref.path in snapshot.files else ref.path
    prefix = "" if folder in ("", ".") else folder + "/"
    rels = {f: f[len(prefix):] for f in snapshot.files}    # paths below the URI's folder
    local = snapshot.root / ref.path if ref.path else snapshot.root
    if out is not None:
        _copy_out(snapshot, rels, Path(out), force)
        local = Path(out)
    from .reports import PullReport

    report = snapshot.provenance("pull")
    report.update(path=str(local), files=sorted(rels.values()),
                  bytes=sum((snapshot.root / f).stat().st_size for f in snapshot.files))
    return PullReport.from_dict(report)


def _copy_out(snapshot: Snapshot, rels: dict[str, str], out: Path, force: bool) -> None:
    """Copy the fetched files (real bytes, not cache links) into ``out``, atomically; every
    destination is checked to stay inside it."""
    nbytes = sum((snapshot.root / f).stat().st_size for f in rels)
    with atomic_output(out, force=force, is_dir=True, expected_bytes=nbytes,
                       inputs=(snapshot.root,)) as tmp:
        inside = tmp.resolve()
        for name, rel in rels.items():
            dst = (tmp / rel).resolve()
            if is_unsafe_name(rel) or inside not in dst.parents:
                raise HubError(f"{snapshot.ref.uri}: refusing to write {rel!r} outside {out}")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(snapshot.root / name, dst)


# ----------------------------------------------------------------------------- push


def push_target(repo_id: str) -> str:
    """``owner/name`` or ``hf://owner/name`` -> ``owner/name`` (the branch goes in ``revision``);
    a malformed id is refused with the rule it breaks."""
    parts = split_uri(repo_id)
    if parts is None or parts[2] is not None or parts[3]:
        raise UnsupportedError(f"{shown(repo_id)}: push to a repo id, owner/name (pass the "
                               "branch with --revision)")
    return parse_uri(repo_id).repo_id


def check_push(repo_id: str, *, revision: str | None = None) -> str:
    """The repo id to push to, or an error now (bad id or branch, offline) rather than after
    the work."""
    repo_id = push_target(repo_id)
    problem = None if revision is None else revision_problem(revision)
    if problem is not None:
        raise UnsupportedError(f"{repo_id}: the branch '{shown(revision)}' (--revision) is not a "
                               f"git revision: {problem}; check the branch name")
    if offline():
        raise HubError(f"{repo_id}: cannot push while HF_HUB_OFFLINE=1; unset it to push")
    return repo_id


def _upload_list(src: Path) -> list[tuple[str, Path]]:
    """(path in repo, local file) for a file or a folder; hidden files and folders are skipped,
    and a symlink leading out of the folder is refused (paths.contained_file)."""
    if src.is_file():
        return [(src.name, src)]
    files = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            contained_file(src, rel)
            files.append((rel.as_posix(), path))
    return files


def push(src: str | os.PathLike, repo_id: str, *, private: bool = False,
         revision: str | None = None, commit_message: str | None = None,
         endpoint: str | None = None, token=None, report: dict | None = None) -> dict:
    """Upload a file or folder to ``repo_id`` (created when missing, ``private`` then) in one
    commit on ``revision`` (a branch, created from main when missing), with a README model card:
    from ``report`` (a convert or merge report: provenance), else a short one unless the folder
    has its own README.md. Returns a ``PushReport``: the commit, its URL and the files."""
    from huggingface_hub import CommitOperationAdd

    from .card import default_commit_message, model_card

    src = require_exists(src)
    repo_id = check_push(repo_id, revision=revision)
    endpoint = endpoint_url(endpoint)
    files = _upload_list(src)
    if not files:
        raise InputNotFoundError(f"{src}: nothing to push (no files); check the path")
    readme = None
    if report is not None or "README.md" not in dict(files):
        readme = model_card(report, repo_id=repo_id, files=[f for f, _ in files])
        files = [(f, p) for f, p in files if f != "README.md"]
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(p)) for f, p in files]
    if readme is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md",
                                             path_or_fileobj=readme.encode("utf-8")))
    api = _api(endpoint, token)
    # private=None: a new repo follows the owner's default visibility unless --private
    _call(api.create_repo, repo_id, endpoint, repo_id, private=private or None, exist_ok=True)
    if revision and revision != "main":
        _call(api.create_branch, f"{repo_id}@{revision}", endpoint, repo_id, branch=revision,
              exist_ok=True)
    message = commit_message or default_commit_message(report, src)
    info = _call(api.create_commit, repo_id, endpoint, repo_id, operations=operations,
                 commit_message=message, revision=revision)
    from .reports import PushReport

    return PushReport(repo_id=repo_id, revision=revision or "main", commit=info.oid,
                      url=redact(info.commit_url), private=private, endpoint=redact(endpoint),
                      files=sorted([f for f, _ in files] + (["README.md"] if readme else [])))
