"""Build one golden case, run it, hash its input and output (shared by the test and regenerate)."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

from cases import Case, tree_digest

# left out of the output hash: wall-clock fields and timing logs (none written today; listed so
# that a new one is added here, not normalized silently)
SKIPPED_OUTPUT_FILES: tuple[str, ...] = ()


def run_case(case: Case, keep: Path | None = None) -> dict:
    """{"input": digest, "output": digest, "output_files": {rel: sha256}} for ``case``; all in a
    fresh temporary folder whose absolute path is normalized out of every hashed byte."""
    root = Path(tempfile.mkdtemp(prefix="golden-")) if keep is None else keep
    try:
        inputs, work = root / "inputs", root / "work"
        inputs.mkdir(parents=True)
        work.mkdir()
        case.build(inputs)
        input_digest, input_files = tree_digest(inputs, root)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case.run(inputs, work / case.out)
        output_digest, output_files = tree_digest(work / case.out, root,
                                                  skip=SKIPPED_OUTPUT_FILES)
        return {"command": case.command, "input": input_digest, "output": output_digest,
                "input_files": input_files, "output_files": output_files}
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
