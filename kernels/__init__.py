"""Triton kernels of leafe-fast, installed as ``leafe_fast.kernels``.

Import-safe without a GPU: kernels run on CUDA, or on the CPU under ``TRITON_INTERPRET=1``.

- ``leafe_ce_triton``   fused LM head + cross-entropy over selected rows: online log-sum-exp forward,
                        recompute backward ("gemm": dlogits chunks + cuBLAS, or "atomic": one kernel);
                        ``smoke_test()`` runs the forward kernel once on a tiny shape.
- ``leafe_ce_torch``    its chunked torch twin (CPU path; gradient-in-forward for scalar losses).
- ``leafe_ce_autograd`` the autograd Functions that ``leafe_fast.loss`` builds on.
"""
