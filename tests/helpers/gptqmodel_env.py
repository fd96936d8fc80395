"""GPTQModel 7.7 as an oracle, in an environment of its own (tests/test_gptq.py).

GPTQModel 7.7.0 requires torch >= 2.14.1 (the tests run torch 2.13) and brings datasets, pyarrow,
torchao, triton, ...: none of that goes into the test environment. The environment is made once
and cached under ``$ADAPTERTOOLS_TEST_CACHE`` (default ``~/.cache/adaptertools-tests``, as
helpers/torchtune_env.py) as ``gptqmodel-7.7.0/``: a plain venv of the base interpreter (no
main-venv.pth: its torch must be its own) with ``torch==2.14.1 gptqmodel==7.7.0`` from the
configured index (about 3 minutes and 6 GB: torch 2.14.1's wheel pulls the CUDA libraries). The
sdist is pure Python: its kernels are built at run time, and on the CPU the torch ones need no
build. GPTQModel then runs there in a subprocess (helpers/gptqmodel_oracle.py).

``hf_folder`` saves a model as GPTQModel wants to load it (with a tokenizer); ``decodings``
reads a GPTQ / AWQ checkpoint back through our codec (codecs/gptq.py).

Every oracle result is cached too, under ``gptqmodel-runs/<sha256 of the job, the oracle's
source and the bytes of its input folders>/``, so a rerun of the tests costs no GPTQModel time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from .torchtune_env import cache_root, cached_venv

GPTQMODEL = "gptqmodel==7.7.0"
TORCH = "torch==2.14.1"             # gptqmodel 7.7.0's requirement (its requirements.txt)
ORACLE = Path(__file__).with_name("gptqmodel_oracle.py")
ENV = {"GPTQMODEL_CPU_WORKERS": "2",            # its default thread pool refuses 1 CPU worker
       "TORCHDYNAMO_DISABLE": "1",     # its CPU kernels torch.compile at load: minutes of g++
       "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


def oracle_python() -> Path:
    """The oracle environment's python, made on first use; RuntimeError saying why it could
    not be made (no index to install from, an install that fails)."""
    return cached_venv(f"gptqmodel-{GPTQMODEL.split('==')[1]}", [TORCH, GPTQMODEL],
                       "import gptqmodel, torch; print(torch.__version__)", share_main=False,
                       env=ENV)


def _digest(job: dict) -> str:
    """sha256 of the job (less its paths), the oracle's source and every file of the folders
    it reads."""
    plain = {k: v for k, v in job.items() if k not in ("float", "folder", "out")}
    h = hashlib.sha256(json.dumps(plain, sort_keys=True).encode() + ORACLE.read_bytes())
    for key in ("float", "folder"):
        if key in job:
            for f in sorted(Path(job[key]).iterdir()):
                h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:24]


def run(jobs: list[dict]) -> list[Path]:
    """Run the oracle's ``jobs`` (helpers/gptqmodel_oracle.py; without "out": each gets a
    cached folder of its own) in one GPTQModel process, skipping those cached; returns each
    job's output folder (quantize: the checkpoint; dequantize / logits: ``out.safetensors``)."""
    runs = cache_root() / "gptqmodel-runs"
    outs, todo = [], []
    for job in jobs:
        out = runs / _digest(job)
        outs.append(out)
        if not (out / ".complete").exists():
            shutil.rmtree(out, ignore_errors=True)
            target = out if job["op"] == "quantize" else out / "out.safetensors"
            todo.append((out, {**job, "out": str(target)}))
    if todo:
        python = oracle_python()
        for out, _ in todo:
            out.mkdir(parents=True)
        specs = runs / f".specs-{os.getpid()}.json"
        specs.write_text(json.dumps([job for _, job in todo]))
        # cwd: GPTQModel writes a logs/ folder into the working directory (not the checkout)
        result = subprocess.run([str(python), str(ORACLE), str(specs)], check=False,
                                capture_output=True, text=True, env={**os.environ, **ENV},
                                cwd=runs)
        specs.unlink()
        if result.returncode:
            raise AssertionError(f"GPTQModel failed:\n{result.stderr[-3000:]}")
        for out, _ in todo:
            (out / ".complete").write_text("")
    return outs


def hf_folder(model, folder: Path) -> Path:
    """``model`` saved as an HF folder with a word-level tokenizer over its 128 ids (GPTQModel's
    loader needs one)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder)
    vocab = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=vocab, unk_token="t0", eos_token="t1",
                            pad_token="t2").save_pretrained(folder)
    return folder


def decodings(folder: Path) -> tuple[dict, dict]:
    """(every tensor of a GPTQ / AWQ checkpoint as the float model holds it: quantized ones by
    our decode under X.weight, the rest as stored, fp32; (encoding, decode state) by X.weight)."""
    from safetensors.torch import load_file

    from adaptertools.codecs import gptq
    from adaptertools.tensor_index import read_entry, read_safetensors_header

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    entries = {t.name: t for t in read_safetensors_header(folder / "model.safetensors").tensors}
    stored = load_file(folder / "model.safetensors")
    found = gptq.describe(entries, qc, lambda e: read_entry(folder / e.file, e), str(folder))
    out = {k: v.float() for k, v in stored.items() if not k.endswith(gptq.MEMBERS)}
    states = {}
    for enc in found:
        key = gptq.logical_name(enc)
        out[key], state = gptq.decode(enc, {m: stored[m] for m in enc.members})
        states[key] = (enc, state)
    return out, states
