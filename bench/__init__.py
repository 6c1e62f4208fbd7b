"""Benchmarks: each prints numbers and is never a test. Run from the repository root as
`python -m bench.NAME` (each module's docstring lists its commands)."""
