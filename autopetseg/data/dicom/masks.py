"""RTSTRUCT contours and DICOM SEG segments as one lesion mask (uint8) on the PET grid.

Which ROIs or segments are lesions goes by name (``LesionRoiRule``: GTV, lesion, tumour, MTV,
metastasis, malignant; not edema), or by ``--roi REGEX``. The names taken and left out go into
the case's ``.dicom.json``; when no name matches, no ``SEG.nii.gz`` is written and the log lists
the names (never a silent guess).

RTSTRUCT: each closed planar contour is filled on the grid of the series it was drawn on (its
ContourImageSequence or referenced series: the PET or the CT; otherwise the PET grid), voxel
centres inside the polygon; contours of one ROI on one slice combine even-odd (a contour inside
another is a hole); ROIs are united. A contour off that grid's slices (more than
``max_off_slice`` of a slice step) is an ``InputError``. A mask drawn on the CT is mapped onto the
PET grid by nearest neighbour.
SEG (highdicom): the chosen segments as one volume in its own geometry, mapped onto the PET grid by
nearest neighbour.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autopetseg.data.dicom.catalog import open_dicom
from autopetseg.data.imageio import Geometry
from autopetseg.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LesionRoiRule:
    """Lesion ROI/segment names: ``include`` matches and ``exclude`` does not (regular expressions,
    searched case-insensitively); ``max_off_slice``: how far (in slice steps) a contour may lie from a slice."""

    include: str = r"gtv|lesion|tum(ou)?r|mtv|metast|malig"
    exclude: str | None = r"o?edema"
    max_off_slice: float = 0.25

    @classmethod
    def from_pattern(cls, pattern: str | None) -> "LesionRoiRule":
        """``--roi REGEX``: exactly the names it matches; ``None``: the default rule."""
        if pattern is None:
            return cls()
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InputError(f"--roi {pattern!r} is not a regular expression ({exc})") from None
        return cls(include=pattern, exclude=None)

    def is_lesion(self, name: str) -> bool:
        if not re.search(self.include, name, re.IGNORECASE):
            return False
        return self.exclude is None or not re.search(self.exclude, name, re.IGNORECASE)


@dataclass
class MaskResult:
    """A lesion mask on the PET grid and what it was made from."""

    mask: np.ndarray | None  # None: no ROI/segment matched the rule
    source: Path
    taken: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    drawn_on: str = "PET"  # the grid the contours were filled on

    def record(self) -> dict:
        return {"file": str(self.source), "lesion_names": self.taken, "other_names": self.left_out,
                "drawn_on": self.drawn_on, "voxels": int(self.mask.sum()) if self.mask is not None else None}


def _on_grid(mask: np.ndarray, source: Geometry, target: Geometry) -> np.ndarray:
    """A 0/1 mask moved onto ``target`` by nearest neighbour (unchanged on the same grid)."""
    if source.same_grid(target):
        return mask.astype(np.uint8, copy=False)
    reference = target.image(np.zeros(target.shape_zyx, dtype=np.uint8))
    moved = sitk.Resample(source.image(mask.astype(np.uint8)), reference, sitk.Transform(),
                          sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(moved)


def _index_of(points_xyz: np.ndarray, grid: Geometry) -> np.ndarray:
    """Continuous (x, y, z) indices of physical points (n, 3) on ``grid``."""
    direction = np.asarray(grid.direction, dtype=np.float64).reshape(3, 3)
    to_physical = direction @ np.diag(grid.spacing_zyx[::-1])
    return (points_xyz - np.asarray(grid.origin_xyz)) @ np.linalg.inv(to_physical).T


def _fill_roi(contours, grid: Geometry, name: str, rule: LesionRoiRule, case: str | None, path: Path) -> np.ndarray:
    from skimage.draw import polygon

    nz, ny, nx = grid.shape_zyx
    roi = np.zeros(grid.shape_zyx, dtype=bool)
    outside = 0
    for contour in contours:
        kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper()
        data = contour.get("ContourData")
        if kind != "CLOSED_PLANAR" or data is None or len(data) < 9:
            continue  # points and open lines enclose nothing
        index = _index_of(np.asarray(data, dtype=np.float64).reshape(-1, 3), grid)
        k = int(round(float(index[:, 2].mean())))
        off = float(np.abs(index[:, 2] - k).max())
        if off > rule.max_off_slice:
            raise InputError(f"a contour of ROI {name!r} lies {off:.2f} slice steps off the slices of the grid it "
                             "was drawn on (non-planar, or drawn on another series)", case, path)
        if not 0 <= k < nz:
            outside += 1
            continue
        rows, cols = polygon(index[:, 1], index[:, 0], shape=(ny, nx))
        plane = np.zeros((ny, nx), dtype=bool)
        plane[rows, cols] = True
        roi[k] ^= plane  # even-odd: a contour inside another one is a hole
    if outside:
        log.warning("%s: %d contour(s) of ROI %r lie outside the image and were left out", case, outside, name)
    return roi


def rtstruct_mask(path: Path, pet: Geometry, grids: dict[str, tuple[str, Geometry]],
                  rule: LesionRoiRule = LesionRoiRule(), case: str | None = None) -> MaskResult:
    """The lesion ROIs of an RTSTRUCT on the PET grid.

    ``grids``: SOP instance or series UID → (name, geometry) of the series that were read (PET, CT),
    to find the grid the contours were drawn on.
    """
    ds = open_dicom(path)
    names = {int(r.ROINumber): str(r.get("ROIName", f"ROI {r.ROINumber}"))
             for r in ds.get("StructureSetROISequence", [])}
    result = MaskResult(None, Path(path))
    referenced = [str(image.ReferencedSOPInstanceUID) for roi in ds.get("ROIContourSequence", [])
                  for contour in roi.get("ContourSequence", []) for image in contour.get("ContourImageSequence", [])]
    referenced += [str(s.SeriesInstanceUID) for frame in ds.get("ReferencedFrameOfReferenceSequence", [])
                   for study in frame.get("RTReferencedStudySequence", [])
                   for s in study.get("RTReferencedSeriesSequence", [])]
    drawn_on, grid = next((grids[uid] for uid in referenced if uid in grids), ("PET", pet))
    result.drawn_on = drawn_on
    mask = np.zeros(grid.shape_zyx, dtype=bool)
    for roi in ds.get("ROIContourSequence", []):
        name = names.get(int(roi.ReferencedROINumber), f"ROI {roi.ReferencedROINumber}")
        if not rule.is_lesion(name):
            result.left_out.append(name)
            continue
        result.taken.append(name)
        mask |= _fill_roi(roi.get("ContourSequence", []), grid, name, rule, case, Path(path))
    if result.taken:
        result.mask = _on_grid(mask, grid, pet)
    return result


def seg_mask(path: Path, pet: Geometry, rule: LesionRoiRule = LesionRoiRule(), case: str | None = None) -> MaskResult:
    """The lesion segments of a DICOM SEG on the PET grid."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # highdicom raises several kinds for objects it cannot use
        raise InputError(f"unreadable DICOM SEG ({type(exc).__name__}: {exc})", case, path) from None
    result = MaskResult(None, Path(path))
    chosen = []
    for number in seg.segment_numbers:
        name = str(seg.get_segment_description(number).SegmentLabel)
        if rule.is_lesion(name):
            chosen.append(number)
            result.taken.append(name)
        else:
            result.left_out.append(name)
    if not chosen:
        return result
    try:
        volume = seg.get_volume(segment_numbers=chosen, combine_segments=True, skip_overlap_checks=True)
    except Exception as exc:
        raise InputError(f"the SEG's frames do not form a volume ({type(exc).__name__}: {exc})", case, path) from None
    image = volume.with_array((volume.array > 0).astype(np.uint8)).to_simpleitk()
    source = Geometry.of(image)
    result.mask = _on_grid(sitk.GetArrayFromImage(image), source, pet)
    result.drawn_on = "SEG"
    return result
