// Declarations shared by the translation units of fastvq._C.
//
// Every kernel here is registered in module.cpp as an implementation of a torch.ops.fastvq_C
// operator; fastvq/backends/cpp.py calls those operators from the real implementations of the public
// torch.ops.fastvq operators, after fastvq/_checks.py has validated the inputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <optional>
#include <tuple>

namespace fastvq {

enum class Metric { L2, Cosine, Dot };

Metric parse_metric(const std::string& metric);

// (indices int64 [N], distances fp32 [N], codes [N or 0, D] in the promoted dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_code_cpu(
    const at::Tensor& z, const at::Tensor& codebook, const std::string& metric, bool return_codes);

// (indices int64 [B, N], distances fp32 [B, N]): problem b's rows z[b] searched against its codebook[b] alone,
// the B problems in one parallel loop (nearest_code_cpu's answer for each).
std::tuple<at::Tensor, at::Tensor> nearest_code_batched_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                            const std::string& metric);

// The search kernel each dtype takes under the current FASTVQ_CPU_SEARCH, as a JSON object.
std::string cpu_search_kernels();

// fp32 GFLOP/s retired by `threads` threads running FMAs (isa "avx2", "avx512f") or vdpbf16ps
// ("avx512bf16") for `iterations` steps of 12-16 independent chains each; see cpu_peak.cpp.
double cpu_peak_gflops(const std::string& isa, int64_t threads, int64_t iterations);

// The vector instruction sets this CPU runs that fastvq has kernels for, as a JSON list.
std::string cpu_isa();

// (indices int64 [N, k], distances fp32 [N, k]): each row's k nearest codes by ascending distance.
std::tuple<at::Tensor, at::Tensor> nearest_codes_cpu(const at::Tensor& z, const at::Tensor& codebook, int64_t k,
                                                     const std::string& metric);

// (counts fp32 [K], sums fp32 [K, D]); deterministic on CPU whatever `deterministic` says.
std::tuple<at::Tensor, at::Tensor> segment_reduce_cpu(
    const at::Tensor& values, const at::Tensor& indices, int64_t num_codes, bool deterministic);

// Sinkhorn passes (sinkhorn.cpp): (lse [N], indices int64 [N or 0]) of each row's logsumexp over codes of
// (shift - C) * scale + g; per-split (max, sum of exp) partials [splits, K] of the same over rows with f;
// per-row cost statistics float64 [N, 5] (count, min, max, mean, sum of squared deviations).
std::tuple<at::Tensor, at::Tensor> sinkhorn_row_pass_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                         const at::Tensor& column_potential, const std::string& metric,
                                                         const at::Tensor& affine, bool argmax);
std::tuple<at::Tensor, at::Tensor> sinkhorn_column_partials_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                                const at::Tensor& row_potential,
                                                                const std::string& metric, const at::Tensor& affine);
at::Tensor sinkhorn_cost_stats_cpu(const at::Tensor& z, const at::Tensor& codebook, const std::string& metric);

}  // namespace fastvq

namespace fastvq {

// Greedy residual quantization (residual_quantize.cpp): (indices int64 [N, L] (-1 past a row's levels),
// quantized [N, D] promoted dtype, commitment fp32 [L], counts fp32 [L or 0, K], sums fp32 [L or 0, K, D]).
// Row i uses its first min(n_q, max(row_levels[i], 0)) levels (n_q without row_levels).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_quantize_cpu(
    const at::Tensor& z, const at::Tensor& codebooks, int64_t n_q, const c10::optional<at::Tensor>& row_levels,
    bool return_stats);
// Soft assignments on prepared operands (fastvq/backends/soft_codebook.py), in the work dtype (fp32/fp64; zq and
// keys may be bf16 with the rest fp32: the logit products then take AVX512-BF16 where the CPU and build have it);
// metric 0 dot (and cosine), 1 l2, 2 euclidean. (soft [N, Dv], indices int64 [N] or [0], lse [N]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_quantize_cpu(
    const at::Tensor& zq, const at::Tensor& keys, const at::Tensor& code_term, const at::Tensor& row_term,
    const at::Tensor& values, int64_t metric, double inverse_temperature, const std::optional<at::Tensor>& seed,
    bool return_hard);

// (sum_k w k [N, D], sum_k w [N], sum_n w zq [K, D], sum_n w [K], sum_n p g [K, Dv]) with w = dL/dlogit / T
// (times 1 / (2 |z - e|) for euclidean); each [0, ...] when not asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_quantize_backward_cpu(
    const at::Tensor& grad_soft, const at::Tensor& delta, const at::Tensor& lse, const at::Tensor& zq,
    const at::Tensor& keys, const at::Tensor& code_term, const at::Tensor& row_term, const at::Tensor& values,
    int64_t metric, double inverse_temperature, bool rows_grad, bool codes_grad, bool values_grad);

// The entropies of p = softmax(logits) on prepared operands: (row_entropy [N] unclamped, sum_n p [K], lse [N]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_entropy_cpu(
    const at::Tensor& zq, const at::Tensor& keys, const at::Tensor& code_term, const at::Tensor& row_term,
    int64_t metric, double inverse_temperature);

// The entropies' backward sums (as soft_quantize_backward_cpu's first four) from the row entropy's gradient,
// the per-code weights (grad_mean_probs / N) and the row constant grad_lse + grad_entropy * (lse - H).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_entropy_backward_cpu(
    const at::Tensor& grad_entropy, const at::Tensor& code_weights, const at::Tensor& row_constant,
    const at::Tensor& lse, const at::Tensor& zq, const at::Tensor& keys, const at::Tensor& code_term,
    const at::Tensor& row_term, int64_t metric, double inverse_temperature, bool rows_grad, bool codes_grad);

// soft_quantize and soft_entropy of the same logits at two temperatures, one product per tile for both:
// (soft [N, Dv], indices int64 [N] or [0], lse [N], row_entropy [N] unclamped, sum_n p [K], entropy lse [N]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_quantize_entropy_cpu(
    const at::Tensor& zq, const at::Tensor& keys, const at::Tensor& code_term, const at::Tensor& row_term,
    const at::Tensor& values, int64_t metric, double inverse_temperature, double entropy_inverse_temperature,
    bool return_hard);

// The fused op's backward sums (as soft_quantize_backward_cpu's), w the sum of both parts' weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_quantize_entropy_backward_cpu(
    const at::Tensor& grad_soft, const at::Tensor& delta, const at::Tensor& lse, const at::Tensor& grad_entropy,
    const at::Tensor& code_weights, const at::Tensor& row_constant, const at::Tensor& entropy_lse,
    const at::Tensor& zq, const at::Tensor& keys, const at::Tensor& code_term, const at::Tensor& row_term,
    const at::Tensor& values, int64_t metric, double inverse_temperature, double entropy_inverse_temperature,
    bool rows_grad, bool codes_grad, bool values_grad);

}  // namespace fastvq
