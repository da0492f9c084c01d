"""Triton kernels, one file per op family: ``@triton.jit`` kernels first, then their launcher.

Importing this package imports Triton; fastvq only does so when a Triton backend is chosen.
"""
