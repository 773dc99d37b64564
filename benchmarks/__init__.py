"""Benchmarks of bsattn_jax against its peers (run `benchmarks/gpu_suite.py`)."""
