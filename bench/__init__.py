"""Benchmarks: load generator, baselines and the side-by-side comparison (not shipped in the wheel)."""
