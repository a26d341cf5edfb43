"""Training: the ``Trainer`` and its variants, networks, losses, cross-validation splits."""
