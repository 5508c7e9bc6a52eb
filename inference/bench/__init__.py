"""Benchmarks: scripts that print figures side by side with named peers (not tests).

Run one with ``python -m inference.bench.<name> --help``.
"""
