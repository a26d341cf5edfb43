"""Inference: sliding-window prediction, fold ensembles, the folder predictor and MIP pictures.

Heavy submodules (the predictor, which imports the training package, and the pictures, which
import matplotlib) are imported on first use of their names.
"""

from autopetseg.inference.sliding_window import SlidingWindowStats, gaussian_importance_map, sliding_window_predict, window_starts

_LAZY = {
    "Predictor": "autopetseg.inference.predictor",
    "PredictorSettings": "autopetseg.inference.predictor",
    "PredictionReport": "autopetseg.inference.predictor",
    "CasePrediction": "autopetseg.inference.predictor",
    "predict_folder": "autopetseg.inference.predictor",
    "EnsembleModel": "autopetseg.inference.ensemble",
    "ensemble_weights": "autopetseg.inference.ensemble",
    "load_ensemble": "autopetseg.inference.ensemble",
    "render_mip_png": "autopetseg.inference.pictures",
    "write_evaluation_pictures": "autopetseg.inference.pictures",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autopetseg.inference' has no attribute {name!r}")


__all__ = ["SlidingWindowStats", "gaussian_importance_map", "sliding_window_predict", "window_starts", *_LAZY]
