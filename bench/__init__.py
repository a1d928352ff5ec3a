"""Benchmarks of mirror: pytest-benchmark suites and `python -m bench.report`."""
