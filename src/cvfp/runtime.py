"""Process set-up shared by every stage: project root, environment, seeding, device, progress."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

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


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic CPU kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(name: str):
    """`auto` -> cuda when available else cpu; `cuda` without a GPU is an error."""
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
