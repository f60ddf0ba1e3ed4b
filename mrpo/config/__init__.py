"""The configuration: schema (each field with its help and bounds), loading and --set, cross-field rules."""
