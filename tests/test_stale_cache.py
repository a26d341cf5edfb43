"""Issue 17, item 2: a cache made from files that changed since is made again, and says so.

Every cache entry records what its PET, CT and label were (``data.provenance``: path, size,
modification time, a cheap content hash); ``plan_and_preprocess`` redoes the cases whose files
changed, measures the fingerprint again, and warns when the new fingerprint would plan differently.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import SimpleITK as sitk
from _image_helpers import Grid, write_flat_case

from autopetseg.data.provenance import case_sources, changed_sources
from autopetseg.data.records import CaseRecord
from autopetseg.pipeline import plan_and_preprocess
from autopetseg.planning.fingerprint import Fingerprint
from autopetseg.planning.plans import ComputeBudget

GRID = Grid((16, 20, 20), (4.0, 4.0, 4.0))
CASES = ("c0", "c1", "c2")


def _raw(tmp_path):
    raw = tmp_path / "raw" / "Dataset042_Tiny"
    for i, case in enumerate(CASES):
        write_flat_case(raw, case, grid=GRID, seed=i)
    return raw


def _run(raw, tmp_path):
    return plan_and_preprocess(raw, budget=ComputeBudget(device="cpu"), num_processes=1,
                               preprocessed_root=tmp_path / "pp")


def _mtimes(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _erase_lesion_keeping_the_time(label_path):
    """What a user's edit in a viewer that keeps the file time (or a copy with ``cp -p``) does."""
    stat = label_path.stat()
    image = sitk.ReadImage(str(label_path))
    empty = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(image)))
    empty.CopyInformation(image)
    sitk.WriteImage(empty, str(label_path), useCompression=True)
    os.utime(label_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_edited_label_is_preprocessed_again_and_measured_again(tmp_path, caplog):
    raw = _raw(tmp_path)
    out = _run(raw, tmp_path).output_dir
    assert np.load(out / "3d_fullres" / "c1_seg.npy").any()
    before = _mtimes(out)

    _erase_lesion_keeping_the_time(raw / "c1_seg.nii.gz")
    with caplog.at_level(logging.WARNING):
        _run(raw, tmp_path)
    assert "case 'c1': label changed" in caplog.text
    assert not np.load(out / "3d_fullres" / "c1_seg.npy").any()  # training now sees the edited label
    fingerprint = {c.case_id: c for c in Fingerprint.load(out / "fingerprint.json").cases}
    assert fingerprint["c1"].lesions == [] and len(fingerprint["c0"].lesions) == 1
    after = _mtimes(out)
    for case in ("c0", "c2"):  # the unchanged cases are kept as they were
        for suffix in (".npy", "_seg.npy", "_fg.npy"):
            name = f"3d_fullres/{case}{suffix}"
            assert after[name] == before[name], name

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _run(raw, tmp_path)  # nothing changed since: nothing is redone
    assert _mtimes(out) == after and "changed" not in caplog.text


def test_changed_sources_sees_size_time_and_content(tmp_path):
    paths = write_flat_case(tmp_path, "c", pet_ext=".nii", grid=GRID)
    record = CaseRecord("c", paths["pet"], paths["ct"], paths["label"])
    recorded = case_sources(record)
    assert recorded["pet"]["path"] == str(paths["pet"]) and changed_sources(record, recorded) == []

    pet, stat = paths["pet"], paths["pet"].stat()
    data = bytearray(pet.read_bytes())
    data[-100] ^= 0xFF  # one voxel, same size, the time put back
    pet.write_bytes(bytes(data))
    os.utime(pet, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert changed_sources(record, recorded) == ["pet content changed"]

    data[-100] ^= 0xFF  # the same bytes again, but a newer time
    pet.write_bytes(bytes(data))
    os.utime(pet, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert changed_sources(record, recorded) == ["pet modified since"]
    os.utime(pet, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert changed_sources(CaseRecord("c", paths["pet"], paths["ct"], None), recorded) == ["label removed"]
    assert changed_sources(record, None) == ["no record of the source files"]


def test_new_data_that_would_plan_differently_says_so_and_keeps_the_plans(tmp_path, caplog):
    raw = _raw(tmp_path)
    out = _run(raw, tmp_path).output_dir
    plans_before = (out / "plans.json").read_text()
    for i, case in enumerate(("c0", "c1")):  # most cases now much larger: the planner would pick a larger patch
        write_flat_case(raw, case, grid=Grid((40, 48, 48), (4.0, 4.0, 4.0)), seed=i)
    with caplog.at_level(logging.WARNING):
        result = _run(raw, tmp_path)
    assert "would now be planned differently" in caplog.text and "patch_size" in caplog.text
    assert (out / "plans.json").read_text() == plans_before  # kept (hand edits survive); --overwrite plans again
    assert result.failures == []
    shapes = {c.case_id: c.shape_zyx for c in Fingerprint.load(out / "fingerprint.json").cases}
    assert shapes["c0"] == [40, 48, 48]
