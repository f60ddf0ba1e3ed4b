"""Experiment tracking: the only code that imports mlflow; lineage; the runs table."""
