"""What training and inference share, below both: networks, devices and AMP, inference strategies
(sliding window, slices, whole image), methods and their stages, model folders and checkpoints.

Inference builds every network from the JSON a fold records; it never constructs a trainer.
"""
