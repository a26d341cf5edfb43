"""Preprocessing into the cache and its inversion back to the PET geometry."""

from autopetseg.preprocessing.preprocessor import (
    PreprocessingSettings,
    invert_probabilities,
    invert_to_original,
    load_preprocessed,
    preprocess_case,
    preprocess_dataset,
    preprocess_for_inference,
)
from autopetseg.preprocessing.resampling import LabelResampling

__all__ = [
    "LabelResampling",
    "PreprocessingSettings",
    "invert_probabilities",
    "invert_to_original",
    "load_preprocessed",
    "preprocess_case",
    "preprocess_dataset",
    "preprocess_for_inference",
]
