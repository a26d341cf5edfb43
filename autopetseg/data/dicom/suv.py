"""SUV (body weight) factors for a PET series, by the rules of the quantitative-imaging community
(QIBA's SUV pseudocode, as in cornerstone's calculate-suv), with an audit of every tag used.

``SUV = (stored × RescaleSlope + RescaleIntercept) × factor`` per slice, where, by Units (0054,1001):

* every series: CorrectedImage (0028,0051) must list ATTN and DECY;
* ``BQML``: factor = weight [g] / decayed dose [Bq]. DecayCorrection (0054,1102) ``START``: the dose
  decays from the injection to the scan reference time. That is SeriesDate/SeriesTime when it is
  not after the earliest AcquisitionDate/Time of the series; otherwise GE's private scan date-time
  (0009,xx0D, creator GEMS_PETD_01) where present; otherwise the earliest acquisition. The injection
  is RadiopharmaceuticalStartDateTime (0018,1078) when present, else RadiopharmaceuticalStartTime
  (0018,1072) on the scan date, the day before when that would be after the scan (midnight).
  ``ADMIN``: the images are already decay-corrected to the injection, so the dose is not decayed;
* ``CNTS`` (Philips): the private SUV scale factor (7053,xx00, creator "Philips PET Private Group")
  of each slice; else its Bq/ml scale factor (7053,xx09) × the BQML factor;
* ``GML``: already SUV (body weight), passed through (factor 1).

Weight is PatientWeight (0010,1030) in kg, dose RadionuclideTotalDose (0018,1074) and half-life
RadionuclideHalfLife (0018,1075) of the RadiopharmaceuticalInformationSequence (0054,0016). A missing
or zero one is an ``InputError`` naming the tag, unless ``SuvOverrides`` (``--weight``/``--dose``)
gives it; an override always wins and the audit says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Sequence

import numpy as np

from autopetseg.data.dicom.dates import combine, parse_dt, parse_tm
from autopetseg.errors import InputError

log = logging.getLogger(__name__)

PHILIPS_CREATOR = "Philips PET Private Group"
PHILIPS_GROUP = 0x7053
PHILIPS_SUV_OFFSET = 0x00  # SUV scale factor
PHILIPS_BQML_OFFSET = 0x09  # activity concentration (Bq/ml) scale factor
GE_CREATOR = "GEMS_PETD_01"
GE_GROUP = 0x0009
GE_SCAN_DATETIME_OFFSET = 0x0D
SERIES_LEVEL = ("Units", "CorrectedImage", "DecayCorrection", "PatientWeight", "SeriesDate", "SeriesTime")
DOSE_TAG = "RadionuclideTotalDose (0018,1074) in RadiopharmaceuticalInformationSequence (0054,0016)"
MBQ_LIKE_DOSE = 1e5  # a "dose" below this many Bq is probably in MBq


@dataclass(frozen=True)
class SuvOverrides:
    """Values a user gives for every study (``--weight KG``, ``--dose BQ``); ``None``: from the headers."""

    weight_kg: float | None = None
    dose_bq: float | None = None

    def validate(self) -> None:
        for name, value in (("--weight", self.weight_kg), ("--dose", self.dose_bq)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a positive number, got {value}")


@dataclass
class SuvResult:
    """Per-slice factors (slice order) and the audit record written beside the case."""

    factors: np.ndarray
    audit: dict = field(default_factory=dict)

    @property
    def factor(self) -> float:
        return float(self.factors[0])


def tag_name(keyword: str) -> str:
    """``'PatientWeight'`` → ``'PatientWeight (0010,1030)'``."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else keyword


def _as_text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1", "ignore").strip("\x00 ")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(_as_text(v) for v in value)
    return str(value).strip()


def _number(value) -> float | None:
    text = _as_text(value).split("\\")[0] if value is not None else ""
    try:
        return float(text)
    except ValueError:
        return None


def private_value(ds, group: int, creator: str, offset: int):
    """The value of a private element (bytes when the dictionary does not know it); ``None`` when absent."""
    try:
        block = ds.private_block(group, creator)
    except KeyError:
        return None
    if offset not in block:
        return None
    value = block[offset].value
    return None if value in (None, b"", "") else value


class _Audit:
    """Collects what the factor came from, tag by tag."""

    def __init__(self, case: str | None, where: str):
        self.case, self.where = case, where
        self.record: dict = {"tags": {}}

    def read(self, ds, keyword: str, label: str | None = None):
        value = ds.get(keyword)
        if value not in (None, ""):
            self.record["tags"][label or tag_name(keyword)] = _as_text(value)
        return value

    def fail(self, reason: str) -> InputError:
        return InputError(reason, self.case, self.where)


def _radiopharmaceutical(ds):
    sequence = ds.get("RadiopharmaceuticalInformationSequence")
    return sequence[0] if sequence else None


def _positive(value, override: float | None, label: str, option: str, audit: _Audit) -> tuple[float, str]:
    if override is not None:
        return float(override), option
    number = _number(value)
    if number is None or not number > 0:
        raise audit.fail(f"{label} is {'missing' if number is None else number}: SUV needs it; "
                         f"give {option} to set it")
    return number, label


def _check_one_series(headers: Sequence, audit: _Audit) -> None:
    for keyword in SERIES_LEVEL:
        values = {_as_text(h.get(keyword)) for h in headers}
        if len(values) > 1:
            raise audit.fail(f"mixed series: slices differ in {tag_name(keyword)} ({', '.join(sorted(values))})")


def scan_reference_time(headers: Sequence, audit: _Audit) -> tuple[datetime, str]:
    """(scan reference instant, the rule that gave it) for decay correction START."""
    first = headers[0]
    series = combine(audit.read(first, "SeriesDate"), audit.read(first, "SeriesTime"))
    acquisitions = [combine(h.get("AcquisitionDate"), h.get("AcquisitionTime"))
                    or parse_dt(h.get("AcquisitionDateTime")) for h in headers]
    known = [a for a in acquisitions if a is not None]
    earliest = min(known) if known else None
    if earliest is not None:
        audit.record["earliest_acquisition_time"] = earliest.isoformat()
    if series is not None and (earliest is None or series <= earliest):
        return series, f"{tag_name('SeriesDate')} + {tag_name('SeriesTime')} (not after the earliest acquisition)"
    ge = parse_dt(_as_text(private_value(first, GE_GROUP, GE_CREATOR, GE_SCAN_DATETIME_OFFSET) or ""))
    if ge is not None:
        audit.record["tags"]["GE scan date-time (0009,xx0D) GEMS_PETD_01"] = ge.isoformat()
        return ge, "GE private scan date-time (0009,xx0D): the series time is after the earliest acquisition"
    if earliest is not None:
        reason = "the series time is after it" if series is not None else "no series date/time"
        return earliest, (f"earliest {tag_name('AcquisitionDate')} + {tag_name('AcquisitionTime')} of the series "
                          f"({reason})")
    raise audit.fail(f"no scan time: {tag_name('SeriesTime')} and {tag_name('AcquisitionTime')} are missing")


def injection_time(radiopharmaceutical, scan: datetime, audit: _Audit) -> tuple[datetime, str]:
    """(injection instant, where it came from); a start time alone is put on the scan date (or the day before)."""
    start = parse_dt(audit.read(radiopharmaceutical, "RadiopharmaceuticalStartDateTime"))
    if start is not None:
        return start, tag_name("RadiopharmaceuticalStartDateTime")
    time_of_day = parse_tm(audit.read(radiopharmaceutical, "RadiopharmaceuticalStartTime"))
    if time_of_day is None:
        raise audit.fail(f"no injection time: {tag_name('RadiopharmaceuticalStartDateTime')} and "
                         f"{tag_name('RadiopharmaceuticalStartTime')} are missing")
    injected = datetime(scan.year, scan.month, scan.day) + time_of_day
    source = f"{tag_name('RadiopharmaceuticalStartTime')} on the scan date"
    if injected > scan:  # injected before midnight, scanned after it
        injected -= timedelta(days=1)
        source += ", the day before (the scan started after midnight)"
    return injected, source


def bqml_factor(headers: Sequence, overrides: SuvOverrides, audit: _Audit) -> float:
    """weight [g] / decayed dose [Bq] for activity concentration in Bq/ml."""
    first = headers[0]
    record = audit.record
    radiopharmaceutical = _radiopharmaceutical(first)
    weight, record["weight_source"] = _positive(audit.read(first, "PatientWeight"), overrides.weight_kg,
                                                tag_name("PatientWeight"), "--weight", audit)
    if radiopharmaceutical is None and overrides.dose_bq is None:
        raise audit.fail(f"{tag_name('RadiopharmaceuticalInformationSequence')} is missing: SUV needs the dose "
                         "and injection time")
    dose_value = audit.read(radiopharmaceutical, "RadionuclideTotalDose") if radiopharmaceutical else None
    dose, record["dose_source"] = _positive(dose_value, overrides.dose_bq, DOSE_TAG, "--dose", audit)
    record.update(weight_kg=weight, dose_bq=dose)
    if dose < MBQ_LIKE_DOSE:
        log.warning("%s: injected dose %.4g Bq is implausibly small (MBq stored as Bq?); SUV will be huge",
                    audit.case, dose)
    decay_correction = _as_text(audit.read(first, "DecayCorrection")).upper()
    record["decay_correction"] = decay_correction
    if decay_correction == "ADMIN":
        record.update(decay_s=0.0, decay_factor=1.0,
                      decay_rule="DecayCorrection ADMIN: already decay-corrected to the injection, not again")
        return weight * 1000.0 / dose
    if decay_correction != "START":
        raise audit.fail(f"{tag_name('DecayCorrection')} is {decay_correction or 'missing'}; SUV needs START or "
                         "ADMIN")
    half_life = _number(audit.read(radiopharmaceutical, "RadionuclideHalfLife")) if radiopharmaceutical else None
    if half_life is None or not half_life > 0:
        raise audit.fail(f"{tag_name('RadionuclideHalfLife')} is {half_life if half_life is not None else 'missing'}:"
                         " SUV needs it to decay the dose")
    scan, record["scan_time_rule"] = scan_reference_time(headers, audit)
    injected, record["injection_time_source"] = injection_time(radiopharmaceutical, scan, audit)
    decay = (scan - injected).total_seconds()
    if decay < 0:
        raise audit.fail(f"the injection ({injected.isoformat()}) is after the scan reference time "
                         f"({scan.isoformat()})")
    decay_factor = 2.0 ** (-decay / half_life)
    record.update(half_life_s=half_life, scan_time=scan.isoformat(), injection_time=injected.isoformat(),
                  decay_s=decay, decay_factor=decay_factor,
                  decay_rule="DecayCorrection START: dose decayed from the injection to the scan reference time")
    return weight * 1000.0 / (dose * decay_factor)


def _philips_factors(headers: Sequence, offset: int) -> np.ndarray | None:
    values = [_number(private_value(h, PHILIPS_GROUP, PHILIPS_CREATOR, offset)) for h in headers]
    if any(v is None or v == 0 for v in values):
        return None
    return np.array(values, dtype=np.float64)


def suv_factors(headers: Sequence, overrides: SuvOverrides = SuvOverrides(), case: str | None = None,
                where: str | None = None) -> SuvResult:
    """The SUV factor of each slice of a PET series (headers in slice order); see the module doc."""
    overrides.validate()
    audit = _Audit(case, where)
    _check_one_series(headers, audit)
    first = headers[0]
    record = audit.record
    units = _as_text(audit.read(first, "Units")).upper()
    corrected = {c.upper() for c in _as_text(audit.read(first, "CorrectedImage")).split("\\") if c}
    record.update(units=units, corrected_image=sorted(corrected))
    if not units:
        raise audit.fail(f"{tag_name('Units')} is missing: cannot tell how to convert the PET to SUV")
    if not {"ATTN", "DECY"} <= corrected:
        raise audit.fail(f"{tag_name('CorrectedImage')} is {sorted(corrected)}: SUV needs an attenuation- and "
                         "decay-corrected image (ATTN and DECY)")
    n = len(headers)
    if units == "GML":
        factors = np.ones(n)
        record["rule"] = "Units GML: already SUV (body weight), passed through"
    elif units == "BQML":
        factors = np.full(n, bqml_factor(headers, overrides, audit))
        record["rule"] = "Units BQML: weight [g] / decayed dose [Bq]"
    elif units == "CNTS":
        suv = _philips_factors(headers, PHILIPS_SUV_OFFSET)
        bqml = _philips_factors(headers, PHILIPS_BQML_OFFSET)
        if suv is not None:
            factors = suv
            record["rule"] = "Units CNTS: Philips private SUV scale factor (7053,xx00) of each slice"
            if overrides.weight_kg is not None or overrides.dose_bq is not None:
                log.warning("%s: --weight/--dose do not apply: the scanner's SUV scale factor is used", case)
        elif bqml is not None:
            factors = bqml * bqml_factor(headers, overrides, audit)
            record["rule"] = ("Units CNTS: Philips private Bq/ml scale factor (7053,xx09) of each slice × "
                              "weight [g] / decayed dose [Bq]")
        else:
            raise audit.fail("Units CNTS without a Philips SUV scale factor (7053,xx00) or Bq/ml scale factor "
                             "(7053,xx09) on every slice: cannot convert counts to SUV")
        record["tags"]["Philips SUV scale factor (7053,xx00)"] = None if suv is None else _first_or_all(suv)
        record["tags"]["Philips Bq/ml scale factor (7053,xx09)"] = None if bqml is None else _first_or_all(bqml)
    else:
        raise audit.fail(f"{tag_name('Units')} {units} cannot be converted to SUV (BQML, CNTS or GML expected)")
    record["factor"] = float(factors[0])
    if np.ptp(factors) > 0:
        record["factor_per_slice"] = factors.tolist()
    return SuvResult(factors=factors, audit=record)


def _first_or_all(values: np.ndarray):
    return float(values[0]) if np.ptp(values) == 0 else values.tolist()
