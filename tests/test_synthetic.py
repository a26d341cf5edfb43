"""The synthetic phantoms: deterministic, in every layout, plausible PET/CT with correct masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from autopetseg.cli import main
from autopetseg.data.discovery import discover
from autopetseg.data.imageio import Geometry
from autopetseg.data.loading import load_case
from autopetseg.data.synthetic import PRESETS, CaseSpec, case_specs, make_phantom, prognosis_labels, synthesize_dataset


@pytest.fixture(scope="module")
def flat_dataset(tmp_path_factory):
    return synthesize_dataset(tmp_path_factory.mktemp("syn") / "flat", n_cases=6, layout="flat", seed=3, negative_fraction=0.3)


def test_same_seed_same_phantom_other_seed_other_phantom():
    spec = CaseSpec(0, "c", "p", "s", "lymphoma")
    a, b = make_phantom(spec, 7, PRESETS["tiny"]), make_phantom(spec, 7, PRESETS["tiny"])
    np.testing.assert_array_equal(a.pet, b.pet)
    np.testing.assert_array_equal(a.ct, b.ct)
    np.testing.assert_array_equal(a.label, b.label)
    c = make_phantom(spec, 8, PRESETS["tiny"])
    assert a.pet.shape != c.pet.shape or not np.array_equal(a.pet, c.pet)


@pytest.mark.parametrize("layout", ["nnunet", "autopet", "flat"])
def test_each_layout_is_discovered_with_clinical_fields(tmp_path, layout):
    root = synthesize_dataset(tmp_path / layout, n_cases=3, layout=layout, seed=1)
    dataset = discover(root)
    assert dataset.layout == layout
    truth = json.loads((root / "synthetic_truth.json").read_text())["cases"]
    assert sorted(r.case_id for r in dataset.cases) == sorted(t["case_id"] for t in truth)
    by_id = {t["case_id"]: t for t in truth}
    for record in dataset.cases:
        assert record.cohort == by_id[record.case_id]["cohort"]
        assert record.patient == by_id[record.case_id]["patient"]
        assert record.clinical["prognosis"] in ("0", "1")
        # channels found in the right roles: the PET is in SUV, the CT has air
        case = load_case(record)
        assert case.pet.max() < 200 and case.ct.min() <= -900
        assert int(case.label.sum()) == round(by_id[record.case_id]["tmtv_ml"] / case.geometry.voxel_volume_ml)


def test_ct_is_finer_and_larger_than_pet_and_label_on_pet_grid(flat_dataset):
    pet = sitk.ReadImage(str(flat_dataset / "phantom_000_pet.nii.gz"))
    ct = sitk.ReadImage(str(flat_dataset / "phantom_000_ct.nii.gz"))
    seg = sitk.ReadImage(str(flat_dataset / "phantom_000_seg.nii.gz"))
    assert Geometry.of(seg).same_grid(Geometry.of(pet))
    assert all(c <= p for c, p in zip(ct.GetSpacing(), pet.GetSpacing())) and ct.GetSpacing() != pet.GetSpacing()
    for axis in range(3):  # the CT's extent contains the PET's on every axis
        pet_lo = pet.GetOrigin()[axis] - 0.5 * pet.GetSpacing()[axis]
        ct_lo = ct.GetOrigin()[axis] - 0.5 * ct.GetSpacing()[axis]
        assert ct_lo < pet_lo
        assert ct_lo + ct.GetSize()[axis] * ct.GetSpacing()[axis] > pet_lo + pet.GetSize()[axis] * pet.GetSpacing()[axis]
    assert sitk.GetArrayViewFromImage(ct).dtype == np.int16


def test_lesions_are_hot_and_negative_cases_are_empty(flat_dataset):
    truth = json.loads((flat_dataset / "synthetic_truth.json").read_text())["cases"]
    cohorts = {t["cohort"] for t in truth}
    assert "negative" in cohorts and len(cohorts) >= 2
    for record in discover(flat_dataset).cases:
        case = load_case(record)
        if record.cohort == "negative":
            assert case.label.sum() == 0
            continue
        assert case.label.sum() > 0
        lesion_suv = float(np.median(case.pet[case.label > 0]))
        body = (case.ct > -500) & (case.label == 0)
        assert lesion_suv > 2.0 * float(np.median(case.pet[body]))  # lesions stand out of the background
        assert (case.ct[case.label > 0] > -500).mean() > 0.95  # and lie in the body


def test_physiological_uptake_varies_between_cases():
    spec = lambda i: CaseSpec(i, f"c{i}", f"p{i}", "s", "negative")  # noqa: E731
    brains = []
    for i in range(4):
        phantom = make_phantom(spec(i), 0, PRESETS["tiny"])
        top = phantom.pet[-12:]  # the head is at the top of the field of view
        brains.append(float(np.percentile(top, 99)))
    assert max(brains) - min(brains) > 0.5  # brain uptake is drawn per case
    assert min(brains) > 3.0  # and is high: the brain is a hot spot that is not a lesion


def test_patients_with_several_studies_and_cohort_mix():
    specs = case_specs(60, seed=0, negative_fraction=0.25, layout="autopet")
    patients = [s.patient for s in specs]
    assert len(set(patients)) < len(patients)  # some patients have a second study
    assert all(s.case_id == f"{s.patient}_{s.study}" for s in specs)
    negatives = sum(s.cohort == "negative" for s in specs)
    assert 5 <= negatives <= 25


def test_prognosis_rises_with_tumour_burden():
    tmtv = np.concatenate([np.zeros(200), np.full(200, 1.0), np.full(200, 200.0)])
    labels = prognosis_labels(tmtv, seed=0)
    assert labels[:200].mean() < labels[200:400].mean() < labels[400:].mean()


def test_cli_synth_without_labels(tmp_path):
    assert main(["synth", str(tmp_path / "ds"), "-n", "2", "--layout", "flat", "--no-labels"]) == 0
    assert not list((tmp_path / "ds").glob("*_seg.nii.gz"))
    assert len(list((tmp_path / "ds").glob("*_pet.nii.gz"))) == 2
