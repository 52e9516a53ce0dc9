"""The frame every `pipeline/<stage>.py` runs in: params, seeding, tracking, clean errors.

A stage body is a function `(params, run) -> None` that writes its outputs (atomically) and
logs to `run`. Known failures (bad params, missing/corrupted/stale artifacts, bad data) end
the process with exit code 2 and one message naming the cause, without a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from cvfp.io import ArtifactError
from cvfp.params import Params, ParamsError, load_params
from cvfp.runtime import configure_environment, seed_everything


class StageError(RuntimeError):
    """A stage cannot proceed with these inputs; the message says which input and why."""


KNOWN_ERRORS = (ParamsError, ArtifactError, StageError)


def run_stage(name: str, body: Callable[[Params, "StageRun"], None], params_file: str = "params.yaml") -> None:
    configure_environment()
    try:
        params = load_params(params_file)
    except ParamsError as err:
        _fail(name, err)
    seed_everything(params.seed)

    from cvfp.tracking import StageRun

    run = StageRun(name, params.flat(), params_file)
    try:
        body(params, run)
    except KNOWN_ERRORS as err:
        run.close(failed=True)
        _fail(name, err)
    except BaseException:
        run.close(failed=True)
        raise
    run.close()


def _fail(stage: str, err: Exception) -> None:
    print(f"error in stage '{stage}': {err}", file=sys.stderr)
    raise SystemExit(2)


TIMING_DIR = "metrics/timing"


def report_timing(stage: str, run, timing: dict) -> None:
    """Wall-clock figures: logged to MLflow and written to metrics/timing/<stage>.json.

    They are kept out of the DVC-tracked metrics files on purpose: those must be identical
    when the same params run twice, and a clock never is.
    """
    from cvfp.io import write_json

    write_json(f"{TIMING_DIR}/{stage}.json", timing)
    run.log_metrics({"timing": {k: v for k, v in timing.items() if isinstance(v, (int, float))}})


def without_timing(rows: list[dict]) -> list[dict]:
    """Per-iteration/epoch rows minus their wall-clock columns (for the DVC plots tables)."""
    return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows]
