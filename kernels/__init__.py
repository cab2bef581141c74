"""Triton kernels of leafe-fast, installed as ``leafe_fast.kernels``.

Import-safe without a GPU: kernels run on CUDA, or on the CPU under ``TRITON_INTERPRET=1``.
"""
