"""Benchmarks and the performance model of jit_fast: traffic counter, roofline, GPU timings, reports."""
