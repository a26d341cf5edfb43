"""Find the cases in a dataset folder, whichever of the accepted layouts it uses.

Layouts, tried in this order (the first that matches wins):

* ``nnunet`` — nnU-Net raw: ``imagesTr/<case>_<XXXX><ending>`` (or ``imagesTs/`` when there is no
  ``imagesTr``: prediction inputs), optional ``labelsTr/<case><ending>`` (``labelsTs``), and
  ``dataset.json`` whose ``channel_names`` (v1: ``modality``) say which channel index is CT and
  which is PET, and whose ``file_ending`` (default ``.nii.gz``) names the files. Names are matched
  case-insensitively: a name with a word starting with "pet" or "suv" is PET, one starting with
  "ct" is CT. When the names do not tell (nnU-Net's own autoPET conversion calls both channels
  "CT"), the first readable case decides: the channel with air (values below -500) is the CT.
* ``autopet`` — the autoPET release: ``<patient>[/<study>]/SUV.nii.gz`` and ``CTres.nii.gz``
  (the CT on the PET grid; preferred) or ``CT.nii.gz`` (own grid), optional ``SEG.nii.gz``. The case
  id is ``<patient>`` or ``<patient>_<study>`` (verbatim, as nnU-Net's autoPET conversion names
  them); the patient id is the top folder so a patient's studies stay in one fold. ``PET.nii.gz``
  (Bq/ml) is not used.
* ``flat`` — one folder of ``<case>_pet<ext>``, ``<case>_ct<ext>`` and optional ``<case>_seg<ext>``
  (suffixes case-insensitive; ``<ext>`` one of ``imageio.IMAGE_SUFFIXES``, formats may be mixed).

An optional ``clinical.csv`` in the folder adds per-case fields: column ``case`` (or ``case_id``),
optional ``patient`` (``patient_id``) and ``cohort``; every other column goes to
``CaseRecord.clinical`` as text.

A case missing a channel is still listed (``pet``/``ct`` is ``None``), and so is a label without
images, so that loading reports it and a folder run lists it with the other bad cases.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autopetseg.data.imageio import IMAGE_SUFFIXES
from autopetseg.data.records import CaseRecord, Dataset
from autopetseg.errors import InputError
from autopetseg.options import OPTIONS

log = logging.getLogger(__name__)

LAYOUTS = OPTIONS["layout"]  # "nnunet", "autopet", "flat": the order detect_layout tries them
ACCEPTED_LAYOUTS = (
    "nnU-Net raw (imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, dataset.json), "
    "autoPET (<case>[/<study>]/SUV.nii.gz + CTres.nii.gz or CT.nii.gz [+ SEG.nii.gz]), "
    f"flat (<case>_pet<ext>, <case>_ct<ext> [, <case>_seg<ext>] with <ext> one of {', '.join(IMAGE_SUFFIXES)})"
)
CLINICAL_FILE = "clinical.csv"


@dataclass(frozen=True)
class ChannelDecision:
    """How the nnU-Net channel roles are told apart from image content when names do not tell.

    A CT has air: more than ``min_ct_air_fraction`` of its voxels below ``air_hu``; a PET (SUV)
    has at most ``max_pet_air_fraction`` there. ``max_cases_tried`` readable cases are tried.
    """

    air_hu: float = -500.0
    min_ct_air_fraction: float = 0.01
    max_pet_air_fraction: float = 0.001
    max_cases_tried: int = 3


# ----------------------------------------------------------------------------- small helpers


def _split_image_name(name: str) -> tuple[str, str] | None:
    """``'A_pet.NII.GZ' -> ('A_pet', '.nii.gz')``; ``None`` for hidden files and non-images."""
    if name.startswith("."):  # editor/OS droppings, our own atomic temp files
        return None
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    return None


def _image_files(folder: Path) -> list[tuple[Path, str]]:
    """(path, name without image suffix) for the image files directly in ``folder``, sorted."""
    found = []
    for path in sorted(folder.iterdir()):
        split = _split_image_name(path.name)
        if split is not None and path.is_file():
            found.append((path, split[0]))
    return found


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def _no_cases(root: Path, detail: str) -> InputError:
    return InputError(f"{detail}; accepted layouts: {ACCEPTED_LAYOUTS}", file=root)


def _put(records: dict[str, CaseRecord], case_id: str, attr: str, path: Path, **extra) -> None:
    """Set one file of a case; a second file for the same case and role makes the case bad (its
    ``problem``), not the folder."""
    record = records.get(case_id)
    if record is None:
        record = records[case_id] = CaseRecord(case_id=case_id, pet=None, ct=None, **extra)
    existing = getattr(record, attr)
    if existing is not None:
        if record.problem is None:
            record.problem = InputError(f"two files for the {attr} of this case: {existing} and {path.name}; keep one",
                                        case_id, path)
        return
    setattr(record, attr, path)


# ----------------------------------------------------------------------------- flat


_FLAT_NAME = re.compile(r"^(?P<case>.+)_(?P<role>pet|ct|seg)$", re.IGNORECASE)
_FLAT_ROLE = {"pet": "pet", "ct": "ct", "seg": "label"}


def _looks_flat(root: Path) -> bool:
    return any(_FLAT_NAME.match(stem) for _, stem in _image_files(root))


def _discover_flat(root: Path) -> list[CaseRecord]:
    records: dict[str, CaseRecord] = {}
    ignored = []
    for path, stem in _image_files(root):
        m = _FLAT_NAME.match(stem)
        if m is None:
            ignored.append(path.name)
            continue
        _put(records, m.group("case"), _FLAT_ROLE[m.group("role").lower()], path)
    if ignored:
        log.warning("%s: ignored %d image file(s) without a _pet/_ct/_seg suffix: %s",
                    root, len(ignored), ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
    return list(records.values())


# ----------------------------------------------------------------------------- autoPET


_AUTOPET_ROLE = {"suv": "pet", "ctres": "ct", "ct": "ct_own_grid", "seg": "label"}
_AUTOPET_MARKERS = {"suv", "ctres", "seg"}


def _autopet_files(folder: Path) -> dict[str, Path]:
    """role → file for the autoPET names in ``folder`` (case-insensitive, any image suffix)."""
    roles: dict[str, Path] = {}
    for path, stem in _image_files(folder):
        role = _AUTOPET_ROLE.get(stem.lower())
        if role is None:
            continue
        if role in roles:
            raise InputError(f"two files for the same channel: {roles[role].name} and {path.name}", file=folder)
        roles[role] = path
    return roles


def _is_autopet_case(folder: Path) -> bool:
    return any(stem.lower() in _AUTOPET_MARKERS for _, stem in _image_files(folder))


def _looks_autopet(root: Path) -> bool:
    for sub in _subfolders(root):
        if _is_autopet_case(sub) or any(_is_autopet_case(study) for study in _subfolders(sub)):
            return True
    return False


def _discover_autopet(root: Path) -> list[CaseRecord]:
    records: dict[str, CaseRecord] = {}
    for patient in _subfolders(root):
        candidates = [(patient.name, patient)] + [(f"{patient.name}_{s.name}", s) for s in _subfolders(patient)]
        for case_id, folder in candidates:
            try:
                roles = _autopet_files(folder)
            except InputError as exc:  # two files for one channel: this case is bad, the others go on
                records[case_id] = CaseRecord(case_id, None, None, patient_id=patient.name, problem=exc.with_case(case_id))
                continue
            if not roles:
                continue
            if case_id in records:
                raise InputError(f"case id occurs twice (folder {folder})", case_id, folder)
            ct = roles.get("ct") or roles.get("ct_own_grid")
            records[case_id] = CaseRecord(case_id, roles.get("pet"), ct, roles.get("label"), patient_id=patient.name)
    return list(records.values())


# ----------------------------------------------------------------------------- nnU-Net raw


_NNUNET_NAME = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _looks_nnunet(root: Path) -> bool:
    return (root / "dataset.json").is_file() or (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir()


def _read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"dataset.json is not valid JSON ({exc})", file=path) from None
    if not isinstance(content, dict):
        raise InputError("dataset.json must hold a JSON object", file=path)
    return content


def _channel_role(name: str) -> str | None:
    """'PET', 'suv', 'FDG-PET' → 'pet'; 'CT', 'CTres', 'ct_hu' → 'ct'; anything else → None."""
    words = [w for w in re.split(r"[^a-z0-9]+", str(name).lower()) if w]
    is_pet = any(w.startswith(("pet", "suv")) for w in words)
    is_ct = any(w.startswith("ct") for w in words)
    return "pet" if is_pet and not is_ct else "ct" if is_ct and not is_pet else None


def _roles_from_names(names: dict[int, str]) -> dict[str, int] | None:
    """{'pet': index, 'ct': index} when the channel names decide it, else ``None``."""
    by_role: dict[str, list[int]] = {"pet": [], "ct": []}
    for index, name in names.items():
        role = _channel_role(name)
        if role is not None:
            by_role[role].append(index)
    pet, ct = by_role["pet"], by_role["ct"]
    if len(pet) == 1 and len(ct) == 1:
        return {"pet": pet[0], "ct": ct[0]}
    if len(names) == 2 and len(pet) + len(ct) == 1:  # one named, the other is the other one
        known_role, known = ("pet", pet[0]) if pet else ("ct", ct[0])
        other = next(i for i in names if i != known)
        return {known_role: known, ("ct" if known_role == "pet" else "pet"): other}
    return None


def _roles_from_content(files: dict[str, dict[int, Path]], channels: list[int], rule: ChannelDecision) -> dict[str, int] | None:
    """Tell CT from PET by air in the first readable case that has both channels."""
    tried = 0
    for case_id in sorted(files):
        if not all(c in files[case_id] for c in channels):
            continue
        try:
            # GetArrayFromImage (a copy): a view of a temporary image would read freed memory.
            air = {c: float(np.mean(sitk.GetArrayFromImage(sitk.ReadImage(str(files[case_id][c]))) < rule.air_hu))
                   for c in channels}
        except RuntimeError:
            air = None
        tried += 1
        if air is not None:
            ct = max(air, key=air.get)
            pet = min(air, key=air.get)
            if air[ct] > rule.min_ct_air_fraction and air[pet] <= rule.max_pet_air_fraction:
                log.warning("channel names do not say which is PET; case %s decides: channel %d is CT "
                            "(%.0f%% air), channel %d is PET", case_id, ct, 100 * air[ct], pet)
                return {"pet": pet, "ct": ct}
        if tried >= rule.max_cases_tried:
            break
    return None


def _discover_nnunet(root: Path, channel_names: dict | None, rule: ChannelDecision) -> list[CaseRecord]:
    meta = _read_dataset_json(root)
    ending = str(meta.get("file_ending", ".nii.gz"))
    subset = "Tr" if (root / "imagesTr").is_dir() else "Ts"
    images_dir, labels_dir = root / f"images{subset}", root / f"labels{subset}"

    files: dict[str, dict[int, Path]] = {}
    ignored = []
    other_endings: dict[str, int] = {}
    if images_dir.is_dir():
        for path in sorted(images_dir.iterdir()):
            if path.name.startswith(".") or not path.name.endswith(ending):
                split = _split_image_name(path.name)
                if split is not None:
                    other_endings[split[1]] = other_endings.get(split[1], 0) + 1
                continue
            m = _NNUNET_NAME.match(path.name[: -len(ending)])
            if m is None:
                ignored.append(path.name)
                continue
            files.setdefault(m.group("case"), {})[int(m.group("channel"))] = path
    if ignored:
        log.warning("%s: ignored %d file(s) not named <case>_XXXX%s: %s", images_dir, len(ignored), ending,
                    ", ".join(ignored[:5]))
    if other_endings:
        found = ", ".join(f"{n} {e!r}" for e, n in sorted(other_endings.items()))
        mismatch = (f"file_ending is {ending!r} but {images_dir.name} holds image files ending otherwise ({found}); "
                    "set file_ending in dataset.json to the files' ending")
        if not files:
            raise InputError(mismatch, file=root / "dataset.json")
        log.warning("%s: %s (those files are not used)", root / "dataset.json", mismatch)
    labels = {}
    if labels_dir.is_dir():
        labels = {p.name[: -len(ending)]: p for p in sorted(labels_dir.iterdir())
                  if p.name.endswith(ending) and not p.name.startswith(".")}

    names_source = "the channel_names argument"
    names = channel_names
    if names is None:
        names = meta.get("channel_names", meta.get("modality"))
        names_source = f"{root / 'dataset.json'} channel_names"
    channels = sorted({c for per_case in files.values() for c in per_case})
    if names is not None:
        try:
            names = {int(k): str(v) for k, v in dict(names).items()}
        except (TypeError, ValueError):
            raise InputError(f"{names_source} must map channel indices to names, got {names!r}",
                             file=root / "dataset.json") from None
        channels = sorted(names)
    roles = _roles_from_names(names) if names is not None else None
    if roles is None and len(channels) == 2:
        roles = _roles_from_content(files, channels, rule)
    if roles is None:
        shown = names if names is not None else f"no channel names (channels found: {channels})"
        raise InputError(
            f"cannot tell which channel is PET and which is CT from {shown}; name them \"PET\" and \"CT\" "
            "in dataset.json channel_names",
            file=root / "dataset.json",
        )
    extra = [c for c in channels if c not in roles.values()]
    if extra:
        log.warning("%s: channel(s) %s are neither PET nor CT and are not used", root, extra)

    records = [CaseRecord(case_id, per_case.get(roles["pet"]), per_case.get(roles["ct"]), labels.get(case_id))
               for case_id, per_case in files.items()]
    for case_id in sorted(set(labels) - set(files)):
        log.warning("case %s: label %s has no images", case_id, labels[case_id])
        records.append(CaseRecord(case_id, None, None, labels[case_id]))
    return records


# ----------------------------------------------------------------------------- clinical.csv


_CASE_COLUMNS = ("case", "case_id")
_PATIENT_COLUMNS = ("patient", "patient_id")
_COHORT_COLUMNS = ("cohort",)


def read_clinical(path: str | Path) -> dict[str, dict[str, str]]:
    """case id → {column: text} from a clinical CSV (comma, semicolon or tab separated).

    The case column is returned under ``"case"``, patient under ``"patient"``, cohort under
    ``"cohort"`` whatever their header spelling; other headers are kept as written.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the clinical table ({exc})", file=path) from None
    first_line = text.splitlines()[0] if text.strip() else ""
    delimiter = max(",;\t", key=first_line.count)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    headers = {h: h.strip().lower() for h in (reader.fieldnames or [])}

    def column(options: tuple[str, ...]) -> str | None:
        return next((h for h, low in headers.items() if low in options), None)

    case_col = column(_CASE_COLUMNS)
    if case_col is None:
        raise InputError(f"the clinical table needs a 'case' or 'case_id' column (has {list(headers)})", file=path)
    rename = {case_col: "case", column(_PATIENT_COLUMNS): "patient", column(_COHORT_COLUMNS): "cohort"}
    rows: dict[str, dict[str, str]] = {}
    for row in reader:
        line = reader.line_num  # the physical line where this row ends (quoted cells may span lines)
        fields = {rename.get(k, k.strip()): (v or "").strip() for k, v in row.items() if k is not None}
        case_id = fields["case"]
        if not case_id:
            continue
        if case_id in rows:
            raise InputError(f"case {case_id!r} appears twice in the clinical table (line {line})", file=path)
        rows[case_id] = fields
    return rows


def _apply_clinical(records: list[CaseRecord], path: Path) -> None:
    rows = read_clinical(path)
    known = {r.case_id for r in records}
    unknown = sorted(set(rows) - known)
    if unknown:
        log.warning("%s: %d row(s) name no case in the folder: %s", path, len(unknown), ", ".join(unknown[:5]))
    for record in records:
        row = rows.get(record.case_id)
        if row is None:
            continue
        row = dict(row)
        row.pop("case")
        record.patient_id = row.pop("patient", "") or record.patient_id
        record.cohort = row.pop("cohort", "") or record.cohort
        record.clinical = row


# ----------------------------------------------------------------------------- entry point


def detect_layout(folder: str | Path) -> str | None:
    """The first layout of ``LAYOUTS`` the folder looks like, or ``None``."""
    root = Path(folder)
    checks = {"nnunet": _looks_nnunet, "autopet": _looks_autopet, "flat": _looks_flat}
    matching = [name for name in LAYOUTS if checks[name](root)]
    if len(matching) > 1:
        log.warning("%s looks like several layouts (%s); using %s", root, ", ".join(matching), matching[0])
    return matching[0] if matching else None


def discover(folder: str | Path, channel_names: dict | None = None, rule: ChannelDecision = ChannelDecision()) -> Dataset:
    """Find the cases in ``folder`` (layout detected automatically); cases sorted by id.

    ``channel_names`` ({"0": "CT", "1": "PET"}) overrides dataset.json for the nnU-Net layout, e.g.
    for a prediction folder of ``<case>_XXXX`` files without one. Raises ``InputError`` for a
    missing, empty or unrecognised folder, duplicate case ids and unreadable dataset.json /
    clinical.csv; problems inside a case are left to ``loading.load_case``.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise _no_cases(root, "the dataset folder does not exist")
    if not root.is_dir():
        raise _no_cases(root, "the dataset path is not a folder")
    layout = detect_layout(root)
    if layout is None:
        what = "the folder is empty" if not any(root.iterdir()) else "no case files in any accepted layout"
        raise _no_cases(root, what)
    if layout == "nnunet":
        records = _discover_nnunet(root, channel_names, rule)
    elif layout == "autopet":
        records = _discover_autopet(root)
    else:
        records = _discover_flat(root)
    if not records:
        raise _no_cases(root, f"the folder looks like the {layout} layout but holds no case")

    records.sort(key=lambda r: r.case_id)
    seen: set[str] = set()
    for record in records:
        if record.case_id in seen:
            raise InputError("case id occurs twice in the folder", record.case_id, root)
        seen.add(record.case_id)

    clinical = root / CLINICAL_FILE
    if clinical.is_file():
        _apply_clinical(records, clinical)
    incomplete = [r.case_id for r in records if r.pet is None or r.ct is None]
    if incomplete:
        log.warning("%s: %d case(s) lack PET or CT: %s", root, len(incomplete), ", ".join(incomplete[:5]))
    log.info("%s: %d case(s), %s layout", root, len(records), layout)
    return Dataset(root=root.resolve(), layout=layout, cases=records)
