"""The body crop of a case, and the cropped stage of the cache that the fingerprint writes.

``crop_case`` turns a checked ``LoadedCase`` into a ``CroppedCase``: PET, CT (on the PET grid) and
label cut to the body box grown to hold every lesion voxel (``planning.body``), the body mask on
that box, and what is needed to put results back (the box and the original PET geometry). The CT
is resampled only onto the region that loading already resampled for its checks (or onto the crop
box itself), never onto the whole PET grid.

Whole-body PET/CT is mostly air: the crop is typically a fifth of the PET grid. The fingerprint
pass crops every case once and saves it (``save_cropped``) under
``<preprocessed>/<Dataset>/cropped/`` (format in ``docs/ARCHITECTURE.md``); preprocessing then
reads the crops (``read_cropped``) instead of decompressing and resampling the raw files a second
time. An entry records what its source files were (``data.provenance``: size, modification time,
a cheap content hash) and the body-mask settings it was made with: when either differs it is
stale, and the case is read from the raw files again.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from autopetseg.data.imageio import Geometry
from autopetseg.data.loading import BODY_HU, LoadedCase, box_geometry, load_case
from autopetseg.data.provenance import case_sources, changed_sources
from autopetseg.data.records import CaseRecord
from autopetseg.io_utils import read_json, save_npy, write_json
from autopetseg.data.body import BodyMaskSettings, bbox_slices, body_bbox, body_mask_in_region, union_bbox

log = logging.getLogger(__name__)

CROPPED_VERSION = 2  # 2: sources stamped by data.provenance
CROPPED_FOLDER = "cropped"
CROPPED_FILE_SUFFIXES = (".npy", "_seg.npy", "_body.npy", ".json")


@dataclass(eq=False)
class CroppedCase:
    """A checked case cut to its body box; arrays (z, y, x) on the PET grid inside ``bbox_zyx``."""

    case_id: str
    geometry: Geometry  # the original PET grid
    bbox_zyx: list[list[int]]  # body box ∪ lesions on the PET grid, end exclusive
    pet: np.ndarray  # float32 SUV
    ct: np.ndarray  # float32 HU
    label: np.ndarray | None  # uint8 {0, 1}; None: no label
    body: np.ndarray  # bool body mask (all of it lies inside the box)
    sources: dict | None = None  # ``data.provenance.case_sources`` of the files it was read from

    @property
    def crop_geometry(self) -> Geometry:
        return box_geometry(self.geometry, self.bbox_zyx)

    @property
    def body_voxels(self) -> int:
        return int(np.count_nonzero(self.body))


def _body_region(case: LoadedCase, settings: BodyMaskSettings) -> tuple[np.ndarray, list[list[int]]]:
    """(body mask on a region, the region): ``planning.body.body_mask`` without the whole-grid CT."""
    shape = case.geometry.shape_zyx
    full = case.full_box
    raw = region = None
    if settings.ct_body_hu >= BODY_HU:  # CT above the bound lies inside the region loading resampled
        if case.tissue_box is not None:
            region = case.tissue_box
            raw = case.ct_in(region) > settings.ct_body_hu
    else:  # a lower bound than loading's: the whole grid is needed
        region = full
        raw = case.ct > settings.ct_body_hu
    if raw is None or not raw.any():
        log.debug("%s: CT has no voxel above %s HU; finding the body on the PET", case.case_id, settings.ct_body_hu)
        region, raw = full, case.pet > settings.pet_body_suv
    if not raw.any():
        log.debug("%s: no body found in CT or PET; the whole image counts as body", case.case_id)
        return np.ones(shape, dtype=bool), full
    return body_mask_in_region(raw, region, shape, settings)


def crop_case(case: LoadedCase, settings: BodyMaskSettings = BodyMaskSettings()) -> CroppedCase:
    """Cut a loaded case to its body box, grown to hold every lesion voxel (so that cropping never
    removes a lesion, even one drawn in air by mistake). The arrays are copies: the full-grid ones
    can be freed."""
    mask, region = _body_region(case, settings)
    offset = [lo for lo, _ in region]
    box = [[lo + o, hi + o] for (lo, hi), o in zip(body_bbox(mask), offset)]
    label = case.label
    if label is not None and label.any():
        box = union_bbox(box, body_bbox(label))
    # The mask lies inside the box; copy the part of it the region and the box share.
    body = np.zeros([hi - lo for lo, hi in box], dtype=bool)
    common = [[max(b[0], r[0]), min(b[1], r[1])] for b, r in zip(box, region)]
    body[tuple(slice(c[0] - b[0], c[1] - b[0]) for c, b in zip(common, box))] = mask[
        tuple(slice(c[0] - r[0], c[1] - r[0]) for c, r in zip(common, region))
    ]
    crop = bbox_slices(box)
    return CroppedCase(
        case_id=case.case_id,
        geometry=case.geometry,
        bbox_zyx=[[int(lo), int(hi)] for lo, hi in box],
        pet=np.array(case.pet[crop], dtype=np.float32),
        ct=np.array(case.ct_in(box), dtype=np.float32),
        label=None if label is None else np.array(label[crop], dtype=np.uint8),
        body=body,
    )


def load_cropped_case(record: CaseRecord, with_label: bool = True,
                      settings: BodyMaskSettings = BodyMaskSettings()) -> CroppedCase:
    """``load_case`` (every input check) then ``crop_case``; ``sources`` stamped before reading."""
    sources = case_sources(record)
    case = crop_case(load_case(record, with_label=with_label), settings)
    case.sources = sources
    return case


# --------------------------------------------------------------------------- the cropped stage


def cropped_files(folder: Path, case_id: str) -> dict[str, Path]:
    folder = Path(folder)
    return {
        "data": folder / f"{case_id}.npy",
        "seg": folder / f"{case_id}_seg.npy",
        "body": folder / f"{case_id}_body.npy",
        "properties": folder / f"{case_id}.json",
    }


def save_cropped(folder: Path, record: CaseRecord, case: CroppedCase, settings: BodyMaskSettings) -> None:
    """Write ``case`` into the cropped stage (atomically; the JSON last marks it complete)."""
    folder = Path(folder)
    files = cropped_files(folder, case.case_id)
    for suffix in CROPPED_FILE_SUFFIXES:  # temporaries an interrupted run left
        for stray in folder.glob(f".{case.case_id}{suffix}.*"):
            stray.unlink(missing_ok=True)
    files["properties"].unlink(missing_ok=True)  # an entry is complete only once its JSON is back
    save_npy(files["data"], np.stack([case.pet, case.ct]).astype(np.float32, copy=False))
    if case.label is not None:
        save_npy(files["seg"], case.label)
    else:
        files["seg"].unlink(missing_ok=True)
    save_npy(files["body"], np.packbits(case.body.reshape(-1)))
    write_json(files["properties"], {
        "version": CROPPED_VERSION,
        "case_id": case.case_id,
        "geometry": {key: list(value) for key, value in asdict(case.geometry).items()},
        "bbox_zyx": case.bbox_zyx,
        "has_label": case.label is not None,
        "body_voxels": case.body_voxels,
        "body_settings": asdict(settings),
        "sources": case.sources if case.sources is not None else case_sources(record),
    })


def read_cropped(folder: Path, record: CaseRecord, settings: BodyMaskSettings | None,
                 with_label: bool = True) -> CroppedCase | None:
    """The case from the cropped stage; ``None`` when it is absent, incomplete or stale (other
    source files or, unless ``settings`` is None, other body-mask settings)."""
    files = cropped_files(Path(folder), record.case_id)
    try:
        props = read_json(files["properties"])
        if (
            props.get("version") != CROPPED_VERSION
            or changed_sources(record, props.get("sources"))
            or (settings is not None and props.get("body_settings") != asdict(settings))
        ):
            return None
        box = [[int(lo), int(hi)] for lo, hi in props["bbox_zyx"]]
        shape = tuple(hi - lo for lo, hi in box)
        data = np.load(files["data"])
        label = np.load(files["seg"]) if props["has_label"] and with_label else None
        packed = np.load(files["body"])
        body = np.unpackbits(packed, count=int(np.prod(shape))).astype(bool).reshape(shape)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if data.shape != (2, *shape) or data.dtype != np.float32 or (label is not None and label.shape != shape):
        return None
    return CroppedCase(
        case_id=record.case_id,
        geometry=Geometry.from_dict(props["geometry"]),
        bbox_zyx=box,
        pet=data[0],
        ct=data[1],
        label=label,
        body=body,
        sources=props["sources"],  # just checked: still what the files are
    )
