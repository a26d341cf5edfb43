"""Load one case into arrays on the PET grid, checking everything a user can get wrong.

The PET image is the reference geometry: the CT is resampled onto it (linear, air = -1024 HU
outside the CT), and the label must already lie on it (autoPET's SEG does).

Checks, each an ``InputError`` naming the case and the file (heuristics and their numbers are
the module constants below):

* a channel is missing (the record has no PET or no CT);
* a file is missing, unreadable, truncated (also a ``.nii``/``.nii.gz`` cut short, which ITK would
  otherwise read silently with the missing part zero-filled), not 3D or not single-channel;
* NaN or infinite voxels in any image;
* the CT covers less than ``MIN_CT_COVERAGE`` of the PET field of view (a CT from another study);
* the PET has many strongly negative values (a CT given as PET: channels swapped);
* the PET body median is above ``MAX_PLAUSIBLE_BODY_MEDIAN_SUV`` (Bq/ml rather than SUV);
* the label lies on another grid than the PET, or holds values other than 0 and 1.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autopetseg.data.imageio import Geometry, read_image
from autopetseg.data.records import CaseRecord
from autopetseg.errors import InputError

log = logging.getLogger(__name__)

CT_FILL_HU = -1024.0
# A body median above this cannot be SUV (it would be Bq/ml): design notes, Conventions.
MAX_PLAUSIBLE_BODY_MEDIAN_SUV = 100.0
# The CT must cover at least this share of the PET field of view.
MIN_CT_COVERAGE = 0.95
# CT voxels above this are "body" for the Bq/ml check (air is about -1000 HU, lung -900..-500).
BODY_HU = -500.0
# Reconstruction gives small negative SUVs; a PET with more than MAX_NEGATIVE_PET_FRACTION of its
# voxels below NEGATIVE_PET_SUV is a CT (air at -1000 HU) passed as PET.
NEGATIVE_PET_SUV = -50.0
MAX_NEGATIVE_PET_FRACTION = 0.01
# Voxels handled per block by the CT coverage computation (bounds its memory to ~100 MB).
_COVERAGE_BLOCK_VOXELS = 4_000_000


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


# ----------------------------------------------------------------------------- truncated files


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Header + voxel bytes a single-file NIfTI-1/2 should hold; ``None`` if the header is not NIfTI."""
    if len(header) < 348:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if sizeof_hdr == 540 and len(header) >= 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    n_voxels = int(np.prod([max(int(d), 1) for d in dims[1 : ndim + 1]], dtype=np.int64))
    return max(vox_offset, sizeof_hdr) + n_voxels * bitpix // 8


def _gzip_stream_is_complete(path: Path) -> bool:
    """Decompress the whole file (in blocks, checking CRCs); ``False`` when it ends early or is corrupt."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(16 << 20):
                pass
    except (EOFError, OSError, zlib.error):
        return False
    return True


_NIFTI_FLOAT_DTYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 / float64


def _nifti_float_layout(header: bytes) -> tuple[np.dtype, int] | None:
    """(voxel dtype, data offset) of a float NIfTI-1/2 header; ``None`` for other files and types."""
    if len(header) < 348:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:
            code = struct.unpack(endian + "h", header[70:72])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if sizeof_hdr == 540 and len(header) >= 540:
            code = struct.unpack(endian + "h", header[12:14])[0]
            offset = int(struct.unpack(endian + "q", header[168:176])[0])
            break
    else:
        return None
    if code not in _NIFTI_FLOAT_DTYPES:
        return None
    return np.dtype(endian + _NIFTI_FLOAT_DTYPES[code]), max(offset, sizeof_hdr)


def count_nonfinite_nifti(path: str | Path) -> int:
    """NaN/inf voxels stored in a float ``.nii``/``.nii.gz`` (0 for any other file).

    ITK before version 6 replaces every non-finite NIfTI voxel with 0 while reading, so a PET full
    of NaN would pass unnoticed (ITK PR #6683). The voxel bytes are scanned here in blocks instead.
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return 0
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rb") as f:
        layout = _nifti_float_layout(f.read(544))
        if layout is None:
            return 0
        dtype, offset = layout
        f.seek(offset)
        block = (8 << 20) // dtype.itemsize * dtype.itemsize
        count, tail = 0, b""
        while chunk := f.read(block):
            chunk = tail + chunk
            usable = len(chunk) // dtype.itemsize * dtype.itemsize
            count += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk[:usable], dtype=dtype))))
            tail = chunk[usable:]
    return count


def check_file_complete(path: str | Path, case: str | None = None, what: str = "image") -> None:
    """Raise an ``InputError`` when a NIfTI file holds fewer bytes than its header promises.

    ITK reads a ``.nii``/``.nii.gz`` that was cut short without complaint (the missing voxels come
    back as zeros), so this looks for it. For ``.nii.gz`` the gzip trailer's size field is compared
    with header + voxel bytes first (cheap); only when they differ (truncation, or a legitimate
    multi-member/padded file) is the whole stream decompressed to decide. Other formats are checked
    by their ITK readers, which raise on short data.
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(".nii.gz"):
            with gzip.open(path, "rb") as f:
                header = f.read(544)
            expected = _nifti_expected_bytes(header)
            with open(path, "rb") as f:
                f.seek(-4, 2)
                trailer_size = struct.unpack("<I", f.read(4))[0]
            if expected is not None and trailer_size == expected % (1 << 32):
                return
            complete = _gzip_stream_is_complete(path)
            detail = "the gzip stream ends early or is corrupt"
        elif name.endswith(".nii"):
            with open(path, "rb") as f:
                header = f.read(544)
            expected = _nifti_expected_bytes(header)
            actual = path.stat().st_size
            complete = expected is None or actual >= expected
            detail = f"{actual} bytes, the header promises {expected}"
        else:
            return
    except (EOFError, OSError, zlib.error) as exc:
        complete, detail = False, str(exc)
    if not complete:
        raise InputError(f"{what} file is truncated or corrupt ({detail})", case, path)


def read_checked(path: str | Path, case: str | None = None, what: str = "image") -> sitk.Image:
    """``read_image`` plus the truncation and NaN/inf checks ITK leaves out for NIfTI."""
    path = Path(path)
    image = read_image(path, case, what)  # existence, readability, 3D single-channel
    check_file_complete(path, case, what)
    nonfinite = count_nonfinite_nifti(path)
    if nonfinite:
        raise InputError(f"{what} has {nonfinite} NaN or infinite voxel(s)", case, path)
    return image


# ----------------------------------------------------------------------------- geometry checks


def ct_on_pet_grid(ct: sitk.Image, pet: sitk.Image) -> sitk.Image:
    """Resample the CT onto the PET grid (linear, -1024 HU outside); a no-op on the same grid."""
    if Geometry.of(ct).same_grid(Geometry.of(pet)):
        return sitk.Cast(ct, sitk.sitkFloat32)
    return sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), pet, sitk.Transform(), sitk.sitkLinear, CT_FILL_HU, sitk.sitkFloat32)


def _index_to_physical(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with physical point = A @ index_xyz + b."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    return direction @ np.diag(image.GetSpacing()), np.asarray(image.GetOrigin(), dtype=np.float64)


def ct_coverage(ct: sitk.Image, pet: sitk.Image) -> float:
    """Share of PET voxel centres, one-voxel rim excluded, that fall inside the CT's field of view.

    "Inside" is ITK's convention: continuous CT index within [-0.5, size - 0.5] on every axis, i.e.
    within the CT voxels' outer faces. The rim is left out because crops made on two grids (real
    data does this) disagree by up to one PET voxel at each face; what we want to catch is a CT
    from elsewhere, not that. Computed from the affine map PET index → CT index, in blocks of
    slices, so no CT-sized image is allocated.
    """
    if Geometry.of(ct).same_grid(Geometry.of(pet)):
        return 1.0
    a_pet, b_pet = _index_to_physical(pet)
    a_ct, b_ct = _index_to_physical(ct)
    to_ct = np.linalg.inv(a_ct)
    m = to_ct @ a_pet  # continuous CT index (x, y, z) = m @ PET index (x, y, z) + t
    t = to_ct @ (b_pet - b_ct)
    ct_size = np.asarray(ct.GetSize(), dtype=np.float64)

    def interior(n: int) -> np.ndarray:
        return np.arange(1, n - 1, dtype=np.float64) if n > 2 else np.arange(n, dtype=np.float64)

    ix, iy, iz = (interior(n) for n in pet.GetSize())
    per_slice = max(ix.size * iy.size, 1)
    block = max(1, _COVERAGE_BLOCK_VOXELS // per_slice)
    inside_count = 0
    for start in range(0, iz.size, block):
        kz = iz[start : start + block]
        inside = np.ones((kz.size, iy.size, ix.size), dtype=bool)
        for axis in range(3):
            c = (m[axis, 0] * ix[None, None, :] + m[axis, 1] * iy[None, :, None]) + (m[axis, 2] * kz + t[axis])[:, None, None]
            inside &= (c >= -0.5) & (c <= ct_size[axis] - 0.5)
        inside_count += int(np.count_nonzero(inside))
    return inside_count / float(ix.size * iy.size * iz.size)


def _check_finite(array: np.ndarray, case: str, path, what: str) -> None:
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputError(f"{what} has {bad} NaN or infinite voxel(s)", case, path)


def _missing_channel_error(record: CaseRecord, what: str) -> InputError:
    """Name where the channel was looked for: the folder of the files that were found."""
    found = [p for p in (record.pet, record.ct, record.label) if p is not None]
    folder = Path(found[0]).parent if found else None
    return InputError(f"no {what} image found for this case", record.case_id, folder)


# ----------------------------------------------------------------------------- the case


def load_case(record: CaseRecord, with_label: bool = True) -> LoadedCase:
    """Read and check one case. Every problem is an ``InputError`` naming the case and file."""
    case = record.case_id
    for what, path in (("PET", record.pet), ("CT", record.ct)):
        if path is None:
            raise _missing_channel_error(record, what)

    pet_img = read_checked(record.pet, case, "PET")
    ct_img = read_checked(record.ct, case, "CT")
    geometry = Geometry.of(pet_img)

    pet = sitk.GetArrayFromImage(pet_img).astype(np.float32, copy=False)
    _check_finite(pet, case, record.pet, "PET")
    _check_finite(sitk.GetArrayViewFromImage(ct_img), case, record.ct, "CT")

    negative_fraction = float(np.count_nonzero(pet < NEGATIVE_PET_SUV)) / pet.size
    if negative_fraction > MAX_NEGATIVE_PET_FRACTION:
        raise InputError(
            f"{100 * negative_fraction:.1f}% of the PET voxels are below {NEGATIVE_PET_SUV:g} (minimum "
            f"{float(pet.min()):.0f}); this looks like a CT: are the PET and CT channels swapped?",
            case,
            record.pet,
        )

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
        label = _load_label(record.label, geometry, case)
    return LoadedCase(case_id=case, pet=pet, ct=ct, label=label, geometry=geometry)


def _load_label(path: Path, geometry: Geometry, case: str) -> np.ndarray:
    label_img = read_checked(path, case, "label")
    label_geometry = Geometry.of(label_img)
    if not label_geometry.same_grid(geometry):
        raise InputError(
            f"label grid {label_geometry.shape_zyx} @ {label_geometry.spacing_zyx} mm, origin "
            f"{label_geometry.origin_xyz} differs from the PET grid {geometry.shape_zyx} @ "
            f"{geometry.spacing_zyx} mm, origin {geometry.origin_xyz}; the label must lie on the PET grid",
            case,
            path,
        )
    label_values = sitk.GetArrayFromImage(label_img)
    _check_finite(label_values, case, path, "label")
    values = np.unique(label_values)
    if not np.isin(values, (0, 1)).all():
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if values.size > 8 else "")
        raise InputError(f"label values must be 0 and 1, found {shown}", case, path)
    return np.asarray(label_values, dtype=np.uint8)


# ----------------------------------------------------------------------------- folder checks


@dataclass
class CaseCheck:
    """What ``check_case`` reports for a good case."""

    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    has_label: bool
    n_lesion_voxels: int


def check_case(record: CaseRecord) -> CaseCheck:
    """Load one case with every check (a top-level function, so process pools can run it)."""
    loaded = load_case(record)
    n_lesion = int(np.count_nonzero(loaded.label)) if loaded.label is not None else 0
    return CaseCheck(loaded.geometry.shape_zyx, loaded.geometry.spacing_zyx, loaded.label is not None, n_lesion)


def check_dataset(dataset, num_processes: int = 1) -> tuple[dict[str, CaseCheck], list[InputError]]:
    """Run every input check on every case: (good case id → ``CaseCheck``, one ``InputError`` per bad case)."""
    from autopetseg.data.parallel import run_per_case  # parallel imports nothing from here; kept local anyway

    return run_per_case(check_case, dataset.cases, num_processes=num_processes, desc="checking cases")
