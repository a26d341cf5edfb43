"""A series of single-frame DICOM images as a float32 volume, on the grid SimpleITK would give it.

* Headers first (``stack``): one orientation, size and pixel spacing for every slice (else a mixed
  series), slices sorted by position along the normal (row × column direction), no two at one
  position, even steps within ``SliceSpacingRule`` (a gap is an ``InputError``; a small unevenness
  is logged, as ITK does), no in-plane shift between slices (gantry tilt).
* The grid: origin at the first slice's ImagePositionPatient, direction columns (row, column,
  normal), slice spacing (last − first) / (n − 1): what ``sitk.ImageSeriesReader`` gives.
* Pixels (``read_pixels``): each slice's stored values × its own RescaleSlope + RescaleIntercept
  (and an optional per-slice factor, e.g. SUV) in float64, then stored as float32. Series readers
  that take the first slice's pixel type truncate later slices' slopes; this does not.
  PhotometricInterpretation is not applied: stored values are quantities, not grey levels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from autopetseg.data.dicom.catalog import open_dicom
from autopetseg.data.imageio import Geometry
from autopetseg.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SliceSpacingRule:
    """How even slice positions must be (``max_step_error``: fraction of the mean step; beyond it a
    slice is missing or misplaced) and the tolerances for one orientation and no in-plane shift."""

    max_step_error: float = 0.1
    log_step_error_mm: float = 0.01
    orientation_tolerance: float = 1e-4
    max_in_plane_shift_mm: float = 0.05


@dataclass
class SliceStack:
    """The headers of a series in slice order, and its grid."""

    headers: list  # pydicom Datasets without pixels, sorted along the normal
    paths: list[Path]
    geometry: Geometry
    max_step_error_mm: float

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(h.SOPInstanceUID) for h in self.headers]


def _floats(ds, keyword: str, n: int, path: Path, case: str | None) -> np.ndarray:
    value = ds.get(keyword)
    try:
        values = np.array([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        values = None
    if values is None or values.size != n:
        raise InputError(f"{keyword} is missing or malformed ({value!r})", case, path)
    return values


def read_headers(paths: Sequence[Path], case: str | None = None) -> list:
    """The headers (no pixels) of ``paths``; an unreadable file is an ``InputError`` naming it."""
    headers = []
    for path in paths:
        try:
            headers.append(open_dicom(path, stop_before_pixels=True))
        except Exception as exc:  # pydicom raises many kinds for a damaged file
            raise InputError(f"unreadable DICOM file ({type(exc).__name__}: {exc})", case, path) from None
    return headers


def _one_value(values: list, what: str, folder: str, case: str | None) -> None:
    distinct = sorted({str(v) for v in values})
    if len(distinct) > 1:
        raise InputError(f"mixed series: slices differ in {what} ({', '.join(distinct[:4])}); export each "
                         "series on its own", case, folder)


def stack(paths: Sequence[Path], case: str | None = None, rule: SliceSpacingRule = SliceSpacingRule()) -> SliceStack:
    """Sort a single-frame series along its normal and work out its grid (see the module doc)."""
    paths = [Path(p) for p in paths]
    folder = ", ".join(sorted({str(p.parent) for p in paths}))
    headers = read_headers(paths, case)
    _one_value([(h.get("Rows"), h.get("Columns")) for h in headers], "size (rows, columns)", folder, case)
    orientations = np.stack([_floats(h, "ImageOrientationPatient", 6, p, case) for h, p in zip(headers, paths)])
    if np.abs(orientations - orientations[0]).max() > rule.orientation_tolerance:
        raise InputError("mixed series: slices have different ImageOrientationPatient", case, folder)
    pixel_spacing = np.stack([_floats(h, "PixelSpacing", 2, p, case) for h, p in zip(headers, paths)])
    if np.abs(pixel_spacing - pixel_spacing[0]).max() > 1e-4 * pixel_spacing[0].max():
        raise InputError("mixed series: slices have different PixelSpacing", case, folder)
    row, column = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, column)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3 or abs(float(row @ column)) > 1e-3:
        raise InputError(f"ImageOrientationPatient {orientations[0].tolist()} is not two orthogonal unit vectors",
                         case, paths[0])
    positions = np.stack([_floats(h, "ImagePositionPatient", 3, p, case) for h, p in zip(headers, paths)])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    headers = [headers[i] for i in order]
    paths = [paths[i] for i in order]
    positions, along = positions[order], along[order]

    n = len(headers)
    if n > 1:
        steps = np.diff(along)
        if steps.min() <= 1e-3:
            at = along[1:][steps <= 1e-3][0]
            raise InputError(f"mixed series: {int((steps <= 1e-3).sum()) + 1} or more images at slice position "
                             f"{at:.2f} mm (a dynamic, gated or repeated series?); export one time point",
                             case, folder)
        spacing_z = float(along[-1] - along[0]) / (n - 1)
        step_error = float(np.abs(steps - spacing_z).max())
        if step_error > rule.max_step_error * spacing_z:
            worst = int(np.argmax(np.abs(steps - spacing_z)))
            raise InputError(
                f"uneven slice positions: a step of {steps[worst]:.3f} mm between {along[worst]:.2f} and "
                f"{along[worst + 1]:.2f} mm where the mean step is {spacing_z:.3f} mm (a missing slice?)",
                case, folder)
        if step_error > rule.log_step_error_mm:
            log.warning("%s: slice steps vary by up to %.3f mm around %.4f mm in %s; the volume uses the mean "
                        "step, as SimpleITK does", case or "DICOM series", step_error, spacing_z, folder)
        shift = positions - positions[0] - np.outer(along - along[0], normal)
        if np.abs(shift).max() > rule.max_in_plane_shift_mm:
            raise InputError(f"slices are shifted in-plane by up to {np.abs(shift).max():.2f} mm (gantry tilt?); "
                             "resample the series to an orthogonal grid first", case, folder)
    else:
        spacing_z = float(headers[0].get("SpacingBetweenSlices") or headers[0].get("SliceThickness") or 1.0)
        step_error = 0.0
    direction = np.stack([row, column, normal], axis=1)  # columns: index axes x, y, z
    geometry = Geometry(
        shape_zyx=(n, int(headers[0].Rows), int(headers[0].Columns)),
        spacing_zyx=(spacing_z, float(pixel_spacing[0, 0]), float(pixel_spacing[0, 1])),
        origin_xyz=tuple(float(v) for v in positions[0]),
        direction=tuple(float(v) for v in direction.reshape(-1)),
    )
    return SliceStack(headers, paths, geometry, step_error)


def _rescale(ds) -> tuple[float, float]:
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    return (float(slope) if slope not in (None, "") else 1.0, float(intercept) if intercept not in (None, "") else 0.0)


def read_pixels(slices: SliceStack, factors: Sequence[float] | np.ndarray | None = None,
                case: str | None = None) -> np.ndarray:
    """(z, y, x) float32: per slice (stored × slope + intercept) × ``factors[k]`` computed in float64."""
    out = np.empty(slices.geometry.shape_zyx, dtype=np.float32)
    for k, path in enumerate(slices.paths):
        try:
            ds = open_dicom(path)
        except Exception as exc:  # pydicom raises many kinds for a damaged file
            raise InputError(f"unreadable DICOM file ({type(exc).__name__}: {exc})", case, path) from None
        try:
            stored = ds.pixel_array
        except Exception as exc:  # no decoder for the transfer syntax, or damaged pixel data
            syntax = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
            raise InputError(f"cannot decode the pixel data (transfer syntax {syntax}: {exc})", case, path) from None
        if stored.shape != out.shape[1:]:
            raise InputError(f"pixel data of shape {stored.shape}, expected {out.shape[1:]}", case, path)
        slope, intercept = _rescale(ds)
        values = stored.astype(np.float64) * slope + intercept
        if factors is not None:
            values *= float(factors[k])
        out[k] = values
    return out
