"""The ``evaluate`` stage: a prediction folder against a labelled dataset folder.

``evaluate`` (``evaluate_folder`` → ``metrics.csv`` + ``summary.json``), ``report`` (the L1DFL
paper's lesion-level analysis), ``pictures`` (MIPs of predictions against ground truth). The
metric functions themselves live in ``autopetseg.scoring``, below training and inference.
"""
