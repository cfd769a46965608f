"""Sweeps past one machine: the job grid and its record keys, shards, resume files, merging of
shards, and the Ray executor."""
