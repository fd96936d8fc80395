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
    return cached_venv(f"torchtune-{TORCHTUNE.split('==')[1]}", [TORCHTUNE, TORCHAO],
                       "import torchtune, torchao, torch; print(torch.__version__)")


def cached_venv(name: str, packages: list[str], probe: str, *, share_main: bool = True,
                env: dict[str, str] | None = None) -> Path:
    """The python of the venv ``cache_root() / name`` with ``packages`` pip-installed, made once
    (under a lock, one maker at a time) and checked by running ``probe``; ``share_main``: a
    ``main-venv.pth`` puts the test environment's site-packages after its own."""
    folder = cache_root() / name
    python, done = folder / "bin" / "python", folder / ".complete"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return python
        shutil.rmtree(folder, ignore_errors=True)     # a half-made one from an interrupted run
        base = getattr(sys, "_base_executable", sys.executable) if not share_main else sys.executable
        _run([base, "-m", "venv", str(folder)], folder, env)
        if share_main:
            purelib = Path(sysconfig.get_paths()["purelib"])
            (_site_packages(folder) / "main-venv.pth").write_text(f"{purelib}\n")
        _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              *packages], folder, env)
        _run([str(python), "-c", probe], folder, env)
        done.write_text(" ".join(packages) + "\n")
    return python


def _site_packages(env: Path) -> Path:
    return next((env / "lib").glob("python3*/site-packages"))


def _run(argv: list[str], folder: Path, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(argv, check=False, capture_output=True, text=True,
                            env=None if env is None else {**os.environ, **env})
    if result.returncode:
        shutil.rmtree(folder, ignore_errors=True)
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"making the oracle environment {folder.name} failed at "
                           f"`{' '.join(argv[:4])} ...`: {' | '.join(tail)}")


def make_checkpoints(python: Path, specs: list[dict]) -> None:
    """Run torchtune (helpers/torchtune_oracle.py) once for all ``specs``; each writes
    ``out/epoch_0/`` as torchtune's LoRA recipe would."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([str(python), str(ORACLE), json.dumps(specs, default=str)],
                            check=False, capture_output=True, text=True, env=env)
    if result.returncode:
        raise AssertionError(f"torchtune failed:\n{result.stderr[-3000:]}")
