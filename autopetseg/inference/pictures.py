"""Coronal PET maximum-intensity projections with lesion contours: what a physician looks at first.

One PNG per case: the PET (SUV) projected along the anterior-posterior axis, inverted grey
(white = 0, black = ``suv_max`` and above), head up and the patient's right on the viewer's left
(as if facing the patient). Ground-truth lesions are outlined in green, predicted lesions in
red, each by the contour of the mask's own projection. Every image is first reoriented to LPS
(``SimpleITK.DICOMOrient``), so files with flipped or permuted axes give the same picture;
pixels keep their physical aspect ratio (z spacing / x spacing).

Drawing uses matplotlib's Agg canvas directly (no pyplot, no global backend change), so it
works without a screen and from any thread.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autopetseg.data.imageio import Geometry, read_image
from autopetseg.errors import InputError
from autopetseg.io_utils import atomic_path

log = logging.getLogger(__name__)

PNG_FOLDER = "png"
GT_COLOR = "#00b000"  # green
PRED_COLOR = "#e00000"  # red


@dataclass(frozen=True)
class PictureSettings:
    """Display window and size. SUV 0..10 shows lesions and organs without saturating the liver."""

    suv_min: float = 0.0
    suv_max: float = 10.0
    width_inches: float = 4.0
    max_height_inches: float = 12.0
    dpi: int = 120
    contour_width: float = 1.0


PICTURE_SETTINGS = PictureSettings()


def _to_lps(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(array reoriented so that index axes run x→left, y→posterior, z→superior, its spacing_zyx)."""
    image = sitk.DICOMOrient(geometry.image(np.ascontiguousarray(array)), "LPS")
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))


def coronal_mip(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, float]:
    """(coronal MIP with rows = z from head (top) to feet, columns = x from the patient's right; pixel aspect)."""
    lps, spacing_zyx = _to_lps(array, geometry)
    mip = lps.max(axis=1)[::-1]  # project along y (anterior-posterior); superior on top
    return np.ascontiguousarray(mip), float(spacing_zyx[0] / spacing_zyx[2])


def render_mip_png(
    path: str | Path,
    pet: np.ndarray,
    geometry: Geometry,
    label: np.ndarray | None = None,
    prediction: np.ndarray | None = None,
    title: str | None = None,
    settings: PictureSettings = PICTURE_SETTINGS,
) -> Path:
    """Write the coronal MIP of ``pet`` (SUV, z, y, x) with the contours of the masks given, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    path = Path(path)
    mip, aspect = coronal_mip(np.asarray(pet, dtype=np.float32), geometry)
    rows, cols = mip.shape
    height = settings.width_inches * rows * aspect / max(cols, 1)
    height = min(max(height, 1.5), settings.max_height_inches)
    fig = Figure(figsize=(settings.width_inches, height + (0.35 if title else 0.0)), dpi=settings.dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.96 * height / (height + (0.35 if title else 0.0))))
    ax.imshow(mip, cmap="gray_r", vmin=settings.suv_min, vmax=settings.suv_max, aspect=aspect, interpolation="bilinear")
    handles = []
    for mask, color, name in ((label, GT_COLOR, "ground truth"), (prediction, PRED_COLOR, "prediction")):
        if mask is None:
            continue
        projected, _ = coronal_mip(np.asarray(mask, dtype=np.uint8), geometry)
        if projected.any():
            ax.contour(projected.astype(np.float32), levels=[0.5], colors=[color], linewidths=settings.contour_width)
        handles.append(Line2D([], [], color=color, linewidth=1.5, label=name))
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.7)
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=8, y=0.995)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=settings.dpi)
    return path


def _fmt(value: float, unit: str = "", digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}{unit}"


def prediction_title(case_id: str, numbers: dict | None = None, dsc: float | None = None) -> str:
    """``case · TMTV 12.3 ml · 2 lesions · DSC 0.81`` (the parts known)."""
    parts = [case_id]
    if numbers is not None:
        parts.append(f"TMTV {_fmt(numbers.get('tmtv_ml'), ' ml')}")
        parts.append(f"{numbers.get('lesion_count', 0)} lesion(s)")
    if dsc is not None:
        parts.append(f"DSC {_fmt(dsc, '', 3)}")
    return " · ".join(parts)


def read_mask_on(path: Path, geometry: Geometry, case: str, what: str) -> np.ndarray | None:
    """A mask file on the PET grid as uint8, or None (with a warning) when it cannot be drawn."""
    try:
        image = read_image(path, case, what)
    except InputError as error:
        log.warning("%s; not drawn", error)
        return None
    if not Geometry.of(image).same_grid(geometry):
        log.warning("case %r: %s %s is not on the PET grid; not drawn", case, what, path)
        return None
    return (sitk.GetArrayFromImage(image) > 0).astype(np.uint8)
