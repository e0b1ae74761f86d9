"""Benchmark scripts (run as ``python bench/<name>.py``); a package so that the tests import them as
``bench.<name>`` from the repository root."""
