// Weight-only quantized matmuls for the CPU: y[M, N] = x[M, K] @ W[N, K]^T with W held as
// small integers and per-group float scales (and mins), dequantized in registers.
//
//   bits 4: qweight uint8 [N, K/2]; in each group of 32, byte i holds element i (low nibble)
//           and element i + 16 (high nibble), q in [0, 15]       (GGUF Q4_0/Q4_1's own order)
//   bits 8: qweight int8 [N, K]
//   scales, mins: float16 or float32 [N, K/group]; w = scale * q + min (mins optional)
//
// One dequantized group is reused for every row of x in the tile (decode batches: M <= 16).
// Larger M is the caller's business (dequantize once, then a BLAS matmul). AVX-512 where the
// CPU has it (chosen at run time); a portable loop elsewhere. Threads: ATen's pool, over N.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace {

inline float h2f(const at::Half* p) { return static_cast<float>(*p); }
inline float h2f(const float* p) { return *p; }

// ---- portable ------------------------------------------------------------------------------

template <typename S>
void dequant_group_ref(const uint8_t* q, int bits, int g, float s, float m, float* out) {
  if (bits == 8) {
    const int8_t* qi = reinterpret_cast<const int8_t*>(q);
    for (int i = 0; i < g; ++i) out[i] = s * float(qi[i]) + m;
  } else {
    const int half = g / 2;
    for (int i = 0; i < half; ++i) {
      out[i] = s * float(q[i] & 0x0F) + m;
      out[i + half] = s * float(q[i] >> 4) + m;
    }
  }
}

template <typename S>
void rows_ref(const float* x, int64_t M, int64_t K, const uint8_t* qw, const S* sc, const S* mn, int bits, int g,
              float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / g, row_bytes = bits == 8 ? K : K / 2, group_bytes = bits == 8 ? g : g / 2;
  float w[32];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = 0.f;
    for (int64_t b = 0; b < G; ++b) {
      dequant_group_ref<S>(qw + n * row_bytes + b * group_bytes, bits, g, h2f(sc + n * G + b),
                           mn ? h2f(mn + n * G + b) : 0.f, w);
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * K + b * g;
        float acc = 0.f;
        for (int i = 0; i < g; ++i) acc += w[i] * xr[i];
        y[m * N + n] += acc;
      }
    }
  }
}

// ---- AVX-512 -------------------------------------------------------------------------------

#define ZS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))

ZS_AVX512 inline float scalar_of(const at::Half* p) { return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(p)); }
ZS_AVX512 inline float scalar_of(const float* p) { return *p; }

// one group of g (16 or 32) weights -> w0 (elements 0..15) and w1 (16..31)
template <typename S>
ZS_AVX512 inline void dequant_group(const uint8_t* q, int bits, int g, __m512 s, __m512 m, __m512& w0, __m512& w1) {
  if (bits == 8) {
    w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q))), s, m);
    if (g == 32)
      w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 16)))), s, m);
  } else {  // g == 32: 16 bytes, low nibbles 0..15, high nibbles 16..31
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)q));
    w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F))), s, m);
    w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), s, m);
  }
}

// MT rows of x against the rows [n0, n1) of W
template <typename S, int MT>
ZS_AVX512 void rows_tile(const float* x, int64_t K, const uint8_t* qw, const S* sc, const S* mn, int bits, int g,
                         float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / g, row_bytes = bits == 8 ? K : K / 2, group_bytes = bits == 8 ? g : g / 2;
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* qr = qw + n * row_bytes;
    const S* sr = sc + n * G;
    const S* mr = mn ? mn + n * G : nullptr;
    for (int64_t b = 0; b < G; ++b) {
      __m512 s = _mm512_set1_ps(scalar_of(sr + b));
      __m512 mm = mr ? _mm512_set1_ps(scalar_of(mr + b)) : _mm512_setzero_ps();
      __m512 w0, w1 = _mm512_setzero_ps();
      dequant_group<S>(qr + b * group_bytes, bits, g, s, mm, w0, w1);
      const float* xb = x + b * g;
      for (int m = 0; m < MT; ++m) {
        acc[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + m * K), acc[m]);
        if (g == 32) acc[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + m * K + 16), acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) y[m * N + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

template <typename S>
ZS_AVX512 void rows_avx512(const float* x, int64_t M, int64_t K, const uint8_t* qw, const S* sc, const S* mn, int bits,
                           int g, float* y, int64_t N, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) rows_tile<S, 8>(x + m * K, K, qw, sc, mn, bits, g, y + m * N, N, n0, n1);
  if (M - m >= 4) { rows_tile<S, 4>(x + m * K, K, qw, sc, mn, bits, g, y + m * N, N, n0, n1); m += 4; }
  if (M - m >= 2) { rows_tile<S, 2>(x + m * K, K, qw, sc, mn, bits, g, y + m * N, N, n0, n1); m += 2; }
  if (M - m >= 1) { rows_tile<S, 1>(x + m * K, K, qw, sc, mn, bits, g, y + m * N, N, n0, n1); }
}

template <typename S>
ZS_AVX512 void dequant_rows_avx512(const uint8_t* qw, const S* sc, const S* mn, int bits, int g, int64_t K,
                                   float* out, int64_t n0, int64_t n1) {
  const int64_t G = K / g, row_bytes = bits == 8 ? K : K / 2, group_bytes = bits == 8 ? g : g / 2;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < G; ++b) {
      __m512 s = _mm512_set1_ps(scalar_of(sc + n * G + b));
      __m512 mm = mn ? _mm512_set1_ps(scalar_of(mn + n * G + b)) : _mm512_setzero_ps();
      __m512 w0, w1;
      dequant_group<S>(qw + n * row_bytes + b * group_bytes, bits, g, s, mm, w0, w1);
      float* o = out + n * K + b * g;
      _mm512_storeu_ps(o, w0);
      if (g == 32) _mm512_storeu_ps(o + 16, w1);
    }
  }
}

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c") &&
                          __builtin_cpu_supports("fma");
  return yes;
}

void check(const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& mins, int64_t bits,
           int64_t group, int64_t K) {
  TORCH_CHECK(bits == 4 || bits == 8, "qmm: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group == 32 || (group == 16 && bits == 8), "qmm: group ", group, " is not supported for ", bits, " bits");
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous(), "qmm: qweight and scales must be contiguous");
  TORCH_CHECK(qweight.dim() == 2 && scales.dim() == 2, "qmm: qweight and scales must be 2-D");
  TORCH_CHECK(qweight.scalar_type() == (bits == 8 ? at::kChar : at::kByte), "qmm: qweight dtype");
  TORCH_CHECK(K % group == 0 && qweight.size(1) == (bits == 8 ? K : K / 2), "qmm: qweight columns do not match K=", K);
  TORCH_CHECK(scales.size(0) == qweight.size(0) && scales.size(1) == K / group, "qmm: scales shape");
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat, "qmm: scales must be f16 or f32");
  if (mins) {
    TORCH_CHECK(mins->is_contiguous() && mins->sizes() == scales.sizes() && mins->scalar_type() == scales.scalar_type(),
                "qmm: mins must match scales");
  }
}

template <typename S>
void run_mm(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sc, const c10::optional<at::Tensor>& mn,
            int bits, int g, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0);
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = static_cast<const uint8_t*>(qw.data_ptr());
  const S* sp = sc.data_ptr<S>();
  const S* mp = mn ? mn->data_ptr<S>() : nullptr;
  float* yp = y.data_ptr<float>();
  const bool fast = has_avx512();
  // rows per task: enough work per task to pay for the hand-off, at least 16 rows
  const int64_t grain = std::max<int64_t>(16, (1 << 16) / std::max<int64_t>(1, K * M));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    if (fast) rows_avx512<S>(xp, M, K, qp, sp, mp, bits, g, yp, N, n0, n1);
    else rows_ref<S>(xp, M, K, qp, sp, mp, bits, g, yp, N, n0, n1);
  });
}

at::Tensor qmm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const c10::optional<at::Tensor>& mins, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "qmm: x must be 2-D float32");
  TORCH_CHECK(x.device().is_cpu(), "qmm: CPU tensors only");
  at::Tensor xc = x.contiguous();
  check(qweight, scales, mins, bits, group, xc.size(1));
  at::Tensor y = at::empty({xc.size(0), qweight.size(0)}, xc.options());
  if (scales.scalar_type() == at::kHalf) run_mm<at::Half>(xc, qweight, scales, mins, bits, group, y);
  else run_mm<float>(xc, qweight, scales, mins, bits, group, y);
  return y;
}

template <typename S>
void run_dequant(const at::Tensor& qw, const at::Tensor& sc, const c10::optional<at::Tensor>& mn, int bits, int g,
                 int64_t K, at::Tensor& out) {
  const uint8_t* qp = static_cast<const uint8_t*>(qw.data_ptr());
  const S* sp = sc.data_ptr<S>();
  const S* mp = mn ? mn->data_ptr<S>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t G = K / g, row_bytes = bits == 8 ? K : K / 2, group_bytes = bits == 8 ? g : g / 2;
  const bool fast = has_avx512();
  at::parallel_for(0, qw.size(0), std::max<int64_t>(1, (1 << 16) / K), [&](int64_t n0, int64_t n1) {
    if (fast) {
      dequant_rows_avx512<S>(qp, sp, mp, bits, g, K, op, n0, n1);
      return;
    }
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < G; ++b)
        dequant_group_ref<S>(qp + n * row_bytes + b * group_bytes, bits, g, h2f(sp + n * G + b),
                             mp ? h2f(mp + n * G + b) : 0.f, op + n * K + b * g);
  });
}

at::Tensor dequant(const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                   int64_t bits, int64_t group) {
  TORCH_CHECK(qweight.device().is_cpu(), "dequant: CPU tensors only");
  const int64_t K = bits == 8 ? qweight.size(1) : qweight.size(1) * 2;
  check(qweight, scales, mins, bits, group, K);
  at::Tensor out = at::empty({qweight.size(0), K}, scales.options().dtype(at::kFloat));
  if (scales.scalar_type() == at::kHalf) run_dequant<at::Half>(qweight, scales, mins, bits, group, K, out);
  else run_dequant<float>(qweight, scales, mins, bits, group, K, out);
  return out;
}

bool avx512() { return has_avx512(); }

}  // namespace

TORCH_LIBRARY(zerostart_quant, m) {
  m.def("qmm(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int bits, int group) -> Tensor");
  m.def("dequant(Tensor qweight, Tensor scales, Tensor? mins, int bits, int group) -> Tensor");
  m.def("avx512() -> bool");
}

TORCH_LIBRARY_IMPL(zerostart_quant, CPU, m) {
  m.impl("qmm", &qmm);
  m.impl("dequant", &dequant);
}

TORCH_LIBRARY_IMPL(zerostart_quant, CatchAll, m) { m.impl("avx512", &avx512); }
