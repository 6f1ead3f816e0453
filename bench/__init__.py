"""Benchmarks: CPU throughput vs reference implementations, instrument overhead, distributed scaling,
and a GPU script (bench/gpu.py). Run everything with ``python -m bench.run_all --out bench/RESULTS.md``."""
