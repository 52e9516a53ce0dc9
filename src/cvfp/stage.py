"""The frame every `pipeline/<stage>.py` runs in: params, seeding, tracking, clean errors.

A stage body is a function `(params, run) -> None` that writes its outputs (atomically) and
logs to `run`. Known failures (bad params, missing/corrupted/stale artifacts, bad data) end
the process with exit code 2 and one message naming the cause, without a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from cvfp import distributed
from cvfp.errors import KNOWN_ERRORS, ParamsError
from cvfp.io import write_json
from cvfp.params import Params, load_params
from cvfp.runtime import configure_environment, resolve_device, seed_everything
from cvfp.tracking import NullRun, StageRun


def run_stage(name: str, body: Callable[[Params, StageRun], None], params_file: str = "params.yaml",
              data_parallel: bool = False) -> None:
    """Load params, seed, open the stage's MLflow run and call `body(params, run)`.

    With `data_parallel` (phase1, phase2, baselines) and `distributed.nproc_per_node` > 1 the
    script re-launches itself under torchrun; each process then joins the process group, and
    only rank 0 opens an MLflow run (the others get a run that records nothing).
    """
    configure_environment()
    try:
        params = load_params(params_file)
    except ParamsError as err:
        _fail(name, err)
    nproc = params.distributed.nproc_per_node
    if data_parallel and nproc > 1 and not distributed.launched():
        code = distributed.relaunch(nproc)
        if code:
            _fail(name, f"a process of the torchrun launch (distributed.nproc_per_node={nproc}) failed with exit "
                        f"code {code}; its error is above", code=code if code > 0 else 1)
        return
    try:
        device = resolve_device(params.device)
    except ParamsError as err:
        _fail(name, err)
    seed_everything(params.seed)
    world = distributed.setup(device.type) if data_parallel else distributed.SINGLE

    run = StageRun(name, params.flat(), params_file) if world.is_main else NullRun()
    try:
        body(params, run)
    except KNOWN_ERRORS as err:
        run.close(failed=True)
        _fail(name, err, world)
    except BaseException:
        run.close(failed=True)
        raise
    finally:
        distributed.teardown()
    run.close()


def _fail(stage: str, err: Exception | str, world: distributed.World = distributed.SINGLE, code: int = 2) -> None:
    where = f" (rank {world.rank} of {world.size})" if world.active else ""
    print(f"error in stage '{stage}'{where}: {err}", file=sys.stderr)
    raise SystemExit(code)


TIMING_DIR = "metrics/timing"


def report_timing(stage: str, run, timing: dict) -> None:
    """Wall-clock figures: logged to MLflow and written to metrics/timing/<stage>.json.

    They are kept out of the DVC-tracked metrics files on purpose: those must be identical
    when the same params run twice, and a clock never is.
    """
    write_json(f"{TIMING_DIR}/{stage}.json", timing)
    run.log_metrics({"timing": {k: v for k, v in timing.items() if isinstance(v, (int, float))}})


def without_timing(rows: list[dict]) -> list[dict]:
    """Per-iteration/epoch rows minus their wall-clock columns (for the DVC plots tables)."""
    return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows]
