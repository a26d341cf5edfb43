"""``plan_and_preprocess`` end to end: the files each stage writes, re-runs that reuse them, hand
edits that survive, bad cases that are reported while the good ones finish, the CLI's exit codes,
and the three real MIRP cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from _image_helpers import Grid, link_mirp_cases, write_flat_case
from autopetseg.cli import main
from autopetseg.errors import InputError
from autopetseg.pipeline import plan_and_preprocess
from autopetseg.planning.fingerprint import Fingerprint
from autopetseg.planning.plans import ComputeBudget, Plans
from autopetseg.preprocessing import invert_to_original, load_preprocessed

GRID = Grid((16, 20, 20), (4.0, 4.0, 4.0))
GOOD = ("c0", "c1", "c2")
CPU = ComputeBudget(device="cpu")


def write_dataset(folder: Path, bad: bool = True) -> Path:
    """Three good flat cases and, with ``bad``, one whose label holds a 2."""
    for i, case in enumerate(GOOD):
        write_flat_case(folder, case, grid=GRID, seed=i)
    if bad:
        write_bad_case(folder)
    return folder


def write_bad_case(folder: Path) -> None:
    paths = write_flat_case(folder, "zbad", grid=GRID, seed=9)
    label = sitk.ReadImage(str(paths["label"]))
    array = sitk.GetArrayFromImage(label)
    array[array > 0] = 2
    fixed = sitk.GetImageFromArray(array)
    fixed.CopyInformation(label)
    sitk.WriteImage(fixed, str(paths["label"]), useCompression=True)


def fix_bad_case(folder: Path) -> None:
    write_flat_case(folder, "zbad", grid=GRID, seed=9)


@pytest.fixture
def raw(tmp_path) -> Path:
    return write_dataset(tmp_path / "raw" / "Dataset042_Tiny")


def run(raw: Path, out: Path, **kwargs):
    kwargs.setdefault("budget", CPU)
    kwargs.setdefault("num_processes", 1)
    return plan_and_preprocess(raw, preprocessed_root=out, **kwargs)


def stamps(folder: Path) -> dict[str, int]:
    """Modification time of every file under ``folder`` (nanoseconds)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def cache_files(case: str) -> list[str]:
    return [f"3d_fullres/{case}{suffix}" for suffix in (".npy", "_seg.npy", "_fg.npy", ".json")]


# --------------------------------------------------------------------------- one run


def test_writes_manifest_fingerprint_plans_and_cache(raw, tmp_path):
    result = run(raw, tmp_path / "pp")
    out = result.output_dir
    assert out == tmp_path / "pp" / "Dataset042_Tiny"
    assert [(f.case, "label values must be 0 and 1" in f.reason) for f in result.failures] == [("zbad", True)]

    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["layout"] == "flat" and [c["case_id"] for c in manifest["cases"]] == list(GOOD)
    fingerprint = Fingerprint.load(out / "fingerprint.json")
    assert fingerprint.case_ids() == list(GOOD)
    assert [f.case_id for f in fingerprint.failures] == ["zbad"]
    plans = Plans.load(out / "plans.json")
    assert plans == result.plans and plans.budget == CPU and plans.dataset == "Dataset042_Tiny"

    files = set(stamps(out))
    for case in GOOD:
        assert set(cache_files(case)) <= files
        # The fingerprint pass left each case cut to its body for preprocessing.
        assert {f"cropped/{case}{suffix}" for suffix in (".npy", "_seg.npy", "_body.npy", ".json")} <= files
        data, seg, _, properties = load_preprocessed(out / "3d_fullres", case)
        assert data.shape[0] == 2 and data.dtype == np.float32 and seg.shape == data.shape[1:]
        assert properties["spacing_zyx"] == plans.configuration("3d_fullres").spacing_zyx
    assert not any("zbad" in f for f in files)


def test_rerun_reuses_every_file_and_redoes_only_missing_cases(raw, tmp_path, monkeypatch):
    first = run(raw, tmp_path / "pp")
    out = first.output_dir
    before = stamps(out)

    import autopetseg.pipeline as pipeline

    def must_not_run(*args, **kwargs):
        raise AssertionError("the fingerprint was measured again")

    monkeypatch.setattr(pipeline, "extract_fingerprint", must_not_run)
    second = run(raw, tmp_path / "pp")
    after = stamps(out)
    assert after == before  # dataset.json, fingerprint.json, plans.json and the cache untouched
    assert second.plans == first.plans
    # The bad case is reported again, with its actual reason.
    assert [(f.case, f.reason) for f in second.failures] == [(f.case, f.reason) for f in first.failures]

    # An interrupted run: c1's properties (written last) are missing, so only c1 is redone.
    (out / "3d_fullres" / "c1.json").unlink()
    run(raw, tmp_path / "pp")
    again = stamps(out)
    for name in cache_files("c0") + cache_files("c2") + ["fingerprint.json", "plans.json"]:
        assert again[name] == before[name], name
    assert all(again[name] != before[name] for name in cache_files("c1") if name != "3d_fullres/c1.json")
    assert "3d_fullres/c1.json" in again


def test_overwrite_redoes_everything(raw, tmp_path):
    out = run(raw, tmp_path / "pp").output_dir
    before = stamps(out)
    run(raw, tmp_path / "pp", overwrite=True)
    after = stamps(out)
    assert all(after[name] != before[name] for name in before)


def test_a_fixed_case_is_picked_up_by_the_next_run(raw, tmp_path):
    first = run(raw, tmp_path / "pp")
    assert [f.case for f in first.failures] == ["zbad"]
    fix_bad_case(raw)
    second = run(raw, tmp_path / "pp")
    assert second.failures == []
    assert "zbad" in Fingerprint.load(second.output_dir / "fingerprint.json").case_ids()
    assert (second.output_dir / "3d_fullres" / "zbad.json").is_file()
    manifest = json.loads((second.output_dir / "dataset.json").read_text())
    assert [c["case_id"] for c in manifest["cases"]] == [*GOOD, "zbad"]


# --------------------------------------------------------------------------- plans.json kept


def test_hand_edited_plans_are_kept_and_the_cache_follows_them(raw, tmp_path, monkeypatch):
    out = run(raw, tmp_path / "pp").output_dir
    raw_plans = json.loads((out / "plans.json").read_text())
    conf = raw_plans["configurations"]["3d_fullres"]
    assert conf["spacing_zyx"] == [4.0, 4.0, 4.0]
    conf["spacing_zyx"] = [6.0, 6.0, 6.0]
    conf["batch_size"] = 7
    (out / "plans.json").write_text(json.dumps(raw_plans, indent=2))

    import autopetseg.preprocessing.preprocessor as preprocessor

    def no_raw_reading(*args, **kwargs):
        raise AssertionError("preprocessing read the raw files")

    # The cases are preprocessed again from the cropped stage the first run left.
    monkeypatch.setattr(preprocessor, "load_cropped_case", no_raw_reading)
    result = run(raw, tmp_path / "pp")
    monkeypatch.undo()
    kept = Plans.load(out / "plans.json").configuration("3d_fullres")
    assert (kept.spacing_zyx, kept.batch_size) == ([6.0, 6.0, 6.0], 7)
    assert result.plans.configuration("3d_fullres").batch_size == 7
    for case in GOOD:  # made with the old spacing: redone with the edited one
        data, _, _, properties = load_preprocessed(out / "3d_fullres", case)
        assert properties["spacing_zyx"] == [6.0, 6.0, 6.0]
        assert data.shape[1] == round(properties["shape_after_crop_zyx"][0] * 4.0 / 6.0)

    # A bad edit stops the run with a message naming the file; the file is not replaced.
    conf["patch_size"] = [5, 5, 5]
    conf["network"]["strides"] = [[1, 1, 1], [2, 2, 2]]
    (out / "plans.json").write_text(json.dumps(raw_plans))
    with pytest.raises(InputError, match="divisible by the total stride") as info:
        run(raw, tmp_path / "pp")
    assert "plans.json" in str(info.value)
    assert json.loads((out / "plans.json").read_text())["configurations"]["3d_fullres"]["patch_size"] == [5, 5, 5]


def test_a_new_configuration_is_added_beside_the_kept_ones(raw, tmp_path):
    out = run(raw, tmp_path / "pp").output_dir
    before = stamps(out)
    first = Plans.load(out / "plans.json")
    result = run(raw, tmp_path / "pp", configurations=("2d",))
    plans = Plans.load(out / "plans.json")
    # 3d_fullres is sized for every network the planner knows (the variants share its cache)
    assert set(plans.configurations) == {"3d_fullres", "3d_fullres_attention_unet", "3d_fullres_segresnet", "2d"}
    assert plans.configuration("3d_fullres") == first.configuration("3d_fullres")
    assert plans.configuration("2d").spacing_zyx == first.configuration("3d_fullres").spacing_zyx
    assert result.plans == plans
    after = stamps(out)  # 2d reads the 3d data: nothing to preprocess
    assert all(after[name] == before[name] for name in before if name.startswith("3d_fullres/"))

    # Another budget plans again.
    gpu = run(raw, tmp_path / "pp", budget=ComputeBudget(device="cuda", gpu_memory_gb=8))
    assert Plans.load(out / "plans.json").budget == gpu.plans.budget == ComputeBudget(gpu_memory_gb=8)


def test_bad_arguments_fail_before_any_work(raw, tmp_path):
    with pytest.raises(InputError, match="unknown configuration"):
        run(raw, tmp_path / "pp", configurations=("3d_cascade",))
    with pytest.raises(InputError, match="budget"):
        run(raw, tmp_path / "pp", budget=ComputeBudget(device="cuda", gpu_memory_gb=-1))
    assert not (tmp_path / "pp").exists()


def test_every_case_bad_is_one_error_with_the_reasons(tmp_path):
    folder = tmp_path / "Dataset043_Bad"
    write_bad_case(folder)
    with pytest.raises(InputError, match="label values must be 0 and 1"):
        run(folder, tmp_path / "pp")


# --------------------------------------------------------------------------- CLI


def test_cli_exit_codes(raw, tmp_path, capsys):
    args = ["plan_and_preprocess", "-d", str(raw), "--preprocessed", str(tmp_path / "pp"), "--device", "cpu"]
    assert main([*args, "-np", "2"]) == 1  # bad case: listed, the good ones finished
    captured = capsys.readouterr()
    assert "zbad" in captured.err and "label values must be 0 and 1" in captured.err
    assert "3d_fullres: resunet, spacing" in captured.out
    out = tmp_path / "pp" / "Dataset042_Tiny"
    assert all((out / "3d_fullres" / f"{c}.json").is_file() for c in GOOD)
    # Two processes measure what one process measures (seeded per case).
    single = run(raw, tmp_path / "single")
    assert Fingerprint.load(out / "fingerprint.json") == Fingerprint.load(single.output_dir / "fingerprint.json")

    fix_bad_case(raw)
    assert main(args) == 0

    unrecognised = tmp_path / "Dataset044_Notes"
    unrecognised.mkdir()
    (unrecognised / "notes.txt").write_text("not a dataset")
    assert main(["plan_and_preprocess", "-d", str(unrecognised), "--preprocessed", str(tmp_path / "pp")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and len(err.strip().splitlines()) == 1


def test_cli_finds_a_dataset_by_id_under_the_raw_root(raw, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AUTOPETSEG_PREPROCESSED", str(tmp_path / "env_pp"))
    code = main(["plan_and_preprocess", "-d", "42", "--raw", str(raw.parent), "--gpu-memory", "4", "-np", "1"])
    assert code == 1
    plans = Plans.load(tmp_path / "env_pp" / "Dataset042_Tiny" / "plans.json")
    assert plans.budget == ComputeBudget(device="cuda", gpu_memory_gb=4.0)


# --------------------------------------------------------------------------- real data


def test_real_mirp_cases_through_fingerprint_plan_and_preprocess(tmp_path):
    flat = link_mirp_cases(tmp_path)  # skips when ../shared is absent
    result = plan_and_preprocess(flat, budget=CPU, num_processes=1, preprocessed_root=tmp_path / "pp")
    assert result.failures == []
    out = result.output_dir
    fingerprint = Fingerprint.load(out / "fingerprint.json")
    assert fingerprint.case_ids() == ["STS_001", "STS_002", "STS_003"]
    assert all(c.n_lesions >= 1 for c in fingerprint.cases) and fingerprint.lesions.lesion_free_fraction == 0.0
    # Real FDG SUVs: tumours hotter than the body on average.
    assert fingerprint.intensity["PET"]["lesion"].mean > fingerprint.intensity["PET"]["body"].mean
    assert -1100 < fingerprint.intensity["CT"]["body"].percentile(50) < 200
    spacings = np.array([c.spacing_zyx for c in fingerprint.cases])
    assert result.plans.target_spacing_zyx == pytest.approx(np.median(spacings, axis=0).tolist())
    conf = result.plans.configuration("3d_fullres")
    for case in fingerprint.case_ids():
        data, seg, _, properties = load_preprocessed(out / "3d_fullres", case)
        assert np.isfinite(data).all() and 0 <= data[1].min() and data[1].max() <= 1
        assert properties["spacing_zyx"] == conf.spacing_zyx
        back = invert_to_original(seg, properties, order="nearest")
        original = sitk.GetArrayFromImage(sitk.ReadImage(str(flat / f"{case}_seg.nii.gz")))
        assert back.shape == original.shape
        if np.allclose(properties["geometry"]["spacing_zyx"], conf.spacing_zyx):
            assert np.array_equal(back, original), case  # not resampled: exactly the same voxels
        else:  # resampled there and back: the same tumour, up to its boundary
            assert 2 * (back & original).sum() / (back.sum() + original.sum()) > 0.9, case
