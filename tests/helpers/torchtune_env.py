"""torchtune 0.6.1 as an oracle, in an environment of its own (tests/test_torchtune.py).

torchtune 0.6.1 wants torchao 0.15.0 and brings datasets, pandas, pyarrow, omegaconf, ...; none
of that goes into the test environment. The environment is made once and cached under
``$ADAPTERTOOLS_TEST_CACHE`` (default ``~/.cache/adaptertools-tests``, as conftest.py's llama.cpp
sources) as ``torchtune-0.6.1/``: a venv of the base interpreter whose ``main-venv.pth`` puts the
test environment's site-packages after its own, so torch 2.13, transformers and safetensors are
the very ones the tests use, and pip installs only what they lack. torchtune then runs there in a
subprocess (helpers/torchtune_oracle.py) that writes its checkpoints into folders the tests read.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

TORCHTUNE = "torchtune==0.6.1"
TORCHAO = "torchao==0.15.0"          # torchtune 0.6.1's requirement (FORMATS.md, Wave 2)
ORACLE = Path(__file__).with_name("torchtune_oracle.py")


def cache_root() -> Path:
    return Path(os.environ.get("ADAPTERTOOLS_TEST_CACHE",
                               Path.home() / ".cache" / "adaptertools-tests"))


def oracle_python() -> Path:
    """The oracle environment's python, made on first use; RuntimeError saying why it could
    not be made (no index to install from, an install that fails)."""
    env = cache_root() / f"torchtune-{TORCHTUNE.split('==')[1]}"
    python, done = env / "bin" / "python", env / ".complete"
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.parent / f".{env.name}.lock", "w") as lock:   # one maker at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return python
        shutil.rmtree(env, ignore_errors=True)        # a half-made one from an interrupted run
        _run([sys.executable, "-m", "venv", str(env)], env)
        purelib = Path(sysconfig.get_paths()["purelib"])
        (_site_packages(env) / "main-venv.pth").write_text(f"{purelib}\n")
        _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              TORCHTUNE, TORCHAO], env)
        _run([str(python), "-c", "import torchtune, torchao, torch; print(torch.__version__)"],
             env)
        done.write_text(f"{TORCHTUNE} {TORCHAO}\n")
    return python


def _site_packages(env: Path) -> Path:
    return next((env / "lib").glob("python3*/site-packages"))


def _run(argv: list[str], env: Path) -> None:
    result = subprocess.run(argv, check=False, capture_output=True, text=True)
    if result.returncode:
        shutil.rmtree(env, ignore_errors=True)
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"making the torchtune oracle environment failed at "
                           f"`{' '.join(argv[:4])} ...`: {' | '.join(tail)}")


def make_checkpoints(python: Path, specs: list[dict]) -> None:
    """Run torchtune (helpers/torchtune_oracle.py) once for all ``specs``; each writes
    ``out/epoch_0/`` as torchtune's LoRA recipe would."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([str(python), str(ORACLE), json.dumps(specs, default=str)],
                            check=False, capture_output=True, text=True, env=env)
    if result.returncode:
        raise AssertionError(f"torchtune failed:\n{result.stderr[-3000:]}")
