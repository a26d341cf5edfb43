"""Load one case into arrays on the PET grid, checking everything a user can get wrong.

The PET image is the reference geometry: the CT is resampled onto it (linear, air = -1024 HU
outside the CT), and the label must already lie on it (autoPET's SEG does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from autopetseg.data.imageio import Geometry, read_image
from autopetseg.data.records import CaseRecord
from autopetseg.errors import InputError

CT_FILL_HU = -1024.0
# A body median above this cannot be SUV (it would be Bq/ml): design notes, Conventions.
MAX_PLAUSIBLE_BODY_MEDIAN_SUV = 100.0
# The CT must cover at least this share of the PET field of view.
MIN_CT_COVERAGE = 0.95
BODY_HU = -500.0


@dataclass
class LoadedCase:
    """A case as float32 arrays (z, y, x) on the PET grid."""

    case_id: str
    pet: np.ndarray  # SUV
    ct: np.ndarray  # HU, resampled onto the PET grid
    label: np.ndarray | None  # uint8 in {0, 1}
    geometry: Geometry  # the PET image's geometry

    def stacked(self) -> np.ndarray:
        """(2, z, y, x) float32 with channel 0 = PET, channel 1 = CT (the package-wide order)."""
        return np.stack([self.pet, self.ct]).astype(np.float32, copy=False)


def ct_on_pet_grid(ct: sitk.Image, pet: sitk.Image) -> sitk.Image:
    """Resample the CT onto the PET grid (linear, -1024 HU outside); a no-op on the same grid."""
    if Geometry.of(ct).same_grid(Geometry.of(pet)):
        return sitk.Cast(ct, sitk.sitkFloat32)
    return sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), pet, sitk.Transform(), sitk.sitkLinear, CT_FILL_HU, sitk.sitkFloat32)


def ct_coverage(ct: sitk.Image, pet: sitk.Image) -> float:
    """Share of PET voxel centres, one-voxel rim excluded, that fall inside the CT's field of view.

    The rim is left out because crops made on two grids (real data does this) disagree by up to
    one PET voxel at each face; what we want to catch is a CT from elsewhere, not that.
    """
    if Geometry.of(ct).same_grid(Geometry.of(pet)):
        return 1.0
    inside = sitk.Image(ct.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(ct)
    on_pet = sitk.GetArrayFromImage(sitk.Resample(inside, pet, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    interior = on_pet[tuple(slice(1, -1) if n > 2 else slice(None) for n in on_pet.shape)]
    return float(interior.mean())


def _check_finite(array: np.ndarray, case: str, path, what: str) -> None:
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputError(f"{what} has {bad} NaN or infinite voxel(s)", case, path)


def load_case(record: CaseRecord, with_label: bool = True) -> LoadedCase:
    """Read and check one case. Every problem is an ``InputError`` naming the case and file."""
    case = record.case_id
    for what, path in (("PET", record.pet), ("CT", record.ct)):
        if path is None:
            raise InputError(f"no {what} image found for this case", case)

    pet_img = read_image(record.pet, case, "PET")
    ct_img = read_image(record.ct, case, "CT")
    geometry = Geometry.of(pet_img)

    pet = sitk.GetArrayFromImage(pet_img).astype(np.float32, copy=False)
    _check_finite(pet, case, record.pet, "PET")
    _check_finite(sitk.GetArrayViewFromImage(ct_img), case, record.ct, "CT")

    coverage = ct_coverage(ct_img, pet_img)
    if coverage < MIN_CT_COVERAGE:
        raise InputError(
            f"CT covers only {100 * coverage:.1f}% of the PET field of view (need {100 * MIN_CT_COVERAGE:.0f}%); "
            "are the PET and CT from the same study?",
            case,
            record.ct,
        )
    ct = sitk.GetArrayFromImage(ct_on_pet_grid(ct_img, pet_img))

    body = ct > BODY_HU
    body_pet = pet[body] if body.any() else pet[pet > 0]
    body_median = float(np.median(body_pet)) if body_pet.size else 0.0
    if body_median > MAX_PLAUSIBLE_BODY_MEDIAN_SUV:
        raise InputError(
            f"PET body median is {body_median:.0f}, which looks like Bq/ml rather than SUV; "
            "convert the PET to SUV (body weight) first",
            case,
            record.pet,
        )

    label = None
    if with_label and record.label is not None:
        label_img = read_image(record.label, case, "label")
        label_geometry = Geometry.of(label_img)
        if not label_geometry.same_grid(geometry):
            raise InputError(
                f"label grid {label_geometry.shape_zyx} @ {label_geometry.spacing_zyx} mm, origin "
                f"{label_geometry.origin_xyz} differs from the PET grid {geometry.shape_zyx} @ "
                f"{geometry.spacing_zyx} mm, origin {geometry.origin_xyz}",
                case,
                record.label,
            )
        label_values = sitk.GetArrayFromImage(label_img)
        _check_finite(label_values, case, record.label, "label")
        values = np.unique(label_values)
        if not np.isin(values, (0, 1)).all():
            shown = ", ".join(f"{v:g}" for v in values[:8])
            raise InputError(f"label values must be 0 and 1, found {shown}", case, record.label)
        label = np.asarray(label_values, dtype=np.uint8)

    return LoadedCase(case_id=case, pet=pet, ct=ct, label=label, geometry=geometry)
