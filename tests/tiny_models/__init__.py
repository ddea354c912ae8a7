"""Tiny random-weight models built from configs in code, for offline tests and benchmarks."""
