"""llama.cpp in a child process (adaptertools.llamacpp): the same logits as llama_cpp in this
process, the extra buffer types off (the Intel AMX crash), and a crash of llama.cpp as one clear
error that neither the CLI nor this test session dies of."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import adaptertools as at
from adaptertools import llamacpp
from adaptertools.errors import AdapterToolsError

from helpers.cli import assert_cli_error, run_cli
from helpers.gguf_base import IDS, llama_quantize, make_base_model, write_gguf_base
from helpers.models import LLAMA_ALL

if importlib.util.find_spec("llama_cpp") is None:
    if os.environ.get("CI"):
        raise RuntimeError("llama-cpp-python is missing; CI installs the `llama` extra")
    pytestmark = pytest.mark.skip(reason="llama-cpp-python not installed")

SEQUENCES = [IDS, IDS[3:8], [9, 9, 9]]      # different lengths: each starts from an empty cache
# the child itself, with llama.cpp's eval replaced by a segfault (after a real model load)
CRASH_IN_EVAL = ("import os, signal, sys, llama_cpp; from adaptertools import _llamacpp_child "
                 "as c; llama_cpp.Llama.eval = lambda self, ids: os.kill(os.getpid(), "
                 "signal.SIGSEGV); sys.exit(c.main())")
# "load_tensors:   CPU_REPACK model buffer size =  0.63 MiB": where llama.cpp put the weights
MODEL_BUFFER = re.compile(r"load_tensors:\s+(\S+) model buffer size")
PLAIN_BUFFERS = {"CPU", "CPU_Mapped"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama as F32 GGUF, quantized by llama.cpp to Q8_0 and Q4_0 (the type llama.cpp's
    CPU backend repacks when it may), a GGUF LoRA, and a merge of it into the F32 file."""
    from helpers.peft_adapters import perturb_trainables
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("llamacpp")
    model = make_base_model("llama")
    model.save_pretrained(root / "hf")
    files = {"F32": write_gguf_base(model, root / "base.gguf", "llama")}
    for ftype in ("Q8_0", "Q4_0"):
        files[ftype] = llama_quantize(files["F32"], root / f"base-{ftype}.gguf", ftype)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_ALL,
                                                  init_lora_weights=False))
    perturb_trainables(peft_model)
    peft_model.save_pretrained(root / "peft")
    at.convert(root / "peft", root / "lora.gguf", to="gguf", base=root / "hf")
    files["lora"], files["peft"] = root / "lora.gguf", root / "peft"
    files["merged"] = root / "merged.gguf"
    at.merge(files["F32"], [files["peft"]], files["merged"])
    return files


def in_process(model, sequences, lora=None, scale=1.0) -> list[np.ndarray]:
    """The reference, independent of the child's code: llama_cpp.Llama in this process, its
    extra buffer types off through its default params, a fresh model for each sequence."""
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def without_extra_bufts():
        params = default()
        params.use_extra_bufts = False
        return params

    rows = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lib, "llama_model_default_params", without_extra_bufts)
        for ids in sequences:
            kwargs = dict(model_path=str(model), logits_all=True, n_ctx=64, type_k=0, type_v=0,
                          verbose=False, n_threads=2, n_threads_batch=2)
            if lora is not None:
                kwargs.update(lora_path=str(lora), lora_scale=scale)
            llm = llama_cpp.Llama(**kwargs)
            try:
                assert llm.model_params.use_extra_bufts is False
                llm.eval(ids)
                rows.append(np.array(llm.scores[:len(ids)], dtype=np.float32))
            finally:
                llm.close()
    return rows


def child_logits(model, sequences, **kwargs) -> list[np.ndarray]:
    return llamacpp.logits(model, sequences, n_ctx=64, n_threads=2, **kwargs)


# ----------------------------------------------------------------------------- same logits

@pytest.mark.parametrize("ftype", ["F32", "Q8_0"])
def test_child_logits_equal_llama_cpp_in_process(models, ftype):
    got = child_logits(models[ftype], SEQUENCES)
    want = in_process(models[ftype], SEQUENCES)
    assert [g.shape for g in got] == [(len(ids), 128) for ids in SEQUENCES]
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and np.array_equal(g, w)
    assert not np.array_equal(got[0][3:8], got[1])       # the context of IDS[:3] matters


def test_child_applies_the_runtime_lora_at_its_scale(models):
    plain = child_logits(models["F32"], SEQUENCES[:1])[0]
    half = child_logits(models["F32"], SEQUENCES[:1], lora=models["lora"], scale=0.5)[0]
    full = child_logits(models["F32"], SEQUENCES[:1], lora=models["lora"])[0]
    assert np.array_equal(half, in_process(models["F32"], SEQUENCES[:1], models["lora"], 0.5)[0])
    assert np.abs(half - plain).max() > 0.05 and np.abs(full - half).max() > 0.05


# ----------------------------------------------------------------------------- extra buffer types

def test_child_loads_without_extra_buffer_types(models):
    """The flag as passed to llama_model_load_from_file, and llama.cpp's own account of where
    it put the weights: plain CPU buffers, nothing repacked (see the control below)."""
    run = llamacpp.run(models["Q4_0"], [IDS], n_threads=2)
    assert run.use_extra_bufts is False
    buffers = set(MODEL_BUFFER.findall(run.log))
    assert buffers and buffers <= PLAIN_BUFFERS, buffers
    assert "repack tensor" not in run.log


def test_control_with_defaults_llama_cpp_repacks_q4_0(models, tmp_path):
    """What the check above would see if the flag were left on: load only (no matmul, so safe
    on AMX hosts too), in a process of its own."""
    script = textwrap.dedent(f"""
        import ctypes, llama_cpp, llama_cpp.llama_cpp as lib
        lines = []                                  # printed after: the load mutes stdout
        @lib.llama_log_callback
        def log(level, text, user_data):
            lines.append((text or b"").decode(errors="replace"))
        lib.llama_log_set(log, ctypes.c_void_p(0))
        llm = llama_cpp.Llama(model_path={str(models["Q4_0"])!r}, n_ctx=64, verbose=False)
        print("use_extra_bufts", llm.model_params.use_extra_bufts)
        llm.close()
        print("".join(lines))
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "use_extra_bufts True" in proc.stdout
    extra = set(MODEL_BUFFER.findall(proc.stdout)) - PLAIN_BUFFERS
    if not extra:
        pytest.skip("llama.cpp has no extra CPU buffer type for Q4_0 on this CPU: the log "
                    "check above cannot tell the flag's effect here")
    assert extra & {"CPU_REPACK", "AMX"}, extra


# ----------------------------------------------------------------------------- crashes

@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGABRT])
def test_child_killed_by_a_signal_is_one_clear_error(models, monkeypatch, sig):
    monkeypatch.setattr(llamacpp, "child_command", lambda: [
        sys.executable, "-c", f"import os, signal; os.kill(os.getpid(), {int(sig)})"])
    with pytest.raises(llamacpp.LlamaCppError) as info:
        child_logits(models["Q8_0"], [IDS])
    message = str(info.value)
    assert isinstance(info.value, AdapterToolsError) and "\n" not in message
    for fragment in (f"llama.cpp crashed ({sig.name})", str(models["Q8_0"]), "while starting",
                     "pip install -U llama-cpp-python"):
        assert fragment in message, message


def test_crash_in_eval_names_the_phase_and_llama_cpps_last_output(models, monkeypatch):
    monkeypatch.setattr(llamacpp, "child_command", lambda: [sys.executable, "-c", CRASH_IN_EVAL])
    with pytest.raises(llamacpp.LlamaCppError) as info:
        child_logits(models["Q8_0"], SEQUENCES, lora=models["lora"])
    message = str(info.value)
    for fragment in ("llama.cpp crashed (SIGSEGV)", str(models["Q8_0"]), str(models["lora"]),
                     "while evaluating sequence 1 of 3 (12 tokens)", "last output: "):
        assert fragment in message, message
    assert "\n" not in message and len(message) < 1200


def test_python_error_in_the_child_names_llama_cpps_reason(models):
    with pytest.raises(llamacpp.LlamaCppError, match=r"llama\.cpp failed on .*peft.*"
                       r"while loading the model: ValueError: Failed to load model.*"
                       r"invalid magic"):
        child_logits(models["peft"] / "adapter_model.safetensors", [IDS])


def test_child_that_hangs_is_stopped(models, monkeypatch):
    monkeypatch.setattr(llamacpp, "child_command",
                        lambda: [sys.executable, "-c", "import time; time.sleep(120)"])
    monkeypatch.setenv(llamacpp.TIMEOUT_ENV, "0.5")
    with pytest.raises(llamacpp.LlamaCppError, match=r"did not finish within 0\.5 s on .*"
                       r"base-Q8_0\.gguf.*ADAPTERTOOLS_LLAMACPP_TIMEOUT"):
        child_logits(models["Q8_0"], [IDS])


def test_cli_validate_e2e_with_a_crashing_llama_cpp_exits_1(models, monkeypatch):
    monkeypatch.setattr(llamacpp, "child_command", lambda: [sys.executable, "-c", CRASH_IN_EVAL])
    outcome = run_cli("validate", models["F32"], models["peft"], "--merged",
                      models["merged"], "--e2e")
    assert_cli_error(outcome, ["llama.cpp crashed (SIGSEGV)", str(models["F32"]),
                               "without --e2e"])


def test_cli_process_survives_llama_cpp_dying_on_import(models, tmp_path, monkeypatch):
    """A real CLI process: a llama_cpp that segfaults as soon as it is imported crashes only the
    child, so the CLI never runs llama.cpp in its own process and exits 1, not 139."""
    fake = tmp_path / "shadow" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(fake.parent), os.environ.get("PYTHONPATH")) if p))
    outcome = run_cli("validate", models["F32"], models["peft"], "--merged",
                      models["merged"], "--e2e", how="subprocess")
    assert_cli_error(outcome, ["llama.cpp crashed (SIGSEGV)", str(models["F32"])])
