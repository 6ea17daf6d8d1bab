"""Throughput and scaling benchmarks."""
