"""The old name of helpers.gguf_base, kept for benchmarks/w5.py, which imports ``gguf_base`` with
tests/ on sys.path; tests import ``helpers.gguf_base``. Remove once w5.py does too."""

from helpers.gguf_base import *  # noqa: F401,F403
