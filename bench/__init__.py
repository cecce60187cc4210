"""Benchmarks of the queue against the floor and the old in-request design (see bench/README.md)."""
