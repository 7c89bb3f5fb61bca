"""Benchmarks (`python -m bench`, see bench/README.md): every figure is a difference or a ratio
against a baseline measured in the same run."""
