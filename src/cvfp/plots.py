"""PNG figures of the evaluation and of the training curves (matplotlib, Agg backend).

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot,
so no global backend state or display is involved. Every file is written atomically.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cvfp.io import atomic_path

FIGSIZE = (6.4, 4.0)  # inches; matplotlib's default width, a lower height for line plots
DPI = 120


def _figure(panels: int = 1) -> tuple[Figure, list[Any]]:
    figure = Figure(figsize=(FIGSIZE[0] * panels, FIGSIZE[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, panels, i + 1) for i in range(panels)]


def _save(figure: Figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)


def read_table(path: str | Path) -> list[dict[str, float]]:
    """A CSV written by a stage as rows of floats; empty cells are dropped. Missing file -> []."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{key: float(value) for key, value in row.items() if value not in ("", None)} for row in rows]


def _curves(axis, rows: list[dict[str, float]], x_key: str, columns: list[str], ylabel: str) -> None:
    for column in columns:
        points = [(row[x_key], row[column]) for row in rows if column in row and x_key in row]
        if points:
            axis.plot(*zip(*points), marker="o", label=column)
    axis.set_xlabel(x_key)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations and epochs are counts
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend()


def plot_spectrum(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Normalised singular values of train and val C* (rows of metrics/eval_spectrum.csv), log scale."""
    figure, (axis,) = _figure()
    for split in ("train", "val"):
        points = [(row["index"], row[split]) for row in rows if row[split] != "" and row[split] > 0]
        if points:
            axis.plot(*zip(*points), label=f"{split} C*")
    axis.set_yscale("log")
    axis.set_xlabel("singular value index")
    axis.set_ylabel("sigma_i / sum(sigma)")
    axis.set_title("Singular-value spectrum of the contexts")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, path)


def plot_phase1_iterations(csv_path: str | Path, path: str | Path) -> Path | None:
    """Effective rank and convergence rate per Phase-1 iteration (metrics/phase1_iterations.csv)."""
    rows = read_table(csv_path)
    if not rows:
        return None
    figure, (rank_axis, rate_axis) = _figure(2)
    _curves(rank_axis, rows, "iteration", ["train_effective_rank", "val_effective_rank"], "effective rank")
    _curves(rate_axis, rows, "iteration", ["train_convergence_rate", "val_convergence_rate"], "convergence rate")
    rank_axis.set_title("Phase 1: effective rank")
    rate_axis.set_title("Phase 1: convergence rate")
    return _save(figure, path)


def plot_phase2_epochs(csv_path: str | Path, path: str | Path) -> Path | None:
    """The cross-entropy columns (`train_loss`, `val_loss`) per epoch of metrics/phase2_epochs.csv.

    The objective (CE + stability) is a different quantity and is not drawn on the same axis.
    """
    rows = read_table(csv_path)
    if not rows:
        return None
    x_key = "epoch" if "epoch" in rows[0] else next(iter(rows[0]))
    columns = sorted({key for row in rows for key in row if key.endswith("_loss")})
    figure, (axis,) = _figure()
    _curves(axis, rows, x_key, columns, "cross-entropy (nats/prediction)")
    axis.set_title("Phase 2: loss (CE) per epoch")
    return _save(figure, path)


def plot_convergence_trials(checks: dict[str, list[float]], path: str | Path) -> Path:
    """MSE of each convergence-check trial against the previous one, one line per model (log scale)."""
    figure, (axis,) = _figure()
    for label, mses in checks.items():
        positive = [(trial + 2, mse) for trial, mse in enumerate(mses) if mse > 0]  # trial 1 has no MSE
        if positive:
            axis.plot(*zip(*positive), marker="o", label=label)
    axis.set_yscale("log")
    axis.set_xlabel("trial")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel("MSE vs previous trial")
    axis.set_title("CVFP convergence check (validation)")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend()
    return _save(figure, path)


def evaluation_plots(folder: str | Path, spectrum: list[dict[str, Any]], trial_mses: dict[str, list[float]],
                     phase1_csv: str | Path, phase2_csv: str | Path) -> list[Path]:
    """All evaluation figures into `folder`; the training-curve ones only when their CSV exists."""
    folder = Path(folder)
    written = [plot_spectrum(spectrum, folder / "spectrum.png"),
               plot_convergence_trials(trial_mses, folder / "convergence_check.png"),
               plot_phase1_iterations(phase1_csv, folder / "phase1_iterations.png"),
               plot_phase2_epochs(phase2_csv, folder / "phase2_epochs.png")]
    return [path for path in written if path is not None]
