"""Image files and their geometry (SimpleITK), with errors that name the case and file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autopetseg.errors import InputError
from autopetseg.io_utils import atomic_path

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


def strip_image_suffix(name: str) -> str | None:
    """``'case_pet.nii.gz' -> 'case_pet'``; ``None`` when the name is not an image file."""
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels lie. Shape and spacing in array order (z, y, x); origin and
    direction as SimpleITK gives them (x, y, z and a row-major 3×3)."""

    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(
            shape_zyx=tuple(int(s) for s in reversed(image.GetSize())),
            spacing_zyx=tuple(float(s) for s in reversed(image.GetSpacing())),
            origin_xyz=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(
            shape_zyx=tuple(int(v) for v in d["shape_zyx"]),
            spacing_zyx=tuple(float(v) for v in d["spacing_zyx"]),
            origin_xyz=tuple(float(v) for v in d["origin_xyz"]),
            direction=tuple(float(v) for v in d["direction"]),
        )

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing_zyx)) / 1000.0

    def image(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image holding ``array`` (z, y, x) with this geometry."""
        if tuple(array.shape) != self.shape_zyx:
            raise ValueError(f"array shape {array.shape} does not match geometry {self.shape_zyx}")
        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        img.SetSpacing(tuple(reversed(self.spacing_zyx)))
        img.SetOrigin(self.origin_xyz)
        img.SetDirection(self.direction)
        return img

    def same_grid(self, other: "Geometry", atol_mm: float = 1e-3, rtol: float = 1e-4) -> bool:
        return (
            self.shape_zyx == other.shape_zyx
            and np.allclose(self.spacing_zyx, other.spacing_zyx, rtol=rtol, atol=atol_mm)
            and np.allclose(self.origin_xyz, other.origin_xyz, rtol=rtol, atol=atol_mm)
            and np.allclose(self.direction, other.direction, atol=1e-4)
        )


def read_image(path: str | Path, case: str | None = None, what: str = "image") -> sitk.Image:
    """Read a 3D image; an unreadable, truncated or non-3D file is an ``InputError``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file does not exist", case, path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reader error"
        raise InputError(f"{what} file is unreadable or truncated ({first_line})", case, path) from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what} must be a 3D single-channel image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s)",
            case,
            path,
        )
    return image


def write_image(path: str | Path, array: np.ndarray, geometry: Geometry, compress: bool = True) -> None:
    """Write ``array`` with ``geometry`` atomically (the format follows the file name)."""
    path = Path(path)
    suffix = next((s for s in IMAGE_SUFFIXES if path.name.endswith(s)), path.suffix)
    with atomic_path(path, suffix) as tmp:
        sitk.WriteImage(geometry.image(array), str(tmp), useCompression=compress)
