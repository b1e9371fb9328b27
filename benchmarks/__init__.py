"""Benchmarks of the implicit gradient and the bilevel stage; run ``python -m benchmarks.<name>``
from the repository root (shared pieces: :mod:`benchmarks.harness`)."""
