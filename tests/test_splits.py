"""Cohort-stratified, patient-grouped cross-validation splits and the splits file."""

import json
import random
from collections import Counter

import pytest

from autopetseg.errors import InputError
from autopetseg.training.splits import fold_cases, load_or_create_splits, make_splits


def make_cases(seed: int = 0) -> list[dict]:
    """Four cohorts like autoPET (scaled down), some patients with 2-3 studies, some without a cohort."""
    rng = random.Random(seed)
    cases = []
    sizes = {"lymphoma": 29, "lung": 34, "melanoma": 38, "negative": 103, None: 11}
    for cohort, n in sizes.items():
        tag = cohort or "unknown"
        k = 0
        while k < n:
            studies = min(n - k, rng.choice([1, 1, 1, 1, 2, 3]))
            patient = f"{tag}_p{k:03d}"
            for s in range(studies):
                cases.append({"case_id": f"{tag}_{k + s:03d}", "patient": patient, "cohort": cohort})
            k += studies
    return cases


def test_each_fold_holds_a_fifth_of_every_cohort():
    cases = make_cases()
    splits = make_splits(cases, n_folds=5, seed=12345)
    assert len(splits) == 5
    cohort_of = {c["case_id"]: c["cohort"] for c in cases}
    totals = Counter(c["cohort"] for c in cases)
    for split in splits:
        in_val = Counter(cohort_of[i] for i in split["val"])
        for cohort, total in totals.items():
            assert abs(in_val[cohort] - total / 5) <= 2, (cohort, in_val[cohort], total)
    sizes = [len(s["val"]) for s in splits]
    assert max(sizes) - min(sizes) <= 2


def test_patients_are_never_split_and_every_case_is_validated_once():
    cases = make_cases()
    splits = make_splits(cases)
    patient_of = {c["case_id"]: c["patient"] for c in cases}
    val_folds_of_patient = {}
    for f, split in enumerate(splits):
        assert set(split["train"]).isdisjoint(split["val"])
        assert sorted(split["train"] + split["val"]) == sorted(patient_of)
        assert {patient_of[i] for i in split["train"]}.isdisjoint({patient_of[i] for i in split["val"]})
        for i in split["val"]:
            val_folds_of_patient.setdefault(patient_of[i], set()).add(f)
    assert all(len(folds) == 1 for folds in val_folds_of_patient.values())
    assert sorted(i for s in splits for i in s["val"]) == sorted(patient_of)


def test_patient_with_studies_in_two_cohorts_follows_its_first_study():
    cases = make_cases()
    cases += [
        {"case_id": "zz_a", "patient": "mixed", "cohort": "melanoma"},
        {"case_id": "zz_b", "patient": "mixed", "cohort": "lung"},
    ]
    splits = make_splits(cases)
    holding = [s["val"] for s in splits if "zz_a" in s["val"]]
    assert len(holding) == 1 and "zz_b" in holding[0]


def test_deterministic_for_a_seed_and_independent_of_input_order():
    cases = make_cases()
    shuffled = list(cases)
    random.Random(3).shuffle(shuffled)
    assert make_splits(cases, seed=7) == make_splits(shuffled, seed=7)
    assert make_splits(cases, seed=7) != make_splits(cases, seed=8)


def test_too_few_patients_is_an_input_error():
    cases = [{"case_id": f"c{i}", "patient": f"p{i % 3}", "cohort": None} for i in range(9)]
    with pytest.raises(InputError, match="at least 5 patients"):
        make_splits(cases, n_folds=5)
    assert len(make_splits(cases, n_folds=3)) == 3


def test_fold_cases_and_all():
    splits = make_splits(make_cases())
    train, val = fold_cases(splits, 2)
    assert (train, val) == (splits[2]["train"], splits[2]["val"])
    assert fold_cases(splits, "2") == (train, val)
    everything, none = fold_cases(splits, "all")
    assert none == [] and sorted(everything) == sorted(train + val)
    with pytest.raises(InputError, match="does not exist"):
        fold_cases(splits, 5)


def test_file_is_created_once_and_a_users_file_is_respected(tmp_path):
    cases = make_cases()
    path = tmp_path / "splits.json"
    created = load_or_create_splits(path, cases, seed=1)
    assert json.loads(path.read_text()) == created
    # A user's own 2-fold file over a subset of the cases is used as is.
    ids = sorted(c["case_id"] for c in cases)
    users = [{"train": ids[:10], "val": ids[10:20]}, {"train": ids[10:20], "val": ids[:10]}]
    path.write_text(json.dumps(users))
    assert load_or_create_splits(path, cases, n_folds=5, seed=1) == users


@pytest.mark.parametrize(
    "content, message",
    [
        ([{"train": ["lung_000"], "val": ["not_a_case"]}], "not in the dataset"),
        ([{"train": ["lung_000"], "val": ["lung_000"]}], "both train and val"),
        ([{"training": ["lung_000"]}], "'train' and 'val'"),
        ({"train": [], "val": []}, "non-empty list"),
        ("{broken", "not valid JSON"),
    ],
)
def test_bad_users_file_is_an_input_error(tmp_path, content, message):
    path = tmp_path / "splits.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(InputError, match=message) as info:
        load_or_create_splits(path, make_cases())
    assert info.value.file == str(path)
