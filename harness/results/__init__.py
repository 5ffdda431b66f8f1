"""Results on disk: the run folder layout, the verdict rules that judge a sweep, and sweep comparison."""
