"""The memory-bounded pure-PyTorch path (``FASTVQ_BACKEND=torch``), one file per op family.

It runs on any device PyTorch runs on, with no compilation, and never holds an ``N x K`` matrix:
every loop works on slabs bounded by ``fastvq.backends.common.CHUNK_BYTES``.
"""
