"""Speed and accuracy benchmarks: `python -m benchmarks run [--small]` (README lists the figures)."""
