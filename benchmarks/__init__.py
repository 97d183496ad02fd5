"""Benchmarks: per-stage latency, side-by-side baselines, server load, memory and the bandwidth floor."""
