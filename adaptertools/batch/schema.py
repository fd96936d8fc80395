"""The jobs file (YAML or JSON): parsed and checked up front, every problem listed at once.

::

    jobs:
      - merge: {base: ./base, adapters: [./lora_a], out: ./merged_a}
        name: merged_a                 # optional: ${merged_a} is this job's output path
      - validate: {base: ./base, adapters: [./lora_a], merged: "${merged_a}"}
      - merge: {base: "${base}", adapters: ["${lora}"], out: "./out/${lora.name}-${base.name}"}
        matrix: {lora: [./lora_a, ./lora_b], base: [./base, ./base2]}   # 4 jobs

A job is one key, the kind (merge, convert, validate, combine, extract, push), whose mapping holds
the keyword arguments of the library function of that name, plus optional ``name`` (a named
output; a job using ``${name}`` runs after that job, and is skipped when it failed) and
``matrix`` (variables -> lists of values; one job per combination; ``${var}`` is the value,
``${var.name}`` its last path component). Relative paths are relative to the jobs file. The
named output of merge/combine/extract is ``out``, of convert ``dst``, of validate ``merged``,
of push ``src``.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OptionError

KINDS = ("merge", "convert", "validate", "combine", "extract", "push")
OUTPUT_KEY = {"merge": "out", "convert": "dst", "combine": "out", "extract": "out",
              "validate": "merged", "push": "src"}
WRITES = {"merge", "convert", "combine", "extract"}      # kinds whose OUTPUT_KEY is written
PATH_KEYS = {"base", "adapters", "out", "quantize_like", "src", "dst", "merged", "finetuned"}
# keywords a batch sets itself, or that make no sense in a file
RESERVED = {"progress", "dry_run", "executor", "address", "report"}
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_-]*)(\.name)?\}")


class JobsFileError(OptionError):
    """A bad jobs file: ``problems`` holds one line per problem (job index and key named)."""

    def __init__(self, path, problems: list[str]) -> None:
        self.path, self.problems = str(path), list(problems)
        super().__init__(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))

    def __reduce__(self):
        return type(self), (self.path, self.problems)


@dataclass(frozen=True)
class Job:
    index: int                    # position in the expanded plan
    source: str                   # "job 2" or "job 2 [lora=./a]" (as written in the file)
    kind: str
    kwargs: dict                  # keyword arguments, paths absolute, ${name} resolved
    name: str | None = None
    after: tuple[int, ...] = ()   # indices of the jobs whose named outputs it takes
    output: str | None = None     # the path it writes (None: validate, push)
    inputs: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        """Its manifest key: what it writes, or (validate, push) what it checks or sends."""
        target = self.output or self.kwargs.get(OUTPUT_KEY[self.kind])
        extra = f" -> {self.kwargs['repo_id']}" if self.kind == "push" else ""
        return f"{self.kind} {target}{extra}"


def _signature(kind: str) -> inspect.Signature:
    if kind == "push":
        from ..hub import push as func
    else:
        from .. import api
        func = getattr(api, kind)
    return inspect.signature(func)


def allowed_keys(kind: str) -> tuple[list[str], list[str]]:
    """(every keyword a ``kind`` job takes, the ones it must have)."""
    params = [p for p in _signature(kind).parameters.values() if p.name not in RESERVED]
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    if kind in WRITES and OUTPUT_KEY[kind] not in required:
        required.append(OUTPUT_KEY[kind])
    return [p.name for p in params], required


def load_file(path: Path) -> object:
    text = path.read_text()
    if path.suffix.lower() == ".json":
        return json.loads(text)
    try:
        import yaml
    except ImportError:
        raise OptionError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write "
                          "the jobs file as JSON") from None
    return yaml.safe_load(text)


def _resolve(value, root: Path):
    if isinstance(value, list):
        return [_resolve(v, root) for v in value]
    if not isinstance(value, str) or value.startswith("hf://") or "${" in value:
        return value
    return os.path.normpath(root / os.path.expanduser(value))


def _substitute(value, env: dict[str, str]):
    if isinstance(value, list):
        return [_substitute(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, env) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def one(m):
        if m.group(1) not in env:
            return m.group(0)
        got = env[m.group(1)]
        return os.path.basename(got.rstrip("/")) if m.group(2) else got
    return REF.sub(one, value)


def _refs(value) -> set[str]:
    if isinstance(value, list):
        return set().union(*map(_refs, value)) if value else set()
    return {m.group(1) for m in REF.finditer(value)} if isinstance(value, str) else set()


def _expand(i: int, raw, problems: list[str]) -> list[tuple[str, str, dict, str | None]]:
    """One entry of ``jobs`` -> (source, kind, raw kwargs, name) per matrix combination."""
    if not isinstance(raw, dict):
        problems.append(f"job {i}: not a mapping; write '- merge: {{...}}'")
        return []
    kinds = [k for k in raw if k in KINDS]
    unknown = [k for k in raw if k not in KINDS and k not in ("name", "matrix")]
    if unknown:
        problems.append(f"job {i}: unknown key(s) {', '.join(map(str, unknown))}; a job has "
                        f"one of {', '.join(KINDS)}, and optionally name, matrix")
    if len(kinds) != 1:
        problems.append(f"job {i}: needs exactly one kind of {', '.join(KINDS)} (has "
                        f"{', '.join(kinds) or 'none'})")
        return []
    kind, kwargs = kinds[0], raw[kinds[0]]
    if not isinstance(kwargs, dict):
        problems.append(f"job {i} {kind}: its value must be a mapping of keyword arguments")
        return []
    matrix = raw.get("matrix") or {}
    if not isinstance(matrix, dict) or not all(isinstance(v, list) and v
                                               for v in matrix.values()):
        problems.append(f"job {i} matrix: must map names to non-empty lists of values")
        return []
    name = raw.get("name")
    if name is not None and not (isinstance(name, str) and NAME.fullmatch(REF.sub("x", name))):
        problems.append(f"job {i} name: {name!r} is not a name (letters, digits, _ and -)")
        name = None
    out = []
    for combo in itertools.product(*matrix.values()):
        env = {k: str(v) for k, v in zip(matrix, combo)}
        tag = f" [{', '.join(f'{k}={v}' for k, v in env.items())}]" if env else ""
        out.append((f"job {i}{tag}", kind, _substitute(kwargs, env),
                    _substitute(name, env) if name else None))
    return out


def _check_keys(source: str, kind: str, kwargs: dict, problems: list[str]) -> None:
    allowed, required = allowed_keys(kind)
    for key in kwargs:
        if key not in allowed:
            problems.append(f"{source} {kind}: unknown key {key!r}; valid keys: "
                            f"{', '.join(allowed)}")
    for key in required:
        if key not in kwargs:
            problems.append(f"{source} {kind}: missing key {key!r}")
    for key in PATH_KEYS & set(kwargs):
        value = kwargs[key]
        items = value if isinstance(value, list) and key == "adapters" else [value]
        if not all(isinstance(v, str) for v in items):
            problems.append(f"{source} {kind} {key}: must be a path (a string)"
                            + (" or a list of paths" if key == "adapters" else ""))


def parse(path: str | os.PathLike) -> list[Job]:
    """The expanded jobs of the file at ``path``, in dependency order; JobsFileError (every
    problem at once) when anything is wrong."""
    path = Path(path)
    if not path.is_file():
        raise JobsFileError(path, ["no such file; give the jobs file (YAML or JSON)"])
    try:
        data = load_file(path)
    except (ValueError, OSError) as exc:   # json and yaml errors are ValueErrors or YAMLError
        raise JobsFileError(path, [f"cannot be read: {str(exc).splitlines()[0]}"]) from None
    except Exception as exc:  # noqa: BLE001  (yaml.YAMLError)
        raise JobsFileError(path, [f"not valid YAML: {str(exc).splitlines()[0]}"]) from None
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise JobsFileError(path, ["must hold 'jobs:', a non-empty list of jobs"])
    problems: list[str] = []
    extra = [k for k in data if k != "jobs"]
    if extra:
        problems.append(f"unknown top-level key(s) {', '.join(map(str, extra))}; only 'jobs'")
    expanded = [e for i, raw in enumerate(data["jobs"]) for e in _expand(i, raw, problems)]
    root = path.resolve().parent
    names: dict[str, int] = {}
    for n, (source, kind, kwargs, name) in enumerate(expanded):
        _check_keys(source, kind, kwargs, problems)
        if name is not None:
            if name in names:
                problems.append(f"{source} name: {name!r} is also the name of an earlier job")
            names[name] = n
    jobs = []
    for n, (source, kind, kwargs, name) in enumerate(expanded):
        kwargs = {k: _resolve(v, root) if k in PATH_KEYS else v for k, v in kwargs.items()}
        after = set()
        for key, value in kwargs.items():
            for ref in _refs(value):
                if ref not in names:
                    problems.append(f"{source} {kind} {key}: ${{{ref}}} names no job; name "
                                    "one with 'name: " + ref + "'")
                elif names[ref] == n:
                    problems.append(f"{source} {kind} {key}: ${{{ref}}} is this job's own name")
                else:
                    after.add(names[ref])
        jobs.append([n, source, kind, kwargs, name, after])
    outputs = {}
    for n, source, kind, kwargs, name, after in jobs:
        target = kwargs.get(OUTPUT_KEY[kind])
        if isinstance(target, str):
            outputs[n] = target
        if kind in WRITES and isinstance(target, str) and "${" not in target:
            if target in {outputs[m] for m in outputs if m != n and jobs[m][2] in WRITES}:
                problems.append(f"{source} {kind} {OUTPUT_KEY[kind]}: {target} is also "
                                "written by another job")
    if problems:
        raise JobsFileError(path, problems)
    env = {name: outputs[n] for name, n in names.items() if n in outputs}
    return _ordered([Job(n, source, kind, _substitute(kwargs, env), name, tuple(sorted(after)),
                         kwargs.get(OUTPUT_KEY[kind]) if kind in WRITES else None,
                         _inputs(kind, _substitute(kwargs, env)))
                     for n, source, kind, kwargs, name, after in jobs], path)


def _inputs(kind: str, kwargs: dict) -> tuple[str, ...]:
    paths = []
    for key in sorted(PATH_KEYS & set(kwargs)):
        if kind in WRITES and key == OUTPUT_KEY[kind]:
            continue
        value = kwargs[key]
        paths += value if isinstance(value, list) else [value]
    return tuple(p for p in paths if isinstance(p, str))


def _ordered(jobs: list[Job], path) -> list[Job]:
    """``jobs`` with every job after those it depends on (file order otherwise)."""
    done: list[Job] = []
    seen: set[int] = set()
    left = list(jobs)
    while left:
        ready = [j for j in left if set(j.after) <= seen]
        if not ready:
            raise JobsFileError(path, [f"{j.source}: depends in a circle on "
                                       f"{', '.join(jobs[a].source for a in j.after)}"
                                       for j in left])
        done += ready
        seen |= {j.index for j in ready}
        left = [j for j in left if j.index not in seen]
    return done
