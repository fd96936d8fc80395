"""llama.cpp inference (llama-cpp-python) in a child process, with its extra buffer types off.

Everything in adaptertools and its tests that runs a llama.cpp model goes through ``logits``
(or ``run``): one child process per call, ``python -m adaptertools._llamacpp_child``, which loads
the model once, optionally applies a runtime LoRA at a scale, and evaluates each token sequence
from an empty KV cache (F32, so that the cache adds no noise of its own) with the logits of
every position. The request goes to the child as JSON on stdin, the logits come back as ``.npy``
files in a temporary folder (never pickle).

Why a child: llama.cpp can die by a signal, and a signal cannot be caught in the process it hits.
On Xeons with Intel AMX (``amx_int8 amx_bf16 amx_tile``), llama-cpp-python 0.3.36 segfaults in
``ggml_backend_amx_mul_mat`` on any quantized model when the CPU's "extra buffer types" are on,
taking down the CLI (exit 139, no message) or the pytest session with it. So the child loads
every model with ``llama_model_params.use_extra_bufts = False`` (the AMX and CPU_REPACK weight
layouts off; the same model then decodes correctly), and any crash that is left becomes one
``LlamaCppError`` naming the signal, the phase, the model file and what to do.

Costs: a child start (interpreter, numpy and llama_cpp imports) per call, about 0.3 s on a
small CPU, against model loads that dominate for any real model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _llamacpp_child as child
from .errors import InputNotFoundError, LlamaCppError

TIMEOUT_ENV = "ADAPTERTOOLS_LLAMACPP_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0            # seconds: a 70B load from a slow disk, not a tiny test model
TAIL_LINES, TAIL_CHARS = 3, 400     # how much of llama.cpp's last output an error shows


@dataclass(frozen=True)
class Run:
    logits: list[np.ndarray]        # per sequence: (len(ids), n_vocab) float32
    use_extra_bufts: bool           # as passed to llama_model_load_from_file in the child
    log: str                        # llama.cpp's own log of the run, with the child's phases


def logits(model: str | os.PathLike, sequences: Sequence[Sequence[int]], *,
           lora: str | os.PathLike | None = None, scale: float = 1.0,
           n_ctx: int | None = None, n_threads: int | None = None,
           timeout: float | None = None) -> list[np.ndarray]:
    """llama.cpp's logits of the GGUF ``model`` (with the GGUF adapter ``lora`` applied at run
    time, times ``scale``) for every position of each token-id sequence: one (len, n_vocab)
    float32 array per sequence. See ``run``."""
    return run(model, sequences, lora=lora, scale=scale, n_ctx=n_ctx, n_threads=n_threads,
               timeout=timeout).logits


def run(model: str | os.PathLike, sequences: Sequence[Sequence[int]], *,
        lora: str | os.PathLike | None = None, scale: float = 1.0,
        n_ctx: int | None = None, n_threads: int | None = None,
        timeout: float | None = None) -> Run:
    """``logits`` with what the child saw: one model load, ``n_ctx`` (default: twice the longest
    sequence, at least 64), ``n_threads`` (default: every CPU), ``timeout`` in seconds (default
    ``$ADAPTERTOOLS_LLAMACPP_TIMEOUT`` or 1800). Raises ``LlamaCppError`` when llama.cpp crashes,
    fails or times out."""
    model, lora = _existing(model, "GGUF model"), lora and _existing(lora, "GGUF adapter")
    sequences = [[int(t) for t in ids] for ids in sequences]
    timeout = float(timeout or os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT)
    with tempfile.TemporaryDirectory(prefix="adaptertools-llamacpp-") as tmp:
        out = Path(tmp)
        request = {"model": str(model), "lora": lora and str(lora), "scale": float(scale),
                   "sequences": sequences, "out": str(out),
                   "n_ctx": n_ctx or max(64, 2 * max(map(len, sequences), default=0)),
                   "n_threads": n_threads or os.cpu_count() or 1}
        what = _what(model, lora)
        try:
            proc = subprocess.run(child_command(), input=json.dumps(request), text=True,
                                  capture_output=True, cwd=out, env=_child_env(),
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LlamaCppError(
                f"llama.cpp did not finish within {timeout:g} s {what}, {_phase(out)}, and "
                f"was stopped; for a large model on a slow disk set {TIMEOUT_ENV} to more seconds"
                f"{_tail(out, '')}") from None
        result = out / child.RESULT_NAME
        if proc.returncode != 0 or not result.exists():
            raise _failure(proc, out, what)
        info = json.loads(result.read_text())
        arrays = [np.load(out / f"logits_{i}.npy", allow_pickle=False)
                  for i in range(len(sequences))]
        return Run(arrays, bool(info["use_extra_bufts"]),
                   (out / child.LOG_NAME).read_text(errors="replace"))


def child_command() -> list[str]:
    """The command that runs the child; tests replace it to make the child crash."""
    return [sys.executable, "-m", child.__name__]


def _child_env() -> dict[str, str]:
    """This environment, with this adaptertools importable in the child (it runs in a temp dir,
    so nothing in the caller's working directory can shadow it)."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), root) if p)
    return env


def _existing(path, kind: str) -> Path:
    path = Path(path).resolve()
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such {kind} file for llama.cpp")
    return path


def _what(model: Path, lora: Path | None) -> str:
    return f"on {model}" + (f" with the runtime LoRA {lora}" if lora else "")


def _failure(proc: subprocess.CompletedProcess, out: Path, what: str) -> LlamaCppError:
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return LlamaCppError(
            f"llama.cpp crashed ({name}) {what}, {_phase(out)}, in its child process; adaptertools "
            f"already turns llama.cpp's extra CPU buffer types off (the Intel AMX crash), so "
            f"this is another llama.cpp bug: try another llama-cpp-python version (pip install "
            f"-U llama-cpp-python) or run the file with llama.cpp's own llama-cli"
            f"{_tail(out, proc.stderr)}")
    error = out / child.ERROR_NAME
    if error.exists():     # a Python error: its message, and llama.cpp's log, not the traceback
        reason, stderr = json.loads(error.read_text())["error"], ""
    else:
        reason, stderr = f"its child process exited with code {proc.returncode}", proc.stderr
    return LlamaCppError(
        f"llama.cpp failed {what}, {_phase(out)}: {reason}; check that the file is a GGUF model "
        f"(and adapter) this llama-cpp-python can load{_tail(out, stderr)}")


def _log_lines(out: Path) -> list[str]:
    path = out / child.LOG_NAME
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = (" ".join(line.split()) for line in text.splitlines())  # llama.cpp pads with spaces
    return [line for line in lines if line not in ("", ".")]


def _phase(out: Path) -> str:
    """'while evaluating sequence 2 of 2 (16 tokens)', from the child's last phase line."""
    phases = [line[len(child.PHASE):] for line in _log_lines(out) if line.startswith(child.PHASE)]
    return f"while {phases[-1] if phases else 'starting'}"


def _tail(out: Path, stderr: str) -> str:
    """'; llama.cpp's last output: ...', one line, from its log and the child's stderr."""
    lines = [line for line in _log_lines(out) if not line.startswith(child.PHASE)]
    lines += [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    if not lines:
        return ""
    text = " | ".join(lines[-TAIL_LINES:])
    if len(text) > TAIL_CHARS:
        text = "..." + text[-TAIL_CHARS:]
    return f"; llama.cpp's last output: {text}"
