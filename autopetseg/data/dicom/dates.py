"""DICOM dates and times (DA, TM, DT) as ``datetime``: SUV decay and CT pairing need real instants.

Old (ACR-NEMA) separators ``YYYY.MM.DD`` and ``HH:MM:SS`` are accepted. A DT's UTC offset is
dropped: DA and TM carry none, and every instant that is compared comes from the same scanner clock.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta

_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def parse_da(value) -> date | None:
    """``'20201217'`` → ``date(2020, 12, 17)``; ``None`` when empty or malformed."""
    text = _text(value).replace(".", "").replace("-", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def parse_tm(value) -> timedelta | None:
    """``'084500.25'`` → the time of day as a ``timedelta``; ``None`` when empty or malformed."""
    match = _TM.match(_text(value).replace(":", ""))
    if match is None:
        return None
    hours, minutes, seconds, fraction = match.groups()
    offset = timedelta(hours=int(hours), minutes=int(minutes or 0), seconds=int(seconds or 0),
                       microseconds=round(float(fraction) * 1e6) if fraction else 0)
    return offset if offset < timedelta(days=1) else None


def combine(da, tm) -> datetime | None:
    """A DA and a TM as one instant; ``None`` when either is missing."""
    day, time_of_day = parse_da(da), parse_tm(tm)
    if day is None or time_of_day is None:
        return None
    return datetime(day.year, day.month, day.day) + time_of_day


def parse_dt(value) -> datetime | None:
    """``'20201217084500.00 '`` (optionally ``&ZZXX``) → an instant; ``None`` when empty or malformed."""
    text = re.split(r"[+-]", _text(value).split("&")[0], maxsplit=1)[0]
    if len(text) < 8:
        return None
    return combine(text[:8], text[8:] or "00")
