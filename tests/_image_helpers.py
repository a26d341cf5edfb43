"""Tiny PET/CT/label files for tests, in every layout discovery accepts, plus the real MIRP cases.

A ``Grid`` is an image geometry (identity direction). A ``Phantom`` is defined in physical space
(mm), so the same body and lesion can be drawn on any grid: the PET grid, a finer CT grid, a
shifted grid. Values: CT 40 HU in the body and -1000 HU outside; PET 1 SUV in the body (plus a
little seeded noise), 8 SUV in the lesion, 0 outside; label 1 in the lesion.

Typical use::

    grid = Grid()                                   # 8 × 10 × 10 voxels of 4 mm
    write_flat_case(tmp_path, "c1")                 # c1_pet/_ct/_seg.nii.gz
    write_autopet_case(tmp_path, "P1", study="s1", ct_name="CT.nii.gz", ct_grid=grid.finer(2))
    write_nnunet_case(tmp_path, "c1", channel_index={"CT": 0, "PET": 1})
    write_dataset_json(tmp_path, {"0": "CT", "1": "PET"})
    flat = link_mirp_cases(tmp_path)                # real cases, skipped when shared/ is absent
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

MIRP_CASES = ("STS_001", "STS_002", "STS_003")


@dataclass(frozen=True)
class Grid:
    """Image geometry with identity direction: shape and spacing (z, y, x), origin (x, y, z) in mm."""

    shape_zyx: tuple[int, int, int] = (8, 10, 10)
    spacing_zyx: tuple[float, float, float] = (4.0, 4.0, 4.0)
    origin_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def coordinates_zyx(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Physical z, y, x (mm) of every voxel centre, broadcastable to ``shape_zyx``."""
        origin_zyx = self.origin_xyz[::-1]
        axes = [origin_zyx[a] + self.spacing_zyx[a] * np.arange(self.shape_zyx[a]) for a in range(3)]
        return np.meshgrid(*axes, indexing="ij", sparse=True)

    def center_xyz(self) -> tuple[float, float, float]:
        return tuple(self.origin_xyz[a] + self.spacing_zyx[2 - a] * (self.shape_zyx[2 - a] - 1) / 2 for a in range(3))

    def finer(self, factor: int) -> "Grid":
        """The same field of view (voxel faces aligned) with ``factor``× more voxels per axis."""
        spacing = tuple(s / factor for s in self.spacing_zyx)
        # voxel centre of the first fine voxel: half a coarse voxel minus half a fine voxel inward
        origin = tuple(o - self.spacing_zyx[2 - a] / 2 + spacing[2 - a] / 2 for a, o in enumerate(self.origin_xyz))
        return Grid(tuple(n * factor for n in self.shape_zyx), spacing, origin)

    def shifted(self, dx_mm: float = 0.0, dy_mm: float = 0.0, dz_mm: float = 0.0) -> "Grid":
        x, y, z = self.origin_xyz
        return replace(self, origin_xyz=(x + dx_mm, y + dy_mm, z + dz_mm))


@dataclass(frozen=True)
class Phantom:
    """An ellipsoid body with one spherical lesion, in physical space (mm)."""

    center_xyz: tuple[float, float, float]
    body_radii_xyz: tuple[float, float, float]
    lesion_center_xyz: tuple[float, float, float]
    lesion_radius_mm: float
    seed: int = 0

    @classmethod
    def for_grid(cls, grid: Grid, seed: int = 0) -> "Phantom":
        """A body filling ~70 % of the grid's extent, a lesion of radius ~1.3 voxels off-centre."""
        extent_xyz = [grid.spacing_zyx[2 - a] * grid.shape_zyx[2 - a] for a in range(3)]
        center = grid.center_xyz()
        lesion = tuple(c + 0.15 * e for c, e in zip(center, extent_xyz))
        return cls(center, tuple(0.35 * e for e in extent_xyz), lesion, 1.3 * max(grid.spacing_zyx), seed)

    def _ellipsoid(self, grid: Grid, center_xyz, radii_xyz) -> np.ndarray:
        z, y, x = grid.coordinates_zyx()
        cx, cy, cz = center_xyz
        rx, ry, rz = radii_xyz
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0

    def body(self, grid: Grid) -> np.ndarray:
        return self._ellipsoid(grid, self.center_xyz, self.body_radii_xyz)

    def label(self, grid: Grid) -> np.ndarray:
        r = self.lesion_radius_mm
        return (self._ellipsoid(grid, self.lesion_center_xyz, (r, r, r)) & self.body(grid)).astype(np.uint8)

    def ct(self, grid: Grid) -> np.ndarray:
        return np.where(self.body(grid), 40.0, -1000.0).astype(np.float32)

    def pet(self, grid: Grid) -> np.ndarray:
        noise = np.random.default_rng(self.seed).uniform(-0.1, 0.1, grid.shape_zyx)
        pet = np.where(self.body(grid), 1.0 + noise, 0.0)
        pet[self.label(grid) > 0] = 8.0
        return pet.astype(np.float32)


def write_volume(path: str | Path, array: np.ndarray, grid: Grid | None = None) -> Path:
    """Write ``array`` (z, y, x) with ``grid``'s geometry (default: unit spacing, zero origin)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    if grid is not None:
        image.SetSpacing(tuple(float(s) for s in grid.spacing_zyx[::-1]))
        image.SetOrigin(tuple(float(o) for o in grid.origin_xyz))
    sitk.WriteImage(image, str(path), useCompression=path.name.lower().endswith((".gz", ".mha", ".nrrd")))
    return path


def write_case(
    pet_path: str | Path | None,
    ct_path: str | Path | None,
    label_path: str | Path | None = None,
    grid: Grid = Grid(),
    ct_grid: Grid | None = None,
    label_grid: Grid | None = None,
    seed: int = 0,
) -> Phantom:
    """Write one case's files (``None`` skips that file); CT/label on their own grids when given."""
    phantom = Phantom.for_grid(grid, seed)
    if pet_path is not None:
        write_volume(pet_path, phantom.pet(grid), grid)
    if ct_path is not None:
        write_volume(ct_path, phantom.ct(ct_grid or grid), ct_grid or grid)
    if label_path is not None:
        write_volume(label_path, phantom.label(label_grid or grid), label_grid or grid)
    return phantom


def write_flat_case(folder: str | Path, case_id: str, pet_ext: str = ".nii.gz", ct_ext: str = ".nii.gz",
                    seg_ext: str | None = ".nii.gz", suffixes: tuple[str, str, str] = ("_pet", "_ct", "_seg"),
                    **case_kwargs) -> dict[str, Path]:
    """``<case>_pet/_ct/_seg<ext>`` in ``folder``; ``seg_ext=None`` writes no label. Returns role → path."""
    folder = Path(folder)
    paths = {"pet": folder / f"{case_id}{suffixes[0]}{pet_ext}", "ct": folder / f"{case_id}{suffixes[1]}{ct_ext}"}
    if seg_ext is not None:
        paths["label"] = folder / f"{case_id}{suffixes[2]}{seg_ext}"
    write_case(paths["pet"], paths["ct"], paths.get("label"), **case_kwargs)
    return paths


def write_autopet_case(folder: str | Path, patient: str, study: str | None = None, ct_name: str = "CTres.nii.gz",
                       with_label: bool = True, **case_kwargs) -> dict[str, Path]:
    """``<patient>[/<study>]/SUV.nii.gz``, ``<ct_name>``, ``SEG.nii.gz``. Returns role → path."""
    case_dir = Path(folder) / patient / (study or "")
    paths = {"pet": case_dir / "SUV.nii.gz", "ct": case_dir / ct_name}
    if with_label:
        paths["label"] = case_dir / "SEG.nii.gz"
    write_case(paths["pet"], paths["ct"], paths.get("label"), **case_kwargs)
    return paths


def write_nnunet_case(folder: str | Path, case_id: str, channel_index: dict[str, int] | None = None,
                      subset: str = "Tr", with_label: bool = True, file_ending: str = ".nii.gz",
                      **case_kwargs) -> dict[str, Path]:
    """``images<subset>/<case>_XXXX<ending>`` with PET/CT at ``channel_index`` (default CT 0, PET 1)
    and ``labels<subset>/<case><ending>``. Returns role → path."""
    folder = Path(folder)
    index = channel_index or {"CT": 0, "PET": 1}
    paths = {
        "pet": folder / f"images{subset}" / f"{case_id}_{index['PET']:04d}{file_ending}",
        "ct": folder / f"images{subset}" / f"{case_id}_{index['CT']:04d}{file_ending}",
    }
    if with_label:
        paths["label"] = folder / f"labels{subset}" / f"{case_id}{file_ending}"
    write_case(paths["pet"], paths["ct"], paths.get("label"), **case_kwargs)
    return paths


def write_dataset_json(folder: str | Path, channel_names: dict[str, str], file_ending: str = ".nii.gz",
                       num_training: int = 0) -> Path:
    """A minimal nnU-Net v2 ``dataset.json``."""
    path = Path(folder) / "dataset.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"channel_names": channel_names, "labels": {"background": 0, "lesion": 1},
                                "numTraining": num_training, "file_ending": file_ending}, indent=2))
    return path


# ----------------------------------------------------------------------------- real data


def shared_dir() -> Path | None:
    """``$AUTOPETSEG_SHARED`` or ``<repo>/../shared``; ``None`` when neither exists."""
    env = os.environ.get("AUTOPETSEG_SHARED")
    candidate = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    return candidate if candidate.is_dir() else None


def mirp_dir() -> Path | None:
    """The cropped MIRP soft-tissue-sarcoma cases (real FDG PET in SUV + CT), or ``None``."""
    shared = shared_dir()
    path = shared / "realdata" / "mirp_sts" / "cropped" if shared else None
    return path if path is not None and all((path / c / "PET" / "image.nii.gz").is_file() for c in MIRP_CASES) else None


def link_mirp_cases(tmp_path: str | Path) -> Path:
    """Symlink the three MIRP cases into ``tmp_path/mirp_flat`` as a flat-layout folder and return it.

    ``PET/image`` → ``<case>_pet.nii.gz``, ``CT/image`` → ``<case>_ct.nii.gz`` (CT on its own, finer
    grid), ``PET/mask`` → ``<case>_seg.nii.gz`` (the tumour on the PET grid). Skips the calling test
    when the shared data is absent.
    """
    import pytest

    source = mirp_dir()
    if source is None:
        pytest.skip("real MIRP data not found: set AUTOPETSEG_SHARED or put shared/realdata beside the repository")
    out = Path(tmp_path) / "mirp_flat"
    out.mkdir(parents=True, exist_ok=True)
    for case in MIRP_CASES:
        for target, name in ((source / case / "PET" / "image.nii.gz", f"{case}_pet.nii.gz"),
                             (source / case / "CT" / "image.nii.gz", f"{case}_ct.nii.gz"),
                             (source / case / "PET" / "mask.nii.gz", f"{case}_seg.nii.gz")):
            link = out / name
            if not link.exists():
                link.symlink_to(target)
    return out


def read(path) -> np.ndarray:
    """The voxels of an image file, (z, y, x)."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def csv_rows(path: Path) -> dict[str, dict]:
    """The rows of a ``predictions.csv``-like file by case id."""
    with open(path, newline="") as f:
        return {r["case_id"]: r for r in csv.DictReader(f)}
