"""Triton kernels of leafe-fast, installed as ``leafe_fast.kernels``.

Import-safe without a GPU: kernels run on CUDA, or on the CPU under ``TRITON_INTERPRET=1``.

- ``leafe_ce_operands`` the operand record (``LossHead``) and ``GradNeeds`` every op set takes.
- ``leafe_ce_triton``   fused LM head + cross-entropy over selected rows: the "chunked" gradient-in-forward
                        schedule (cuBLAS + a Triton row kernel; the CUDA default, ``impl="auto"``) and
                        the forward + recompute-backward schedules ("triton_gemm", "triton_atomic");
                        ``smoke_test()`` runs the forward kernel once on a tiny shape.
- ``leafe_ce_torch``    the chunked schedule in torch (CPU path; fp32 math).
- ``leafe_ce_autograd`` the autograd Functions and the named implementations (``IMPLS``) that
                        ``leafe_fast.loss`` builds on.
- ``aot_check``         compiles every kernel variant for sm_90 / sm_80 on the CPU; reports shared memory,
                        registers and spills.
"""
