"""Benchmark scripts and the training tasks they share with the tests."""
