"""Benchmarks behind `sessiongate bench` (one module per verb: `store_bench` for `bench store`).

Benchmarks print their figures and, with `--json`, write them; they never assert timings
(DESIGN, conventions: performance is measured here, not in tests).
"""
