"""Process set-up shared by every stage: project root, environment, seeding, device, progress.

Importing this module imports neither torch nor numpy (the tracking writer starts before they
load; see `cvfp.stage`): the functions that need them import them when called.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from cvfp.errors import ParamsError

EXPERIMENT_TEMP_MARKER = os.path.join(".dvc", "tmp", "exps")


def project_root() -> Path:
    """The workspace root: DVC_ROOT inside a stage, else the nearest folder holding dvc.yaml.

    Experiments queued with `dvc exp run --queue/--temp` run in a copy under
    `<workspace>/.dvc/tmp/exps/...`; for them the workspace is the folder above `.dvc`,
    so their tracking lands in the same store as the workspace's.
    """
    start = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    text = str(start)
    marker = os.sep + EXPERIMENT_TEMP_MARKER + os.sep
    if marker in text + os.sep:
        return Path((text + os.sep).split(marker)[0])
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file() or (folder / ".dvc").is_dir():
            return folder
    return start


def configure_environment() -> None:
    """Environment every stage needs before importing HF/MLflow: no telemetry, local caches, no fork warnings."""
    root = project_root()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HOME", str(root / ".cache" / "huggingface"))
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # an unreachable tracking server must cost seconds, not MLflow's default minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a "View run" line per run: noise


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels.

    This is what `torch.use_deterministic_algorithms(True, warn_only=True)` does, minus its import of
    the compiler stack (`torch._inductor.config`, which pulls `torch._dynamo`: 1.9 s of a stage's
    start on 2 cores). The compiled paths set inductor's flag themselves (`fast.compiled`).
    """
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch._C._set_deterministic_algorithms(True, warn_only=True)


def resolve_device(name: str):
    """`auto` -> cuda when available else cpu; `cuda` without a GPU is an error."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("device: cuda was asked for, but this machine has no CUDA device (torch.cuda.is_available() "
                          "is False); set device: auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and launched():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun process
    return device


LAUNCHED_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun in every process it starts


def launched() -> bool:
    """Whether this process was started by torchrun."""
    return LAUNCHED_ENV in os.environ and "WORLD_SIZE" in os.environ


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", disable: bool = False):
    """A tqdm progress bar with ETA on stderr (quiet when CVFP_NO_PROGRESS is set, or `disable`: ranks > 0)."""
    from tqdm.auto import tqdm  # lazy: tqdm.auto probes for notebooks, which costs start-up in stages that never show a bar

    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0,
                disable=disable or bool(os.environ.get("CVFP_NO_PROGRESS")))
