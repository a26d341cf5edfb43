"""Scoring: the autoPET challenge metrics (DSC, FPV, FNV), lesion detection by the SUVmax rule,
clinical numbers (TMTV, TLG, SUVmax, SUVmean, lesion count, Dmax) and the ``evaluate`` stage.

Modules: ``metrics`` (per-case metrics and their aggregation), ``clinical`` (numbers read from
a mask and the SUV image), ``evaluate`` (``evaluate_folder``: a prediction folder against a
labelled dataset folder → ``metrics.csv`` + ``summary.json``). None of them imports torch.
"""
