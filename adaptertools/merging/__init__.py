"""The streaming merge engine: bases.py (indexes), plan.py (jobs), run.py (execution).

Named ``merging`` rather than ``merge`` so that importing it never rebinds the public function
``adaptertools.merge`` (a subpackage import sets the parent's attribute of the same name).
"""
