"""``autopetseg predict``: lesion masks for a folder of PET/CT cases from a model folder's fold ensembles.

Per case:

1. load and check the case (any accepted layout, no label needed), preprocess it in memory
   exactly as each stage's training cache was made (plans, configuration and preprocessing
   settings from the fold records: body crop, normalisation, resampling);
2. each stage in order, by its inference strategy (``models/strategies.py``: 3D sliding windows,
   2D slices, or the whole image on a fixed grid): every fold (and every mirrored copy with TTA)
   run on each batch while it is on the device, the folds' probabilities averaged with the
   ensemble weights (``ensemble.py``), autocast on GPU; windows in air are not run, and with
   ``min_suv`` neither are windows whose PET never exceeds that SUV. A stage that takes earlier
   stages' outputs gets their lesion probability, mapped onto its grid, as extra channels;
3. the method's combine rule (``combine.py``) makes one lesion probability on the last stage's
   grid (and any patient-level numbers), which is mapped back onto the original PET grid
   (linear) and thresholded at the stage's recorded threshold;
4. ``<case>.nii.gz`` (uint8, exactly the PET image's shape, spacing, origin and direction),
   optionally ``probabilities/<case>.nii.gz`` (float32 lesion probability) and
   ``png/<case>.png`` (coronal MIP with contours), then the case's row of ``predictions.csv``
   (TMTV, TLG, SUVmax, SUVmean, lesion count, Dmax, then method-specific columns), all written
   atomically.

A case is finished when its mask exists and ``predictions.csv`` has its row; a re-run skips it
(unless ``overwrite``). A bad case (``InputError``) is reported and the others finish.
``num_parts``/``part_id`` split the sorted case list as ``cases[part_id::num_parts]``; parts
sharing an output folder update ``predictions.csv`` under a file lock.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from autopetseg.data.discovery import discover
from autopetseg.data.imageio import Geometry, write_image
from autopetseg.data.loading import LoadedCase, load_case
from autopetseg.data.records import CaseRecord
from autopetseg.errors import InputError
from autopetseg.inference.combine import READ_REGIONS, STAGE_RUNNERS, RunContext, StageOutput, get_combiner, read_last
from autopetseg.inference.ensemble import StageEnsemble, load_ensemble
from autopetseg.inference.output_record import describe_producer, producer_differences, read_producer, write_producer
from autopetseg.io_utils import atomic_path, file_lock, remove_stale_temporaries
from autopetseg.models.runtime import amp_dtype, resolve_device
from autopetseg.models.sliding_window import EMPTY_PET_MAX, SlidingWindowStats
from autopetseg.models.trained import ensemble_probabilities
from autopetseg.preprocessing.preprocessor import (
    PreprocessingSettings,
    invert_to_original,
    map_between_caches,
    preprocess_loaded_case,
)
from autopetseg.scoring.clinical import clinical_numbers

log = logging.getLogger(__name__)

PREDICTIONS_CSV = "predictions.csv"
PROBABILITIES_FOLDER = "probabilities"
PNG_FOLDER = "png"
MASK_SUFFIX = ".nii.gz"
PREDICTION_COLUMNS = ("case_id", "tmtv_ml", "tlg", "suvmax", "suvmean", "lesion_count", "dmax_mm")


@dataclass
class PredictorSettings:
    """How to predict. Defaults: the GDFL paper's inference (overlap 0.5, no test-time mirroring)."""

    folds: Sequence[int | str] | None = None  # None: every fold that has the checkpoint
    checkpoint: str = "best"  # "best" or "final"
    ensemble: str = "mean"  # "mean" or "dice_weighted"
    ensemble_space: str = "probabilities"  # average the folds' "probabilities" or their "logits"
    blending: str = "gaussian"  # overlapping windows: "gaussian" (nnU-Net) or "constant" (MONAI, the GDFL authors)
    device: str = "auto"  # "auto", "cuda", "cpu" (or any torch device string)
    tta: bool = False  # mirror along the axes the model was trained to be mirrored along
    overlap: float = 0.5
    batch_size: int = 2  # windows per forward pass
    # 2D stages: slices per forward pass, as many as fit this many (padded) pixels, at least batch_size.
    slice_batch_pixels: int = 2**16
    skip_empty: bool = True  # skip windows that lie in air (outside the body)
    min_suv: float | None = None  # also skip windows whose PET max is <= this SUV
    amp: bool | None = None  # None: autocast on CUDA only
    save_probabilities: bool = False
    png: bool = False
    overwrite: bool = False
    num_parts: int = 1
    part_id: int = 0
    prefetch: bool = True  # load and preprocess the next case while this one is predicted
    dicom_seg: bool = False  # also <case>_seg.dcm referencing the source PET series (cases from import-dicom)

    def validate(self) -> None:
        if self.num_parts < 1:
            raise InputError(f"--num-parts must be at least 1, got {self.num_parts}")
        if not 0 <= self.part_id < self.num_parts:
            raise InputError(
                f"--part-id must be in 0..{self.num_parts - 1} for --num-parts {self.num_parts}, got {self.part_id}"
            )
        if not 0.0 <= self.overlap < 1.0:
            raise InputError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")
        if self.slice_batch_pixels < 1:
            raise InputError(f"slice_batch_pixels must be >= 1, got {self.slice_batch_pixels}")
        if self.min_suv is not None and not self.min_suv >= 0:
            raise InputError(f"--min-suv must be a non-negative SUV, got {self.min_suv}")


@dataclass
class CasePrediction:
    """One predicted case on the original PET grid."""

    case_id: str
    mask: np.ndarray  # uint8 (z, y, x)
    lesion_probability: np.ndarray | None  # float32 (z, y, x)
    geometry: Geometry
    pet: np.ndarray  # SUV on the PET grid (for the clinical numbers and the picture)
    numbers: dict
    windows: SlidingWindowStats
    seconds: float


@dataclass
class PredictionReport:
    """What a folder run did."""

    output_dir: Path
    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished by an earlier run
    failures: list[InputError] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # per predicted case (loading overlaps the previous case)
    n_windows: int = 0
    n_windows_skipped: int = 0

    @property
    def csv_path(self) -> Path:
        return self.output_dir / PREDICTIONS_CSV


def split_cases(cases: Sequence[CaseRecord], num_parts: int, part_id: int) -> list[CaseRecord]:
    """This part's share of the cases: sorted by id, every ``num_parts``-th from ``part_id``."""
    ordered = sorted(cases, key=lambda c: c.case_id)
    return ordered[part_id::num_parts]


# ----------------------------------------------------------------------------- predictions.csv


def read_prediction_rows(path: str | Path) -> dict[str, dict[str, str]]:
    """Rows of an existing ``predictions.csv`` by case id (values as text); {} when absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["case_id"]: row for row in csv.DictReader(f) if row.get("case_id")}


# An exclusive lock whose file is removed on release (no lock file left in the output folder);
# without POSIX locks (Windows) parts must use separate output folders.
_locked = file_lock


def _csv_value(value) -> str | int | float:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def update_prediction_csv(path: str | Path, row: dict) -> None:
    """Insert or replace ``row`` in ``predictions.csv`` (sorted by case), atomically and under a lock.

    Re-read inside the lock so parts writing to one folder never drop each other's rows.
    """
    path = Path(path)
    with _locked(path.with_name(f".{path.name}.lock")):
        rows = read_prediction_rows(path)
        rows[row["case_id"]] = {k: _csv_value(v) for k, v in row.items()}
        # The clinical numbers first, then any method-specific columns (e.g. a prognosis probability).
        extra = sorted({k for r in rows.values() for k in r} - set(PREDICTION_COLUMNS))
        with atomic_path(path, ".csv") as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=[*PREDICTION_COLUMNS, *extra], extrasaction="ignore")
                writer.writeheader()
                for case_id in sorted(rows):
                    writer.writerow(rows[case_id])


# ----------------------------------------------------------------------------- the predictor


def _extra_columns(extras: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in extras.items()}


class Predictor:
    """A model folder's stage ensembles, ready to predict cases (``predict_case``) or folders (``predict_folder``)."""

    def __init__(self, model_dir: str | Path, settings: PredictorSettings | None = None):
        self.settings = settings or PredictorSettings()
        self.settings.validate()
        self.device = resolve_device(self.settings.device)
        self.amp_dtype = amp_dtype(self.device, self.settings.amp)
        self.model = load_ensemble(
            model_dir, self.settings.folds, self.settings.checkpoint, self.settings.ensemble, self.device
        )
        self.combine = get_combiner(self.model.method.combine)
        if self.settings.tta and not any(s.record.mirror_axes for s in self.model.stages):
            log.warning("TTA asked for, but the model was trained without mirroring: predicting without it")

    # -------------------------------------------------------------- arrays
    def _skip_bounds(self) -> dict:
        """Keyword arguments of the strategies that choose the windows or slices to skip."""
        if self.settings.min_suv is None:
            return {"skip_empty": self.settings.skip_empty}
        # A window is skipped when its PET max <= the bound, whatever its CT (inf): this includes
        # every air window, because the bound is never below the air bound.
        bound = max(float(self.settings.min_suv), EMPTY_PET_MAX)
        return {"skip_empty": True, "empty_pet_max": bound, "empty_ct_max": math.inf}

    def predict_stage(self, stage: StageEnsemble, image: np.ndarray | torch.Tensor,
                      stats: SlidingWindowStats | None = None, region: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Named outputs (``probabilities`` (channels, z, y, x) float32 on the CPU, patient-level heads)
        of one stage's fold ensemble over a preprocessed volume (a 2D stage with a ``region``: only
        the slices holding any of its voxels are run, the others are background)."""
        kind = stage.folds[0].record.strategy.kind
        return ensemble_probabilities(
            stage.folds, image, stage.weights, device=self.device, amp_dtype=self.amp_dtype,
            mirror=self.settings.tta, batch_size=self.settings.batch_size, overlap=self.settings.overlap,
            stats=stats, ensemble_space=self.settings.ensemble_space,
            **({"blending": self.settings.blending} if kind == "sliding_window" else {}),
            **({"slice_batch_pixels": self.settings.slice_batch_pixels, "region": region} if kind == "slices" else {}),
            **self._skip_bounds(),
        )

    def predict_array(self, data: np.ndarray | torch.Tensor, stats: SlidingWindowStats | None = None) -> torch.Tensor:
        """Class probabilities of a one-stage model for a preprocessed volume (tests, benchmarks)."""
        return self.predict_stage(self.model.last, data, stats)["probabilities"]

    def to_original(self, lesion: np.ndarray, properties: dict,
                    threshold: float | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(mask uint8, lesion probability float32 or None) on the PET grid from the cache-grid lesion
        probability. Inverted linearly, then thresholded: thresholding on a coarser cache grid and
        resampling the mask would give blocky masks. A threshold map (cache grid) is inverted too."""
        lesion = invert_to_original(lesion, properties, "linear", fill=0.0)
        if isinstance(threshold, np.ndarray):
            threshold = invert_to_original(threshold, properties, "linear", fill=float(threshold.max()))
        mask = (lesion > threshold).astype(np.uint8)
        return mask, lesion if self.settings.save_probabilities else None

    # -------------------------------------------------------------- one case
    def load(self, record: CaseRecord) -> tuple[LoadedCase, list[tuple[np.ndarray, dict]]]:
        """(the checked case, per stage its preprocessed array and properties); ``InputError`` for bad input.

        Each stage is preprocessed exactly as its training cache was (its plans, configuration and
        preprocessing settings, from the fold record); stages whose configurations make the same cache
        (plans, data identifier, spacing, preprocessing) share the array.
        """
        case = load_case(record, with_label=False)
        done: dict[tuple, tuple[np.ndarray, dict]] = {}
        prepared = []
        for stage in self.model.stages:
            r = stage.record
            plans = stage.plans
            conf = plans.configuration(r.configuration)
            # Configurations on one cache (e.g. 2d_coronal on 3d_fullres's) share the array.
            key = (r.plans_sha256, conf.data_identifier, tuple(conf.spacing_zyx), json.dumps(r.preprocessing, sort_keys=True))
            if key not in done:
                settings = PreprocessingSettings.from_signature(r.preprocessing)
                data, _, properties = preprocess_loaded_case(case, plans, conf, settings)
                properties.update(cohort=record.cohort, patient=record.patient)
                done[key] = (data, properties)
            data, properties = done[key]
            prepared.append((data, {**properties, "configuration": conf.name}))
        return case, prepared

    def predict_loaded(
        self, case: LoadedCase, prepared: list[tuple[np.ndarray, dict]], started: float | None = None
    ) -> CasePrediction:
        """Predict a case loaded by ``load`` (``started``: when its clock started, for the timing)."""
        started = time.perf_counter() if started is None else started
        stats = SlidingWindowStats()
        runner = STAGE_RUNNERS.get(self.model.method.combine)
        if runner is not None:  # the rule runs the stages itself (combine.py)
            combined = runner(self.model.method, self.model.stages, prepared,
                              RunContext(self.device, self.amp_dtype, stats))
        else:
            combined = self.combine(self.model.method, self.stage_outputs(prepared, stats))
        mask, lesion = self.to_original(combined.lesion_probability, combined.properties, combined.threshold)
        numbers = clinical_numbers(mask, case.pet, case.geometry.spacing_zyx)
        numbers.update(_extra_columns(combined.values))
        return CasePrediction(
            case_id=case.case_id,
            mask=mask,
            lesion_probability=lesion,
            geometry=case.geometry,
            pet=case.pet,
            numbers=numbers,
            windows=stats,
            seconds=time.perf_counter() - started,
        )

    def stage_outputs(self, prepared: list[tuple[np.ndarray, dict]], stats: SlidingWindowStats) -> dict[str, StageOutput]:
        """Every stage's output, each stage given the earlier ones it takes as channels. A stage whose
        output only the combine rule reads, in part (``combine.READ_REGIONS``), runs after the others
        and only where the rule reads it."""
        method = self.model.method
        last = read_last(method)
        pairs = list(zip(self.model.stages, prepared))
        outputs: dict[str, StageOutput] = {}
        for stage, (data, properties) in sorted(pairs, key=lambda pair: pair[0].stage.name in last):
            region = None
            if stage.stage.name in last:
                region = READ_REGIONS[method.combine](method, outputs, stage.stage.name, properties)
            image = data
            if stage.stage.channel_inputs:
                cues = [map_between_caches(outputs[s].lesion_probability(), outputs[s].properties, properties)[None]
                        for s in stage.stage.channel_inputs]
                image = np.concatenate([data] + cues).astype(np.float32, copy=False)
            named = self.predict_stage(stage, image, stats, region)
            outputs[stage.stage.name] = StageOutput(
                probabilities=named.pop("probabilities").numpy(), properties=properties, output=stage.record.output,
                heads={k: v.numpy() for k, v in named.items()}, head_thresholds=stage.head_thresholds,
            )
        return outputs

    def predict_case(self, record: CaseRecord) -> CasePrediction:
        """Predict one case in memory (nothing written)."""
        started = time.perf_counter()
        case, prepared = self.load(record)
        return self.predict_loaded(case, prepared, started)

    # -------------------------------------------------------------- a folder
    def write_case(self, prediction: CasePrediction, output_dir: Path, record: CaseRecord | None = None) -> None:
        """Mask, optional probability and picture, then the CSV row (last: it marks the case finished)."""
        write_image(output_dir / f"{prediction.case_id}{MASK_SUFFIX}", prediction.mask, prediction.geometry)
        if prediction.lesion_probability is not None:
            write_image(
                output_dir / PROBABILITIES_FOLDER / f"{prediction.case_id}{MASK_SUFFIX}",
                prediction.lesion_probability,
                prediction.geometry,
            )
        if self.settings.png:
            _write_picture(output_dir, prediction.case_id, prediction.pet, prediction.geometry, prediction.mask,
                           record, prediction.numbers)
        update_prediction_csv(output_dir / PREDICTIONS_CSV, {"case_id": prediction.case_id, **prediction.numbers})

    def claim_output_folder(self, output_dir: Path) -> None:
        """Record this model and these settings as the producer of ``output_dir``'s predictions; a folder
        holding another producer's predictions is refused unless ``overwrite``, which removes them
        first (``output_record.py``). Under the CSV's lock: parts sharing the folder agree."""
        producer = describe_producer(self.model, self.settings, self.amp_dtype)
        csv_path = output_dir / PREDICTIONS_CSV
        with _locked(csv_path.with_name(f".{csv_path.name}.lock")):
            recorded, rows = read_producer(output_dir), read_prediction_rows(csv_path)
            if (recorded is not None and recorded["producer"] == producer) or (recorded is None and not rows):
                if recorded is None:
                    write_producer(output_dir, producer, self.model.model_dir)
                return
            differences = "; ".join(producer_differences(recorded, producer, self.model.model_dir))
            if not self.settings.overwrite:
                raise InputError(f"the folder holds {len(rows)} prediction(s) made by another model or with other "
                                 f"settings ({differences}): predict into another folder, or add --overwrite to "
                                 "replace them", file=output_dir)
            log.warning("--overwrite: removing %d prediction(s) of another model or settings (%s) from %s",
                        len(rows), differences, output_dir)
            from autopetseg.inference.dicom_seg import dicom_seg_path

            for case_id in rows:
                for path in (output_dir / f"{case_id}{MASK_SUFFIX}",
                             output_dir / PROBABILITIES_FOLDER / f"{case_id}{MASK_SUFFIX}",
                             output_dir / PNG_FOLDER / f"{case_id}.png", dicom_seg_path(output_dir, case_id)):
                    path.unlink(missing_ok=True)
            csv_path.unlink(missing_ok=True)
            write_producer(output_dir, producer, self.model.model_dir)

    def predict_folder(self, input_dir: str | Path, output_dir: str | Path) -> PredictionReport:
        """Predict every case of ``input_dir`` (this part's share) into ``output_dir``."""
        settings = self.settings
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output_dir, recursive=True)  # masks, probabilities, pictures of killed runs
        dataset = discover(input_dir)
        cases = split_cases(dataset.cases, settings.num_parts, settings.part_id)
        self.claim_output_folder(output_dir)  # refuse another model's predictions (output_record.py)
        report = PredictionReport(output_dir=output_dir)
        done_rows = read_prediction_rows(output_dir / PREDICTIONS_CSV)
        todo = []
        for record in cases:
            finished = record.case_id in done_rows and (output_dir / f"{record.case_id}{MASK_SUFFIX}").is_file()
            if settings.save_probabilities:  # asked for now, maybe not by the run that finished the case
                finished = finished and (output_dir / PROBABILITIES_FOLDER / f"{record.case_id}{MASK_SUFFIX}").is_file()
            if settings.dicom_seg:
                from autopetseg.inference.dicom_seg import dicom_seg_path

                finished = finished and dicom_seg_path(output_dir, record.case_id).is_file()
            if finished and not settings.overwrite:
                report.skipped.append(record.case_id)
                if settings.png and not (output_dir / PNG_FOLDER / f"{record.case_id}.png").is_file():
                    _picture_from_files(output_dir, record)
            else:
                todo.append(record)
        log.info(
            "predict: %d case(s) in part %d/%d, %d finished before, %d to do -> %s",
            len(cases), settings.part_id, settings.num_parts, len(report.skipped), len(todo), output_dir,
        )

        from tqdm import tqdm

        pool = ThreadPoolExecutor(max_workers=1) if settings.prefetch and len(todo) > 1 else None
        try:
            pending: Future | None = None
            for i, record in enumerate(tqdm(todo, desc="predict", disable=len(todo) < 2)):
                started = time.perf_counter()
                try:
                    loaded = pending.result() if pending is not None else self.load(record)
                except InputError as error:
                    loaded = error
                pending = pool.submit(self.load, todo[i + 1]) if pool is not None and i + 1 < len(todo) else None
                if isinstance(loaded, InputError):
                    error = loaded.with_case(record.case_id)
                    log.error("%s", error)
                    report.failures.append(error)
                    continue
                prediction = self.predict_loaded(*loaded, started=started)
                self.write_case(prediction, output_dir, record)
                if settings.dicom_seg:
                    from autopetseg.inference.dicom_seg import write_case_seg

                    try:
                        write_case_seg(output_dir, record, prediction.mask, prediction.geometry)
                    except InputError as error:  # the mask is written; the SEG failure is reported
                        log.error("%s", error.with_case(record.case_id))
                        report.failures.append(error.with_case(record.case_id))
                        continue
                report.predicted.append(record.case_id)
                report.seconds[record.case_id] = time.perf_counter() - started
                report.n_windows += prediction.windows.n_windows
                report.n_windows_skipped += prediction.windows.n_skipped
                log.info(
                    "%s: %d lesion(s), TMTV %.2f ml; %d of %d windows run; %.1f s",
                    record.case_id, prediction.numbers["lesion_count"], prediction.numbers["tmtv_ml"],
                    prediction.windows.n_windows - prediction.windows.n_skipped, prediction.windows.n_windows,
                    report.seconds[record.case_id],
                )
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if report.failures:
            log.error("%d case(s) failed: %s", len(report.failures), ", ".join(str(e.case) for e in report.failures))
        return report


def _write_picture(output_dir: Path, case_id: str, pet: np.ndarray, geometry: Geometry, mask: np.ndarray,
                   record: CaseRecord | None, numbers: dict | None) -> None:
    from autopetseg.scoring.metrics import dice
    from autopetseg.inference.pictures import read_mask_on, prediction_title, render_mip_png

    label = None
    if record is not None and record.label is not None:
        label = read_mask_on(record.label, geometry, case_id, "label")
    dsc = dice(label, mask) if label is not None and label.any() else None
    render_mip_png(output_dir / PNG_FOLDER / f"{case_id}.png", pet, geometry, label, mask,
                   prediction_title(case_id, numbers, dsc))


def _picture_from_files(output_dir: Path, record: CaseRecord) -> None:
    """The picture of a case finished by an earlier run without ``--png``."""
    import SimpleITK as sitk

    from autopetseg.data.imageio import read_image
    from autopetseg.inference.pictures import read_mask_on

    try:
        pet_image = read_image(record.pet, record.case_id, "PET") if record.pet is not None else None
    except InputError as error:
        log.warning("%s; no picture", error)
        return
    if pet_image is None:
        return
    geometry = Geometry.of(pet_image)
    mask = read_mask_on(output_dir / f"{record.case_id}{MASK_SUFFIX}", geometry, record.case_id, "prediction")
    if mask is None:
        return
    pet = sitk.GetArrayFromImage(pet_image).astype(np.float32, copy=False)
    _write_picture(output_dir, record.case_id, pet, geometry, mask, record,
                   clinical_numbers(mask, pet, geometry.spacing_zyx))


def predict_folder(
    input_dir: str | Path,
    output_dir: str | Path,
    model_dir: str | Path,
    settings: PredictorSettings | None = None,
) -> PredictionReport:
    """Load the ensemble of ``model_dir`` and predict every case of ``input_dir`` into ``output_dir``.

    The one call ``autopetseg predict`` and the demo make; see the module doc for the files.
    """
    return Predictor(model_dir, settings).predict_folder(input_dir, output_dir)
