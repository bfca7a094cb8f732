"""Benchmarks, run as modules: `python -m minisora.bench.data` (or `minisora bench data`)."""
