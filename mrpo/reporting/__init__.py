"""Tables, plots, the model card."""
