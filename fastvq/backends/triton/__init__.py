"""Triton kernels, one file per op family: ``@triton.jit`` kernels first, then their launcher.

Importing this package imports Triton; fastvq only does so when a Triton backend is chosen.

Compile cases: the convention every family file follows
-------------------------------------------------------
CI has no GPU, and Triton's interpreter, which checks the kernels' arithmetic there, sees no shared
memory, registers, tensor cores, atomic orderings or int32 overflow. ``tests/backends/test_aot_compile.py``
therefore compiles every kernel for sm_80 and sm_90 and reads the cubin. For that, a family file
that defines ``@triton.jit`` kernels provides::

    def compile_cases() -> list[CompileCase]:   # CompileCase from .common

listing the launches real calls make: one case per dtype, metric, layout and constexpr branch, and the
specialisations real calls take (odd N, K and D, strides and addresses no multiple of 16:
``common.offset_rows``, ``common.codes_by_column``; a prune may key on that divisibility), with
arguments built by the same helper the launcher uses (CPU tensors stand in for CUDA ones; the JIT
specialises on dtype, alignment and sizes, not on the device). A case's ``launcher`` is what the
launcher calls: an autotuned kernel is compiled in every config its early prune keeps on the
target, a fixed launch in the ``configs`` the case names (so give the launcher its
``triton.Config``). The test fails for a kernel no case launches (device helpers that a kernel calls
are covered through it), for a compile error, a config that overflows the target's shared memory
or that the prune keeps although it does not fit, a register spill (any stack frame or local
memory), a ``tl.dot`` not on tensor cores, an int32 pointer offset (unless the family declares
``INT32_TILE_OFFSETS``, a string saying why its int32 offsets cannot overflow, as soft_quantize.py
does), and an atomic that is not ``sem="relaxed"``. Autotuners prune with
``common.fits_shared_memory(kernel, own_prune)``, which compiles each config for the device and drops
those over its shared memory per block. Keep the cases few: each costs a compile per config and
target, and the whole test has a few minutes of CI.
"""
