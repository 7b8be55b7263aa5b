"""Benchmarks: each row is a cost relative to a plain forward pass in the same run."""
