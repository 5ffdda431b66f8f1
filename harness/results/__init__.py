"""Results on disk: the run folder layout, the verdict rules that judge a sweep, sweep comparison,
and a sweep's results as pandas DataFrames (tables.py)."""
