"""The C++ soft-assignment kernels (csrc/cpu/soft_quantize.cpp) beyond the shared parity cases: shapes
that span several row and code tiles and ragged register blocks, every metric's forward and gradients
against the PyTorch path in float64, Gumbel samples equal to ``fastvq._philox``'s across tiles, the
same results on one thread and two, and ``opcheck`` of the ``fastvq_C`` operators themselves."""

from __future__ import annotations

import pytest
import torch
from _backends import CPP_MISSING_REASON, HAS_CPP

import fastvq
from fastvq import _philox

pytestmark = pytest.mark.skipif(not HAS_CPP, reason=f"fastvq._C: {CPP_MISSING_REASON}")

# 70 rows span two 64-row tiles; 300 codes three 128-code tiles; 37 and 5 are ragged register blocks.
ROWS, CODES, DIM, VALUE_DIM = 70, 300, 37, 5


def _run(backend: str, monkeypatch, z, codebook, values, metric, temperature):
    monkeypatch.setenv("FASTVQ_BACKEND", backend)
    z = z.clone().requires_grad_(True)
    codebook = codebook.clone().requires_grad_(True)
    values = None if values is None else values.clone().requires_grad_(True)
    soft, indices, lse = torch.ops.fastvq.soft_quantize(z, codebook, values, metric, temperature, None, True)
    upstream = torch.randn(soft.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(soft.dtype)
    ((soft * upstream).sum() + lse.square().sum()).backward()
    grads = (z.grad, codebook.grad) + (() if values is None else (values.grad,))
    return (soft, indices, lse) + grads


@pytest.mark.parametrize("metric", ["dot", "cosine", "l2", "euclidean"])
@pytest.mark.parametrize("with_values", [False, True], ids=["codebook-values", "own-values"])
def test_matches_the_pytorch_path_across_tiles(metric, with_values, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(ROWS, DIM, generator=generator, dtype=torch.float64)
    codebook = torch.randn(CODES, DIM, generator=generator, dtype=torch.float64)
    codebook[7] = float("nan")  # an excluded code: probability 0, no gradient
    values = torch.randn(CODES, VALUE_DIM, generator=generator, dtype=torch.float64) if with_values else None
    temperature = 3.0 if metric in ("dot", "l2") else 0.3
    theirs = _run("torch", monkeypatch, z, codebook, values, metric, temperature)
    ours = _run("cpp", monkeypatch, z, codebook, values, metric, temperature)
    names = ("soft", "indices", "lse", "grad_z", "grad_codebook", "grad_values")
    for name, got, expected in zip(names, ours, theirs):
        if name == "indices":
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10, equal_nan=True, msg=name)


def test_fp32_and_bf16_accumulate_in_fp32(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(ROWS, DIM, generator=generator)
    codebook = torch.randn(CODES, DIM, generator=generator)
    truth = _run("torch", monkeypatch, z.double(), codebook.double(), None, "l2", 5.0)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        ours = _run("cpp", monkeypatch, z.to(dtype), codebook.to(dtype), None, "l2", 5.0)
        assert ours[2].dtype == torch.float32  # lse in the work dtype
        for index in (0, 3, 4):
            torch.testing.assert_close(ours[index].double(), truth[index], rtol=tolerance, atol=tolerance)


def test_gumbel_samples_are_philox_across_tiles(monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", "cpp")
    seed = -(2**40) - 12345  # both key words set, the high one from a negative seed
    z = torch.zeros(ROWS, 4)
    codebook = torch.randn(CODES, 4)
    expected = _philox.gumbel_noise(seed, torch.arange(ROWS), 0, CODES).argmax(dim=1)
    _, indices, _ = fastvq.soft_quantize(z, codebook, metric="dot", gumbel=True, seed=torch.tensor(seed))
    assert torch.equal(indices, expected)


def test_one_thread_and_two_agree(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(ROWS, DIM, generator=generator)
    codebook = torch.randn(CODES, DIM, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run("cpp", monkeypatch, z, codebook, None, "dot", 2.0)
        torch.set_num_threads(2)
        two = _run("cpp", monkeypatch, z, codebook, None, "dot", 2.0)
    finally:
        torch.set_num_threads(threads)
    # Rows and codes each belong to one thread: the same sums in the same order. The row gradient's
    # partial sums are per thread and added at the end, so it may differ in the last bits.
    for name, got, expected in zip(("soft", "indices", "lse", "grad_z", "grad_codebook"), two, one):
        if name == "grad_z":
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, expected), name


def test_c_operators_pass_opcheck():
    fastvq.backends.cpp.load()
    generator = torch.Generator().manual_seed(4)
    zq, keys = torch.randn(9, 6, generator=generator), torch.randn(40, 6, generator=generator)
    values, code_term, row_term = torch.randn(40, 3, generator=generator), torch.rand(40), torch.rand(9)
    torch.library.opcheck(torch.ops.fastvq_C.soft_quantize,
                          (zq, keys, code_term, row_term, values, 1, 0.5, torch.tensor(7), True))
    grad_soft, delta, lse = torch.randn(9, 3), torch.randn(9), torch.randn(9)
    torch.library.opcheck(torch.ops.fastvq_C.soft_quantize_backward,
                          (grad_soft, delta, lse, zq, keys, code_term, row_term, values, 2, 0.5, True, True, True))


@pytest.mark.parametrize("metric", ["dot", "cosine", "l2", "euclidean"])
def test_entropies_match_the_pytorch_path_across_tiles(metric, monkeypatch):
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(ROWS, DIM, generator=generator, dtype=torch.float64)
    codebook = torch.randn(CODES, DIM, generator=generator, dtype=torch.float64)
    codebook[11] = float("inf")  # an excluded code: probability 0, no gradient
    weights = [torch.randn(size, generator=generator, dtype=torch.float64) for size in (ROWS, CODES, ROWS)]

    def run(backend):
        monkeypatch.setenv("FASTVQ_BACKEND", backend)
        leaves = z.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
        outputs = torch.ops.fastvq.soft_entropy(*leaves, metric, 0.7)
        sum((out * weight).sum() for out, weight in zip(outputs, weights)).backward()
        return (*outputs, leaves[0].grad, leaves[1].grad)

    names = ("row_entropy", "mean_probs", "lse", "grad_z", "grad_codebook")
    for name, got, expected in zip(names, run("cpp"), run("torch")):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11, equal_nan=True, msg=name)


def _fp32_step(z, codebook, values):
    """soft_quantize (euclidean, own values) and soft_quantize_entropy (l2), forward and backward, on leaf copies."""
    leaves = [t.clone().requires_grad_(True) for t in (z, codebook, values)]
    soft, indices, lse = fastvq.soft_quantize(leaves[0], leaves[1], metric="euclidean", temperature=0.7,
                                              values=leaves[2])
    fused_soft, fused_indices, row_entropy, mean_probs = fastvq.soft_quantize_entropy(
        leaves[0], leaves[1], metric="l2", temperature=2.0, entropy_temperature=0.5
    )
    generator = torch.Generator().manual_seed(4)
    outputs = (soft, lse, fused_soft, row_entropy, mean_probs)
    objective = sum((out * torch.randn(out.shape, generator=generator)).sum() for out in outputs)
    return (*(out.detach() for out in outputs), indices, fused_indices, *torch.autograd.grad(objective, leaves))


@pytest.mark.parametrize("kernel", ["avx2", "blas"])
def test_every_instruction_set_gives_the_default_kernels_results(kernel, monkeypatch):
    """FASTVQ_CPU_SEARCH picks the soft kernels' instruction set as it picks the search's: the AVX2 + FMA
    kernels (6 x 16 register blocks, their own exp) and the plain loops give the default kernels' results in
    fp32 across tiles and ragged blocks, forward and backward, the fused op included."""
    if kernel == "avx2" and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv("FASTVQ_BACKEND", "cpp")
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(ROWS, DIM, generator=generator)
    codebook = torch.randn(CODES, DIM, generator=generator)
    values = torch.randn(CODES, VALUE_DIM, generator=generator)
    default = _fp32_step(z, codebook, values)
    monkeypatch.setenv("FASTVQ_CPU_SEARCH", kernel)
    chosen = _fp32_step(z, codebook, values)
    for position, (got, expected) in enumerate(zip(chosen, default)):
        if expected.dtype == torch.int64:
            assert torch.equal(got, expected), position
        else:
            torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-6, msg=f"output {position}")


def test_an_unknown_instruction_set_is_rejected(monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", "cpp")
    monkeypatch.setenv("FASTVQ_CPU_SEARCH", "sse9")
    with pytest.raises(ValueError, match="FASTVQ_CPU_SEARCH must be auto"):
        fastvq.soft_quantize(torch.randn(4, 3), torch.randn(5, 3))


def _bf16_products_run() -> bool:
    if not HAS_CPP:
        return False
    fastvq.backends.cpp.load()
    return fastvq.backends.cpp._bf16_logit_products()


def _bf16_operand_calls(zq, keys, code_term, row_term, values):
    """Every fastvq_C soft operator, forward and backward, on the given operands (euclidean for soft_quantize,
    dot for the entropies, l2 for the fused op): the outputs, in one flat list."""
    generator = torch.Generator().manual_seed(8)
    rows, codes, value_dim = zq.shape[0], keys.shape[0], values.shape[1]

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    ops = torch.ops.fastvq_C
    soft, indices, lse = ops.soft_quantize(zq, keys, code_term, row_term, values, 2, 1 / 0.7, None, True)
    outputs = [soft, indices, lse]
    outputs += ops.soft_quantize_backward(randn(rows, value_dim), randn(rows), lse, zq, keys, code_term, row_term,
                                        values, 2, 1 / 0.7, True, True, True)
    entropy, code_sums, entropy_lse = ops.soft_entropy(zq, keys, code_term, row_term, 0, 2.0)
    outputs += [entropy, code_sums, entropy_lse]
    outputs += ops.soft_entropy_backward(randn(rows), randn(codes), randn(rows), entropy_lse, zq, keys, code_term,
                                       row_term, 0, 2.0, True, True)
    fused = ops.soft_quantize_entropy(zq, keys, code_term, row_term, values, 1, 0.5, 2.0, True)
    outputs += fused
    outputs += ops.soft_quantize_entropy_backward(randn(rows, value_dim), randn(rows), fused[2], randn(rows),
                                                randn(codes), randn(rows), fused[5], zq, keys, code_term, row_term,
                                                values, 1, 0.5, 2.0, True, True, True)
    return outputs


@pytest.mark.skipif(not _bf16_products_run(), reason="this CPU (or build) has no AVX512-BF16, so the soft kernels "
                    "widen bf16 operands to fp32 and there is no bf16 kernel to compare")
def test_bf16_logit_products_match_the_widened_fp32_path(monkeypatch):
    """bf16 zq and keys: under FASTVQ_CPU_SEARCH=auto the logit products run on vdpbf16ps (exact bf16 products,
    fp32 accumulation, two dimensions a step, an odd last one padded), under `avx512` on the same values widened
    to fp32. Only the order of the fp32 additions differs, so every operator's outputs and sums agree to fp32
    rounding across row and code tiles and ragged blocks (70 rows, 300 codes, D = 37)."""
    generator = torch.Generator().manual_seed(9)
    zq = torch.randn(ROWS, DIM, generator=generator).bfloat16()
    keys = torch.randn(CODES, DIM, generator=generator).bfloat16()
    code_term, row_term = keys.float().square().sum(1), zq.float().square().sum(1)
    values = torch.randn(CODES, VALUE_DIM, generator=generator)
    bf16 = _bf16_operand_calls(zq, keys, code_term, row_term, values)
    monkeypatch.setenv("FASTVQ_CPU_SEARCH", "avx512")
    widened = _bf16_operand_calls(zq, keys, code_term, row_term, values)
    for position, (got, expected) in enumerate(zip(bf16, widened)):
        if expected.dtype == torch.int64:
            assert torch.equal(got, expected), position
        else:
            assert got.dtype == torch.float32, position
            scale = float(expected.abs().max()) if expected.numel() else 1.0
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * scale, msg=f"output {position}")
    # The pairs add in another order: were the bf16 products not taken, the results would be bit-equal.
    assert not all(torch.equal(got, expected) for got, expected in zip(bf16, widened))


def test_bf16_operands_pass_opcheck():
    """The operators take bf16 zq and keys (the rest in fp32) and return fp32, their fakes too."""
    fastvq.backends.cpp.load()
    generator = torch.Generator().manual_seed(6)
    zq, keys = torch.randn(9, 7, generator=generator).bfloat16(), torch.randn(40, 7, generator=generator).bfloat16()
    values, code_term, row_term = torch.randn(40, 3, generator=generator), torch.rand(40), torch.rand(9)
    torch.library.opcheck(torch.ops.fastvq_C.soft_quantize,
                          (zq, keys, code_term, row_term, values, 1, 0.5, None, True))
    torch.library.opcheck(torch.ops.fastvq_C.soft_entropy_backward,
                          (torch.randn(9), torch.randn(40), torch.randn(9), torch.randn(9), zq, keys, code_term,
                           row_term, 1, 0.5, True, True))


def test_soft_ops_run_pytorch_ops_on_one_thread_and_kernels_on_the_callers(monkeypatch):
    """The soft ops' operand preparation runs on one OpenMP thread (a loaded machine turns each PyTorch
    region's wake-up into a scheduler slice), the kernel on the caller's count, which is restored afterwards,
    after an error too."""
    from fastvq.backends import cpp, openmp

    if openmp._openmp_num_threads_setter() is None:
        pytest.skip("PyTorch's OpenMP runtime was not found: the soft ops run their PyTorch ops as they are")
    outer = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = {}
        kernel = torch.ops.fastvq_C.soft_quantize

        def recording_kernel(*args):
            seen["kernel"] = torch.get_num_threads()
            return kernel(*args)

        def recording_operands(prep, z):
            seen["operands"] = torch.get_num_threads()
            return original_operands(prep, z)

        original_operands = cpp._soft_operands
        monkeypatch.setattr(cpp, "_soft_operands", recording_operands)
        monkeypatch.setattr(cpp, "with_threads", _wrap_with_threads(cpp.with_threads, kernel, recording_kernel))
        z, codebook = torch.randn(40, 8), torch.randn(24, 8)
        cpp.soft_quantize(z, codebook, None, "l2", 1.0, None, True)
        assert seen == {"operands": 1, "kernel": 2}
        assert torch.get_num_threads() == 2

        def failing_operands(prep, z):
            raise RuntimeError("operands failed")

        monkeypatch.setattr(cpp, "_soft_operands", failing_operands)
        with pytest.raises(RuntimeError, match="operands failed"):
            cpp.soft_quantize(z, codebook, None, "l2", 1.0, None, True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(outer)


def _wrap_with_threads(with_threads, kernel, replacement):
    """``cpp.with_threads`` that runs ``replacement`` where it was given ``kernel``."""

    def wrapped(op, *args):
        return with_threads(replacement if op is kernel else op, *args)

    return wrapped
