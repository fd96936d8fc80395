"""The streaming merge engine: bases.py (indexes), plan.py (jobs), run.py (execution)."""
