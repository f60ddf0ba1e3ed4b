"""The objective: losses, the reference combination, WPO, weighting strategies, statistics. Pure tensors;
imports nothing else from mrpo.
"""
