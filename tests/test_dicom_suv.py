"""SUV (body weight) factors of ``import-dicom``: the vendor header sets of calculate-suv and the two
ACRIN FLT slices (real headers, skipped without ``shared/realdata``), and synthetic headers for each
rule (midnight, ADMIN, missing weight or dose, Philips CNTS, GE private time, GML, CorrectedImage)."""

from __future__ import annotations

import json
import re
from datetime import datetime

import pytest

pytest.importorskip("pydicom")
from _dicom_helpers import pet_header, pet_headers_from_json, realdata  # noqa: E402

from autopetseg.data.dicom.dates import combine, parse_dt, parse_tm  # noqa: E402
from autopetseg.data.dicom.suv import SuvOverrides, suv_factors  # noqa: E402
from autopetseg.errors import InputError  # noqa: E402

F18 = 6588.0
BASE = {  # a plain BQML series: 70 kg, 350 MBq, injected 09:15, scanned 10:15 (one hour of decay)
    "Units": "BQML", "CorrectedImage": ["ATTN", "DECY", "SCAT"], "DecayCorrection": "START", "PatientWeight": 70,
    "SeriesDate": "20200102", "SeriesTime": "101500", "AcquisitionDate": "20200102", "AcquisitionTime": "101500",
    "RadionuclideTotalDose": 3.5e8, "RadionuclideHalfLife": F18, "RadiopharmaceuticalStartTime": "091500",
}


def expected(weight_kg, dose_bq, decay_s, half_life=F18) -> float:
    return weight_kg * 1000.0 / (dose_bq * 2.0 ** (-decay_s / half_life))


def factor(*instances, overrides=SuvOverrides()) -> float:
    return suv_factors([pet_header(i) for i in instances], overrides).factor


# ----------------------------------------------------------------------------- golden: real headers


def _reference_factors():
    folder = realdata("calculate_suv_metadata")
    lines = (folder / "reference_suvbw_factors.txt").read_text().splitlines()
    return folder, {name: float(value) for name, value in (ln.split() for ln in lines if ln and not ln.startswith("#"))}


@pytest.mark.realdata
def test_every_vendor_header_set_gives_its_reference_factor():
    folder, references = _reference_factors()
    assert len(references) == 8
    for name, reference in references.items():
        headers = pet_headers_from_json(json.loads((folder / name).read_text()))
        result = suv_factors(headers, case=name)
        assert result.factor == pytest.approx(reference, rel=1e-4), name
        assert result.factors.shape == (len(headers),)


@pytest.mark.realdata
def test_acquisition_before_series_time_takes_the_earliest_acquisition():
    folder, references = _reference_factors()
    name = "CPS_AND_BQML_AC_DT_-_S_DT-instances.json"
    result = suv_factors(pet_headers_from_json(json.loads((folder / name).read_text())))
    assert result.audit["scan_time"] == "2020-12-17T13:03:48.234000"
    assert "earliest AcquisitionDate" in result.audit["scan_time_rule"]


@pytest.mark.realdata
def test_acrin_flt_slices_follow_the_series_time_rule():
    import pydicom

    folder = realdata("pet_dicom_slices_acrin_flt")
    for name in ("1.dcm", "2.dcm"):
        ds = pydicom.dcmread(folder / name, stop_before_pixels=True)
        radiopharmaceutical = ds.RadiopharmaceuticalInformationSequence[0]
        series = combine(ds.SeriesDate, ds.SeriesTime)
        acquisition = combine(ds.AcquisitionDate, ds.AcquisitionTime)
        injection = combine(ds.SeriesDate, radiopharmaceutical.RadiopharmaceuticalStartTime)
        scan = series if series <= acquisition else acquisition  # no GE private time in these files
        want = expected(float(ds.PatientWeight), float(radiopharmaceutical.RadionuclideTotalDose),
                        (scan - injection).total_seconds(), float(radiopharmaceutical.RadionuclideHalfLife))
        result = suv_factors([ds], case=name)
        assert result.factor == pytest.approx(want, rel=1e-9), name
        assert result.audit["scan_time"] == scan.isoformat()
    # 2.dcm: series 11:19:59.109 is before its acquisition 11:35:59.1, so the series time is the reference
    assert series < acquisition and "SeriesTime" in result.audit["scan_time_rule"]


# ----------------------------------------------------------------------------- synthetic headers


def test_plain_bqml_decays_the_dose_for_one_hour():
    assert factor(BASE) == pytest.approx(expected(70, 3.5e8, 3600))


def test_midnight_crossing_with_and_without_the_start_date_time():
    late = {**BASE, "SeriesDate": "20200103", "SeriesTime": "001500", "AcquisitionDate": "20200103",
            "AcquisitionTime": "001500", "RadiopharmaceuticalStartTime": "231500"}
    assert factor({**late, "RadiopharmaceuticalStartDateTime": "20200102231500"}) == pytest.approx(
        expected(70, 3.5e8, 3600))
    result = suv_factors([pet_header(late)])  # time only: put on the day before the scan
    assert result.factor == pytest.approx(expected(70, 3.5e8, 3600))
    assert result.audit["injection_time"] == "2020-01-02T23:15:00"
    assert "day before" in result.audit["injection_time_source"]


def test_start_date_time_wins_over_start_time():
    both = {**BASE, "RadiopharmaceuticalStartTime": "101000", "RadiopharmaceuticalStartDateTime": "20200102084500"}
    assert factor(both) == pytest.approx(expected(70, 3.5e8, 5400))


def test_series_time_after_the_earliest_acquisition():
    slices = [{**BASE, "SeriesTime": "103000", "AcquisitionTime": t} for t in ("102500", "101500", "102000")]
    assert factor(*slices) == pytest.approx(expected(70, 3.5e8, 3600))  # earliest acquisition 10:15
    ge = [{**s, "GEPrivatePostInjectionDateTime": "20200102100000"} for s in slices]
    result = suv_factors([pet_header(s) for s in ge])
    assert result.factor == pytest.approx(expected(70, 3.5e8, 2700))  # GE's private scan time 10:00
    assert "GE private" in result.audit["scan_time_rule"]


def test_admin_decay_correction_is_not_decayed_again():
    result = suv_factors([pet_header({**BASE, "DecayCorrection": "ADMIN"})])
    assert result.factor == pytest.approx(70_000 / 3.5e8)
    assert result.audit["decay_s"] == 0.0


@pytest.mark.parametrize("tag, field, option", [
    ("PatientWeight (0010,1030)", "PatientWeight", "--weight"),
    ("RadionuclideTotalDose (0018,1074)", "RadionuclideTotalDose", "--dose"),
])
def test_missing_or_zero_weight_or_dose_names_the_tag(tag, field, option):
    for value in (None, 0):
        with pytest.raises(InputError, match=rf"{re.escape(tag)}.*{option}"):
            factor({**BASE, field: value})


def test_overrides_replace_missing_weight_and_dose_and_are_audited():
    result = suv_factors([pet_header({**BASE, "PatientWeight": None, "RadionuclideTotalDose": 0})],
                         SuvOverrides(weight_kg=80.0, dose_bq=4e8))
    assert result.factor == pytest.approx(expected(80, 4e8, 3600))
    assert result.audit["weight_source"] == "--weight" and result.audit["dose_source"] == "--dose"


def test_philips_cnts_uses_the_private_suv_factor_then_the_bqml_factor():
    private = {"SUVScaleFactor": "0.000551", "ActivityConcentrationScaleFactor": "1.602563"}
    cnts = {**BASE, "Units": "CNTS", "PhilipsPETPrivateGroup": private}
    assert factor(cnts) == pytest.approx(0.000551)
    only_bqml = {**cnts, "PhilipsPETPrivateGroup": {"ActivityConcentrationScaleFactor": "1.602563"}}
    assert factor(only_bqml) == pytest.approx(1.602563 * expected(70, 3.5e8, 3600))
    with pytest.raises(InputError, match="Units CNTS without"):
        factor({**cnts, "PhilipsPETPrivateGroup": {}})


def test_philips_private_factors_are_taken_per_slice():
    slices = [{**BASE, "Units": "CNTS", "PhilipsPETPrivateGroup": {"SUVScaleFactor": f}} for f in ("0.0005", "0.0006")]
    result = suv_factors([pet_header(s) for s in slices])
    assert result.factors.tolist() == pytest.approx([0.0005, 0.0006])
    assert result.audit["factor_per_slice"] == pytest.approx([0.0005, 0.0006])


def test_gml_passes_through_without_weight_or_dose():
    assert factor({**BASE, "Units": "GML", "PatientWeight": None, "RadionuclideTotalDose": None}) == 1.0


@pytest.mark.parametrize("change, message", [
    ({"CorrectedImage": ["ATTN", "SCAT"]}, r"CorrectedImage \(0028,0051\).*ATTN and DECY"),
    ({"Units": "PROPCPS"}, "cannot be converted to SUV"),
    ({"DecayCorrection": "NONE"}, r"DecayCorrection \(0054,1102\) is NONE"),
    ({"RadionuclideHalfLife": None}, r"RadionuclideHalfLife \(0018,1075\)"),
    ({"RadiopharmaceuticalStartTime": None}, "no injection time"),
    ({"RadiopharmaceuticalStartDateTime": "20200102110000"}, "after the scan reference time"),
])
def test_headers_that_cannot_give_suv_are_input_errors(change, message):
    with pytest.raises(InputError, match=message):
        factor({**BASE, **change})


def test_slices_that_disagree_on_series_values_are_a_mixed_series():
    with pytest.raises(InputError, match="mixed series.*PatientWeight"):
        factor(BASE, {**BASE, "PatientWeight": 71})


def test_dicom_date_and_time_forms():
    assert parse_tm("084500.25").total_seconds() == pytest.approx(8 * 3600 + 45 * 60 + 0.25)
    assert parse_tm("08:45").total_seconds() == 8 * 3600 + 45 * 60
    assert parse_tm("2500") is None and parse_tm("") is None
    assert parse_dt("20201217084500.00 ") == datetime(2020, 12, 17, 8, 45)
    assert parse_dt("20201217084500+0100") == datetime(2020, 12, 17, 8, 45)
    assert combine("2020.12.17", "0845") == datetime(2020, 12, 17, 8, 45)
