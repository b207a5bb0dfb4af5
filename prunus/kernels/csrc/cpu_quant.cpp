// CPU kernels for quantized weights (prunus.kernels.backends.cpu_quant): dense int8, dense int4 and
// bitmap-sparse int8, all weight-only: y (N, out) = x (N, in) @ W^T + bias with W decoded on the fly
// from integer codes, W[r, c] = s[r, g] * (q[r, c] - z[r, g]) for the group g = c / group.
//
// The decoded weight equals prunus.core.quant.QuantizedWeight.dequantize() bit for bit (the same
// (q - z) * s in float32); only the order of the sums differs from F.linear. Activations stay float32.
//
// Formats (built by prunus.kernels.quant_formats):
//  - q8: codes int8 (out, in); scales (out, G) float32; zeros (out, G) float32 or none.
//  - q4: codes packed two per byte (out, in / 2) in blocks of 32 columns: byte j of a block holds
//    column j in its low nibble and column j + 16 in its high nibble, so 16 bytes widen to the
//    block's two halves with one shift; codes are unsigned 0..15 with a zero point per group
//    (8 for symmetric int4). in and the group are multiples of 32.
//  - bitmap q8: one bit per weight (uint64 words of 64 columns, (out, ceil(in / 64))), the kept
//    weights' int8 values (q - z) row by row from vptr[r], then 64 bytes of padding; scales
//    (out, G). A 64-column word expands its popcount values to 64 lanes with one vpexpandb.
//
// At 1 to 15 tokens the decoded weights go straight into multiply-adds (several tokens share each
// decoded vector); from 16 tokens (prefill) the rows are decoded into a float32 scratch matrix and
// at::linear (oneDNN/MKL) does the product, so prefill runs at the speed of the dense path.
//
// The AVX-512 (F, BW, VL, DQ, VBMI2) code is used when the build targets it (the Python loader
// passes -mavx512* where /proc/cpuinfo lists them); otherwise a portable loop decodes each row.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__AVX512VBMI2__)
#define PRUNUS_AVX512 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using prunus_kernels::for_even_rows;
using prunus_kernels::for_rows;
using prunus_kernels::token_tiles;  // tokens in tiles of 4, 2, 1 (n < kDenseFrom)

#ifndef PRUNUS_RB1
#define PRUNUS_RB1 1
#endif
constexpr int64_t kDenseFrom = 16;  // tokens from which rows are decoded and at::linear runs

// Group index of column c: c >> shift (shift 62 when there is one group per row).
inline int64_t group_of(int64_t c, int shift) { return c >> shift; }

int shift_for(int64_t group, int64_t in, int64_t groups) {
  TORCH_CHECK(groups == 1 || (group >= 1 && (group & (group - 1)) == 0),
              "prunus_cpu: the quantization group must be a power of two");
  if (groups == 1) return 62;
  int s = 0;
  while ((int64_t{1} << s) < group) ++s;
  TORCH_CHECK(in == group * groups, "prunus_cpu: scales do not match in_features / group");
  return s;
}

// Sum of each token's x over each group of columns (n, G), for the zero points: a zero point z
// enters a group's product as z * sum(x over the group).
template <typename S, typename T>
std::vector<S> group_sums(const T* x, int64_t n, int64_t in, int64_t groups, int shift) {
  std::vector<S> out(n * groups, S{0});
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < in; ++c) out[t * groups + group_of(c, shift)] += x[t * in + c];
  return out;
}

struct Q8 {
  const int8_t* q;
  const float* s;
  const float* z;
  int64_t in, G;
  int shift;
};

struct Q4 {
  const uint8_t* p;
  const float* s;
  const float* z;
  int64_t in, G;
  int shift;
};

struct B8 {
  const int32_t* vptr;
  const uint64_t* bits;
  const int8_t* vals;
  const float* s;
  int64_t in, W, G;  // W words of 64 columns per row
  int shift;
};

// ---------------------------------------------------------------------------------------------
// Decoding one row into floats (portable; used by every build for the prefill scratch matrix and
// for the multiply-adds where AVX-512 is absent).

void q8_row(const Q8& w, int64_t r, float* out) {
  const int8_t* q = w.q + r * w.in;
  for (int64_t c = 0; c < w.in; ++c) {
    const int64_t g = r * w.G + group_of(c, w.shift);
    const float v = static_cast<float>(q[c]);
    out[c] = (w.z ? v - w.z[g] : v) * w.s[g];
  }
}

void q4_row(const Q4& w, int64_t r, float* out) {
  const uint8_t* p = w.p + r * (w.in / 2);
  for (int64_t b = 0; b < w.in; b += 32) {
    const int64_t g = r * w.G + group_of(b, w.shift);
    for (int64_t j = 0; j < 16; ++j) {
      const uint8_t byte = p[b / 2 + j];
      out[b + j] = (static_cast<float>(byte & 0xF) - w.z[g]) * w.s[g];
      out[b + 16 + j] = (static_cast<float>(byte >> 4) - w.z[g]) * w.s[g];
    }
  }
}

void b8_row(const B8& w, int64_t r, float* out) {
  const int8_t* p = w.vals + w.vptr[r];
  const uint64_t* bits = w.bits + r * w.W;
  for (int64_t c = 0; c < w.in; ++c) {
    if ((bits[c >> 6] >> (c & 63)) & 1) {
      out[c] = static_cast<float>(*p++) * w.s[r * w.G + group_of(c, w.shift)];
    } else {
      out[c] = 0.f;
    }
  }
}

// y rows [r0, r1) for n tokens from decoded rows (portable path).
template <typename D>
void rows_portable(const D& decode, int64_t in, const float* x, int64_t n, const float* bias,
                   float* y, int64_t out, int64_t r0, int64_t r1) {
  std::vector<float> row(in);
  for (int64_t r = r0; r < r1; ++r) {
    decode(r, row.data());
    for (int64_t t = 0; t < n; ++t) {
      const float* xt = x + t * in;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      int64_t c = 0;
      for (; c + 4 <= in; c += 4) {
        s0 += row[c] * xt[c];
        s1 += row[c + 1] * xt[c + 1];
        s2 += row[c + 2] * xt[c + 2];
        s3 += row[c + 3] * xt[c + 3];
      }
      for (; c < in; ++c) s0 += row[c] * xt[c];
      y[t * out + r] = (s0 + s1) + (s2 + s3) + (bias ? bias[r] : 0.f);
    }
  }
}

// Decode every row into a float32 (out, in) matrix, then at::linear: the prefill path.
template <typename D>
at::Tensor via_dense(const D& decode, const at::Tensor& x, int64_t out, int64_t in,
                     const c10::optional<at::Tensor>& bias) {
  at::Tensor wd = at::empty({out, in}, x.options());
  float* wp = wd.data_ptr<float>();
  for_even_rows(out, out * in, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) decode(r, wp + r * in);
  });
  return at::linear(x, wd, bias);
}

#ifdef PRUNUS_AVX512
inline __mmask16 tail16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

inline __m512 q8_w16(const Q8& w, int64_t r, int64_t c, __mmask16 k) {
  const __m128i b = _mm_maskz_loadu_epi8(k, w.q + r * w.in + c);
  __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  const int64_t g = r * w.G + group_of(c, w.shift);
  if (w.z) f = _mm512_sub_ps(f, _mm512_set1_ps(w.z[g]));
  return _mm512_mul_ps(f, _mm512_set1_ps(w.s[g]));
}

// RB rows from r, T tokens (x rows of stride ldx); RB * T independent multiply-add chains.
// Inside a group the raw codes are summed (code * x); the group's scale multiplies the partial sum
// once, and a zero point enters as s * z * sum(x over the group) (xsum[t * G + g]), so the inner
// loop is widen, convert, multiply-add.
template <int RB, int T>
void q8_block(const Q8& w, const float* x, int64_t ldx, const float* xsum, const float* bias,
              float* y, int64_t ldy, int64_t r) {
  __m512 acc[RB][T];
  float corr[RB][T] = {};
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_ps();
  const int64_t gs = w.G == 1 ? w.in : (int64_t{1} << w.shift);
  for (int64_t g = 0; g < w.G; ++g) {
    __m512 part[RB][T];
    for (int i = 0; i < RB; ++i)
      for (int t = 0; t < T; ++t) part[i][t] = _mm512_setzero_ps();
    const int64_t c1 = std::min(w.in, (g + 1) * gs);
    for (int64_t c = g * gs; c < c1; c += 16) {
      const __mmask16 k = tail16(c1 - c);
      __m512 xv[T];
      for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_ps(k, x + t * ldx + c);
      for (int i = 0; i < RB; ++i) {
        const __m128i b = _mm_maskz_loadu_epi8(k, w.q + (r + i) * w.in + c);
        const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
        for (int t = 0; t < T; ++t) part[i][t] = _mm512_fmadd_ps(f, xv[t], part[i][t]);
      }
    }
    for (int i = 0; i < RB; ++i) {
      const float s = w.s[(r + i) * w.G + g];
      const __m512 sv = _mm512_set1_ps(s);
      for (int t = 0; t < T; ++t) {
        acc[i][t] = _mm512_fmadd_ps(part[i][t], sv, acc[i][t]);
        if (w.z) corr[i][t] += s * w.z[(r + i) * w.G + g] * xsum[t * w.G + g];
      }
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < T; ++t)
      y[t * ldy + r + i] = _mm512_reduce_add_ps(acc[i][t]) - corr[i][t] + (bias ? bias[r + i] : 0.f);
}

inline void q4_w32(const Q4& w, int64_t r, int64_t c, __m512& lo, __m512& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.p + r * (w.in / 2) + c / 2));
  const __m512i v = _mm512_cvtepu8_epi32(b);
  const int64_t g = r * w.G + group_of(c, w.shift);
  const __m512 z = _mm512_set1_ps(w.z[g]), s = _mm512_set1_ps(w.s[g]);
  lo = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))), z), s);
  hi = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), z), s);
}

// As q8_block: raw codes summed per group, scale once per group, zero point through xsum.
template <int RB, int T>
void q4_block(const Q4& w, const float* x, int64_t ldx, const float* xsum, const float* bias,
              float* y, int64_t ldy, int64_t r) {
  __m512 acc[RB][T];
  float corr[RB][T] = {};
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_ps();
  const int64_t gs = w.G == 1 ? w.in : (int64_t{1} << w.shift);
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int64_t g = 0; g < w.G; ++g) {
    __m512 part[RB][T];
    for (int i = 0; i < RB; ++i)
      for (int t = 0; t < T; ++t) part[i][t] = _mm512_setzero_ps();
    for (int64_t c = g * gs; c < (g + 1) * gs; c += 32) {
      __m512 x0[T], x1[T];
      for (int t = 0; t < T; ++t) {
        x0[t] = _mm512_loadu_ps(x + t * ldx + c);
        x1[t] = _mm512_loadu_ps(x + t * ldx + c + 16);
      }
      for (int i = 0; i < RB; ++i) {
        const __m512i v = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.p + (r + i) * (w.in / 2) + c / 2)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low4));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        for (int t = 0; t < T; ++t) {
          part[i][t] = _mm512_fmadd_ps(lo, x0[t], part[i][t]);
          part[i][t] = _mm512_fmadd_ps(hi, x1[t], part[i][t]);
        }
      }
    }
    for (int i = 0; i < RB; ++i) {
      const float sc = w.s[(r + i) * w.G + g];
      const __m512 sv = _mm512_set1_ps(sc);
      for (int t = 0; t < T; ++t) {
        acc[i][t] = _mm512_fmadd_ps(part[i][t], sv, acc[i][t]);
        corr[i][t] += sc * w.z[(r + i) * w.G + g] * xsum[t * w.G + g];
      }
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < T; ++t)
      y[t * ldy + r + i] = _mm512_reduce_add_ps(acc[i][t]) - corr[i][t] + (bias ? bias[r + i] : 0.f);
}

// Rows [r0, r1) of a dense kernel: blocks of RB rows, then single rows.
template <int RB, int T, typename Blk1, typename BlkN>
void dense_rows(int64_t r0, int64_t r1, const BlkN& blk, const Blk1& one) {
  int64_t r = r0;
  for (; r + RB <= r1; r += RB) blk(r);
  for (; r < r1; ++r) one(r);
}

// One bitmap row for T tokens; x is padded to W * 64 columns (ldx).
template <int T>
void b8_one(const B8& w, const float* x, int64_t ldx, const float* bias, float* y, int64_t ldy,
            int64_t r) {
  const int8_t* p = w.vals + w.vptr[r];
  const uint64_t* bits = w.bits + r * w.W;
  const float* srow = w.s + r * w.G;
  __m512 acc[4][T];
  for (int i = 0; i < 4; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < w.W; ++j) {
    const uint64_t k = bits[j];
    if (k == 0) continue;
    const __m512i v = _mm512_maskz_expand_epi8(static_cast<__mmask64>(k),
                                               _mm512_loadu_si512(reinterpret_cast<const void*>(p)));
    p += _mm_popcnt_u64(k);
    const int64_t c = 64 * j;
#define PRUNUS_B8_SLOT(I)                                                                     \
    {                                                                                           \
      __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, I)));     \
      if (w.G != 1) f = _mm512_mul_ps(f, _mm512_set1_ps(srow[group_of(c + 16 * (I), w.shift)])); \
      for (int t = 0; t < T; ++t)                                                               \
        acc[I][t] = _mm512_fmadd_ps(f, _mm512_loadu_ps(x + t * ldx + c + 16 * (I)), acc[I][t]); \
    }
    PRUNUS_B8_SLOT(0)
    PRUNUS_B8_SLOT(1)
    PRUNUS_B8_SLOT(2)
    PRUNUS_B8_SLOT(3)
#undef PRUNUS_B8_SLOT
  }
  for (int t = 0; t < T; ++t) {
    const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[0][t], acc[1][t]),
                                   _mm512_add_ps(acc[2][t], acc[3][t]));
    const float scale = w.G == 1 ? srow[0] : 1.f;
    y[t * ldy + r] = _mm512_reduce_add_ps(s) * scale + (bias ? bias[r] : 0.f);
  }
}

void q8_row_simd(const Q8& w, int64_t r, float* out) {
  for (int64_t c = 0; c < w.in; c += 16) {
    const __mmask16 k = tail16(w.in - c);
    _mm512_mask_storeu_ps(out + c, k, q8_w16(w, r, c, k));
  }
}

void q4_row_simd(const Q4& w, int64_t r, float* out) {
  for (int64_t c = 0; c < w.in; c += 32) {
    __m512 lo, hi;
    q4_w32(w, r, c, lo, hi);
    _mm512_storeu_ps(out + c, lo);
    _mm512_storeu_ps(out + c + 16, hi);
  }
}

void b8_row_simd(const B8& w, int64_t r, float* out) {
  const int8_t* p = w.vals + w.vptr[r];
  const uint64_t* bits = w.bits + r * w.W;
  const float* srow = w.s + r * w.G;
  for (int64_t j = 0; j < w.W; ++j) {
    const uint64_t k = bits[j];
    const __m512i v = _mm512_maskz_expand_epi8(static_cast<__mmask64>(k),
                                               _mm512_loadu_si512(reinterpret_cast<const void*>(p)));
    p += _mm_popcnt_u64(k);
    alignas(64) float tmp[64];
    _mm512_store_ps(tmp, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 0))), _mm512_set1_ps(srow[group_of(64 * j, w.shift)])));
    _mm512_store_ps(tmp + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 1))), _mm512_set1_ps(srow[group_of(64 * j + 16, w.shift)])));
    _mm512_store_ps(tmp + 32, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 2))), _mm512_set1_ps(srow[group_of(64 * j + 32, w.shift)])));
    _mm512_store_ps(tmp + 48, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 3))), _mm512_set1_ps(srow[group_of(64 * j + 48, w.shift)])));
    const int64_t c = 64 * j, m = std::min<int64_t>(64, w.in - c);
    std::memcpy(out + c, tmp, m * sizeof(float));
  }
}
#endif  // PRUNUS_AVX512


void check_x(const at::Tensor& x, int64_t in, const c10::optional<at::Tensor>& bias, int64_t out) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "prunus_cpu: x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(x.size(1) == in, "prunus_cpu: x has ", x.size(1), " features, the layer takes ", in);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "prunus_cpu: bias must be contiguous float32 of size out_features");
  }
}

void check_scales(const at::Tensor& s, const c10::optional<at::Tensor>& z, int64_t out) {
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 && s.size(0) == out,
              "prunus_cpu: scales must be contiguous float32 (out, groups)");
  if (z.has_value()) {
    TORCH_CHECK(z->scalar_type() == at::kFloat && z->is_contiguous() && z->sizes() == s.sizes(),
                "prunus_cpu: zero points must be contiguous float32 shaped like the scales");
  }
}

// ---------------------------------------------------------------------------------------------
// The ops

at::Tensor q8_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& bias,
                     int64_t group) {
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous() && codes.dim() == 2,
              "prunus_cpu: int8 codes must be contiguous int8 (out, in)");
  const int64_t out = codes.size(0), in = codes.size(1);
  check_x(x_in, in, bias, out);
  check_scales(scales, zeros, out);
  const Q8 w{codes.data_ptr<int8_t>(), scales.data_ptr<float>(),
             zeros.has_value() ? zeros->data_ptr<float>() : nullptr, in, scales.size(1),
             shift_for(group, in, scales.size(1))};
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0);
  auto decode = [&](int64_t r, float* o) { q8_row(w, r, o); };
#ifdef PRUNUS_AVX512
  if (n >= kDenseFrom)
    return via_dense([&](int64_t r, float* o) { q8_row_simd(w, r, o); }, x, out, in, bias);
#else
  if (n >= kDenseFrom) return via_dense(decode, x, out, in, bias);
#endif
  at::Tensor y = at::empty({n, out}, x.options());
  if (n == 0) return y;
  const float* xd = x.data_ptr<float>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yd = y.data_ptr<float>();
  const std::vector<float> xsum = w.z ? group_sums<float>(xd, n, in, w.G, w.shift)
                                       : std::vector<float>(1, 0.f);
  for_even_rows(out, out * in * n, 4, [&](int64_t r0, int64_t r1) {
#ifdef PRUNUS_AVX512
    token_tiles(n, [&](auto tc, int64_t t) {
      constexpr int T = decltype(tc)::value;
      constexpr int RB = T == 1 ? PRUNUS_RB1 : (T == 4 ? 2 : 4);
      const float* xt = xd + t * in;
      float* yt = yd + t * out;
      const float* st = xsum.data() + t * w.G;
      dense_rows<RB, T>(r0, r1, [&](int64_t r) { q8_block<RB, T>(w, xt, in, st, b, yt, out, r); },
                        [&](int64_t r) { q8_block<1, T>(w, xt, in, st, b, yt, out, r); });
    });
#else
    rows_portable(decode, in, xd, n, b, yd, out, r0, r1);
#endif
  });
  return y;
}

at::Tensor q4_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                     const at::Tensor& zeros, const c10::optional<at::Tensor>& bias, int64_t group,
                     int64_t in) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2,
              "prunus_cpu: int4 codes must be contiguous uint8 (out, in / 2)");
  const int64_t out = packed.size(0);
  TORCH_CHECK(in % 32 == 0 && packed.size(1) * 2 == in,
              "prunus_cpu: int4 rows must hold in / 2 bytes, in a multiple of 32");
  check_x(x_in, in, bias, out);
  check_scales(scales, zeros, out);
  TORCH_CHECK(scales.size(1) == 1 || group % 32 == 0, "prunus_cpu: int4 groups must be multiples of 32");
  const Q4 w{packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<float>(), in,
             scales.size(1), shift_for(group, in, scales.size(1))};
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0);
  auto decode = [&](int64_t r, float* o) { q4_row(w, r, o); };
#ifdef PRUNUS_AVX512
  if (n >= kDenseFrom)
    return via_dense([&](int64_t r, float* o) { q4_row_simd(w, r, o); }, x, out, in, bias);
#else
  if (n >= kDenseFrom) return via_dense(decode, x, out, in, bias);
#endif
  at::Tensor y = at::empty({n, out}, x.options());
  if (n == 0) return y;
  const float* xd = x.data_ptr<float>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yd = y.data_ptr<float>();
  const std::vector<float> xsum = group_sums<float>(xd, n, in, w.G, w.shift);
  for_even_rows(out, out * in * n, 4, [&](int64_t r0, int64_t r1) {
#ifdef PRUNUS_AVX512
    token_tiles(n, [&](auto tc, int64_t t) {
      constexpr int T = decltype(tc)::value;
      constexpr int RB = T == 1 ? PRUNUS_RB1 : (T == 4 ? 2 : 4);
      const float* xt = xd + t * in;
      float* yt = yd + t * out;
      const float* st = xsum.data() + t * w.G;
      dense_rows<RB, T>(r0, r1, [&](int64_t r) { q4_block<RB, T>(w, xt, in, st, b, yt, out, r); },
                        [&](int64_t r) { q4_block<1, T>(w, xt, in, st, b, yt, out, r); });
    });
#else
    rows_portable(decode, in, xd, n, b, yd, out, r0, r1);
#endif
  });
  return y;
}

at::Tensor bitmap_q8_linear(const at::Tensor& x_in, const at::Tensor& vptr_t, const at::Tensor& bits_t,
                            const at::Tensor& vals_t, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& bias, int64_t group, int64_t in) {
  TORCH_CHECK(bits_t.scalar_type() == at::kLong && bits_t.is_contiguous() && bits_t.dim() == 2,
              "prunus_cpu: bits must be contiguous int64 words (out, ceil(in / 64))");
  const int64_t out = bits_t.size(0), W = bits_t.size(1);
  TORCH_CHECK((in + 63) / 64 == W, "prunus_cpu: bits do not match in_features");
  TORCH_CHECK(vptr_t.scalar_type() == at::kInt && vptr_t.is_contiguous() && vptr_t.numel() == out + 1,
              "prunus_cpu: value pointer must be contiguous int32 with out_features + 1 entries");
  TORCH_CHECK(vals_t.scalar_type() == at::kChar && vals_t.is_contiguous(),
              "prunus_cpu: values must be contiguous int8");
  check_x(x_in, in, bias, out);
  check_scales(scales, c10::nullopt, out);
  TORCH_CHECK(scales.size(1) == 1 || group % 16 == 0, "prunus_cpu: groups must be multiples of 16");
  const int32_t* vptr = vptr_t.data_ptr<int32_t>();
  TORCH_CHECK(vals_t.numel() >= static_cast<int64_t>(vptr[out]) + 64,
              "prunus_cpu: values need 64 bytes of padding");
  const B8 w{vptr, reinterpret_cast<const uint64_t*>(bits_t.data_ptr<int64_t>()),
             vals_t.data_ptr<int8_t>(), scales.data_ptr<float>(), in, W, scales.size(1),
             shift_for(group, in, scales.size(1))};
  at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0);
  auto decode = [&](int64_t r, float* o) { b8_row(w, r, o); };
#ifdef PRUNUS_AVX512
  if (n >= kDenseFrom)
    return via_dense([&](int64_t r, float* o) { b8_row_simd(w, r, o); }, x, out, in, bias);
#else
  if (n >= kDenseFrom) return via_dense(decode, x, out, in, bias);
#endif
  at::Tensor y = at::empty({n, out}, x.options());
  if (n == 0) return y;
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yd = y.data_ptr<float>();
#ifdef PRUNUS_AVX512
  const int64_t ldx = W * 64;
  if (ldx != in) {  // the kernel reads whole words of 64 columns
    at::Tensor xp = at::zeros({n, ldx}, x.options());
    xp.narrow(1, 0, in).copy_(x);
    x = xp;
  }
  const float* xd = x.data_ptr<float>();
  const int64_t work = (static_cast<int64_t>(vptr[out]) + out * W * 8) * n;
  for_rows(vptr, out, work, [&](int64_t r0, int64_t r1) {
    token_tiles(n, [&](auto tc, int64_t t) {
      constexpr int T = decltype(tc)::value;
      for (int64_t r = r0; r < r1; ++r) b8_one<T>(w, xd + t * ldx, ldx, b, yd + t * out, out, r);
    });
  });
#else
  const float* xd = x.data_ptr<float>();
  for_rows(vptr, out, static_cast<int64_t>(vptr[out]) * n, [&](int64_t r0, int64_t r1) {
    rows_portable(decode, in, xd, n, b, yd, out, r0, r1);
  });
#endif
  return y;
}


// ---------------------------------------------------------------------------------------------
// W8A8 (AVX-512 VNNI): the activation is quantized too, per token: sx[t] = max|x[t]| / 127,
// xq = round(x / sx) in [-127, 127], fed to vpdpbusd as xq + 128 (unsigned); with the int8 weight
// codes w (pruned ones 0) the int32 sums are exact, and
//     y[t, r] = s[r] * sx[t] * (sum_c (xq + 128) * w - 128 * sum_c w) + bias[r].
// One load and one vpdpbusd per 64 weights. This is not weight-only: the activation's rounding
// changes the result (by about what torch's dynamic int8 quantization or llama.cpp's Q8_0 do), so
// these kernels are offered only when asked for (prunus export --act-int8).

#if defined(PRUNUS_AVX512) && defined(__AVX512VNNI__)
#define PRUNUS_VNNI 1

// x (n, in) -> xu (n, W * 64) uint8 (xq + 128, zero-padded columns hold 128), sx (n).
void quantize_rows(const float* x, int64_t n, int64_t in, int64_t W, uint8_t* xu, float* sx) {
  for (int64_t t = 0; t < n; ++t) {
    const float* xr = x + t * in;
    __m512 m = _mm512_setzero_ps();
    for (int64_t c = 0; c < in; c += 16)
      m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail16(in - c), xr + c)));
    const float amax = _mm512_reduce_max_ps(m);
    const float s = amax > 0.f ? amax / 127.f : 1.f;
    sx[t] = s;
    const __m512 inv = _mm512_set1_ps(1.f / s);
    uint8_t* o = xu + t * W * 64;
    std::memset(o, 128, W * 64);
    for (int64_t c = 0; c < in; c += 16) {
      const __mmask16 k = tail16(in - c);
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, xr + c), inv));
      const __m512i u = _mm512_add_epi32(_mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)),
                                                          _mm512_set1_epi32(-127)),
                                         _mm512_set1_epi32(128));
      _mm_mask_storeu_epi8(o + c, k, _mm512_cvtepi32_epi8(u));
    }
  }
}

inline __mmask64 tail64(int64_t n) {
  return n >= 64 ? ~__mmask64{0} : ((__mmask64{1} << n) - 1);
}

// Dense int8 codes q (out, in): rows [r0, r1), tokens in tiles of up to 4.
template <int RB, int T>
void a8_dense_block(const int8_t* q, int64_t in, int64_t W, const uint8_t* xu, int64_t r,
                    __m512i (&acc)[RB][T]) {
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_si512();
  for (int64_t b = 0; b < W; ++b) {
    const __mmask64 k = tail64(in - 64 * b);
    __m512i xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_si512(xu + t * W * 64 + 64 * b);
    for (int i = 0; i < RB; ++i) {
      const __m512i wv = _mm512_maskz_loadu_epi8(k, q + (r + i) * in + 64 * b);
      for (int t = 0; t < T; ++t) acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], xv[t], wv);
    }
  }
}

// One bitmap row: the expanded codes of each 64-column word feed every token of the tile.
template <int T>
void a8_bitmap_row(const B8& w, const uint8_t* xu, int64_t r, __m512i (&acc)[1][T]) {
  for (int t = 0; t < T; ++t) acc[0][t] = _mm512_setzero_si512();
  const int8_t* p = w.vals + w.vptr[r];
  const uint64_t* bits = w.bits + r * w.W;
  for (int64_t j = 0; j < w.W; ++j) {
    const uint64_t k = bits[j];
    if (k == 0) continue;
    const __m512i v = _mm512_maskz_expand_epi8(static_cast<__mmask64>(k),
                                               _mm512_loadu_si512(reinterpret_cast<const void*>(p)));
    p += _mm_popcnt_u64(k);
    for (int t = 0; t < T; ++t)
      acc[0][t] = _mm512_dpbusd_epi32(acc[0][t], _mm512_loadu_si512(xu + t * w.W * 64 + 64 * j), v);
  }
}
#endif  // VNNI

// y = s[r] * sx[t] * (acc - 128 * wsum[r]) + bias, for the a8 ops.
at::Tensor a8_linear(const at::Tensor& x_in, const at::Tensor& codes_or_bits, const at::Tensor& vptr_t,
                     const at::Tensor& vals_t, const at::Tensor& scales, const at::Tensor& wsum_t,
                     const c10::optional<at::Tensor>& bias, int64_t in, bool bitmap) {
#ifndef PRUNUS_VNNI
  TORCH_CHECK(false, "prunus_cpu: the W8A8 kernels need a build with AVX-512 VNNI");
  return x_in;
#else
  const int64_t out = codes_or_bits.size(0);
  check_x(x_in, in, bias, out);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == out,
              "prunus_cpu: W8A8 needs one float32 scale per output channel");
  TORCH_CHECK(wsum_t.scalar_type() == at::kInt && wsum_t.is_contiguous() && wsum_t.numel() == out,
              "prunus_cpu: W8A8 needs the int32 code sum of every row");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), W = (in + 63) / 64;
  at::Tensor y = at::empty({n, out}, x.options());
  if (n == 0) return y;
  std::vector<uint8_t> xu(n * W * 64);
  std::vector<float> sx(n);
  quantize_rows(x.data_ptr<float>(), n, in, W, xu.data(), sx.data());
  const float* s = scales.data_ptr<float>();
  const int32_t* wsum = wsum_t.data_ptr<int32_t>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yd = y.data_ptr<float>();
  auto finish = [&](int64_t r, int64_t t, __m512i acc) {
    const int64_t isum = static_cast<int64_t>(_mm512_reduce_add_epi32(acc)) - 128 * int64_t{wsum[r]};
    yd[t * out + r] = s[r] * sx[t] * static_cast<float>(isum) + (b ? b[r] : 0.f);
  };
  if (!bitmap) {
    TORCH_CHECK(codes_or_bits.scalar_type() == at::kChar && codes_or_bits.is_contiguous() &&
                    codes_or_bits.size(1) == in, "prunus_cpu: int8 codes must be contiguous (out, in)");
    const int8_t* q = codes_or_bits.data_ptr<int8_t>();
    for_even_rows(out, out * in * n, 4, [&](int64_t r0, int64_t r1) {
      token_tiles(n, [&](auto tc, int64_t t0) {
        constexpr int T = decltype(tc)::value;
        const uint8_t* xt = xu.data() + t0 * W * 64;
        int64_t r = r0;
        for (; PRUNUS_RB1 == 4 && r + 4 <= r1; r += 4) {
          __m512i acc[4][T];
          a8_dense_block<4, T>(q, in, W, xt, r, acc);
          for (int i = 0; i < 4; ++i)
            for (int t = 0; t < T; ++t) finish(r + i, t0 + t, acc[i][t]);
        }
        for (; r < r1; ++r) {
          __m512i acc[1][T];
          a8_dense_block<1, T>(q, in, W, xt, r, acc);
          for (int t = 0; t < T; ++t) finish(r, t0 + t, acc[0][t]);
        }
      });
    });
  } else {
    TORCH_CHECK(codes_or_bits.scalar_type() == at::kLong && codes_or_bits.size(1) == W,
                "prunus_cpu: bits must be int64 words (out, ceil(in / 64))");
    const int32_t* vptr = vptr_t.data_ptr<int32_t>();
    TORCH_CHECK(vals_t.numel() >= static_cast<int64_t>(vptr[out]) + 64,
                "prunus_cpu: values need 64 bytes of padding");
    const B8 w{vptr, reinterpret_cast<const uint64_t*>(codes_or_bits.data_ptr<int64_t>()),
               vals_t.data_ptr<int8_t>(), s, in, W, 1, 62};
    for_rows(vptr, out, (static_cast<int64_t>(vptr[out]) + out * W * 8) * n, [&](int64_t r0, int64_t r1) {
      token_tiles(n, [&](auto tc, int64_t t0) {
        constexpr int T = decltype(tc)::value;
        const uint8_t* xt = xu.data() + t0 * W * 64;
        for (int64_t r = r0; r < r1; ++r) {
          __m512i acc[1][T];
          a8_bitmap_row<T>(w, xt, r, acc);
          for (int t = 0; t < T; ++t) finish(r, t0 + t, acc[0][t]);
        }
      });
    });
  }
  return y;
#endif
}

at::Tensor q8a8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const at::Tensor& wsum, const c10::optional<at::Tensor>& bias) {
  return a8_linear(x, codes, codes, codes, scales, wsum, bias, codes.size(1), false);
}

at::Tensor bitmap_q8a8_linear(const at::Tensor& x, const at::Tensor& vptr, const at::Tensor& bits,
                              const at::Tensor& vals, const at::Tensor& scales, const at::Tensor& wsum,
                              const c10::optional<at::Tensor>& bias, int64_t in) {
  TORCH_CHECK(vptr.scalar_type() == at::kInt && vals.scalar_type() == at::kChar,
              "prunus_cpu: bitmap arrays have the wrong types");
  return a8_linear(x, bits, vptr, vals, scales, wsum, bias, in, true);
}


// W4A8: int4 codes u in [0, 15] with a zero point z per group (8 for symmetric int4), packed in
// blocks of 64 columns (byte j holds column j in its low nibble and column j + 32 in its high one),
// times the activation rounded to int8 per token (xq, no offset: vpdpbusd takes the unsigned
// codes as its first operand). Per group: int32 sum of u * xq, minus z * sum(xq over the group),
// times the group's scale; times the token's scale at the end.
#ifdef PRUNUS_VNNI
// x (n, in) -> xq (n, in) int8 and sx (n); in is a multiple of 64.
void quantize_rows_signed(const float* x, int64_t n, int64_t in, int8_t* xq, float* sx) {
  for (int64_t t = 0; t < n; ++t) {
    const float* xr = x + t * in;
    __m512 m = _mm512_setzero_ps();
    for (int64_t c = 0; c < in; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xr + c)));
    const float amax = _mm512_reduce_max_ps(m);
    const float s = amax > 0.f ? amax / 127.f : 1.f;
    sx[t] = s;
    const __m512 inv = _mm512_set1_ps(1.f / s);
    for (int64_t c = 0; c < in; c += 16) {
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + c), inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + t * in + c),
                       _mm512_cvtsepi32_epi8(_mm512_max_epi32(q, _mm512_set1_epi32(-127))));
    }
  }
}

template <int RB, int T>
void q4a8_block(const Q4& w, const int8_t* xq, const int32_t* xsum, const float* sx,
                const float* bias, float* y, int64_t ldy, int64_t r) {
  __m512 acc[RB][T];
  float corr[RB][T] = {};
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_ps();
  const int64_t gs = w.G == 1 ? w.in : (int64_t{1} << w.shift);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t g = 0; g < w.G; ++g) {
    __m512i part[RB][T];
    for (int i = 0; i < RB; ++i)
      for (int t = 0; t < T; ++t) part[i][t] = _mm512_setzero_si512();
    for (int64_t c = g * gs; c < (g + 1) * gs; c += 64) {
      __m512i xv[T];
      for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_si512(xq + t * w.in + c);
      for (int i = 0; i < RB; ++i) {
        const __m256i v = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(w.p + (r + i) * (w.in / 2) + c / 2));
        const __m256i lo = _mm256_and_si256(v, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        const __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        for (int t = 0; t < T; ++t) part[i][t] = _mm512_dpbusd_epi32(part[i][t], u, xv[t]);
      }
    }
    for (int i = 0; i < RB; ++i) {
      const float sc = w.s[(r + i) * w.G + g];
      const __m512 sv = _mm512_set1_ps(sc);
      for (int t = 0; t < T; ++t) {
        acc[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part[i][t]), sv, acc[i][t]);
        corr[i][t] += sc * w.z[(r + i) * w.G + g] * static_cast<float>(xsum[t * w.G + g]);
      }
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < T; ++t)
      y[t * ldy + r + i] = sx[t] * (_mm512_reduce_add_ps(acc[i][t]) - corr[i][t]) +
                           (bias ? bias[r + i] : 0.f);
}
#endif

at::Tensor q4a8_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zeros, const c10::optional<at::Tensor>& bias, int64_t group,
                       int64_t in) {
#ifndef PRUNUS_VNNI
  TORCH_CHECK(false, "prunus_cpu: the W4A8 kernel needs a build with AVX-512 VNNI");
  return x_in;
#else
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2 &&
                  in % 64 == 0 && packed.size(1) * 2 == in,
              "prunus_cpu: W4A8 codes must be contiguous uint8 (out, in / 2), in a multiple of 64");
  const int64_t out = packed.size(0);
  check_x(x_in, in, bias, out);
  check_scales(scales, zeros, out);
  TORCH_CHECK(scales.size(1) == 1 || group % 64 == 0, "prunus_cpu: W4A8 groups must be multiples of 64");
  const Q4 w{packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<float>(), in,
             scales.size(1), shift_for(group, in, scales.size(1))};
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0);
  at::Tensor y = at::empty({n, out}, x.options());
  if (n == 0) return y;
  std::vector<int8_t> xq(n * in);
  std::vector<float> sx(n);
  quantize_rows_signed(x.data_ptr<float>(), n, in, xq.data(), sx.data());
  const std::vector<int32_t> xsum = group_sums<int32_t>(xq.data(), n, in, w.G, w.shift);
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yd = y.data_ptr<float>();
  for_even_rows(out, out * in * n, 4, [&](int64_t r0, int64_t r1) {
    token_tiles(n, [&](auto tc, int64_t t) {
      constexpr int T = decltype(tc)::value;
      constexpr int RB = T == 1 ? PRUNUS_RB1 : (T == 4 ? 2 : 4);
      const int8_t* xt = xq.data() + t * in;
      const int32_t* st = xsum.data() + t * w.G;
      const float* sxt = sx.data() + t;
      float* yt = yd + t * out;
      dense_rows<RB, T>(r0, r1, [&](int64_t r) { q4a8_block<RB, T>(w, xt, st, sxt, b, yt, out, r); },
                        [&](int64_t r) { q4a8_block<1, T>(w, xt, st, sxt, b, yt, out, r); });
    });
  });
  return y;
#endif
}

bool vnni() {
#ifdef PRUNUS_VNNI
  return true;
#else
  return false;
#endif
}

bool quant_simd() {
#ifdef PRUNUS_AVX512
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prunus_cpu, m) {
  m.def("q8_linear(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias, int group) -> Tensor");
  m.def("q4_linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, Tensor? bias, int group, int in_features) -> Tensor");
  m.def("bitmap_q8_linear(Tensor x, Tensor val_ptr, Tensor bits, Tensor val, Tensor scales, Tensor? bias, int group, int in_features) -> Tensor");
  m.def("q8a8_linear(Tensor x, Tensor codes, Tensor scales, Tensor wsum, Tensor? bias) -> Tensor");
  m.def("bitmap_q8a8_linear(Tensor x, Tensor val_ptr, Tensor bits, Tensor val, Tensor scales, Tensor wsum, Tensor? bias, int in_features) -> Tensor");
  m.def("q4a8_linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, Tensor? bias, int group, int in_features) -> Tensor");
  m.def("quant_simd() -> bool", quant_simd);
  m.def("vnni() -> bool", vnni);
}

TORCH_LIBRARY_IMPL(prunus_cpu, CPU, m) {
  m.impl("q8_linear", q8_linear);
  m.impl("q4_linear", q4_linear);
  m.impl("bitmap_q8_linear", bitmap_q8_linear);
  m.impl("q8a8_linear", q8a8_linear);
  m.impl("q4a8_linear", q4a8_linear);
  m.impl("bitmap_q8a8_linear", bitmap_q8a8_linear);
}
