"""Scores of a mask against its ground truth (autoPET challenge metrics, detection) and the clinical numbers of a mask.

Pure numpy/scipy, below every stage that needs them: training (validation), inference
(clinical numbers in predictions.csv) and evaluation.
"""
