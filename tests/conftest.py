"""Fixtures and hooks only; the builders they use live in tests/helpers/ (tiny models built in
code with seeded random weights, PEFT adapters made with the real PEFT)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# triton's CPU interpreter must be on before anything imports triton (bitsandbytes does, and
# triton.language's own functions are built at import): tests/test_triton_kernels.py runs under it
os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers.peft_adapters import PEFT_CASES, PeftCase, build_peft_case  # noqa: E402


@pytest.fixture(scope="session")
def peft_cases(tmp_path_factory) -> dict[str, PeftCase]:
    """Every case built once per session (building them is the slow part)."""
    root = tmp_path_factory.mktemp("peft_cases")
    return {name: build_peft_case(root, name, kind, kwargs, **options)
            for name, (kind, kwargs, options) in PEFT_CASES.items()}


@pytest.fixture(scope="session")
def llama_cpp_converter(tmp_path_factory) -> Path:
    """llama.cpp's own ``convert_lora_to_gguf.py``, from the llama-cpp-python sdist that matches
    the installed llama-cpp-python (downloaded once from PyPI into a cache folder)."""
    import importlib.metadata
    import subprocess
    import sys
    import tarfile

    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed; CI installs the `llama` extra")
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[test,llama]')")
    cache = Path(os.environ.get("ADAPTERTOOLS_TEST_CACHE",
                                Path.home() / ".cache" / "adaptertools-tests"))
    root = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    script = root / "convert_lora_to_gguf.py"
    if script.exists():
        return script
    download = tmp_path_factory.mktemp("sdist")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                             "--no-binary", ":all:", f"llama-cpp-python=={version}",
                             "-d", str(download)], capture_output=True, text=True)
    sdists = list(download.glob("*.tar.gz"))
    if result.returncode or not sdists:
        message = f"cannot fetch the llama-cpp-python {version} sdist: {result.stderr[-300:]}"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    wanted = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers()
                   if "/vendor/llama.cpp/" in m.name
                   and m.name.split("/vendor/llama.cpp/", 1)[1].startswith(wanted)]
        tar.extractall(cache, members=members, filter="data")
    assert script.exists(), f"{script} missing from the sdist"
    return script
