"""Training log (CSV, one row per epoch) and the ``progress.png`` curves (loss, validation DSC, LR)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

from autopetseg.io_utils import atomic_path

LOG_COLUMNS = ("epoch", "train_loss", "lr", "val_mean_dsc", "val_mean_fpv_ml", "val_mean_fnv_ml", "epoch_seconds")


def write_training_log(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rewrite the whole log (rows are few; rewriting keeps a resumed run at one row per epoch)."""
    with atomic_path(path, ".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in LOG_COLUMNS})


def read_training_log(path: str | Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [{k: (float(v) if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_progress(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Two panels: training loss and validation mean DSC over epochs; learning rate below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], color="tab:blue", label="train loss")
    ax_loss.set_ylabel("loss")
    validated = [(r["epoch"], r["val_mean_dsc"]) for r in rows if _is_number(r.get("val_mean_dsc"))]
    ax_dsc = ax_loss.twinx()
    if validated:
        # Drawn above the axes' frame, and the range starts below 0: a DSC of 0 (nothing found yet)
        # must show as a line, not vanish under the bottom spine.
        ax_dsc.plot(*zip(*validated), color="tab:green", marker="o", markersize=3, zorder=3, clip_on=False,
                    label=validation_label(validated))
    ax_dsc.set_ylabel("mean DSC")
    ax_dsc.set_ylim(-0.04, 1.04)
    lines = ax_loss.get_lines() + ax_dsc.get_lines()
    ax_loss.legend(lines, [l.get_label() for l in lines], loc="upper right")
    ax_lr.plot(epochs, [r["lr"] for r in rows], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def validation_label(validated: Sequence[tuple[float, float]]) -> str:
    """Legend text of the validation curve with its last and best values (a flat 0 reads as 0)."""
    last = validated[-1][1]
    best_epoch, best = max(validated, key=lambda pair: pair[1])
    return f"validation mean DSC (last {last:.3f}, best {best:.3f} at epoch {best_epoch:g})"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)
