// The step's work between its matmuls, fused for the CPU: a decode step of a small model is
// mostly ATen calls of a few microseconds each (norms, rotary, the KV write, masks, attention,
// the MLP's gate), about 180 per layer; each op here does one of those groups in one call.
//
//   add_rms_norm(x, residual?, weight, eps) -> (y, h)  h = x + residual, y = rms_norm(h) * weight
//   rope_write_(q, k, v, cos, sin, positions, k_cache, v_cache, slots?, pos?)
//                                   q, k rotated in place; rows [0, len(slots)) of k, v into the cache
//                                   (the cache float32 or bfloat16, whatever q's dtype)
//   decode_attention(q, k_cache, v_cache, slots?, lens, window, scale) -> [rows, heads * head_dim]
//   silu_mul(gate, up) -> silu(gate) * up
//   mv_bf16(x, w, bias?) -> x @ w^T for a few rows of bfloat16 activations and weights
//
// Activations are float32 or bfloat16; results round where the reference (torch ops in the same
// dtype) rounds, so a bfloat16 model gives the same values up to the order of float sums.
// AVX-512 where the CPU has it (chosen at run time), a portable loop elsewhere.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "ops.h"

namespace zs::step {

using at::BFloat16;
using at::Tensor;

#define ZS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

inline float f32(float v) { return v; }
inline float f32(BFloat16 v) { return static_cast<float>(v); }
template <typename T>
inline T to(float v) { return static_cast<T>(v); }  // bfloat16: round to nearest even
template <typename T>
inline float rnd(float v) { return f32(to<T>(v)); }  // v as the reference's T holds it

ZS_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
ZS_AVX512 inline __m512 load16(const BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// float -> bfloat16 bits, rounded to nearest even (as c10::BFloat16 rounds finite values)
ZS_AVX512 inline __m256i bf16_bits(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
ZS_AVX512 inline __m512 round16(__m512 v, float) { return v; }
ZS_AVX512 inline __m512 round16(__m512 v, BFloat16) {  // v as bfloat16 holds it
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits(v)), 16));
}
ZS_AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
ZS_AVX512 inline void store16(BFloat16* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, bf16_bits(v)); }

void check_act(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.stride(-1) == 1, op, ": ", name, "'s last dimension must be contiguous");
}

// runs the lambda with `Name` the C++ type of `dtype` (float32 or bfloat16)
#define ZS_DISPATCH_AS(Name, dtype, ...)         \
  if ((dtype) == at::kFloat) {                   \
    using Name = float;                          \
    __VA_ARGS__();                               \
  } else {                                       \
    using Name = BFloat16;                       \
    __VA_ARGS__();                               \
  }
#define ZS_DISPATCH(dtype, ...) ZS_DISPATCH_AS(T, dtype, __VA_ARGS__)

// the KV cache is float32 or bfloat16, its own dtype beside the activations' (a model of float32
// activations over quantized weights keeps a bfloat16 cache)
void check_caches(const Tensor& k_cache, const Tensor& v_cache, int64_t kv_heads, int64_t D, const char* op) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type() &&
                  (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16) &&
                  k_cache.stride(3) == 1 && v_cache.stride(3) == 1 && (kv_heads < 0 || k_cache.size(1) == kv_heads) &&
                  k_cache.size(3) == D,
              op, ": caches [slots, kv_heads, positions, D], float32 or bfloat16, one dtype");
}

// ---- add_rms_norm ------------------------------------------------------------------------

template <typename T>
void norm_rows(const T* x, int64_t xs, const T* r, int64_t rs, const T* w, float eps, int64_t C, T* y, T* h,
               int64_t t0, int64_t t1) {
  std::vector<float> v(C);
  for (int64_t t = t0; t < t1; ++t) {
    const T* xr = x + t * xs;
    float ss = 0.f;
    for (int64_t c = 0; c < C; ++c) {
      const float a = r ? rnd<T>(f32(xr[c]) + f32(r[t * rs + c])) : f32(xr[c]);
      v[c] = a;
      ss += a * a;
      if (h) h[t * C + c] = to<T>(a);
    }
    const float inv = 1.f / std::sqrt(ss / float(C) + eps);
    for (int64_t c = 0; c < C; ++c) y[t * C + c] = to<T>(f32(w[c]) * rnd<T>(v[c] * inv));
  }
}

std::tuple<Tensor, Tensor> add_rms_norm(const Tensor& x, const c10::optional<Tensor>& residual, const Tensor& weight,
                                        double eps) {
  check_act(x, "add_rms_norm", "x");
  TORCH_CHECK(x.dim() == 2, "add_rms_norm: x must be [rows, channels]");
  const int64_t T_ = x.size(0), C = x.size(1);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() && weight.numel() == C,
              "add_rms_norm: weight must be [", C, "] in x's dtype");
  if (residual) {
    TORCH_CHECK(residual->scalar_type() == x.scalar_type() && residual->sizes() == x.sizes() &&
                    residual->stride(1) == 1,
                "add_rms_norm: residual must match x");
  }
  Tensor y = at::empty({T_, C}, x.options());
  Tensor h = residual ? at::empty({T_, C}, x.options()) : x;
  ZS_DISPATCH(x.scalar_type(), [&] {
    const T* rp = residual ? residual->data_ptr<T>() : nullptr;
    const int64_t rs = residual ? residual->stride(0) : 0;
    at::parallel_for(0, T_, 16, [&](int64_t t0, int64_t t1) {
      norm_rows<T>(x.data_ptr<T>(), x.stride(0), rp, rs, weight.data_ptr<T>(), float(eps), C, y.data_ptr<T>(),
                   residual ? h.data_ptr<T>() : nullptr, t0, t1);
    });
  });
  return {y, h};
}

// ---- rope_write_ ---------------------------------------------------------------------------

// x [rows, heads, D] rotated in place: x * cos + swap_halves(x) * sin (sin's first half negated)
template <typename T>
void rotate(T* x, int64_t s0, int64_t s1, int64_t heads, int64_t D, const T* cos, const T* sin, const int64_t* pos,
            int64_t t0, int64_t t1) {
  const int64_t half = D / 2;
  for (int64_t t = t0; t < t1; ++t) {
    const T* c = cos + pos[t] * D;
    const T* s = sin + pos[t] * D;
    for (int64_t hd = 0; hd < heads; ++hd) {
      T* v = x + t * s0 + hd * s1;
      for (int64_t i = 0; i < half; ++i) {
        const float a = f32(v[i]), b = f32(v[i + half]);
        v[i] = to<T>(rnd<T>(a * f32(c[i])) + rnd<T>(b * f32(s[i])));
        v[i + half] = to<T>(rnd<T>(b * f32(c[i + half])) + rnd<T>(a * f32(s[i + half])));
      }
    }
  }
}

void rope_write_(Tensor q, Tensor k, const Tensor& v, const Tensor& cos, const Tensor& sin, const Tensor& positions,
                 Tensor k_cache, Tensor v_cache, const c10::optional<Tensor>& slots, const c10::optional<Tensor>& pos) {
  check_act(q, "rope_write_", "q");
  check_act(k, "rope_write_", "k");
  check_act(v, "rope_write_", "v");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2) && q.size(2) % 2 == 0,
              "rope_write_: q [rows, heads, D], k and v [rows, kv_heads, D], D even");
  const int64_t rows = q.size(0), D = q.size(2);
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && cos.scalar_type() == dt && sin.scalar_type() == dt &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.size(-1) == D && sin.sizes() == cos.sizes(),
              "rope_write_: cos and sin [positions, D] contiguous in q's dtype");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == rows,
              "rope_write_: positions [rows] int64");
  const int64_t* pp = positions.data_ptr<int64_t>();
  const int64_t P = cos.size(0);
  for (int64_t t = 0; t < rows; ++t) TORCH_CHECK(pp[t] >= 0 && pp[t] < P, "rope_write_: position out of the table");
  ZS_DISPATCH(dt, [&] {
    at::parallel_for(0, rows, 16, [&](int64_t t0, int64_t t1) {
      rotate<T>(q.data_ptr<T>(), q.stride(0), q.stride(1), q.size(1), D, cos.data_ptr<T>(), sin.data_ptr<T>(), pp, t0, t1);
      rotate<T>(k.data_ptr<T>(), k.stride(0), k.stride(1), k.size(1), D, cos.data_ptr<T>(), sin.data_ptr<T>(), pp, t0, t1);
    });
  });
  if (!slots) return;
  TORCH_CHECK(pos && slots->scalar_type() == at::kLong && pos->scalar_type() == at::kLong && slots->is_contiguous() &&
                  pos->is_contiguous() && pos->numel() == slots->numel() && slots->numel() <= rows,
              "rope_write_: slots and pos [decode rows] int64");
  check_caches(k_cache, v_cache, k.size(1), D, "rope_write_");
  const int64_t nd = slots->numel(), KH = k.size(1);
  const int64_t* sp = slots->data_ptr<int64_t>();
  const int64_t* ps = pos->data_ptr<int64_t>();
  for (int64_t t = 0; t < nd; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < k_cache.size(0) && ps[t] >= 0 && ps[t] < k_cache.size(2),
                "rope_write_: slot or position out of the cache");
  ZS_DISPATCH(dt, [&] {
    ZS_DISPATCH_AS(C, k_cache.scalar_type(), [&] {
      for (int64_t t = 0; t < nd; ++t)
        for (int64_t hd = 0; hd < KH; ++hd) {
          const T* kr = k.data_ptr<T>() + t * k.stride(0) + hd * k.stride(1);
          const T* vr = v.data_ptr<T>() + t * v.stride(0) + hd * v.stride(1);
          C* ko = k_cache.data_ptr<C>() + sp[t] * k_cache.stride(0) + hd * k_cache.stride(1) + ps[t] * k_cache.stride(2);
          C* vo = v_cache.data_ptr<C>() + sp[t] * v_cache.stride(0) + hd * v_cache.stride(1) + ps[t] * v_cache.stride(2);
          for (int64_t d = 0; d < D; ++d) {  // as copy_ converts: float32 to bfloat16 rounds to nearest even
            ko[d] = to<C>(f32(kr[d]));
            vo[d] = to<C>(f32(vr[d]));
          }
        }
    });
  });
}

// ---- decode_attention --------------------------------------------------------------------

template <typename T>
float dot_ref(const float* a, const T* b, int64_t D) {
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s += a[d] * f32(b[d]);
  return s;
}

template <typename T>
ZS_AVX512 float dot16(const float* a, const T* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), load16(b + d), acc);
  return _mm512_reduce_add_ps(acc);
}

template <typename T>
ZS_AVX512 void axpy16(float p, const T* v, float* out, int64_t D) {
  const __m512 pv = _mm512_set1_ps(p);
  for (int64_t d = 0; d < D; d += 16)
    _mm512_storeu_ps(out + d, _mm512_fmadd_ps(pv, load16(v + d), _mm512_loadu_ps(out + d)));
}

// one decode row's query heads sharing KV head `kvh` against keys [s0, L) of its slot (q and out
// in T, the cache in C)
template <typename T, typename C>
void attend(const T* q, int64_t qs1, int64_t group, const C* kc, const C* vc, int64_t ks, int64_t vs, int64_t s0,
            int64_t L, int64_t D, float scale, bool vec, T* out) {
  const int64_t n = L - s0;
  std::vector<float> qf(group * D), p(n), o(D);
  for (int64_t j = 0; j < group; ++j)
    for (int64_t d = 0; d < D; ++d) qf[j * D + d] = f32(q[j * qs1 + d]) * scale;
  for (int64_t j = 0; j < group; ++j) {
    const float* qj = qf.data() + j * D;
    float mx = -INFINITY;
    for (int64_t l = 0; l < n; ++l) {
      const C* kr = kc + (s0 + l) * ks;
      p[l] = vec ? dot16<C>(qj, kr, D) : dot_ref<C>(qj, kr, D);
      mx = std::max(mx, p[l]);
    }
    float sum = 0.f;
    for (int64_t l = 0; l < n; ++l) sum += (p[l] = std::exp(p[l] - mx));
    std::fill(o.begin(), o.end(), 0.f);
    for (int64_t l = 0; l < n; ++l) {
      const C* vr = vc + (s0 + l) * vs;
      if (vec) axpy16<C>(p[l], vr, o.data(), D);
      else for (int64_t d = 0; d < D; ++d) o[d] += p[l] * f32(vr[d]);
    }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < D; ++d) out[j * D + d] = to<T>(o[d] * inv);
  }
}

Tensor decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const c10::optional<Tensor>& slots,
                        const Tensor& lens, int64_t window, double scale) {
  check_act(q, "decode_attention", "q");
  TORCH_CHECK(q.dim() == 3, "decode_attention: q must be [rows, heads, D]");
  const int64_t nd = q.size(0), H = q.size(1), D = q.size(2);
  check_caches(k_cache, v_cache, -1, D, "decode_attention");
  const int64_t KH = k_cache.size(1);
  TORCH_CHECK(H % KH == 0, "decode_attention: heads ", H, " are not a multiple of kv heads ", KH);
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.is_contiguous() && lens.numel() == nd,
              "decode_attention: lens [rows] int64");
  if (slots) TORCH_CHECK(slots->scalar_type() == at::kLong && slots->is_contiguous() && slots->numel() == nd,
                         "decode_attention: slots [rows] int64");
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* sp = slots ? slots->data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; i < nd; ++i) {
    const int64_t s = sp ? sp[i] : i;
    TORCH_CHECK(s >= 0 && s < k_cache.size(0) && lp[i] >= 1 && lp[i] <= k_cache.size(2),
                "decode_attention: slot or length out of the cache");
  }
  Tensor out = at::empty({nd, H * D}, q.options());
  const int64_t group = H / KH;
  const bool vec = has_avx512() && D % 16 == 0;
  ZS_DISPATCH(q.scalar_type(), [&] {
    ZS_DISPATCH_AS(C, k_cache.scalar_type(), [&] {
      at::parallel_for(0, nd * KH, 1, [&](int64_t a, int64_t b) {
        for (int64_t task = a; task < b; ++task) {
          const int64_t i = task / KH, kvh = task % KH, s = sp ? sp[i] : i, L = lp[i];
          const int64_t s0 = window > 0 ? std::max<int64_t>(0, L - window) : 0;
          attend<T, C>(q.data_ptr<T>() + i * q.stride(0) + kvh * group * q.stride(1), q.stride(1), group,
                       k_cache.data_ptr<C>() + s * k_cache.stride(0) + kvh * k_cache.stride(1),
                       v_cache.data_ptr<C>() + s * v_cache.stride(0) + kvh * v_cache.stride(1), k_cache.stride(2),
                       v_cache.stride(2), s0, L, D, float(scale), vec, out.data_ptr<T>() + i * H * D + kvh * group * D);
        }
      });
    });
  });
  return out;
}

// ---- silu_mul ----------------------------------------------------------------------------

// e^x for 16 floats: x = n ln2 + r (|r| <= ln2 / 2), e^r by its degree-6 Taylor polynomial
// (relative error < 2e-7, about float's rounding), scaled by 2^n; below -87 it is 0
ZS_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

template <typename T>
ZS_AVX512 void silu_mul_row(const T* g, const T* u, T* y, int64_t I) {
  int64_t i = 0;
  for (; i + 16 <= I; i += 16) {
    const __m512 a = load16(g + i);
    const __m512 s = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
    store16(y + i, _mm512_mul_ps(round16(s, T()), load16(u + i)));
  }
  for (; i < I; ++i) {
    const float a = f32(g[i]);
    y[i] = to<T>(rnd<T>(a / (1.f + std::exp(-a))) * f32(u[i]));
  }
}

Tensor silu_mul(const Tensor& gate, const Tensor& up) {
  check_act(gate, "silu_mul", "gate");
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes() && up.scalar_type() == gate.scalar_type() &&
                  up.stride(1) == 1,
              "silu_mul: gate and up [rows, features] in one dtype");
  const int64_t rows = gate.size(0), I = gate.size(1);
  Tensor y = at::empty({rows, I}, gate.options());
  if (has_avx512()) {
    ZS_DISPATCH(gate.scalar_type(), [&] {
      at::parallel_for(0, rows, 4, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
          silu_mul_row<T>(gate.data_ptr<T>() + t * gate.stride(0), up.data_ptr<T>() + t * up.stride(0),
                          y.data_ptr<T>() + t * I, I);
      });
    });
    return y;
  }
  ZS_DISPATCH(gate.scalar_type(), [&] {
    const T* g = gate.data_ptr<T>();
    const T* u = up.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, rows, 4, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t i = 0; i < I; ++i) {
          const float a = f32(g[t * gate.stride(0) + i]);
          yp[t * I + i] = to<T>(rnd<T>(a / (1.f + std::exp(-a))) * f32(u[t * up.stride(0) + i]));
        }
    });
  });
  return y;
}

// ---- mv_bf16 -----------------------------------------------------------------------------

// rows [n0, n1) of w, one at a time (one sequential stream: what the prefetchers follow best),
// against MT rows of x (float): y[m, n] = x[m] . w[n]; U accumulators per row of x, U x 16
// weights a step (one row of x: 4, so 128 bytes of weights are in flight; more rows: 2)
template <int MT, int U = (MT == 1 ? 4 : 2)>
ZS_AVX512 void mv_tile(const float* x, int64_t K, const BFloat16* w, int64_t ws, float* y, int64_t N, int64_t n0,
                       int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const BFloat16* wr = w + n * ws;
    __m512 acc[U][MT];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < MT; ++m) acc[u][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * U <= K; k += 16 * U)
      for (int u = 0; u < U; ++u) {
        const __m512 wv = load16(wr + k + 16 * u);
        for (int m = 0; m < MT; ++m) acc[u][m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k + 16 * u), acc[u][m]);
      }
    for (; k < K; k += 16) {  // K % 16 == 0
      const __m512 wv = load16(wr + k);
      for (int m = 0; m < MT; ++m) acc[0][m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[0][m]);
    }
    for (int m = 0; m < MT; ++m) {
      __m512 sum = acc[0][m];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][m]);
      y[m * N + n] = _mm512_reduce_add_ps(sum);
    }
  }
}

Tensor mv_bf16(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
                  x.device().is_cpu() && w.device().is_cpu() && w.stride(1) == 1 && x.size(1) == w.size(1),
              "mv_bf16: x [M, K] and w [N, K] bfloat16 on the CPU, w's rows contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const bool vec = has_avx512() && K % 16 == 0;
  if (bias) TORCH_CHECK(bias->numel() == N && bias->is_contiguous() && bias->scalar_type() == at::kBFloat16,
                      "mv_bf16: bias [N] bfloat16");
  std::vector<float> xf(M * K), yf(M * N);
  const BFloat16* xs = x.data_ptr<BFloat16>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * K + k] = f32(xs[m * x.stride(0) + k * x.stride(1)]);
  const float* xp = xf.data();
  const BFloat16* wp = w.data_ptr<BFloat16>();
  float* yp = yf.data();
  const int64_t ws = w.stride(0);
  at::parallel_for(0, N, std::max<int64_t>(16, (1 << 15) / K), [&](int64_t n0, int64_t n1) {
    if (!vec) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) yp[m * N + n] = dot_ref<BFloat16>(xp + m * K, wp + n * ws, K);
      return;
    }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) mv_tile<4>(xp + m * K, K, wp, ws, yp + m * N, N, n0, n1);
    for (; m + 2 <= M; m += 2) mv_tile<2>(xp + m * K, K, wp, ws, yp + m * N, N, n0, n1);
    for (; m < M; ++m) mv_tile<1>(xp + m * K, K, wp, ws, yp + m * N, N, n0, n1);
  });
  Tensor y = at::empty({M, N}, x.options());
  BFloat16* out = y.data_ptr<BFloat16>();
  const BFloat16* bp = bias ? bias->data_ptr<BFloat16>() : nullptr;
  for (int64_t m = 0; m < M; ++m)  // as torch's bfloat16 linear: the sum and the bias in float, rounded once
    for (int64_t n = 0; n < N; ++n) out[m * N + n] = to<BFloat16>(yf[m * N + n] + (bp ? f32(bp[n]) : 0.f));
  return y;
}

}  // namespace zs::step

void bind_qmm(pybind11::module_& m);     // qmm.cpp
void bind_layers(pybind11::module_& m);  // layers.cpp

// The library is a Python module: a call costs a quarter of a microsecond, against about five
// through torch's dispatcher (a decode step of a small model makes a few hundred of them).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;  // the engine's thread runs these
  using namespace zs::step;
  bind_qmm(m);
  bind_layers(m);
  m.def("add_rms_norm", &add_rms_norm, release());
  m.def("rope_write_", &rope_write_, release());
  m.def("decode_attention", &decode_attention, release());
  m.def("silu_mul", &silu_mul, release());
  m.def("mv_bf16", &mv_bf16, release());
}
