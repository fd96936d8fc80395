"""The child process of ``adaptertools.llamacpp``: one llama.cpp model, logits of token sequences.

Run as ``python -m adaptertools._llamacpp_child`` with a JSON request on stdin::

    {"model": "/abs/base.gguf", "lora": "/abs/lora.gguf" | null, "scale": 1.0,
     "sequences": [[5, 17, ...], ...], "n_ctx": 64, "n_threads": 2, "out": "/abs/tmpdir"}

It writes into ``out``: ``logits_<i>.npy`` (float32, (len(sequences[i]), n_vocab)) per sequence,
then ``result.json`` ({"use_extra_bufts": false, "n_vocab": V}) last, as the mark of success;
``error.json`` ({"error": "..."}) and exit code 1 on a Python error. llama.cpp's own log goes to
``llama.log`` (never to the terminal), written unbuffered with this process's phases
(``# adaptertools: ...`` lines), so that the parent can say where a crash happened.

Extra buffer types: llama.cpp's CPU backend repacks weights into "extra" buffers (CPU_REPACK,
and AMX on Xeons with amx_int8/amx_bf16). The AMX matmul of llama-cpp-python 0.3.36 segfaults on
quantized models, so every model is loaded with ``llama_model_params.use_extra_bufts = False``:
``llama_model_load_from_file``, the one function every llama-cpp-python model load goes through,
is wrapped to clear the flag on the params it is given and to record the value it passed on;
a load that did not go through the wrapper is an error, not a silent fallback.

This module imports only the standard library, numpy and llama_cpp (no torch, no adaptertools).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import traceback
from pathlib import Path

LOG_NAME, RESULT_NAME, ERROR_NAME = "llama.log", "result.json", "error.json"
PHASE = "# adaptertools: "        # prefix of the phase lines written into the log
_CALLBACKS = []                    # llama.cpp keeps a raw pointer to the log callback: keep it


class _Log:
    """llama.cpp's log (and our phase lines) appended, unbuffered, to one file."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, text: bytes) -> None:
        os.write(self.fd, text)

    def phase(self, text: str) -> None:
        self.write(f"{PHASE}{text}\n".encode())


def _quiet(lib, log: _Log) -> None:
    """Send llama.cpp's and ggml's log to ``log`` (llama_log_set sets both)."""

    @lib.llama_log_callback
    def callback(level, text, user_data):
        if text:
            log.write(text)

    _CALLBACKS.append(callback)
    lib.llama_log_set(callback, ctypes.c_void_p(0))


def _without_extra_bufts(lib) -> list[bool]:
    """Wrap ``llama_model_load_from_file`` so that every load has ``use_extra_bufts`` False;
    returns the list that records, per load, the value actually passed to llama.cpp."""
    load = lib.llama_model_load_from_file
    passed: list[bool] = []

    def load_without_extra_bufts(path_model, params):
        params.use_extra_bufts = False
        passed.append(bool(params.use_extra_bufts))
        return load(path_model, params)

    lib.llama_model_load_from_file = load_without_extra_bufts
    return passed


def compute(request: dict, out: Path, log: _Log) -> dict:
    import numpy as np
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    _quiet(lib, log)
    passed = _without_extra_bufts(lib)
    kwargs = dict(model_path=request["model"], logits_all=True, n_ctx=request["n_ctx"],
                  type_k=0, type_v=0, verbose=False,          # F32 KV cache: no noise of its own
                  n_threads=request["n_threads"], n_threads_batch=request["n_threads"])
    if request.get("lora"):
        kwargs.update(lora_path=request["lora"], lora_scale=float(request["scale"]))
    log.phase("loading the model")
    llm = llama_cpp.Llama(**kwargs)
    try:
        if passed != [False]:
            raise RuntimeError(f"could not confirm that llama.cpp loaded the model with "
                               f"use_extra_bufts off (loads seen: {passed}); llama-cpp-python "
                               f"{llama_cpp.__version__} loads models another way")
        sequences = request["sequences"]
        for i, ids in enumerate(sequences):
            log.phase(f"evaluating sequence {i + 1} of {len(sequences)} ({len(ids)} tokens)")
            llm.reset()
            llm.eval(ids)
            np.save(out / f"logits_{i}.npy",
                    np.array(llm.scores[:len(ids)], dtype=np.float32), allow_pickle=False)
        log.phase("freeing the model")
        return {"use_extra_bufts": passed[0], "n_vocab": int(llm.n_vocab())}
    finally:
        llm.close()


def main() -> int:
    request = json.loads(sys.stdin.read())
    out = Path(request["out"])
    try:
        result = compute(request, out, _Log(out / LOG_NAME))
    except Exception as exc:       # reported to the parent; a signal cannot be caught here
        traceback.print_exc()
        (out / ERROR_NAME).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    (out / RESULT_NAME).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
