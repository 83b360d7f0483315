"""Kernels placeholder."""
