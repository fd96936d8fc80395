"""The streaming merge engine: bases.py (indexes), plan.py (jobs), run.py (execution).

Importing this subpackage for the first time binds the name ``adaptertools.merge`` to it, which
shadows the public function ``adaptertools.merge`` (lazily exported from api.py): the second
``at.merge(...)`` of a session would call a module. Calling the subpackage therefore calls the
function, whichever of the two the name ends up bound to.
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..api import merge

        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
