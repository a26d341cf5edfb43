"""autopetseg: self-configuring lesion segmentation for whole-body PET/CT."""

__version__ = "0.1.0"
