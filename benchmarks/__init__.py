"""Benchmarks: `python -m benchmarks` (or `bash scripts/dev.sh bench`) runs them all in one process."""
