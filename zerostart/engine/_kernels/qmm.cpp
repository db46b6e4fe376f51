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
//
// Tiled layout (the decode kernel's; ``tile``): rows in tiles of 16, and per tile and group of G
// (16 or 32) the group's bytes as 64-byte blocks, each holding 4 consecutive k of all 16 rows
// (byte r*4 + i: row r, k = 4t + i), so one VNNI instruction multiplies 4 k of 16 rows at once
// and the 16 rows' sums stay in the 16 lanes of one register (no horizontal sums):
//   bits 8: int8 qtiles [N/16, 16K]; block t of a group: k = 4t .. 4t + 3
//   bits 4: uint8 qtiles [N/16, 8K]; block t (t < G/8): low nibbles k = 4t + i, high nibbles
//           k = 4(t + G/8) + i
//   stiles, mtiles: [N/16, 16 K/G], per tile and group the 16 rows' scales (mins)
// Its matmul quantizes x per group of G to int8 (a scale per row and group, as llama.cpp does)
// and sums products of integers: y = sum_g dx * (scale * sum(q * xq) + min * sum(xq)).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "ops.h"

// the CPU runs the AVX-512 loops (of this file and step.cpp); else their portable ones
bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c") &&
                          __builtin_cpu_supports("fma");
  return yes;
}

namespace zs::quant {

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

// ---- tiled layout ---------------------------------------------------------------------------

// canonical (qweight, scales, mins) -> tiled (qtiles, stiles, mtiles), same bytes each
std::vector<at::Tensor> tile(const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                             int64_t bits, int64_t group) {
  const int64_t N = qweight.size(0), K = bits == 8 ? qweight.size(1) : qweight.size(1) * 2, G = K / group;
  check(qweight, scales, mins, bits, group, K);
  TORCH_CHECK(N % 16 == 0, "tile: rows must be a multiple of 16, got ", N);
  at::Tensor q = qweight.contiguous();
  at::Tensor qt = at::empty({N / 16, bits == 8 ? 16 * K : 8 * K}, qweight.options());
  const uint8_t* src = static_cast<const uint8_t*>(q.data_ptr());
  uint8_t* dst = static_cast<uint8_t*>(qt.data_ptr());
  const int64_t gbytes = bits == 8 ? 16 * group : 8 * group;  // one tile's group
  at::parallel_for(0, N / 16, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t nt = t0; nt < t1; ++nt)
      for (int64_t b = 0; b < G; ++b) {
        uint8_t* o = dst + nt * (G * gbytes) + b * gbytes;
        for (int r = 0; r < 16; ++r) {
          const int64_t n = nt * 16 + r;
          if (bits == 8) {
            const uint8_t* row = src + n * K + b * group;
            for (int64_t k = 0; k < group; ++k) o[(k / 4) * 64 + r * 4 + (k % 4)] = row[k];
          } else {
            const uint8_t* row = src + n * (K / 2) + b * (group / 2);  // byte i: k = i (lo), i + 16 (hi)
            auto nib = [&](int64_t k) -> uint8_t { return k < 16 ? (row[k] & 0x0F) : (row[k - 16] >> 4); };
            const int64_t half = group / 8;  // blocks per group
            for (int64_t t = 0; t < half; ++t)
              for (int i = 0; i < 4; ++i)
                o[t * 64 + r * 4 + i] = nib(4 * t + i) | (nib(4 * (t + half) + i) << 4);
          }
        }
      }
  });
  auto tile_scales = [&](const at::Tensor& s) {
    // [N, G] -> [N/16, G, 16] -> [N/16, 16 G]
    return s.contiguous().view({N / 16, 16, G}).transpose(1, 2).contiguous().view({N / 16, 16 * G});
  };
  std::vector<at::Tensor> out{qt, tile_scales(scales)};
  if (mins) out.push_back(tile_scales(*mins));
  return out;
}

void check_tiles(const at::Tensor& qt, const at::Tensor& st, const c10::optional<at::Tensor>& mt, int64_t bits,
                 int64_t group, int64_t K) {
  TORCH_CHECK(bits == 4 || bits == 8, "qmm_tiles: bits must be 4 or 8");
  TORCH_CHECK(group == 32 || (group == 16 && bits == 8), "qmm_tiles: group ", group, " is not supported for ", bits, " bits");
  TORCH_CHECK(qt.is_contiguous() && st.is_contiguous() && qt.dim() == 2 && st.dim() == 2, "qmm_tiles: contiguous 2-D tiles");
  TORCH_CHECK(qt.scalar_type() == (bits == 8 ? at::kChar : at::kByte), "qmm_tiles: qtiles dtype");
  TORCH_CHECK(K % group == 0 && qt.size(1) == (bits == 8 ? 16 * K : 8 * K), "qmm_tiles: qtiles do not match K=", K);
  TORCH_CHECK(st.size(0) == qt.size(0) && st.size(1) == 16 * (K / group), "qmm_tiles: stiles shape");
  TORCH_CHECK(st.scalar_type() == at::kHalf || st.scalar_type() == at::kFloat, "qmm_tiles: stiles must be f16 or f32");
  if (mt) TORCH_CHECK(mt->is_contiguous() && mt->sizes() == st.sizes() && mt->scalar_type() == st.scalar_type(),
                      "qmm_tiles: mtiles must match stiles");
}

// x [M, K] float -> xq int8 [M, K], dx [M, G] (x ~= dx * xq per group), sx [M, G] = sum(xq)
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t group, int8_t* xq, float* dx, int32_t* sx) {
  const int64_t G = K / group;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < G; ++b) {
      const float* v = x + m * K + b * group;
      float amax = 0.f;
      for (int64_t i = 0; i < group; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0;
      for (int64_t i = 0; i < group; ++i) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(v[i] * inv));
        xq[m * K + b * group + i] = static_cast<int8_t>(q);
        sum += q;
      }
      dx[m * G + b] = d;
      sx[m * G + b] = sum;
    }
}

// quantize_rows with AVX-512, the same values bit for bit: the same max, the same float
// products, rounded to nearest even as nearbyint rounds (the default rounding mode)
ZS_AVX512 void quantize_rows_avx512(const float* x, int64_t M, int64_t K, int64_t group, int8_t* xq, float* dx,
                                    int32_t* sx) {
  const int64_t G = K / group;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < G; ++b) {
      const float* v = x + m * K + b * group;
      int8_t* q = xq + m * K + b * group;
      const __m512 a0 = _mm512_loadu_ps(v);
      const __m512 a1 = group == 32 ? _mm512_loadu_ps(v + 16) : _mm512_setzero_ps();
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
      const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      const __m512 vinv = _mm512_set1_ps(inv);
      __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, vinv));
      _mm_storeu_si128((__m128i*)q, _mm512_cvtsepi32_epi8(q0));
      if (group == 32) {
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, vinv));
        _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtsepi32_epi8(q1));
        q0 = _mm512_add_epi32(q0, q1);
      }
      dx[m * G + b] = d;
      sx[m * G + b] = _mm512_reduce_add_epi32(q0);
    }
}

template <typename S>
void tiles_ref(const int8_t* xq, const float* dx, const int32_t* sx, int64_t M, int64_t K, int group, int bits,
               const uint8_t* qt, const S* st, const S* mt, float* y, int64_t N, int64_t t0, int64_t t1) {
  const int64_t G = K / group, gbytes = bits == 8 ? 16 * group : 8 * group;
  for (int64_t nt = t0; nt < t1; ++nt)
    for (int r = 0; r < 16; ++r)
      for (int64_t m = 0; m < M; ++m) {
        float acc = 0.f;
        for (int64_t b = 0; b < G; ++b) {
          const uint8_t* o = qt + nt * G * gbytes + b * gbytes;
          int32_t isum = 0;
          for (int64_t k = 0; k < group; ++k) {
            int32_t q;
            if (bits == 8) q = static_cast<int8_t>(o[(k / 4) * 64 + r * 4 + (k % 4)]);
            else {
              const int64_t half = group / 8, t = (k / 4) % half;
              const uint8_t byte = o[t * 64 + r * 4 + (k % 4)];
              q = (k / 4) < half ? (byte & 0x0F) : (byte >> 4);
            }
            isum += q * xq[m * K + b * group + k];
          }
          const int64_t si = nt * 16 * G + b * 16 + r;
          acc += dx[m * G + b] * (h2f(st + si) * float(isum) + (mt ? h2f(mt + si) * float(sx[m * G + b]) : 0.f));
        }
        y[m * N + nt * 16 + r] = acc;
      }
}

#define ZS_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

ZS_VNNI inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
ZS_VNNI inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// MT rows of x against the tiles [t0, t1): the 16 rows of a tile in the 16 lanes
template <typename S, int MT, int GROUP, int BITS>
ZS_VNNI void tiles_vnni(const int8_t* xq, const float* dx, const int32_t* sx, int64_t K, const uint8_t* qt,
                        const S* st, const S* mt, float* y, int64_t N, int64_t t0, int64_t t1) {
  constexpr int BLOCKS = GROUP / 4;  // 64-byte blocks of 4 k per group
  constexpr int64_t GBYTES = BITS == 8 ? 16 * GROUP : 8 * GROUP;
  const int64_t G = K / GROUP;
  const __m512i lo4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
  for (int64_t nt = t0; nt < t1; ++nt) {
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* tileq = qt + nt * G * GBYTES;
    for (int64_t b = 0; b < G; ++b) {
      __m512i w[BLOCKS];
      const uint8_t* o = tileq + b * GBYTES;
      if (BITS == 8) {
        for (int t = 0; t < BLOCKS; ++t) w[t] = _mm512_xor_si512(_mm512_loadu_si512(o + 64 * t), flip);  // q + 128
      } else {
        for (int t = 0; t < BLOCKS / 2; ++t) {
          __m512i v = _mm512_loadu_si512(o + 64 * t);
          w[t] = _mm512_and_si512(v, lo4);
          w[t + BLOCKS / 2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
        }
      }
      const __m512 s = load16(st + (nt * G + b) * 16);
      const __m512 mn = mt ? load16(mt + (nt * G + b) * 16) : _mm512_setzero_ps();
      for (int m = 0; m < MT; ++m) {
        const int32_t* xm = reinterpret_cast<const int32_t*>(xq + m * K + b * GROUP);
        __m512i isum = _mm512_setzero_si512();
        for (int t = 0; t < BLOCKS; ++t) isum = _mm512_dpbusd_epi32(isum, w[t], _mm512_set1_epi32(xm[t]));
        const float d = dx[m * G + b];
        const int32_t sxv = sx[m * G + b];
        if (BITS == 8) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(128 * sxv));  // the +128 of q undone
        __m512 part = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), s);
        if (mt) part = _mm512_fmadd_ps(mn, _mm512_set1_ps(float(sxv)), part);
        acc[m] = _mm512_fmadd_ps(part, _mm512_set1_ps(d), acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) _mm512_storeu_ps(y + m * N + nt * 16, acc[m]);
  }
}

template <typename S, int GROUP, int BITS>
ZS_VNNI void tiles_vnni_rows(const int8_t* xq, const float* dx, const int32_t* sx, int64_t M, int64_t K,
                             const uint8_t* qt, const S* st, const S* mt, float* y, int64_t N, int64_t t0, int64_t t1) {
  const int64_t G = K / GROUP;
  int64_t m = 0;
  auto at = [&](int64_t m0) { return std::make_tuple(xq + m0 * K, dx + m0 * G, sx + m0 * G, y + m0 * N); };
  for (; m + 8 <= M; m += 8) {
    auto [a, b, c, d] = at(m);
    tiles_vnni<S, 8, GROUP, BITS>(a, b, c, K, qt, st, mt, d, N, t0, t1);
  }
  for (; m + 4 <= M; m += 4) {
    auto [a, b, c, d] = at(m);
    tiles_vnni<S, 4, GROUP, BITS>(a, b, c, K, qt, st, mt, d, N, t0, t1);
  }
  for (; m < M; ++m) {
    auto [a, b, c, d] = at(m);
    tiles_vnni<S, 1, GROUP, BITS>(a, b, c, K, qt, st, mt, d, N, t0, t1);
  }
}

bool has_vnni() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return yes;
}

template <typename S>
void run_tiles(const at::Tensor& x, const at::Tensor& qt, const at::Tensor& st, const c10::optional<at::Tensor>& mt,
               int bits, int group, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = qt.size(0) * 16, G = K / group;
  std::vector<int8_t> xq(M * K);
  std::vector<float> dx(M * G);
  std::vector<int32_t> sx(M * G);
  const float* xp = x.data_ptr<float>();
  // the rows quantized in parallel too: at prefill's hundreds of rows, serial, they took a third
  // of the matmul's time on one thread and kept the second thread waiting
  at::parallel_for(0, M, std::max<int64_t>(1, (1 << 14) / K), [&](int64_t m0, int64_t m1) {
    auto rows = has_avx512() ? quantize_rows_avx512 : quantize_rows;
    rows(xp + m0 * K, m1 - m0, K, group, xq.data() + m0 * K, dx.data() + m0 * G, sx.data() + m0 * G);
  });
  const uint8_t* qp = static_cast<const uint8_t*>(qt.data_ptr());
  const S* sp = st.data_ptr<S>();
  const S* mp = mt ? mt->data_ptr<S>() : nullptr;
  float* yp = y.data_ptr<float>();
  const bool fast = has_vnni();
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, K * M));  // tiles per task
  at::parallel_for(0, N / 16, grain, [&](int64_t t0, int64_t t1) {
    if (!fast) {
      tiles_ref<S>(xq.data(), dx.data(), sx.data(), M, K, group, bits, qp, sp, mp, yp, N, t0, t1);
    } else if (bits == 4) {
      tiles_vnni_rows<S, 32, 4>(xq.data(), dx.data(), sx.data(), M, K, qp, sp, mp, yp, N, t0, t1);
    } else if (group == 32) {
      tiles_vnni_rows<S, 32, 8>(xq.data(), dx.data(), sx.data(), M, K, qp, sp, mp, yp, N, t0, t1);
    } else {
      tiles_vnni_rows<S, 16, 8>(xq.data(), dx.data(), sx.data(), M, K, qp, sp, mp, yp, N, t0, t1);
    }
  });
}

at::Tensor qmm_tiles(const at::Tensor& x, const at::Tensor& qtiles, const at::Tensor& stiles,
                     const c10::optional<at::Tensor>& mtiles, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "qmm_tiles: x must be 2-D float32 on CPU");
  at::Tensor xc = x.contiguous();
  check_tiles(qtiles, stiles, mtiles, bits, group, xc.size(1));
  at::Tensor y = at::empty({xc.size(0), qtiles.size(0) * 16}, xc.options());
  if (stiles.scalar_type() == at::kHalf) run_tiles<at::Half>(xc, qtiles, stiles, mtiles, bits, group, y);
  else run_tiles<float>(xc, qtiles, stiles, mtiles, bits, group, y);
  return y;
}

// one tile's group -> its 16 rows of float (AVX-512): a 64-byte block holds 4 k of 16 rows;
// four rows at a time become one register (4 rows x 4 k), stored as 4 x 16 bytes
template <typename S, int BITS>
ZS_VNNI void untile_group(const uint8_t* o, const S* s16, const S* m16, int group, float* out, int64_t K) {
  const __m512 s = load16(s16), mn = m16 ? load16(m16) : _mm512_setzero_ps();
  const int blocks = group / 4;
  for (int t = 0; t < blocks; ++t) {
    const int bt = BITS == 8 ? t : t % (blocks / 2);
    const bool high = BITS == 4 && t >= blocks / 2;
    for (int q4 = 0; q4 < 4; ++q4) {  // rows 4 q4 .. 4 q4 + 3
      const __m128i raw = _mm_loadu_si128((const __m128i*)(o + bt * 64 + q4 * 16));
      __m512i v;
      if (BITS == 8) {
        v = _mm512_cvtepi8_epi32(raw);
      } else {
        v = _mm512_cvtepu8_epi32(raw);
        v = high ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, _mm512_set1_epi32(0x0F));
      }
      // lane j: row 4 q4 + j / 4 -> its scale and min
      const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(4 * q4), _mm512_srli_epi32(
          _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2));
      const __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_permutexvar_ps(idx, s), _mm512_permutexvar_ps(idx, mn));
      for (int j = 0; j < 4; ++j)
        _mm_storeu_ps(out + (4 * q4 + j) * K + 4 * t, _mm512_extractf32x4_ps(w, j));
    }
  }
}

// tiled -> float [N, K] (prefill: then a BLAS matmul; also the rows of an embedding lookup)
template <typename S>
void run_untile(const at::Tensor& qt, const at::Tensor& st, const c10::optional<at::Tensor>& mt, int bits, int group,
                int64_t K, at::Tensor& out) {
  const int64_t G = K / group, gbytes = bits == 8 ? 16 * group : 8 * group, half = group / 8;
  const uint8_t* qp = static_cast<const uint8_t*>(qt.data_ptr());
  const S* sp = st.data_ptr<S>();
  const S* mp = mt ? mt->data_ptr<S>() : nullptr;
  float* op = out.data_ptr<float>();
  const bool fast = has_vnni();
  at::parallel_for(0, qt.size(0), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t nt = t0; nt < t1; ++nt)
      for (int64_t b = 0; b < G; ++b) {
        const uint8_t* o = qp + nt * G * gbytes + b * gbytes;
        if (fast) {
          const int64_t si = nt * 16 * G + b * 16;
          float* rows = op + nt * 16 * K + b * group;
          if (bits == 8) untile_group<S, 8>(o, sp + si, mp ? mp + si : nullptr, group, rows, K);
          else untile_group<S, 4>(o, sp + si, mp ? mp + si : nullptr, group, rows, K);
          continue;
        }
        for (int r = 0; r < 16; ++r) {
          const int64_t si = nt * 16 * G + b * 16 + r;
          const float s = h2f(sp + si), m = mp ? h2f(mp + si) : 0.f;
          float* row = op + (nt * 16 + r) * K + b * group;
          if (bits == 8) {
            for (int64_t k = 0; k < group; ++k) row[k] = s * float(int8_t(o[(k / 4) * 64 + r * 4 + (k % 4)])) + m;
          } else {
            for (int64_t t = 0; t < half; ++t)
              for (int i = 0; i < 4; ++i) {
                const uint8_t byte = o[t * 64 + r * 4 + i];
                row[4 * t + i] = s * float(byte & 0x0F) + m;
                row[4 * (t + half) + i] = s * float(byte >> 4) + m;
              }
          }
        }
      }
  });
}

at::Tensor untile(const at::Tensor& qtiles, const at::Tensor& stiles, const c10::optional<at::Tensor>& mtiles,
                  int64_t bits, int64_t group) {
  TORCH_CHECK(qtiles.device().is_cpu(), "untile: CPU tensors only");
  const int64_t K = bits == 8 ? qtiles.size(1) / 16 : qtiles.size(1) / 8;
  check_tiles(qtiles, stiles, mtiles, bits, group, K);
  at::Tensor out = at::empty({qtiles.size(0) * 16, K}, stiles.options().dtype(at::kFloat));
  if (stiles.scalar_type() == at::kHalf) run_untile<at::Half>(qtiles, stiles, mtiles, bits, group, K, out);
  else run_untile<float>(qtiles, stiles, mtiles, bits, group, K, out);
  return out;
}

bool vnni() { return has_vnni(); }

// how many of ATen's threads one parallel loop of `tasks` tasks ran on (1 when the library was
// built without OpenMP: then the pragma in at::parallel_for is ignored and every loop is serial)
int64_t parallel_threads(int64_t tasks) {
  std::vector<int> seen(std::max(1, at::get_num_threads()), 0);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    seen[std::min<int64_t>(at::get_thread_num(), int64_t(seen.size()) - 1)] = 1;
  });
  return std::count(seen.begin(), seen.end(), 1);
}

}  // namespace zs::quant

// bound into the library's Python module with step.cpp's ops (step.cpp: PYBIND11_MODULE)
void bind_qmm(pybind11::module_& m) {
  using namespace zs::quant;
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;  // the engine's thread runs these
  m.def("qmm", &qmm, release());
  m.def("dequant", &dequant, release());
  m.def("tile", &tile, release());
  m.def("qmm_tiles", &qmm_tiles, release());
  m.def("untile", &untile, release());
  m.def("avx512", &avx512);
  m.def("vnni", &vnni);
  m.def("parallel_threads", &parallel_threads, release());
}
