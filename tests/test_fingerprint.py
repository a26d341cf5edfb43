"""The dataset fingerprint: every number is compared with one this test computes from the arrays
it wrote (no phantom generator or code under test in between).

The cases are drawn voxel by voxel: a body block whose 12 edges are cut away (so that its outline
is already "open" and the body cleanup keeps it exactly), an air pocket inside it (a lung, which
the body must include), a one-voxel scanner table beside it (which the body must not include),
and lesions placed so that 18-connectivity (the autoPET rule) decides their count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from _image_helpers import Grid, write_volume
from autopetseg.data.discovery import discover
from autopetseg.errors import InputError
from autopetseg.data.body import BodyMaskSettings, body_bbox, body_mask, body_mask_in_region
from autopetseg.planning.fingerprint import Fingerprint, extract_fingerprint

BIG_BUDGET = 100_000  # more samples per case than any case has voxels: every voxel is used


@dataclass
class DrawnCase:
    case_id: str
    grid: Grid
    pet: np.ndarray
    ct: np.ndarray
    body: np.ndarray  # what the test calls body: block without edges + lung pocket
    label: np.ndarray | None
    lesions: list[np.ndarray]  # one boolean mask per expected connected lesion


def _block(shape, z, y, x) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return mask


def _block_without_edges(shape, z, y, x) -> np.ndarray:
    """The block minus the voxels on its 12 edges (where two faces meet)."""
    mask = _block(shape, z, y, x)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    on_face = [(zz == z[0]) | (zz == z[1] - 1), (yy == y[0]) | (yy == y[1] - 1), (xx == x[0]) | (xx == x[1] - 1)]
    on_edge = (on_face[0] & on_face[1]) | (on_face[0] & on_face[2]) | (on_face[1] & on_face[2])
    return mask & ~on_edge


def draw_case(case_id: str, grid: Grid, seed: int, lesions: bool | None) -> DrawnCase:
    """``lesions``: True = the three lesions below, False = an empty label, None = no label file."""
    shape = grid.shape_zyx
    rng = np.random.default_rng(seed)
    body_box = ((1, shape[0] - 1), (2, shape[1] - 3), (1, shape[2] - 1))
    tissue = _block_without_edges(shape, *body_box)
    # Enclosed in every axial slice it is in, by walls of 3 voxels or more (the cleanup's opening
    # removes thinner ones, as it removes the table).
    lung = _block(shape, (4, 7), (7, 10), (7, 10))
    table = _block(shape, (0, shape[0]), (shape[1] - 1, shape[1]), (0, shape[2]))  # 1 voxel thick

    ct = np.full(shape, -1000.0, dtype=np.float32)
    ct[tissue] = rng.uniform(-100.0, 300.0, int(tissue.sum()))
    ct[lung] = rng.uniform(-950.0, -850.0, int(lung.sum()))
    ct[table] = 200.0
    pet = np.zeros(shape, dtype=np.float32)
    pet[tissue] = rng.uniform(0.5, 2.5, int(tissue.sum()))
    pet[lung] = 0.3

    label = None
    components: list[np.ndarray] = []
    if lesions is not None:
        label = np.zeros(shape, dtype=np.uint8)
    if lesions:
        cube = _block(shape, (3, 5), (4, 6), (3, 5))  # 8 voxels
        edge = _block(shape, (5, 6), (6, 7), (4, 5))  # shares an edge with the cube: same lesion
        corner = _block(shape, (2, 3), (3, 4), (2, 3))  # shares only a corner: its own lesion
        slab = _block(shape, (6, 8), (4, 7), (8, 11))  # 18 voxels, far away
        components = [cube | edge, corner, slab]
        for comp in components:
            label[comp] = 1
            pet[comp] = rng.uniform(4.0, 15.0, int(comp.sum()))
    body = tissue | lung
    return DrawnCase(case_id, grid, pet, ct, body, label, components)


def write_flat(folder: Path, case: DrawnCase) -> None:
    write_volume(folder / f"{case.case_id}_pet.nii.gz", case.pet, case.grid)
    write_volume(folder / f"{case.case_id}_ct.nii.gz", case.ct, case.grid)
    if case.label is not None:
        write_volume(folder / f"{case.case_id}_seg.nii.gz", case.label, case.grid)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> tuple[Path, list[DrawnCase]]:
    """Three good cases (lesions / lesion-free / unlabelled) on different grids and one with a NaN."""
    folder = tmp_path_factory.mktemp("fp") / "Dataset010_Drawn"
    cases = [
        draw_case("a", Grid((12, 16, 16), (3.0, 2.0, 2.5), (10.0, -5.0, 3.0)), seed=1, lesions=True),
        draw_case("b", Grid((10, 16, 18), (4.0, 2.5, 2.0)), seed=2, lesions=False),
        draw_case("c", Grid((14, 18, 16), (2.0, 3.0, 3.0)), seed=3, lesions=None),
    ]
    for case in cases:
        write_flat(folder, case)
    bad = draw_case("d", Grid((12, 16, 16), (3.0, 2.0, 2.5)), seed=4, lesions=True)
    bad.pet[6, 8, 8] = np.nan
    write_flat(folder, bad)
    return folder, cases


@pytest.fixture(scope="module")
def exact(drawn) -> tuple[Fingerprint, list[InputError]]:
    folder, _ = drawn
    return extract_fingerprint(discover(folder), num_processes=1, samples_per_case=BIG_BUDGET)


def _box(mask: np.ndarray) -> list[list[int]]:
    idx = np.nonzero(mask)
    return [[int(i.min()), int(i.max()) + 1] for i in idx]


# --------------------------------------------------------------------------- per case


def test_geometry_and_body_box_per_case(drawn, exact):
    _, cases = drawn
    fp, _ = exact
    assert fp.case_ids() == ["a", "b", "c"]
    for case, got in zip(cases, fp.cases):
        assert got.spacing_zyx == pytest.approx(case.grid.spacing_zyx, rel=1e-6)
        assert got.shape_zyx == list(case.grid.shape_zyx)
        assert got.bbox_zyx == _box(case.body), case.case_id  # table left out, lung inside
        assert got.shape_after_crop_zyx == [hi - lo for lo, hi in _box(case.body)]
        assert got.body_voxels == int(case.body.sum())
    assert fp.median_spacing_zyx == pytest.approx([3.0, 2.5, 2.5])
    assert fp.median_shape_zyx == pytest.approx([12, 16, 16])


def test_lesions_per_case_with_18_connectivity(drawn, exact):
    _, cases = drawn
    fp, _ = exact
    a = cases[0]
    voxel_ml = float(np.prod(a.grid.spacing_zyx)) / 1000.0
    expected = sorted(
        (int(m.sum()), int(m.sum()) * voxel_ml, float(a.pet[m].max()), float(a.pet[m].astype(np.float64).mean()))
        for m in a.lesions
    )
    got = sorted((les.n_voxels, les.volume_ml, les.suv_max, les.suv_mean) for les in fp.cases[0].lesions)
    assert [g[0] for g in got] == [1, 9, 18]  # the edge-touching voxel joins the cube, the corner one does not
    for g, e in zip(got, expected):
        assert g[0] == e[0]
        assert g[1] == pytest.approx(e[1], rel=1e-9)
        assert g[2] == pytest.approx(e[2], rel=1e-6)
        assert g[3] == pytest.approx(e[3], rel=1e-6)
    assert fp.cases[1].lesions == []  # labelled, lesion-free
    assert fp.cases[2].lesions is None  # no label


def test_dataset_lesion_summary(drawn, exact):
    _, cases = drawn
    fp, _ = exact
    s = fp.lesions
    assert (s.n_labelled_cases, s.n_lesion_free_cases, s.n_lesions_total) == (2, 1, 3)
    assert s.lesion_free_fraction == pytest.approx(0.5)  # the unlabelled case does not count
    assert s.lesions_per_case_mean == pytest.approx(1.5)
    assert s.lesions_per_case_max == 3
    a = cases[0]
    volumes = [m.sum() * np.prod(a.grid.spacing_zyx) / 1000.0 for m in a.lesions]
    assert s.volume_ml["p50"] == pytest.approx(float(np.median(volumes)))
    assert s.volume_ml["p100"] == pytest.approx(max(volumes))
    assert s.suv_max["p0"] == pytest.approx(min(float(a.pet[m].max()) for m in a.lesions))


# --------------------------------------------------------------------------- intensities


@pytest.mark.parametrize("region", ["body", "lesion"])
def test_intensity_statistics_are_exact_with_a_budget_above_the_voxel_count(drawn, exact, region):
    _, cases = drawn
    fp, _ = exact
    for row, channel in enumerate(("PET", "CT")):
        if region == "body":
            values = np.concatenate([(c.pet, c.ct)[row][c.body] for c in cases])
        else:
            values = np.concatenate([(c.pet, c.ct)[row][c.label > 0] for c in cases if c.label is not None])
        values = values.astype(np.float64)
        stats = fp.intensity[channel][region]
        assert stats.n_samples == values.size
        for q in (0.5, 50.0, 99.5):
            assert stats.percentile(q) == pytest.approx(np.percentile(values, q), rel=1e-6, abs=1e-6), (channel, q)
        assert stats.mean == pytest.approx(values.mean(), rel=1e-6)
        assert stats.std == pytest.approx(values.std(), rel=1e-6)
        assert (stats.min, stats.max) == pytest.approx((values.min(), values.max()))
    # The lung is body: its CT (about -900 HU) is the low tail of the body CT.
    assert fp.intensity["CT"]["body"].min < -850


def test_sampling_under_a_small_budget_is_bounded_seeded_and_unbiased(drawn):
    folder, cases = drawn
    budget = 200
    dataset = discover(folder)
    fp, _ = extract_fingerprint(dataset, samples_per_case=budget, seed=7)
    again, _ = extract_fingerprint(dataset, samples_per_case=budget, seed=7)
    other, _ = extract_fingerprint(dataset, samples_per_case=budget, seed=8)
    pet = fp.intensity["PET"]["body"]
    assert pet.n_samples == budget * len(cases)  # every case has more body voxels than the budget
    assert fp.intensity["PET"]["lesion"].n_samples == 28  # fewer lesion voxels than the budget: all
    assert fp.intensity == again.intensity
    assert fp.intensity["PET"]["body"] != other.intensity["PET"]["body"]
    # Every case weighs the same (budget samples each): compare with the mean of the case means.
    # The sample mean of 3 × 200 draws lies within 5 standard errors of it (a 1-in-a-million miss).
    case_means = [c.pet[c.body].astype(np.float64).mean() for c in cases]
    case_vars = [c.pet[c.body].astype(np.float64).var() for c in cases]
    std_error = np.sqrt(np.mean(case_vars) / (budget * len(cases)))
    assert abs(pet.mean - np.mean(case_means)) < 5 * std_error
    all_body = np.concatenate([c.pet[c.body] for c in cases])
    assert all_body.min() <= pet.min and pet.max <= all_body.max()


# --------------------------------------------------------------------------- failures, file


def test_bad_case_is_listed_with_its_reason_and_left_out(exact):
    fp, failures = exact
    assert [f.case for f in failures] == ["d"]
    assert "NaN" in failures[0].reason and failures[0].file.endswith("d_pet.nii.gz")
    assert "d" not in fp.case_ids()
    assert [(f.case_id, f.reason) for f in fp.failures] == [("d", failures[0].reason)]


def test_every_case_bad_is_one_error_naming_the_reasons(tmp_path):
    bad = draw_case("x", Grid((8, 12, 12)), seed=0, lesions=True)
    bad.ct[2, 2, 2] = np.inf
    write_flat(tmp_path, bad)
    with pytest.raises(InputError, match="NaN or infinite"):
        extract_fingerprint(discover(tmp_path))


def test_save_load_round_trip(exact, tmp_path):
    fp, _ = exact
    path = tmp_path / "fingerprint.json"
    fp.save(path)
    loaded = Fingerprint.load(path)
    assert loaded == fp
    raw = json.loads(path.read_text())
    assert raw["cases"][0]["bbox_zyx"] == fp.cases[0].bbox_zyx and "p99.5" in raw["intensity"]["PET"]["body"]["percentiles"]


@pytest.mark.parametrize("edit", ["version", "channel", "syntax"])
def test_load_rejects_a_broken_file(exact, tmp_path, edit):
    fp, _ = exact
    path = tmp_path / "fingerprint.json"
    fp.save(path)
    raw = json.loads(path.read_text())
    if edit == "version":
        raw["version"] = 99
    elif edit == "channel":
        raw["intensity"]["SPECT"] = raw["intensity"].pop("CT")
    text = json.dumps(raw) if edit != "syntax" else path.read_text()[:-20]
    path.write_text(text)
    with pytest.raises(InputError, match="invalid fingerprint file"):
        Fingerprint.load(path)
    with pytest.raises(InputError, match="not found"):
        Fingerprint.load(tmp_path / "missing.json")


# --------------------------------------------------------------------------- body mask


def test_body_mask_on_a_coarse_copy_still_holds_the_whole_body():
    case = draw_case("a", Grid((12, 16, 16), (3.0, 2.0, 2.5)), seed=1, lesions=None)
    exact_mask = body_mask(case.ct, case.pet)
    assert np.array_equal(exact_mask, case.body)
    coarse = body_mask(case.ct, case.pet, BodyMaskSettings(max_coarse_voxels=300, opening_iterations=0))
    assert coarse[case.body].all()  # conservative: a coarse voxel is body when any voxel of it is
    # No CT tissue at all: the PET decides; nothing at all: the whole image.
    air = np.full_like(case.ct, -1000.0)
    assert np.array_equal(body_bbox(body_mask(air, case.pet)), body_bbox(case.pet > 0.1))
    assert body_mask(air, np.zeros_like(case.pet)).all()


@pytest.mark.parametrize("max_coarse_voxels", [10_000_000, 2_000, 500])
def test_body_mask_from_a_region_equals_the_whole_image_mask(max_coarse_voxels):
    """Loading resamples the CT onto the tissue region only: the mask computed there (grown to whole
    coarse blocks) is the whole-image mask, which is empty outside it."""
    shape = (30, 40, 36)
    case = draw_case("r", Grid(shape), seed=5, lesions=None)
    rng = np.random.default_rng(3)
    ct = case.ct.copy()
    ct[rng.random(shape) < 0.002] = 500.0  # specks: removed by the cleanup or kept as small parts
    ct[20:27, 5:9, 30:34] = 60.0  # a second, smaller object
    settings = BodyMaskSettings(max_coarse_voxels=max_coarse_voxels)
    whole = body_mask(ct, case.pet, settings)
    raw = ct > settings.ct_body_hu
    region = _box(raw)  # the tightest box: not aligned to the coarse blocks
    mask, grown = body_mask_in_region(raw[tuple(slice(a, b) for a, b in region)], region, shape, settings)
    inside = tuple(slice(a, b) for a, b in grown)
    assert all(g[0] <= r[0] and r[1] <= g[1] for g, r in zip(grown, region))
    np.testing.assert_array_equal(mask, whole[inside])
    outside = whole.copy()
    outside[inside] = False
    assert not outside.any() and whole.any()
