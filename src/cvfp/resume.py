"""Resume checkpoints for the long stages (Phase 1, Phase 2).

A stage killed midway leaves `models/<stage>.resume.pt`: model and optimizer state, RNG
states, the loop's own state and the history so far, written atomically every
`<stage>.checkpoint_interval` iterations/epochs. Rerun with the same params, the stage
continues from it and ends with the same metrics as an uninterrupted run. The file is not a
DVC out (DVC deletes outs before it reruns a stage) and is removed when the stage succeeds.

The checkpoint stores a fingerprint: the flat params the result depends on, plus the
sha256 of the input files. If any differs, the checkpoint is NOT resumed: a warning line
names the differing keys and the stage starts fresh (the next checkpoint overwrites it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from cvfp.errors import ArtifactError
from cvfp.io import load_checkpoint, save_checkpoint

# params that change how often state is saved or when a run gives up, not the numbers it produces
NOT_FINGERPRINTED = ("checkpoint_interval", "max_nonfinite_steps")


def fingerprint(params, sections: tuple[str, ...], inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """Flat params of `sections` (minus the keys in NOT_FINGERPRINTED) plus `input.<name>` file hashes."""
    flat = {key: value for key, value in params.flat().items()
            if key.split(".")[0] in sections and key.split(".")[-1] not in NOT_FINGERPRINTED}
    flat.update({f"input.{name}": digest for name, digest in (inputs or {}).items()})
    return flat


def differing_keys(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return sorted(key for key in set(stored) | set(current) if stored.get(key, object()) != current.get(key, object()))


def load_resume_state(path: str | Path, stage: str, current: dict[str, Any],
                      log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The checkpoint's state if it exists and matches `current`; otherwise None, with a warning line why."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = load_checkpoint(path, stage)
    except ArtifactError as err:
        log(f"warning: not resuming {stage}: {err}; starting fresh")
        return None
    stored = payload.get("fingerprint")
    if not isinstance(stored, dict):
        log(f"warning: not resuming {stage}: {path} has no params fingerprint; starting fresh")
        return None
    keys = differing_keys(stored, current)
    if keys:
        log(f"warning: not resuming {stage}: {path} was written with different params/inputs "
            f"({', '.join(keys)}); starting fresh")
        return None
    return payload


def checkpointer(path: str | Path, current: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A `checkpoint(state)` callback for the training loops: saves state + fingerprint atomically."""
    def save(state: dict[str, Any]) -> None:
        save_checkpoint(path, {**state, "fingerprint": current})
    return save


def remove(path: str | Path) -> None:
    Path(path).unlink(missing_ok=True)


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def to_cpu(tree: Any) -> Any:
    """Tensors inside nested dicts/lists moved to the CPU (a checkpoint payload is device-free)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().clone()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree
