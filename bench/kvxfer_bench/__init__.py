"""kvxfer-bench: the throughput tool of kvxfer (``kvxfer-bench --help``, docs/benchmarks.md)."""

__version__ = "0.1.0"
