// The torch.ops.fastvq_C operators and the Python module fastvq._C that registers them on import.
//
// These are the compiled kernels behind the public torch.ops.fastvq operators: fastvq/backends/cpp.py
// calls them from the real implementations declared in fastvq/_ops.py (which keep the one public
// schema, the fake functions and autograd) and registers their own fake functions, so they pass
// torch.library.opcheck by themselves too.
#include <Python.h>

#include <torch/library.h>

#include <string>

#include "fastvq.h"

namespace fastvq {
namespace {

std::string build_info() {
  std::string info = "{";
#ifdef _OPENMP
  info += "\"openmp\": true";
#else
  info += "\"openmp\": false";
#endif
#if defined(__AVX512F__)
  info += ", \"vector_isa\": \"avx512\"";
#elif defined(__AVX2__)
  info += ", \"vector_isa\": \"avx2\"";
#elif defined(__ARM_NEON)
  info += ", \"vector_isa\": \"neon\"";
#else
  info += ", \"vector_isa\": \"baseline\"";
#endif
#ifdef FASTVQ_WITH_CUDA
  info += ", \"cuda\": true";
#else
  info += ", \"cuda\": false";
#endif
  // What the CPU runs (at run time, not the build's -march) and the search kernel each dtype takes.
  info += ", \"cpu_isa\": " + cpu_isa();
  info += ", \"cpu_search\": " + cpu_search_kernels();
  info += ", \"compiler\": \"" __VERSION__ "\"}";
  return info;
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY(fastvq_C, m) {
  m.def("nearest_code(Tensor z, Tensor codebook, str metric, bool return_codes) -> (Tensor, Tensor, Tensor)");
  m.def("segment_reduce(Tensor values, Tensor indices, int num_codes, bool deterministic) -> (Tensor, Tensor)");
  m.def("nearest_codes(Tensor z, Tensor codebook, int k, str metric) -> (Tensor, Tensor)");
  m.def("build_info() -> str", &fastvq::build_info);
  m.def("cpu_search_kernels() -> str", &fastvq::cpu_search_kernels);
  m.def("cpu_peak_gflops(str isa, int threads, int iterations) -> float", &fastvq::cpu_peak_gflops);
  m.def("nearest_code_batched(Tensor z, Tensor codebook, str metric) -> (Tensor, Tensor)");
  m.def("soft_quantize(Tensor zq, Tensor keys, Tensor code_term, Tensor row_term, Tensor values, int metric, "
        "float inverse_temperature, Tensor? seed, bool return_hard) -> (Tensor, Tensor, Tensor)");
  m.def("soft_quantize_backward(Tensor grad_soft, Tensor delta, Tensor lse, Tensor zq, Tensor keys, "
        "Tensor code_term, Tensor row_term, Tensor values, int metric, float inverse_temperature, bool rows_grad, "
        "bool codes_grad, bool values_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("soft_entropy(Tensor zq, Tensor keys, Tensor code_term, Tensor row_term, int metric, "
        "float inverse_temperature) -> (Tensor, Tensor, Tensor)");
  m.def("soft_entropy_backward(Tensor grad_entropy, Tensor code_weights, Tensor row_constant, Tensor lse, "
        "Tensor zq, Tensor keys, Tensor code_term, Tensor row_term, int metric, float inverse_temperature, "
        "bool rows_grad, bool codes_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("soft_quantize_entropy(Tensor zq, Tensor keys, Tensor code_term, Tensor row_term, Tensor values, "
        "int metric, float inverse_temperature, float entropy_inverse_temperature, bool return_hard) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("soft_quantize_entropy_backward(Tensor grad_soft, Tensor delta, Tensor lse, Tensor grad_entropy, "
        "Tensor code_weights, Tensor row_constant, Tensor entropy_lse, Tensor zq, Tensor keys, Tensor code_term, "
        "Tensor row_term, Tensor values, int metric, float inverse_temperature, float entropy_inverse_temperature, "
        "bool rows_grad, bool codes_grad, bool values_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvq_C, CPU, m) {
  m.impl("nearest_code", &fastvq::nearest_code_cpu);
  m.impl("segment_reduce", &fastvq::segment_reduce_cpu);
  m.impl("nearest_codes", &fastvq::nearest_codes_cpu);
  m.impl("nearest_code_batched", &fastvq::nearest_code_batched_cpu);
  m.impl("soft_quantize", &fastvq::soft_quantize_cpu);
  m.impl("soft_quantize_backward", &fastvq::soft_quantize_backward_cpu);
  m.impl("soft_entropy", &fastvq::soft_entropy_cpu);
  m.impl("soft_entropy_backward", &fastvq::soft_entropy_backward_cpu);
  m.impl("soft_quantize_entropy", &fastvq::soft_quantize_entropy_cpu);
  m.impl("soft_quantize_entropy_backward", &fastvq::soft_quantize_entropy_backward_cpu);
}

// An empty module: importing it runs the static registrations above.
static PyModuleDef fastvq_c_module = {PyModuleDef_HEAD_INIT, "_C", "fastvq's compiled kernels (torch.ops.fastvq_C)",
                                      -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastvq_c_module); }

TORCH_LIBRARY_FRAGMENT(fastvq_C, m) {
  m.def("residual_quantize(Tensor z, Tensor codebooks, int n_q, Tensor? row_levels, bool return_stats) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace fastvq {
// residual_quantize.cpp: (grad_z [N, D] z's dtype, grad_codebooks [L or 0, K, D] fp32 or fp64).
std::tuple<at::Tensor, at::Tensor> residual_quantize_backward_cpu(
    const at::Tensor& grad_quantized, const at::Tensor& grad_commitment, const at::Tensor& grad_codebook_loss,
    const at::Tensor& z, const at::Tensor& codebooks, const at::Tensor& indices, const std::string& straight_through,
    bool compute_codebook_grad);
}  // namespace fastvq

TORCH_LIBRARY_FRAGMENT(fastvq_C, m) {
  m.def("residual_quantize_backward(Tensor grad_quantized, Tensor grad_commitment, Tensor grad_codebook_loss, "
        "Tensor z, Tensor codebooks, Tensor indices, str straight_through, bool compute_codebook_grad) -> "
        "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvq_C, CPU, m) {
  m.impl("residual_quantize", &fastvq::residual_quantize_cpu);
  m.impl("residual_quantize_backward", &fastvq::residual_quantize_backward_cpu);
}

// Sinkhorn passes (csrc/cpu/sinkhorn.cpp).
TORCH_LIBRARY_FRAGMENT(fastvq_C, m) {
  m.def("sinkhorn_row_pass(Tensor z, Tensor codebook, Tensor column_potential, str metric, Tensor affine, "
        "bool argmax) -> (Tensor, Tensor)");
  m.def("sinkhorn_column_partials(Tensor z, Tensor codebook, Tensor row_potential, str metric, Tensor affine) "
        "-> (Tensor, Tensor)");
  m.def("sinkhorn_cost_stats(Tensor z, Tensor codebook, str metric) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastvq_C, CPU, m) {
  m.impl("sinkhorn_row_pass", &fastvq::sinkhorn_row_pass_cpu);
  m.impl("sinkhorn_column_partials", &fastvq::sinkhorn_column_partials_cpu);
  m.impl("sinkhorn_cost_stats", &fastvq::sinkhorn_cost_stats_cpu);
}
