"""Fingerprint the data, then plan spacing, normalization, patch, network and batch."""
