"""MIP pictures of a prediction folder against the ground truth (``evaluate --png``)."""

from __future__ import annotations

import logging
from pathlib import Path

import SimpleITK as sitk

from autopetseg.data.discovery import discover
from autopetseg.data.imageio import Geometry, read_image
from autopetseg.errors import InputError
from autopetseg.evaluation.evaluate import find_predictions
from autopetseg.inference.pictures import PICTURE_SETTINGS, PictureSettings, prediction_title, read_mask_on, render_mip_png
from autopetseg.scoring.metrics import dice

log = logging.getLogger(__name__)


def write_evaluation_pictures(pred_dir: str | Path, gt_dir: str | Path, out_dir: str | Path,
                              settings: PictureSettings = PICTURE_SETTINGS) -> list[Path]:
    """One MIP per labelled case of ``gt_dir`` into ``out_dir``: ground truth (green), prediction (red).

    Cases without a prediction are drawn with the ground truth only; cases that cannot be read
    are skipped with a warning (``evaluate`` reports them). Returns the files written.
    """
    dataset = discover(gt_dir)
    predictions = find_predictions(pred_dir)
    written = []
    for record in dataset.cases:
        if record.label is None or record.pet is None:
            continue
        try:
            pet_image = read_image(record.pet, record.case_id, "PET")
        except InputError as error:
            log.warning("%s; no picture", error)
            continue
        geometry = Geometry.of(pet_image)
        label = read_mask_on(record.label, geometry, record.case_id, "label")
        pred_path = predictions.get(record.case_id)
        prediction = read_mask_on(pred_path, geometry, record.case_id, "prediction") if pred_path else None
        dsc = None
        if label is not None and prediction is not None and label.any():
            dsc = dice(label, prediction)
        title = prediction_title(record.case_id, dsc=dsc) + ("" if pred_path else " · no prediction")
        written.append(
            render_mip_png(Path(out_dir) / f"{record.case_id}.png", sitk.GetArrayFromImage(pet_image), geometry,
                           label, prediction, title, settings)
        )
    log.info("wrote %d MIP picture(s) to %s", len(written), out_dir)
    return written
