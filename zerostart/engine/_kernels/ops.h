// The library's ops as C++ functions, for the code that strings them together (layers.cpp).
// Python calls them through the module (step.cpp: PYBIND11_MODULE); each is documented where
// it is defined.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

bool has_avx512();  // qmm.cpp: the CPU runs the AVX-512 loops of every file

namespace zs::quant {  // qmm.cpp
at::Tensor qmm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const c10::optional<at::Tensor>& mins, int64_t bits, int64_t group);
at::Tensor dequant(const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                   int64_t bits, int64_t group);
at::Tensor qmm_tiles(const at::Tensor& x, const at::Tensor& qtiles, const at::Tensor& stiles,
                     const c10::optional<at::Tensor>& mtiles, int64_t bits, int64_t group);
}  // namespace zs::quant

namespace zs::step {  // step.cpp
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps);
void rope_write_(at::Tensor q, at::Tensor k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                 const at::Tensor& positions, at::Tensor k_cache, at::Tensor v_cache,
                 const c10::optional<at::Tensor>& slots, const c10::optional<at::Tensor>& pos);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const c10::optional<at::Tensor>& slots, const at::Tensor& lens, int64_t window,
                            double scale);
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);
at::Tensor mv_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);
}  // namespace zs::step
