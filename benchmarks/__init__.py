"""Benchmarks of settler on the real dev stack (`settler dev up`): `python -m benchmarks`.

Settlement throughput (worker vs. driver ceiling vs. naive loop, plus latency), replay of a
settled topic, and worker memory against distinct users. Each writes its own section of
BENCHMARKS.md and a plot; `benchmarks/read_balances.py` is a separate, standalone script.
"""
