"""Configuration, validated before any run: the run config, the matrix that expands into runs, the tune space."""
