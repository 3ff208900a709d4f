"""Loss curves for the run report: the training log (CSV) drawn as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from anomalyqc.errors import DataError
from anomalyqc.fileio import atomic_path
from anomalyqc.training.log import FIXED, TIMES, read_log

if TYPE_CHECKING:  # matplotlib is imported lazily, when a figure is drawn
    from matplotlib.figure import Figure


def loss_curves_figure(rows: list[dict[str, str]], title: str = "") -> Figure:
    """Losses against the step (training solid, validation dashed with markers) on a log
    scale when all are positive, and the learning rates below."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6), dpi=100)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    names = [k for k in rows[0] if k not in (*FIXED, *TIMES)] if rows else []
    positive = True
    for phase, style in (("train", {"linestyle": "-"}), ("val", {"linestyle": "--", "marker": "o"})):
        for name in names:
            if name.startswith("lr_"):
                continue
            pts = [(int(r["step"]), float(r[name])) for r in rows
                   if r["phase"] == phase and r.get(name) not in (None, "")]
            if not pts:
                continue
            positive &= all(v > 0 for _, v in pts)
            loss_ax.plot(*zip(*pts, strict=True), label=f"{phase} {name}", **style)
    for name in (k for k in names if k.startswith("lr_")):
        pts = [(int(r["step"]), float(r[name])) for r in rows
               if r["phase"] == "train" and r.get(name) not in (None, "")]
        if pts:
            lr_ax.plot(*zip(*pts, strict=True), label=name[3:])
    if positive and loss_ax.lines:
        loss_ax.set_yscale("log")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize="small")
    loss_ax.set_title(title)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    if lr_ax.lines:
        lr_ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_loss_curves(log_csv: str | Path, png: str | Path, title: str = "") -> Path:
    """Draw the training log `log_csv` into `png` (written atomically); returns png."""
    log_csv, png = Path(log_csv), Path(png)
    rows = read_log(log_csv)
    if not any(r.get("phase") == "train" for r in rows):
        raise DataError(f"{log_csv}: no training rows to draw; train for at least one logged "
                        f"step (log_every) first")
    fig = loss_curves_figure(rows, title)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    return png
