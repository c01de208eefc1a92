"""Benchmarks: ``python -m benchmarks [--quick]`` (see docs/benchmarks.md)."""
