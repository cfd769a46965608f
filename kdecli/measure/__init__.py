"""The measuring kernel every experiment calls: masks, the float64 reference (every row or a row
sample), metrics, timing, memory, one measured record, the environment and failure classes."""
