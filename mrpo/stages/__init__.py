"""One recipe per pipeline stage (and the comparison). Nothing in the library imports a stage."""
