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
* the PET is not in SUV: its body median, 99th percentile, maximum or share of negative voxels is
  out of the range of a PET in SUV (``suv_check``, with the sources of each limit and the
  override for unusual tracers); a constant PET or a one-slice volume is a warning;
* the label lies on another grid than the PET, or holds values other than 0 and 1.

Speed (whole-body studies are 15-50 M voxels per channel, mostly air):

* a float ``.nii``/``.nii.gz`` is decompressed once, here, so that NaN/inf voxels can be seen
  (ITK 5 turns them into 0 while reading) without a second pass; other files go through ITK;
* the CT is not resampled onto the whole PET grid while loading. Only the *tissue region* is: the
  PET-grid box holding every voxel whose resampled CT can exceed ``BODY_HU`` (found from the CT's
  own voxels and the affine map between the grids). That is all the Bq/ml check and the body
  mask need; ``LoadedCase.ct_in(box)`` resamples other boxes on demand and ``LoadedCase.ct`` the
  whole grid (cached).
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autopetseg.data.imageio import Geometry, read_image
from autopetseg.data.records import CaseRecord
from autopetseg.data.suv_check import SuvCheck, check_suv
from autopetseg.errors import InputError
from autopetseg.data.body import BodyMaskSettings, align_box, bbox_slices, coarse_factor

log = logging.getLogger(__name__)

CT_FILL_HU = -1024.0
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
# The tissue region is aligned to the blocks ``planning.body`` uses with its default settings, so
# that the body mask never needs CT values outside it.
_BODY_DEFAULTS = BodyMaskSettings()

Box = list  # [[z0, z1], [y0, y1], [x0, x1]], end exclusive, on the PET grid


def box_geometry(geometry: Geometry, box_zyx) -> Geometry:
    """The geometry of ``array[z0:z1, y0:y1, x0:x1]`` cut out of an image with ``geometry``."""
    start_xyz = np.array([box_zyx[2][0], box_zyx[1][0], box_zyx[0][0]], dtype=np.float64)
    spacing_xyz = np.asarray(geometry.spacing_zyx[::-1], dtype=np.float64)
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    origin = np.asarray(geometry.origin_xyz) + direction @ (start_xyz * spacing_xyz)
    return Geometry(
        shape_zyx=tuple(int(b[1] - b[0]) for b in box_zyx),
        spacing_zyx=geometry.spacing_zyx,
        origin_xyz=tuple(float(o) for o in origin),
        direction=geometry.direction,
    )


def _box_inside(inner, outer) -> bool:
    return all(o[0] <= i[0] and i[1] <= o[1] for i, o in zip(inner, outer))


@dataclass(eq=False)
class LoadedCase:
    """A checked case: float32 PET (SUV) and uint8 label as arrays (z, y, x) on the PET grid; the
    CT (HU) resampled onto the PET grid on demand (``ct``, ``ct_in``)."""

    case_id: str
    pet: np.ndarray  # SUV, float32
    label: np.ndarray | None  # uint8 in {0, 1}
    geometry: Geometry  # the PET image's geometry
    ct_source: sitk.Image | None = field(default=None, repr=False)  # the CT as read (its own grid)
    ct_source_array: np.ndarray | None = field(default=None, repr=False)  # the same voxels (z, y, x)
    # Box (PET grid, aligned to the default body-mask blocks) holding every voxel whose CT on the PET
    # grid exceeds BODY_HU; None when there is none.
    tissue_box: Box | None = None
    _ct_box: Box | None = field(default=None, repr=False)
    _ct_region: np.ndarray | None = field(default=None, repr=False)

    @property
    def full_box(self) -> Box:
        return [[0, int(n)] for n in self.geometry.shape_zyx]

    @property
    def ct(self) -> np.ndarray:
        """The CT in HU on the whole PET grid (float32; computed once, then cached)."""
        return self.ct_in(self.full_box, keep=True)

    def ct_in(self, box: Box, keep: bool = False) -> np.ndarray:
        """The CT in HU on the PET voxels of ``box`` (float32). A view when a cached region holds
        the box; otherwise resampled for exactly that box (and cached when ``keep``)."""
        if self._ct_box is not None and _box_inside(box, self._ct_box):
            offset = [lo for lo, _ in self._ct_box]
            return self._ct_region[tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, offset))]
        region = self._resample_ct(box)
        if keep:
            self._ct_box, self._ct_region = [list(b) for b in box], region
        return region

    def _resample_ct(self, box: Box) -> np.ndarray:
        target = box_geometry(self.geometry, box)
        source = Geometry.of(self.ct_source) if self.ct_source is not None else None
        if source is None or source.same_grid(self.geometry):
            return np.asarray(self.ct_source_array[bbox_slices(box)], dtype=np.float32)
        return sitk.GetArrayFromImage(resample_ct(self.ct_source, target))

    def stacked(self) -> np.ndarray:
        """(2, z, y, x) float32 with channel 0 = PET, channel 1 = CT (the package-wide order)."""
        return np.stack([self.pet, self.ct]).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- truncated files


def _nifti_header_fields(header: bytes) -> dict | None:
    """Fields of a single-file NIfTI-1/2 header; ``None`` if the bytes are not one."""
    if len(header) < 348:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:
            code, bitpix = struct.unpack(endian + "2h", header[70:74])
            return {
                "endian": endian,
                "sizeof_hdr": 348,
                "dims": struct.unpack(endian + "8h", header[40:56]),
                "code": code,
                "bitpix": bitpix,
                "vox_offset": int(struct.unpack(endian + "f", header[108:112])[0]),
                "scl_slope": struct.unpack(endian + "f", header[112:116])[0],
                "scl_inter": struct.unpack(endian + "f", header[116:120])[0],
            }
        if sizeof_hdr == 540 and len(header) >= 540:
            code, bitpix = struct.unpack(endian + "2h", header[12:16])
            return {
                "endian": endian,
                "sizeof_hdr": 540,
                "dims": struct.unpack(endian + "8q", header[16:80]),
                "code": code,
                "bitpix": bitpix,
                "vox_offset": int(struct.unpack(endian + "q", header[168:176])[0]),
                "scl_slope": struct.unpack(endian + "d", header[176:184])[0],
                "scl_inter": struct.unpack(endian + "d", header[184:192])[0],
            }
    return None


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Header + voxel bytes a single-file NIfTI-1/2 should hold; ``None`` if the header is not NIfTI."""
    fields = _nifti_header_fields(header)
    if fields is None:
        return None
    dims, bitpix = fields["dims"], fields["bitpix"]
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    n_voxels = int(np.prod([max(int(d), 1) for d in dims[1 : ndim + 1]], dtype=np.int64))
    return max(fields["vox_offset"], fields["sizeof_hdr"]) + n_voxels * bitpix // 8


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
    fields = _nifti_header_fields(header)
    if fields is None or fields["code"] not in _NIFTI_FLOAT_DTYPES:
        return None
    return np.dtype(fields["endian"] + _NIFTI_FLOAT_DTYPES[fields["code"]]), max(fields["vox_offset"], fields["sizeof_hdr"])


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


# ----------------------------------------------------------------------------- reading


_GZIP_INPUT_BLOCK = 1 << 20  # compressed bytes fed to zlib per call


def _gzip_members(raw: bytes):
    """Yield the decompressed pieces of every gzip member of ``raw`` in order (each verified)."""
    view = memoryview(raw)
    pos, n = 0, len(raw)
    while pos < n:
        if view[pos : pos + 2] != b"\x1f\x8b":  # padding or trailing bytes after the last member: zlib
            return  # (and so ITK) ignores them
        inflater = zlib.decompressobj(wbits=31)
        while not inflater.eof:
            if pos >= n:
                raise EOFError("the gzip stream ends early")
            piece = view[pos : pos + _GZIP_INPUT_BLOCK]
            pos += len(piece)
            out = inflater.decompress(piece)
            if out:
                yield out
        pos -= len(inflater.unused_data)


def _gunzip_nifti(raw: bytes) -> tuple[dict, np.ndarray]:
    """(header fields, the decompressed file as a writable uint8 array) of a gzip'd NIfTI, with
    one pass of zlib and one copy of each piece into a preallocated buffer."""
    pieces = _gzip_members(raw)
    head = bytearray()
    for piece in pieces:
        head += piece
        if len(head) >= 544:
            break
    fields = _nifti_header_fields(bytes(head[:544]))
    expected = _nifti_expected_bytes(bytes(head[:544]))
    if fields is None or expected is None:
        raise ValueError("not a NIfTI header")
    buffer = np.empty(max(expected, len(head)), dtype=np.uint8)
    filled = len(head)
    buffer[:filled] = np.frombuffer(head, dtype=np.uint8)
    for piece in pieces:
        take = min(len(piece), buffer.size - filled)
        if take:
            buffer[filled : filled + take] = np.frombuffer(piece, dtype=np.uint8, count=take)
            filled += take
    if filled < expected:
        raise EOFError(f"{filled} bytes, the header promises {expected}")
    return fields, buffer


def _read_float_nifti(path: Path, case: str | None, what: str) -> tuple[np.ndarray, Geometry] | None:
    """A float32/float64 3D NIfTI read with one decompression, NaN/inf checked on the array itself.

    ``None`` (the caller falls back to ITK) for anything else: another format or voxel type, more
    than three dimensions, intensity scaling, or a header ITK reads differently.
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")) or not path.is_file():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()  # the geometry as ITK derives it (qform/sform, LPS)
    except RuntimeError:
        return None  # read_image reports it
    if (
        reader.GetDimension() != 3
        or reader.GetNumberOfComponents() != 1
        or reader.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64)
    ):
        return None
    try:
        raw = path.read_bytes()
        if name.endswith(".gz"):
            fields, buffer = _gunzip_nifti(raw)
        else:
            fields = _nifti_header_fields(raw[:544])
            expected = _nifti_expected_bytes(raw[:544])
            if fields is None or expected is None:
                return None
            if len(raw) < expected:
                raise EOFError(f"{len(raw)} bytes, the header promises {expected}")
            buffer = np.frombuffer(raw, dtype=np.uint8)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"{what} file is truncated or corrupt ({exc})", case, path) from None
    except ValueError:
        return None
    slope, inter = fields["scl_slope"], fields["scl_inter"]
    size_xyz = tuple(int(d) for d in fields["dims"][1:4])
    if (
        fields["code"] not in _NIFTI_FLOAT_DTYPES
        or fields["dims"][0] != 3
        or size_xyz != tuple(reader.GetSize())
        or not (math.isfinite(slope) and math.isfinite(inter))
        or (slope not in (0.0, 1.0))
        or (slope != 0.0 and inter != 0.0)
    ):
        return None  # ITK would rescale or interpret differently: let it read the file
    dtype = np.dtype(fields["endian"] + _NIFTI_FLOAT_DTYPES[fields["code"]])
    offset = max(fields["vox_offset"], fields["sizeof_hdr"])
    count = size_xyz[0] * size_xyz[1] * size_xyz[2]
    array = buffer[offset : offset + count * dtype.itemsize].view(dtype).reshape(size_xyz[::-1])
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    elif not array.flags.writeable:
        array = array.copy()
    geometry = Geometry(
        shape_zyx=tuple(size_xyz[::-1]),
        spacing_zyx=tuple(float(s) for s in reversed(reader.GetSpacing())),
        origin_xyz=tuple(float(o) for o in reader.GetOrigin()),
        direction=tuple(float(d) for d in reader.GetDirection()),
    )
    _check_finite(array, case, path, what)
    return array, geometry


def read_checked(path: str | Path, case: str | None = None, what: str = "image") -> sitk.Image:
    """``read_image`` plus the truncation and NaN/inf checks ITK leaves out for NIfTI."""
    path = Path(path)
    fast = _read_float_nifti(path, case, what)
    if fast is not None:
        array, geometry = fast
        return geometry.image(array)
    return _read_with_itk(path, case, what)


def _read_with_itk(path: Path, case: str | None, what: str) -> sitk.Image:
    image = read_image(path, case, what)  # existence, readability, 3D single-channel
    check_file_complete(path, case, what)
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        nonfinite = count_nonfinite_nifti(path)
        if nonfinite:
            raise InputError(f"{what} has {nonfinite} NaN or infinite voxel(s)", case, path)
    return image


def read_array_checked(path: str | Path, case: str | None = None, what: str = "image") -> tuple[np.ndarray, Geometry]:
    """Like ``read_checked``, as a (z, y, x) array and its geometry (no SimpleITK image kept)."""
    path = Path(path)
    fast = _read_float_nifti(path, case, what)
    if fast is not None:
        return fast
    image = _read_with_itk(path, case, what)
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f":
        _check_finite(array, case, path, what)  # formats other than NIfTI keep NaN as NaN
    return array, Geometry.of(image)


def _read_ct(path: Path, case: str) -> tuple[sitk.Image | None, np.ndarray, Geometry]:
    """(ITK image or None, voxels (z, y, x), geometry) of the CT, read once."""
    fast = _read_float_nifti(path, case, "CT")
    if fast is not None:
        array, geometry = fast
        return None, array, geometry
    image = _read_with_itk(path, case, "CT")
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f":
        _check_finite(array, case, path, "CT")
    return image, array, Geometry.of(image)


# ----------------------------------------------------------------------------- geometry checks


def resample_ct(ct: sitk.Image, target: Geometry) -> sitk.Image:
    """The CT on ``target`` (linear, ``CT_FILL_HU`` outside), float32 straight out of the resampler
    (no cast of the whole CT first: ITK interpolates in double either way)."""
    return sitk.Resample(
        ct,
        [int(s) for s in target.shape_zyx[::-1]],
        sitk.Transform(),
        sitk.sitkLinear,
        list(target.origin_xyz),
        [float(s) for s in target.spacing_zyx[::-1]],
        list(target.direction),
        CT_FILL_HU,
        sitk.sitkFloat32,
    )


def ct_on_pet_grid(ct: sitk.Image, pet: sitk.Image) -> sitk.Image:
    """Resample the CT onto the PET grid (linear, -1024 HU outside); a cast on the same grid."""
    if Geometry.of(ct).same_grid(Geometry.of(pet)):
        return sitk.Cast(ct, sitk.sitkFloat32)
    return resample_ct(ct, Geometry.of(pet))


def _index_to_physical(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with physical point = A @ index_xyz + b."""
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    return direction @ np.diag(geometry.spacing_zyx[::-1]), np.asarray(geometry.origin_xyz, dtype=np.float64)


def _pet_to_ct_index(ct: Geometry, pet: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(m, t): continuous CT index (x, y, z) = m @ PET index (x, y, z) + t."""
    a_pet, b_pet = _index_to_physical(pet)
    a_ct, b_ct = _index_to_physical(ct)
    to_ct = np.linalg.inv(a_ct)
    return to_ct @ a_pet, to_ct @ (b_pet - b_ct)


def ct_coverage(ct: sitk.Image | Geometry, pet: sitk.Image | Geometry) -> float:
    """Share of PET voxel centres, one-voxel rim excluded, that fall inside the CT's field of view.

    "Inside" is ITK's convention: continuous CT index within [-0.5, size - 0.5] on every axis, i.e.
    within the CT voxels' outer faces. The rim is left out because crops made on two grids (real
    data does this) disagree by up to one PET voxel at each face; what we want to catch is a CT
    from elsewhere, not that. Computed from the affine map PET index → CT index: per axis when the
    map does not mix axes (the grids share their axes: the usual case), else in blocks of slices,
    so no CT-sized image is allocated.
    """
    ct = ct if isinstance(ct, Geometry) else Geometry.of(ct)
    pet = pet if isinstance(pet, Geometry) else Geometry.of(pet)
    if ct.same_grid(pet):
        return 1.0
    m, t = _pet_to_ct_index(ct, pet)
    ct_size = np.asarray(ct.shape_zyx[::-1], dtype=np.float64)

    def interior(n: int) -> np.ndarray:
        return np.arange(1, n - 1, dtype=np.float64) if n > 2 else np.arange(n, dtype=np.float64)

    axes = [interior(n) for n in pet.shape_zyx[::-1]]  # x, y, z
    total = float(axes[0].size * axes[1].size * axes[2].size)
    # Axis-aligned grids (off-diagonal terms move no index by more than 1e-6 voxel across the whole
    # PET grid): the inside set is a product of one range per axis.
    spread = np.abs(m - np.diag(np.diag(m))) @ np.asarray(pet.shape_zyx[::-1], dtype=np.float64)
    if np.all(spread < 1e-6):
        count = 1
        for axis in range(3):
            c = m[axis, axis] * axes[axis] + t[axis]
            count *= int(np.count_nonzero((c >= -0.5) & (c <= ct_size[axis] - 0.5)))
        return count / total
    ix, iy, iz = axes
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
    return inside_count / total


def tissue_box(ct_array: np.ndarray, ct: Geometry, pet: Geometry, threshold: float = BODY_HU) -> Box | None:
    """The PET-grid box outside which the CT resampled onto the PET grid (linear) is at most
    ``threshold`` everywhere; ``None`` when no CT voxel exceeds it.

    A linearly interpolated value above the threshold needs a CT voxel above it within one CT voxel
    (continuous index distance < 1 per axis). So the CT-index box of those voxels, grown by one, is
    mapped to the PET grid through its eight corners, and the result grown by one more PET voxel.
    """
    above = np.flatnonzero(ct_array.reshape(ct_array.shape[0], -1).max(axis=1) > threshold)
    if above.size == 0:
        return None
    z0, z1 = int(above[0]), int(above[-1]) + 1
    rows = ct_array[z0:z1]
    ys = np.flatnonzero(rows.max(axis=(0, 2)) > threshold)
    xs = np.flatnonzero(rows[:, ys[0] : ys[-1] + 1].max(axis=(0, 1)) > threshold)
    lo = np.array([xs[0], ys[0], z0], dtype=np.float64) - 1.0  # CT index, x y z
    hi = np.array([xs[-1], ys[-1], z1 - 1], dtype=np.float64) + 1.0
    m, t = _pet_to_ct_index(ct, pet)
    to_pet = np.linalg.inv(m)
    corners = np.stack(np.meshgrid(*zip(lo, hi), indexing="ij"), axis=-1).reshape(-1, 3)  # 8 corners, x y z
    pet_index = (to_pet @ (corners - t).T).T  # (8, 3) x y z
    first = np.floor(pet_index.min(axis=0)) - 1
    last = np.ceil(pet_index.max(axis=0)) + 1
    shape_xyz = np.asarray(pet.shape_zyx[::-1])
    start = np.clip(first, 0, shape_xyz).astype(int)
    stop = np.clip(last + 1, 0, shape_xyz).astype(int)
    if np.any(stop <= start):
        return None
    return [[int(start[a]), int(stop[a])] for a in (2, 1, 0)]


def _check_finite(array: np.ndarray, case: str, path, what: str) -> None:
    if array.dtype.kind != "f":
        return  # integer voxels cannot be NaN or infinite
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputError(f"{what} has {bad} NaN or infinite voxel(s)", case, path)


def _missing_channel_error(record: CaseRecord, what: str) -> InputError:
    """Name where the channel was looked for: the folder of the files that were found."""
    found = [p for p in (record.pet, record.ct, record.label) if p is not None]
    folder = Path(found[0]).parent if found else None
    return InputError(f"no {what} image found for this case", record.case_id, folder)


# ----------------------------------------------------------------------------- the case


def load_case(record: CaseRecord, with_label: bool = True, suv_check: SuvCheck | None = None) -> LoadedCase:
    """Read and check one case. Every problem is an ``InputError`` naming the case and file.

    ``suv_check``: how the SUV plausibility is checked (default: ``SuvCheck.from_environment()``).
    """
    case = record.case_id
    record.raise_problem()
    for what, path in (("PET", record.pet), ("CT", record.ct)):
        if path is None:
            raise _missing_channel_error(record, what)

    pet, geometry = read_array_checked(record.pet, case, "PET")
    pet = pet.astype(np.float32, copy=False)
    ct_image, ct_array, ct_geometry = _read_ct(Path(record.ct), case)

    negative_fraction = float(np.count_nonzero(pet < NEGATIVE_PET_SUV)) / pet.size
    if negative_fraction > MAX_NEGATIVE_PET_FRACTION:
        raise InputError(
            f"{100 * negative_fraction:.1f}% of the PET voxels are below {NEGATIVE_PET_SUV:g} (minimum "
            f"{float(pet.min()):.0f}); this looks like a CT: are the PET and CT channels swapped?",
            case,
            record.pet,
        )

    coverage = ct_coverage(ct_geometry, geometry)
    if coverage < MIN_CT_COVERAGE:
        raise InputError(
            f"CT covers only {100 * coverage:.1f}% of the PET field of view (need {100 * MIN_CT_COVERAGE:.0f}%); "
            "are the PET and CT from the same study?",
            case,
            record.ct,
        )
    if ct_image is None and not ct_geometry.same_grid(geometry):
        ct_image = ct_geometry.image(ct_array)  # a float NIfTI CT on its own grid: ITK resamples it

    loaded = LoadedCase(case_id=case, pet=pet, label=None, geometry=geometry, ct_source=ct_image, ct_source_array=ct_array)
    box = tissue_box(ct_array, ct_geometry, geometry, BODY_HU)
    if box is not None:
        shape = geometry.shape_zyx
        box = align_box(box, coarse_factor(shape, _BODY_DEFAULTS.max_coarse_voxels), shape)
        loaded.tissue_box = box
        ct_region = loaded.ct_in(box, keep=True)
        body = ct_region > BODY_HU
        body_pet = pet[bbox_slices(box)][body]
    else:
        body_pet = np.empty(0, dtype=np.float32)
    if body_pet.size == 0:  # no tissue on the CT: the PET's non-zero voxels stand for the body
        body_pet = pet[pet != 0]
    check_suv(pet, body_pet, case, record.pet, suv_check)

    if with_label and record.label is not None:
        loaded.label = _load_label(Path(record.label), geometry, case)
    return loaded


def _load_label(path: Path, geometry: Geometry, case: str) -> np.ndarray:
    label_values, label_geometry = read_array_checked(path, case, "label")
    if not label_geometry.same_grid(geometry):
        raise InputError(
            f"label grid {label_geometry.shape_zyx} @ {label_geometry.spacing_zyx} mm, origin "
            f"{label_geometry.origin_xyz} differs from the PET grid {geometry.shape_zyx} @ "
            f"{geometry.spacing_zyx} mm, origin {geometry.origin_xyz}; the label must lie on the PET grid",
            case,
            path,
        )
    kind = label_values.dtype.kind
    if label_values.size == 0 or kind == "b":
        valid = True
    elif kind == "u":
        valid = label_values.max() <= 1  # one pass, no sort
    elif kind == "i":
        valid = label_values.min() >= 0 and label_values.max() <= 1
    else:
        valid = bool(((label_values == 0) | (label_values == 1)).all())
    if not valid:
        values = np.unique(label_values)
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
