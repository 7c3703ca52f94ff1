"""xfer: transfer-learning studies at cluster scale (Kornblith et al. 2019, and extensions)."""

__version__ = "0.1.0"
