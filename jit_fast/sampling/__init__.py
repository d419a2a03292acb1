"""Sampling: Heun/Euler samplers (CUDA graphs), sample.py's generation, FID/IS, the demo judge, outputs."""
