"""The test set scored: scoring.py (the loop's test pass, and evaluate.py's evaluation of a checkpoint on any
number of processes), metrics.py (per-image -ELBO, IWAE bound, bits/dim, KL per dimension, active units),
sample_quality.py (the Fréchet classifier distance)."""
