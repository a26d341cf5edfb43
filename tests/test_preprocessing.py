"""Preprocessing into the cache and inversion back onto the PET grid.

Phantoms are tiny analytic PET/CT volumes (an ellipsoid body in air, spherical lesions) written
as NIfTI, so every expected number comes from the phantom's definition, not from the code under test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from _image_helpers import Grid, link_mirp_cases, write_flat_case
from autopetseg.data.discovery import discover
from autopetseg.data.imageio import Geometry, write_image
from autopetseg.data.records import CaseRecord, Dataset
from autopetseg.errors import InputError
from autopetseg.planning.plans import (
    ComputeBudget,
    ConfigurationPlan,
    NetworkTopology,
    NormalizationPlan,
    Plans,
)
from autopetseg.preprocessing import (
    LabelResampling,
    PreprocessingSettings,
    invert_probabilities,
    invert_to_original,
    load_preprocessed,
    preprocess_case,
    preprocess_dataset,
    preprocess_for_inference,
)
from autopetseg.data.loading import load_case
from autopetseg.data.body import BodyMaskSettings, body_bbox, body_mask, union_bbox
from autopetseg.data import cropping
from autopetseg.data.cropping import crop_case, read_cropped, save_cropped
from autopetseg.preprocessing.foreground import ForegroundSampling, sample_foreground
from autopetseg.preprocessing.preprocessor import normalize_ct

BODY_SUV = 2.0
LESION_SUV = 9.0
BODY_HU = 40.0
BONE_HU = 1500.0


# --------------------------------------------------------------------------- helpers


def make_plans(spacing_zyx, pet_clip_suv=None, data_identifier="3d_fullres") -> Plans:
    network = NetworkTopology(features_per_stage=[8, 16], strides=[[1, 1, 1], [2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 2)
    conf = ConfigurationPlan(name="3d_fullres", data_identifier=data_identifier, spacing_zyx=list(spacing_zyx),
                             patch_size=[16, 16, 16], batch_size=2, network=network)
    return Plans(dataset="Dataset999_Test", budget=ComputeBudget(device="cpu"), target_spacing_zyx=list(spacing_zyx),
                 normalization=NormalizationPlan(ct_clip_hu=(-1024.0, 1024.0), pet_clip_suv=pet_clip_suv),
                 configurations={"3d_fullres": conf})


@dataclass
class Phantom:
    record: CaseRecord
    geometry: Geometry
    body: np.ndarray  # bool, PET grid
    label: np.ndarray  # uint8, PET grid


def make_phantom(folder: Path, case_id: str, spacing_zyx=(4.0, 4.0, 4.0), shape_zyx=(28, 36, 36),
                 lesions=(((0.0, -12.0, 10.0), 14.0), ((20.0, 16.0, -14.0), 9.0)), single_voxel_lesion=True,
                 with_label=True, origin_xyz=(-70.0, -70.0, -50.0)) -> Phantom:
    """Ellipsoid body (semi-axes 60 % of the field of view) in air; lesions are spheres given in mm
    from the body centre; a bone slab shows CT clipping; optionally a one-voxel lesion."""
    spacing = np.asarray(spacing_zyx, dtype=float)
    centre = (np.asarray(shape_zyx) - 1) / 2.0
    axes = [(np.arange(n) - c) * s for n, c, s in zip(shape_zyx, centre, spacing)]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    half = np.asarray(shape_zyx) * spacing / 2.0
    body = (zz / (0.6 * half[0])) ** 2 + (yy / (0.6 * half[1])) ** 2 + (xx / (0.6 * half[2])) ** 2 <= 1.0
    label = np.zeros(shape_zyx, dtype=np.uint8)
    for (cz, cy, cx), radius in lesions:
        label[(zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1
    if single_voxel_lesion:
        z, y, x = (int(round(c)) for c in centre)
        label[z, y + 6, x - 6] = 1  # isolated: the spheres lie elsewhere
    label &= body
    pet = np.where(body, BODY_SUV, 0.0).astype(np.float32)
    pet[label > 0] = LESION_SUV
    ct = np.where(body, BODY_HU, -1024.0).astype(np.float32)
    ct[body & (np.abs(xx) < 6) & (yy > 0.3 * half[1])] = BONE_HU  # a "spine" above the clip range
    geometry = Geometry(tuple(shape_zyx), tuple(float(s) for s in spacing), tuple(origin_xyz), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{case_id}_{name}.nii.gz" for name in ("pet", "ct", "seg")}
    write_image(paths["pet"], pet, geometry)
    write_image(paths["ct"], ct, geometry)
    if with_label:
        write_image(paths["seg"], label, geometry)
    record = CaseRecord(case_id, paths["pet"], paths["ct"], paths["seg"] if with_label else None, cohort="phantom")
    return Phantom(record, geometry, body, label)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_same_spacing_round_trip_is_exact(tmp_path, mode):
    phantom = make_phantom(tmp_path, "c0")
    settings = PreprocessingSettings(label_resampling=LabelResampling(mode))
    props = preprocess_case(phantom.record, make_plans((4.0, 4.0, 4.0)), "3d_fullres", tmp_path / "out", settings=settings)
    data, seg, fg, stored = load_preprocessed(tmp_path / "out", "c0")
    assert stored == props
    assert tuple(props["shape_after_resample_zyx"]) == tuple(props["shape_after_crop_zyx"]) == seg.shape

    back = invert_to_original(np.asarray(seg), props, order="nearest")
    assert back.shape == phantom.geometry.shape_zyx and back.dtype == np.uint8
    np.testing.assert_array_equal(back, phantom.label)
    # The PET channel comes back exactly too (inside the box; fill outside, where PET is 0 anyway).
    pet_back = invert_to_original(np.asarray(data[0]), props, order="linear")
    pet = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom.record.pet)))
    np.testing.assert_array_equal(pet_back, pet)


@pytest.mark.parametrize("pet_spacing", [(4.0, 4.0, 4.0), (3.0, 4.0, 4.0)])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resampled_round_trip_recovers_the_label(tmp_path, pet_spacing, mode):
    phantom = make_phantom(tmp_path, "c1", spacing_zyx=pet_spacing)
    settings = PreprocessingSettings(label_resampling=LabelResampling(mode))
    props = preprocess_case(phantom.record, make_plans((2.0, 2.0, 2.0)), "3d_fullres", tmp_path / "out", settings=settings)
    _, seg, _, _ = load_preprocessed(tmp_path / "out", "c1")
    crop = np.asarray(props["shape_after_crop_zyx"])
    expected_shape = np.round(crop * np.asarray(pet_spacing) / 2.0).astype(int)
    assert list(seg.shape) == list(expected_shape) == props["shape_after_resample_zyx"]

    back = invert_to_original(np.asarray(seg), props, order="nearest")
    assert back.shape == phantom.geometry.shape_zyx
    assert dice(back, phantom.label) > 0.95
    # The cache grid sits where it should in physical space: it starts at the crop's first voxel
    # face plus half a 2 mm voxel (identity direction), so lesion centroids in mm agree.
    spacing = np.asarray(pet_spacing)
    origin_zyx = np.asarray(phantom.geometry.origin_xyz[::-1])
    crop_face = origin_zyx + (np.asarray(props["bbox_zyx"])[:, 0] - 0.5) * spacing
    centroid_cache = crop_face + (np.argwhere(np.asarray(seg)).mean(axis=0) + 0.5) * 2.0
    centroid_pet = origin_zyx + np.argwhere(phantom.label).mean(axis=0) * spacing
    np.testing.assert_allclose(centroid_cache, centroid_pet, atol=0.5)  # a shifted grid is off by ≥ 1 mm
    # Lesion volume in ml is kept through the resampling (nearest exactly on these grids).
    volume_ratio = seg.sum() * 8.0 / (phantom.label.sum() * np.prod(pet_spacing))
    assert volume_ratio == pytest.approx(1.0, abs=0.02 if mode == "nearest" else 0.08)
    # The one-voxel lesion survives either way.
    lesions, n = ndimage.label(np.asarray(seg), structure=np.ones((3, 3, 3)))
    assert n == ndimage.label(phantom.label, structure=np.ones((3, 3, 3)))[1] == 3


def test_inverted_probabilities_are_linear_and_filled(tmp_path):
    phantom = make_phantom(tmp_path, "c2", spacing_zyx=(3.0, 4.0, 4.0))
    props = preprocess_case(phantom.record, make_plans((2.0, 2.0, 2.0)), "3d_fullres", tmp_path / "out")
    _, seg, _, _ = load_preprocessed(tmp_path / "out", "c2")
    lesion = np.asarray(seg, dtype=np.float32)
    probs = np.stack([1.0 - lesion, lesion])
    back = invert_probabilities(probs, props, fill=(1.0, 0.0))
    assert back.shape == (2, *phantom.geometry.shape_zyx) and back.dtype == np.float32
    np.testing.assert_allclose(back.sum(axis=0), 1.0, atol=1e-5)  # linear keeps the partition of unity
    (z0, z1), (y0, y1), (x0, x1) = props["bbox_zyx"]
    outside = np.ones(phantom.geometry.shape_zyx, dtype=bool)
    outside[z0:z1, y0:y1, x0:x1] = False
    assert outside.any() and (back[0][outside] == 1.0).all() and (back[1][outside] == 0.0).all()
    assert dice(back[1] >= 0.5, phantom.label) > 0.95
    with pytest.raises(ValueError, match="cache shape"):
        invert_to_original(lesion[:-1], props)


# --------------------------------------------------------------------------- crop and intensities


def test_crop_removes_the_air_around_the_body(tmp_path):
    phantom = make_phantom(tmp_path, "c3", single_voxel_lesion=False)
    props = preprocess_case(phantom.record, make_plans((4.0, 4.0, 4.0)), "3d_fullres", tmp_path / "out")
    body_box = [[int(i.min()), int(i.max()) + 1] for i in np.nonzero(phantom.body)]
    for (a, b), (body_a, body_b) in zip(props["bbox_zyx"], body_box):
        assert a <= body_a and b >= body_b  # the whole body is kept ...
        assert body_a - a <= 2 and b - body_b <= 2  # ... and little more
    kept = np.prod(props["shape_after_crop_zyx"]) / np.prod(phantom.geometry.shape_zyx)
    assert kept < 0.35  # the ellipsoid's box is 0.6³ ≈ 0.22 of the field of view


def test_ct_normalisation_maps_the_clip_range_to_unit_interval(tmp_path):
    hu = np.array([-3000.0, -1024.0, -512.0, 0.0, 1024.0, 3000.0], dtype=np.float32)
    np.testing.assert_allclose(normalize_ct(hu, NormalizationPlan((-1024.0, 1024.0))),
                               [0.0, 0.0, 0.25, 0.5, 1.0, 1.0], atol=1e-7)
    phantom = make_phantom(tmp_path, "c4", single_voxel_lesion=False)
    preprocess_case(phantom.record, make_plans((4.0, 4.0, 4.0)), "3d_fullres", tmp_path / "out")
    data, _, _, props = load_preprocessed(tmp_path / "out", "c4")
    ct = np.asarray(data[1])
    assert ct.min() == 0.0 and ct.max() == 1.0  # air → 0, bone (1500 HU) clipped → 1
    soft_tissue = (BODY_HU + 1024.0) / 2048.0
    assert np.isclose(ct, soft_tissue, atol=1e-6).mean() > 0.3


def test_pet_suv_is_preserved_and_optionally_clipped(tmp_path):
    phantom = make_phantom(tmp_path, "c5", spacing_zyx=(3.0, 4.0, 4.0), single_voxel_lesion=False)
    props = preprocess_case(phantom.record, make_plans((2.0, 2.0, 2.0)), "3d_fullres", tmp_path / "out")
    data, seg, _, _ = load_preprocessed(tmp_path / "out", "c5")
    pet = np.asarray(data[0])
    # Deep inside the body and away from lesions the SUV is uniform: its mean must not move.
    interior = ndimage.binary_erosion(np.asarray(pet) > 0.5 * BODY_SUV, iterations=3)
    interior &= ~ndimage.binary_dilation(np.asarray(seg, dtype=bool), iterations=3)
    assert interior.sum() > 1000
    assert pet[interior].mean() == pytest.approx(BODY_SUV, rel=0.01)
    assert pet.max() == pytest.approx(LESION_SUV, rel=1e-5)

    clipped_props = preprocess_case(phantom.record, make_plans((2.0, 2.0, 2.0), pet_clip_suv=5.0), "3d_fullres",
                                    tmp_path / "clipped")
    clipped, _, _, _ = load_preprocessed(tmp_path / "clipped", "c5")
    assert float(np.max(clipped[0])) == pytest.approx(5.0)
    assert clipped_props["preprocessing"]["pet_clip_suv"] == 5.0
    assert props["preprocessing"]["pet_clip_suv"] is None


def test_inference_preprocessing_matches_the_cache(tmp_path):
    phantom = make_phantom(tmp_path, "c6", spacing_zyx=(3.0, 4.0, 4.0))
    plans = make_plans((2.0, 2.0, 2.0))
    props = preprocess_case(phantom.record, plans, "3d_fullres", tmp_path / "out")
    cached, _, _, _ = load_preprocessed(tmp_path / "out", "c6", mmap=False)
    unlabelled = CaseRecord("c6", phantom.record.pet, phantom.record.ct, label=None)
    data, inference_props = preprocess_for_inference(unlabelled, plans, "3d_fullres")
    np.testing.assert_array_equal(data, cached)
    for key in ("geometry", "bbox_zyx", "shape_after_crop_zyx", "shape_after_resample_zyx", "spacing_zyx"):
        assert inference_props[key] == props[key]
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind


# --------------------------------------------------------------------------- lesion locations


def test_foreground_locations_cover_every_lesion(tmp_path):
    phantom = make_phantom(tmp_path, "c7", spacing_zyx=(3.0, 4.0, 4.0))
    props = preprocess_case(phantom.record, make_plans((2.0, 2.0, 2.0)), "3d_fullres", tmp_path / "out", seed=3)
    _, seg, fg, _ = load_preprocessed(tmp_path / "out", "c7")
    seg = np.asarray(seg)
    assert fg.dtype == np.int32 and fg.shape[1] == 3 and 0 < len(fg) <= 10_000
    assert (seg[tuple(fg.T)] == 1).all()
    assert len(np.unique(fg, axis=0)) == len(fg)
    components, n = ndimage.label(seg, structure=ndimage.generate_binary_structure(3, 2))
    assert props["n_lesions"] == n == 3 and props["n_lesion_voxels"] == int(seg.sum())
    assert set(np.unique(components[tuple(fg.T)])) == set(range(1, n + 1))
    # All lesion voxels fit the budget here, so every one is listed.
    assert len(fg) == seg.sum() == props["n_fg_samples"]

    # A tight budget is shared out: the one-voxel lesion still gets its voxel, the big ones the rest.
    small_budget = ForegroundSampling(max_samples=41)
    picked, n_small = sample_foreground(seg, np.random.default_rng(0), small_budget)
    labels = components[tuple(picked.T)]
    counts = np.bincount(labels, minlength=n + 1)[1:]
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
    assert len(picked) == 41 and n_small == 3
    smallest = int(np.argmin(sizes))
    assert sizes[smallest] < 41 // 3 and counts[smallest] == sizes[smallest]  # all of the small one
    big = np.delete(counts, smallest)
    assert big.sum() == 41 - sizes[smallest] and abs(int(big[0]) - int(big[1])) <= 1  # the rest shared evenly
    again, _ = sample_foreground(seg, np.random.default_rng(0), small_budget)
    np.testing.assert_array_equal(picked, again)


def test_unlabelled_case_gets_an_empty_mask(tmp_path):
    phantom = make_phantom(tmp_path, "c8", with_label=False)
    props = preprocess_case(phantom.record, make_plans((4.0, 4.0, 4.0)), "3d_fullres", tmp_path / "out")
    _, seg, fg, _ = load_preprocessed(tmp_path / "out", "c8")
    assert props["has_label"] is False and props["n_lesion_voxels"] == 0
    assert seg.dtype == np.uint8 and not np.asarray(seg).any() and fg.shape == (0, 3)


# --------------------------------------------------------------------------- whole datasets


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_interrupted_preprocessing_resumes(tmp_path):
    cases = [make_phantom(tmp_path / "raw", f"case{i}", shape_zyx=(16, 20, 20), single_voxel_lesion=False,
                         lesions=(((0.0, 0.0, 0.0), 9.0),)).record for i in range(3)]
    dataset = Dataset(tmp_path / "raw", "flat", cases)
    plans = make_plans((4.0, 4.0, 4.0))
    out = tmp_path / "pre"
    assert preprocess_dataset(dataset, plans, out) == []
    folder = out / "3d_fullres"
    assert sorted(p.name for p in folder.glob("*.json")) == ["case0.json", "case1.json", "case2.json"]

    # Pretend everything was written long ago, then "interrupt" case1: its json gone, a temp file left.
    old = 1_000_000_000
    for path in folder.iterdir():
        os.utime(path, ns=(old, old))
    (folder / "case1.json").unlink()
    stray = folder / ".case1_seg.npy.abc123.npy"
    stray.write_bytes(b"half a file")
    assert preprocess_dataset(dataset, plans, out) == []
    after = _mtimes(folder)
    assert not stray.exists()
    assert {name for name, t in after.items() if t != old} == {"case1.npy", "case1_seg.npy", "case1_fg.npy", "case1.json"}

    # Changed settings (a PET clip) make every case stale; so does overwrite=True.
    for rerun in ({"plans": make_plans((4.0, 4.0, 4.0), pet_clip_suv=5.0)}, {"plans": plans, "overwrite": True}):
        for path in folder.iterdir():
            os.utime(path, ns=(old, old))
        assert preprocess_dataset(dataset, rerun["plans"], out, overwrite=rerun.get("overwrite", False)) == []
        times = _mtimes(folder)
        assert len(times) == 12 and all(t != old for t in times.values())


def test_bad_case_is_reported_and_the_good_ones_are_written(tmp_path):
    good = [make_phantom(tmp_path / "raw", f"good{i}", shape_zyx=(16, 20, 20), single_voxel_lesion=False,
                         lesions=(((0.0, 0.0, 0.0), 9.0),)).record for i in range(2)]
    bad = make_phantom(tmp_path / "raw", "bad", shape_zyx=(16, 20, 20), single_voxel_lesion=False).record
    bad.pet.write_bytes(bad.pet.read_bytes()[:100])  # truncated download
    dataset = Dataset(tmp_path / "raw", "flat", [good[0], bad, good[1]])
    failures = preprocess_dataset(dataset, make_plans((4.0, 4.0, 4.0)), tmp_path / "pre", num_processes=2)
    assert len(failures) == 1 and isinstance(failures[0], InputError)
    assert failures[0].case == "bad" and "PET" in failures[0].reason
    folder = tmp_path / "pre" / "3d_fullres"
    assert sorted(p.name for p in folder.glob("*.json")) == ["good0.json", "good1.json"]
    assert not list(folder.glob("bad*")) and not list(folder.glob(".*"))


# --------------------------------------------------------------------------- real data


def test_real_cases_round_trip_in_the_pet_geometry(tmp_path):
    dataset = discover(link_mirp_cases(tmp_path))  # skips when /work/shared is absent
    assert [c.case_id for c in dataset.cases] == ["STS_001", "STS_002", "STS_003"]
    out = tmp_path / "pre"
    assert preprocess_dataset(dataset, make_plans((2.0, 2.0, 2.0)), out) == []
    for record in dataset.cases:
        _, seg, fg, props = load_preprocessed(out / "3d_fullres", record.case_id)
        assert props["spacing_zyx"] == [2.0, 2.0, 2.0] and len(fg) > 0
        mask = invert_to_original(np.asarray(seg), props, order="nearest")
        reference = sitk.ReadImage(str(record.label))
        predicted = sitk.GetImageFromArray(mask)
        predicted.CopyInformation(reference)  # fails unless the shape is the PET's
        assert Geometry.of(predicted) == Geometry.from_dict(props["geometry"]) == Geometry.of(reference)
        assert Geometry.of(reference).same_grid(Geometry.of(sitk.ReadImage(str(record.pet))))
        assert dice(mask, sitk.GetArrayFromImage(reference)) >= 0.9


# --------------------------------------------------------------------------- the cropped stage


@pytest.mark.parametrize("ct_on_its_own_grid", [False, True])
def test_crop_equals_cropping_the_whole_grid_case(tmp_path, ct_on_its_own_grid):
    """``crop_case`` resamples the CT onto part of the PET grid only; box, body and arrays are those
    of the whole-grid case cut to the box (body ∪ lesions)."""
    grid = Grid((20, 24, 22), (4.0, 3.0, 3.0), (5.0, -7.0, 2.0))
    ct_grid = grid.finer(2).shifted(dx_mm=0.6, dz_mm=-0.9) if ct_on_its_own_grid else None
    paths = write_flat_case(tmp_path, "c", grid=grid, ct_grid=ct_grid)
    record = CaseRecord("c", paths["pet"], paths["ct"], paths["label"])
    # Coarse blocks of 4 voxels: the mask reaches past the tissue region loading resampled.
    settings = BodyMaskSettings(max_coarse_voxels=200)
    cropped = crop_case(load_case(record), settings)

    whole = load_case(record)
    mask = body_mask(whole.ct, whole.pet, settings)
    box = union_bbox(body_bbox(mask), body_bbox(whole.label))
    assert cropped.bbox_zyx == box
    assert cropped.pet.shape != grid.shape_zyx  # a part of the grid, not all of it
    inside = tuple(slice(a, b) for a, b in box)
    np.testing.assert_array_equal(cropped.body, mask[inside])
    assert cropped.body_voxels == int(mask.sum())
    np.testing.assert_array_equal(cropped.pet, whole.pet[inside])
    np.testing.assert_array_equal(cropped.label, whole.label[inside])
    np.testing.assert_allclose(cropped.ct, whole.ct[inside], atol=1e-3)
    assert cropped.crop_geometry.shape_zyx == cropped.pet.shape


def test_cropped_stage_round_trip_and_staleness(tmp_path):
    phantom = make_phantom(tmp_path / "raw", "c9", spacing_zyx=(3.0, 4.0, 4.0))
    record = phantom.record
    settings = BodyMaskSettings()
    case = crop_case(load_case(record), settings)
    folder = tmp_path / "cropped"
    save_cropped(folder, record, case, settings)
    assert sorted(p.name for p in folder.iterdir()) == ["c9.json", "c9.npy", "c9_body.npy", "c9_seg.npy"]
    back = read_cropped(folder, record, settings)
    assert back.bbox_zyx == case.bbox_zyx and back.geometry == case.geometry
    for name in ("pet", "ct", "label", "body"):
        np.testing.assert_array_equal(getattr(back, name), getattr(case, name))
    assert read_cropped(folder, record, settings, with_label=False).label is None
    # Other body-mask settings, a source file changed since, or no entry: not used.
    assert read_cropped(folder, record, BodyMaskSettings(ct_body_hu=-400.0)) is None
    assert read_cropped(tmp_path / "elsewhere", record, settings) is None
    stat = record.pet.stat()
    os.utime(record.pet, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert read_cropped(folder, record, settings) is None


def test_preprocessing_from_the_cropped_stage_never_reads_the_raw_files(tmp_path, monkeypatch):
    phantom = make_phantom(tmp_path / "raw", "c10", spacing_zyx=(3.0, 4.0, 4.0))
    plans = make_plans((2.0, 2.0, 2.0))
    from_raw = preprocess_case(phantom.record, plans, "3d_fullres", tmp_path / "raw_out")
    save_cropped(tmp_path / "cropped", phantom.record, crop_case(load_case(phantom.record)), BodyMaskSettings())

    def no_raw_reading(*args, **kwargs):
        raise AssertionError("the raw files were read")

    monkeypatch.setattr(cropping, "load_case", no_raw_reading)
    from_cropped = preprocess_case(phantom.record, plans, "3d_fullres", tmp_path / "out", cropped_dir=tmp_path / "cropped")
    assert from_cropped == from_raw
    for a, b in zip(load_preprocessed(tmp_path / "raw_out", "c10", mmap=False)[:3],
                    load_preprocessed(tmp_path / "out", "c10", mmap=False)[:3]):
        np.testing.assert_array_equal(a, b)
    # Without an entry for the case it falls back to the raw files (here: refused by the patch).
    with pytest.raises(AssertionError, match="raw files were read"):
        preprocess_case(phantom.record, plans, "3d_fullres", tmp_path / "out", cropped_dir=tmp_path / "none")
