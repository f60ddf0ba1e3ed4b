"""The Trainer subclass, its callbacks and checkpoints, and the setup the train stage and the comparison
share.
"""
