"""Layout detection and case records for the three accepted layouts, and clinical.csv."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _image_helpers import Grid, Phantom, write_autopet_case, write_dataset_json, write_flat_case, write_nnunet_case
from autopetseg.data.discovery import discover, read_clinical
from autopetseg.data.loading import load_case
from autopetseg.errors import InputError

GRID = Grid()


def _assert_phantom(loaded, grid: Grid = GRID) -> None:
    """The loaded arrays are the phantom's PET, CT and label (so the channels were not swapped)."""
    phantom = Phantom.for_grid(grid)
    np.testing.assert_array_equal(loaded.pet, phantom.pet(grid))
    np.testing.assert_array_equal(loaded.ct, phantom.ct(grid))
    if loaded.label is not None:
        np.testing.assert_array_equal(loaded.label, phantom.label(grid))


def test_flat_layout_mixed_formats_and_suffix_case(tmp_path):
    a = write_flat_case(tmp_path, "a", pet_ext=".nii.gz", ct_ext=".mha")
    b = write_flat_case(tmp_path, "B", pet_ext=".nii", ct_ext=".nrrd", seg_ext=None, suffixes=("_PET", "_Ct", "_SEG"))
    (tmp_path / "notes.txt").write_text("not an image")

    dataset = discover(tmp_path)

    assert dataset.layout == "flat"
    assert [c.case_id for c in dataset.cases] == ["B", "a"]  # sorted by id (ASCII)
    by_id = dataset.by_id()
    assert (by_id["a"].pet, by_id["a"].ct, by_id["a"].label) == (a["pet"], a["ct"], a["label"])
    assert (by_id["B"].pet, by_id["B"].ct, by_id["B"].label) == (b["pet"], b["ct"], None)
    for record in dataset.cases:
        _assert_phantom(load_case(record))


@pytest.mark.parametrize("channel_index", [{"CT": 0, "PET": 1}, {"PET": 0, "CT": 1}])
def test_nnunet_layout_channel_order_from_dataset_json(tmp_path, channel_index):
    names = {str(i): role for role, i in channel_index.items()}
    names = {k: v.lower() if k == "0" else v for k, v in names.items()}  # names are case-insensitive
    write_dataset_json(tmp_path, names)
    written = {c: write_nnunet_case(tmp_path, c, channel_index) for c in ("case_2", "case_1")}

    dataset = discover(tmp_path)

    assert dataset.layout == "nnunet"
    assert [c.case_id for c in dataset.cases] == ["case_1", "case_2"]
    for record in dataset.cases:
        paths = written[record.case_id]
        assert (record.pet, record.ct, record.label) == (paths["pet"], paths["ct"], paths["label"])
        _assert_phantom(load_case(record))


def test_nnunet_suv_name_file_ending_and_imagests(tmp_path):
    write_dataset_json(tmp_path, {"0": "SUV", "1": "ct_hu"}, file_ending=".mha")
    paths = write_nnunet_case(tmp_path, "p1", {"PET": 0, "CT": 1}, subset="Ts", with_label=False, file_ending=".mha")
    write_nnunet_case(tmp_path, "ignored", {"PET": 0, "CT": 1}, subset="Ts", with_label=False)  # wrong ending

    dataset = discover(tmp_path)

    assert [c.case_id for c in dataset.cases] == ["p1"]
    assert (dataset.cases[0].pet, dataset.cases[0].ct, dataset.cases[0].label) == (paths["pet"], paths["ct"], None)


def test_nnunet_ambiguous_names_decided_by_content(tmp_path):
    # nnU-Net's own autoPET conversion names both channels "CT" (CTres is _0000, SUV is _0001)
    write_dataset_json(tmp_path, {"0": "CT", "1": "CT"})
    paths = write_nnunet_case(tmp_path, "x", {"CT": 0, "PET": 1})

    record = discover(tmp_path).cases[0]

    assert (record.pet, record.ct) == (paths["pet"], paths["ct"])


def test_nnunet_without_dataset_json_uses_channel_names_argument(tmp_path):
    paths = write_nnunet_case(tmp_path, "x", {"PET": 0, "CT": 1}, subset="Ts", with_label=False)

    record = discover(tmp_path, channel_names={"0": "PET", "1": "CT"}).cases[0]

    assert (record.pet, record.ct) == (paths["pet"], paths["ct"])


def test_nnunet_undecidable_channels_error(tmp_path):
    write_dataset_json(tmp_path, {"0": "T1", "1": "T2", "2": "FLAIR"})
    write_nnunet_case(tmp_path, "x")

    with pytest.raises(InputError, match="which channel is PET") as info:
        discover(tmp_path)
    assert info.value.file == str(tmp_path / "dataset.json")


def test_nnunet_label_without_images_is_listed_and_fails_on_load(tmp_path):
    write_dataset_json(tmp_path, {"0": "CT", "1": "PET"})
    write_nnunet_case(tmp_path, "good")
    orphan = write_nnunet_case(tmp_path, "orphan")
    orphan["pet"].unlink()
    orphan["ct"].unlink()

    by_id = discover(tmp_path).by_id()

    assert (by_id["orphan"].pet, by_id["orphan"].ct, by_id["orphan"].label) == (None, None, orphan["label"])
    with pytest.raises(InputError, match="no PET image") as info:
        load_case(by_id["orphan"])
    assert info.value.case == "orphan"
    assert info.value.file == str(orphan["label"].parent)


def test_autopet_layout_with_and_without_studies(tmp_path):
    fine = GRID.finer(2)
    s1 = write_autopet_case(tmp_path, "PETCT_01", "2001-01-01 study A")
    s2 = write_autopet_case(tmp_path, "PETCT_01", "2002-02-02", ct_name="CT.nii.gz", ct_grid=fine)
    single = write_autopet_case(tmp_path, "PETCT_02", with_label=False)
    (tmp_path / "PETCT_02" / "PET.nii.gz").write_bytes(single["pet"].read_bytes())  # Bq/ml file: never used

    dataset = discover(tmp_path)

    assert dataset.layout == "autopet"
    assert [c.case_id for c in dataset.cases] == ["PETCT_01_2001-01-01 study A", "PETCT_01_2002-02-02", "PETCT_02"]
    assert [c.patient for c in dataset.cases] == ["PETCT_01", "PETCT_01", "PETCT_02"]
    recs = dataset.cases
    assert (recs[0].pet, recs[0].ct, recs[0].label) == (s1["pet"], s1["ct"], s1["label"])
    assert (recs[1].pet, recs[1].ct, recs[1].label) == (s2["pet"], s2["ct"], s2["label"])
    assert (recs[2].pet, recs[2].ct, recs[2].label) == (single["pet"], single["ct"], None)

    # CT.nii.gz on its own grid is regridded onto the PET: PET voxel centres sit exactly between
    # 2×2×2 CT voxels, so linear interpolation gives their mean
    loaded = load_case(recs[1])
    fine_ct = Phantom.for_grid(GRID).ct(fine)
    block_mean = fine_ct.reshape(8, 2, 10, 2, 10, 2).mean(axis=(1, 3, 5))
    assert loaded.ct.shape == GRID.shape_zyx
    np.testing.assert_allclose(loaded.ct, block_mean, atol=1e-3)


def test_autopet_prefers_ctres_over_ct(tmp_path):
    paths = write_autopet_case(tmp_path, "P1")
    ct_own = tmp_path / "P1" / "CT.nii.gz"
    ct_own.write_bytes(paths["ct"].read_bytes())

    assert discover(tmp_path).cases[0].ct == paths["ct"]


def test_clinical_csv_fields(tmp_path):
    write_autopet_case(tmp_path, "P1", "s1")
    write_autopet_case(tmp_path, "P1", "s2")
    (tmp_path / "clinical.csv").write_text(
        "case_id;Patient_ID;cohort;age;response\n"
        "P1_s1;patient-7;lymphoma;61;CR\n"
        "P1_s2;;melanoma;62;\n"
        "unknown_case;x;y;1;2\n"
    )

    by_id = discover(tmp_path).by_id()

    assert (by_id["P1_s1"].patient, by_id["P1_s1"].cohort) == ("patient-7", "lymphoma")
    assert by_id["P1_s1"].clinical == {"age": "61", "response": "CR"}
    # an empty patient cell keeps the layout's patient id (the top folder)
    assert (by_id["P1_s2"].patient, by_id["P1_s2"].cohort) == ("P1", "melanoma")
    assert by_id["P1_s2"].clinical == {"age": "62", "response": ""}


def test_clinical_csv_needs_case_column_and_unique_rows(tmp_path):
    bad = tmp_path / "no_case.csv"
    bad.write_text("patient,cohort\np,c\n")
    with pytest.raises(InputError, match="'case' or 'case_id'"):
        read_clinical(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text('case,note\nA,"line one\nline two"\nA,again\n')
    with pytest.raises(InputError, match="appears twice .*line 4"):
        read_clinical(dup)


def test_missing_channel_is_listed_and_raises_on_load(tmp_path):
    write_flat_case(tmp_path, "full")
    paths = write_flat_case(tmp_path, "no_ct")
    paths["ct"].unlink()

    by_id = discover(tmp_path).by_id()

    assert by_id["no_ct"].ct is None and by_id["no_ct"].pet == paths["pet"]
    with pytest.raises(InputError, match="no CT image") as info:
        load_case(by_id["no_ct"])
    assert info.value.case == "no_ct" and info.value.file == str(tmp_path)
    assert "no_ct" in str(info.value) and str(tmp_path) in str(info.value)


def test_duplicate_channel_files_are_an_error_of_that_case(tmp_path):
    """Issue #17: a second file for one channel makes that case bad, not the whole folder."""
    paths = write_flat_case(tmp_path, "a")
    write_flat_case(tmp_path, "b")
    (tmp_path / "a_PET.mha").write_bytes(b"")  # a second PET for the same case

    by_id = discover(tmp_path).by_id()
    assert load_case(by_id["b"]).pet.shape
    with pytest.raises(InputError, match="two files for the pet") as info:
        load_case(by_id["a"])
    assert info.value.case == "a"
    assert str(paths["pet"]) in str(info.value) and "a_PET.mha" in str(info.value)


def test_autopet_case_id_collision_is_an_error(tmp_path):
    write_autopet_case(tmp_path, "A_B")
    write_autopet_case(tmp_path, "A", "B")

    with pytest.raises(InputError, match="occurs twice") as info:
        discover(tmp_path)
    assert info.value.case == "A_B"


def test_dataset_json_must_be_valid(tmp_path):
    write_nnunet_case(tmp_path, "x")
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "PET"}})[:-3])

    with pytest.raises(InputError, match="not valid JSON") as info:
        discover(tmp_path)
    assert info.value.file == str(tmp_path / "dataset.json")
