"""The prepared-data contract, data sources, the synthetic task, score files, tokenization, preference
batches.
"""
