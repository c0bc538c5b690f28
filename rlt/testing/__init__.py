"""Helpers for tests, the demo and benchmarks (tiny models, no hub access)."""
