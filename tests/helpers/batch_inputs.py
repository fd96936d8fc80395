"""Inputs for batch tests: a tiny base, adapters (one broken), and jobs files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from adaptertools import save
from adaptertools.tiny import make_adapter, make_base


def make_inputs(root: Path, adapters: int = 2) -> Path:
    make_base(root / "base")
    for i in range(adapters):
        save(make_adapter(seed=i + 1, rank=4), root / f"lora_{i}", format="peft")
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    (broken / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return root


def write_jobs(path: Path, jobs: list) -> Path:
    path.write_text(json.dumps({"jobs": jobs}))
    return path


def merges_and_validations(n: int, adapters: int = 2, broken: int | None = None) -> list:
    """``n`` named merges (adapter i % adapters; ``broken``: that one merges the broken
    adapter), each followed by a validate of its output."""
    jobs = []
    for i in range(n):
        lora = "./broken" if i == broken else f"./lora_{i % adapters}"
        jobs.append({"name": f"m{i}", "merge": {"base": "./base", "adapters": [lora],
                                                "weights": [1.0 - 0.1 * i], "out": f"./out/m{i}"}})
        jobs.append({"validate": {"base": "./base", "adapters": [lora],
                                  "weights": [1.0 - 0.1 * i], "merged": f"${{m{i}}}"}})
    return jobs


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def mtimes(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_mtime_ns
            for f in sorted(folder.rglob("*")) if f.is_file()}
