"""The update paths of a target weight, and the one error a backend raises when it cannot take this step.

A backend (native.py's C kernels, triton_kernels.py's GPU kernels) says whether it takes a tensor with `takes` and
readies its code with `warm_up` *before* the step touches any parameter or state; when readying fails it raises
`PathUnavailable`, and the router (base.py) falls back to the eager path or, where the path was required, re-raises
it as one sentence.
"""
from __future__ import annotations


class PathUnavailable(RuntimeError):
    """A backend cannot run this step (no compiler, too old a driver, a failed compile): the message says why."""
