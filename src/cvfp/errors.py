"""The errors a stage reports as one line naming the cause (exit 2), with no traceback.

A leaf module: every layer raises these, and `cvfp.stage` alone turns them into the exit.
"""

from __future__ import annotations


class ParamsError(ValueError):
    """params.yaml is missing, malformed or out of range; the message names the key."""


class ArtifactError(RuntimeError):
    """An input artifact is missing, corrupted or stale; the message names the file and the stage to rerun."""


class StageError(RuntimeError):
    """A stage cannot proceed with these inputs; the message says which input and why."""


KNOWN_ERRORS = (ParamsError, ArtifactError, StageError)
