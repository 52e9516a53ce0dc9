"""What every training loop here shares (Phase 1, Phase 2, the baselines): the non-finite guard,
early stopping with the best weights, the loop's result, and its resumable state.

One policy for all three: a non-finite loss or gradient skips the step and is counted; after
`<stage>.max_nonfinite_steps` consecutive ones the stage stops with a StageError naming that
key. Early stopping watches one validation number per epoch, keeps the weights of the best
epoch (a NaN is never the best) and stops after `<stage>.patience` epochs without a better one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from cvfp.errors import StageError
from cvfp.resume import rng_state, set_rng_state, to_cpu


@dataclass
class LoopResult:
    """A training loop's output: per-iteration/epoch rows, the deterministic summary, wall-clock timing."""

    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # deterministic numbers only (the metrics file)
    timing: dict[str, Any] = field(default_factory=dict)  # wall-clock figures, kept apart so reruns compare equal


class NonFiniteGuard:
    """Counts skipped steps; raises StageError after `limit` consecutive non-finite ones (`<stage>.max_nonfinite_steps`)."""

    def __init__(self, stage: str, limit: int):
        self.stage = stage
        self.limit = limit
        self.skipped = 0  # all skipped steps so far
        self.run = 0  # consecutive skipped steps ending at the last one

    def record(self, finite: bool, where: str, bar=None) -> bool:
        """Record one step's outcome (`where` names it in the error); returns `finite`."""
        if finite:
            self.run = 0
            return True
        self.skipped += 1
        self.run += 1
        if self.run >= self.limit:
            if bar is not None:
                bar.close()
            raise StageError(
                f"{self.stage} diverged: {self.run} consecutive non-finite losses/gradients, the last at {where} "
                f"({self.stage}.max_nonfinite_steps={self.limit}); the last good resume checkpoint is kept; "
                f"lower {self.stage}.lr or check the data")
        return False

    def state(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped, "nonfinite_run": self.run}

    def load(self, state: dict[str, Any]) -> None:
        self.skipped, self.run = state["skipped_steps"], state["nonfinite_run"]


class EarlyStopping:
    """The best epoch by a validation number (lower is better), its weights, and the patience rule."""

    def __init__(self, model: torch.nn.Module, patience: int, key: str):
        self.patience = patience
        self.key = key  # the params key named in the log line, e.g. "phase2.patience"
        self.best_value = math.inf
        self.best_epoch = 0  # 0: no epoch had a finite value; the initial weights are kept
        self.best_state = _clone(model.state_dict())
        self.stopped_early = False

    def update(self, epoch: int, value: float, model: torch.nn.Module) -> bool:
        """Whether `epoch` (with validation `value`) is the new best; if so its weights are kept."""
        improved = value < self.best_value  # False for NaN: a diverged epoch is never the best
        if improved:
            self.best_value, self.best_epoch = value, epoch
            self.best_state = _clone(model.state_dict())
        return improved

    def should_stop(self, epoch: int, last_epoch: int) -> bool:
        """After `patience` epochs without a better value, before the last epoch (which ends the loop anyway)."""
        self.stopped_early = epoch - self.best_epoch >= self.patience and epoch < last_epoch
        return self.stopped_early

    def stop_line(self) -> str:
        return (f"early stop: validation has not improved for {self.patience} epochs ({self.key}); "
                f"keeping epoch {self.best_epoch}")

    def restore(self, model: torch.nn.Module) -> None:
        """Load the best epoch's weights (the initial ones if no epoch was finite)."""
        model.load_state_dict(self.best_state)

    def state(self) -> dict[str, Any]:
        return {"best_loss": self.best_value, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        self.best_value, self.best_epoch = state["best_loss"], state["best_epoch"]
        self.best_state = {k: v.to(device) for k, v in state["best_state"].items()}


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def save_state(stage: str, position: dict[str, int], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               device: torch.device, history: list[dict[str, Any]], guard: NonFiniteGuard,
               stopper: EarlyStopping | None = None, **extra: Any) -> dict[str, Any]:
    """Everything a loop needs to continue from `position` (e.g. {"epoch": 3}), as a device-free checkpoint payload."""
    return to_cpu({"stage": stage, **position, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "rng": rng_state(device), "history": history, **guard.state(),
                   **(stopper.state() if stopper is not None else {}), **extra})


def restore_state(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  device: torch.device, guard: NonFiniteGuard, stopper: EarlyStopping | None = None,
                  load_weights: bool = True) -> list[dict[str, Any]]:
    """Load a `save_state` payload into the loop's objects; returns the history so far."""
    if load_weights:
        model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"], device)
    guard.load(state)
    if stopper is not None:
        stopper.load(state, device)
    return list(state["history"])
