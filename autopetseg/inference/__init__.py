"""Inference: fold ensembles per stage, the folder predictor and MIP pictures.

Submodules are imported on first use of their names (the pictures import matplotlib).
"""

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
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autopetseg.inference' has no attribute {name!r}")


__all__ = list(_LAZY)
