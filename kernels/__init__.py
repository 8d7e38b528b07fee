"""Fused RepBend loss kernels."""
