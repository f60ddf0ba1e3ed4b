"""Multi-Reference Preference Optimization (arXiv 2405.16388): losses, weighting, pipeline stages."""

__version__ = "0.1.0"
