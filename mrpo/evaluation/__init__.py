"""lm-eval-harness: task data, running it on a model, reading its results."""
