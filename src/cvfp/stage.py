"""The frame every `pipeline/<stage>.py` runs in: params, seeding, tracking, clean errors.

A stage body is a function `(params, run) -> None` that writes its outputs (atomically) and
logs to `run`. Known failures (bad params, missing/corrupted/stale artifacts, bad data) end
the process with exit code 2 and one message naming the cause, without a traceback.

Start-up order: this module and `pipeline/<stage>.py`'s top level import neither torch nor
MLflow. `run_stage` first hands the stage to the warm server (`cvfp.warm`: a process with torch
and the library imported, which forks the stage; the same code then runs there). Where it runs,
it loads the params, starts the stage's tracking writer (forked by the tracking service, which
has MLflow imported: `cvfp.tracking`), and only then imports torch (already loaded, when warm)
and calls the body, which imports the library modules it uses.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from cvfp.errors import KNOWN_ERRORS, ParamsError
from cvfp.params import Params, load_params
from cvfp.runtime import configure_environment, launched
from cvfp.tracking import NullRun, StageRun


def run_stage(name: str, body: Callable[[Params, StageRun], None], params_file: str = "params.yaml",
              data_parallel: bool = False) -> None:
    """Load params, seed, open the stage's MLflow run and call `body(params, run)`.

    With `data_parallel` (phase1, phase2, baselines) and `distributed.nproc_per_node` > 1 the
    script re-launches itself under torchrun; each process then joins the process group, and
    only rank 0 opens an MLflow run (the others get a run that records nothing).
    """
    from cvfp import warm

    code = warm.delegate(body)  # run where torch and the library are already imported, if we can
    if code is not None:
        raise SystemExit(code)
    configure_environment()
    try:
        params = load_params(params_file)
    except ParamsError as err:
        _fail(name, err)
    nproc = params.distributed.nproc_per_node
    if data_parallel and nproc > 1 and not launched():
        from cvfp import distributed

        code = distributed.relaunch(nproc)
        if code:
            _fail(name, f"a process of the torchrun launch (distributed.nproc_per_node={nproc}) failed with exit "
                        f"code {code}; its error is above", code=code if code > 0 else 1)
        return
    # rank 0 of a torchrun launch (RANK is set before the process group exists), or the only process
    main_process = not (data_parallel and launched()) or os.environ.get("RANK", "0") == "0"
    run = StageRun(name, params.flat(), params_file) if main_process else NullRun()

    from cvfp import distributed  # torch loads here, while the tracking writer opens the store
    from cvfp.runtime import resolve_device, seed_everything

    world = distributed.SINGLE
    try:
        device = resolve_device(params.device)
        seed_everything(params.seed)
        world = distributed.setup(device.type) if data_parallel else distributed.SINGLE
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


def _fail(stage: str, err: Exception | str, world=None, code: int = 2) -> None:
    where = f" (rank {world.rank} of {world.size})" if world is not None and world.active else ""
    print(f"error in stage '{stage}'{where}: {err}", file=sys.stderr)
    raise SystemExit(code)


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


SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}  # MLflow's dataset contexts


def log_split(run, path: str, split, execution: bool = False) -> None:
    """A loaded split (`cvfp.data.cache.TokenStream`) as the run's dataset input: its file, digest and counts."""
    profile = {"tokens": split.num_tokens, "documents": split.num_docs, "bytes": int(split.doc_bytes.sum())}
    if split.scored is not None:
        profile["scored_predictions"] = int(split.scored.sum())
        profile["predictions"] = split.num_predictions
    run.log_dataset(split.name, path, SPLIT_CONTEXTS.get(split.name, split.name), profile, execution=execution)
