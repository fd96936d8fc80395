"""Adapter algebra: adapters made from adapters (``combine``: cat, weighted SVD, TIES, DARE) and
from checkpoints (``extract``: a truncated SVD of finetuned - base), with their shared checks
(``common``). Nothing here runs the merge engine; ``merging.bases`` is only used to read the
checkpoints ``extract`` compares."""
