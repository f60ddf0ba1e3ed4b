"""Prefect flows that run the DVC pipeline (`pipeline`) and sweeps over it (`sweep`)."""
