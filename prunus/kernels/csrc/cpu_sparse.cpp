// CPU sparse x dense products for prunus.kernels.cpu: CSR and bitmap (unstructured), BSR (blocks).
//
// y (N, out) = x (N, in) @ W^T + bias, with W stored sparse. Registered as torch.ops.prunus_cpu.*.
//
// Why it is fast where torch's CSR matmul is not:
//  - the weight's values and column indices are read once per call and per token tile, and
//    column indices are uint16 when in_features <= 65536 (6 bytes per non-zero instead of 12);
//  - for several tokens the activation is transposed to xt (in, Np), Np = N rounded up to 8, so a
//    non-zero W[r, c] multiplies one contiguous row xt[c, t0:t0+W] held in vector registers;
//  - rows are split between threads by non-zero count (not row count), so a pruned model whose
//    rows have unequal sparsity (global magnitude, OWL) keeps both cores busy;
//  - threads come from at::parallel_for (torch's OpenMP pool), so torch.set_num_threads applies.
//
// Vector code uses GCC vector extensions: the same source builds for AVX2+FMA (-mavx2 -mfma, picked
// at run time by the Python loader when the CPU has them) or for baseline x86-64 / other CPUs.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {
using prunus_kernels::for_rows;

// Rows processed through all token tiles before moving on (their weights stay in L1/L2).
constexpr int64_t kRowChunk = 8;

typedef float v8f __attribute__((vector_size(32)));
// Unaligned view for loads/stores of 8 floats.
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));

inline v8f load8(const float* p) { return *reinterpret_cast<const v8f_u*>(p); }
inline void store8(float* p, v8f v) { *reinterpret_cast<v8f_u*>(p) = v; }
inline v8f splat(float a) { return v8f{a, a, a, a, a, a, a, a}; }

// xt (in, Np) = x (N, in)^T, zero-padded to Np columns.
at::Tensor transpose_pad(const at::Tensor& x, int64_t np) {
  const int64_t n = x.size(0), in = x.size(1);
  at::Tensor xt = at::zeros({in, np}, x.options());
  const float* xs = x.data_ptr<float>();
  float* xd = xt.data_ptr<float>();
  for (int64_t t = 0; t < n; ++t) {
    const float* row = xs + t * in;
    for (int64_t c = 0; c < in; ++c) xd[c * np + t] = row[c];
  }
  return xt;
}

// ---------------------------------------------------------------------------------------------
// CSR

// One token: y[r] = bias[r] + sum_k val[k] * x[col[k]]. Rows are padded to a multiple of 8
// non-zeros (value 0), so the loop needs no tail.
template <typename Idx>
void csr_spmv(const int32_t* ptr, const Idx* col, const float* val, const float* x,
              const float* bias, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f;
    for (int32_t k = ptr[r]; k < ptr[r + 1]; k += 8) {
      a0 += val[k + 0] * x[col[k + 0]];
      a1 += val[k + 1] * x[col[k + 1]];
      a2 += val[k + 2] * x[col[k + 2]];
      a3 += val[k + 3] * x[col[k + 3]];
      a4 += val[k + 4] * x[col[k + 4]];
      a5 += val[k + 5] * x[col[k + 5]];
      a6 += val[k + 6] * x[col[k + 6]];
      a7 += val[k + 7] * x[col[k + 7]];
    }
    float s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
    y[r] = bias ? s + bias[r] : s;
  }
}

// Several tokens: a tile of V*8 tokens [t0, t0 + V*8) from xt (in, np); writes y (n, out).
template <typename Idx, int V>
void csr_spmm_tile(const int32_t* ptr, const Idx* col, const float* val, const float* xt,
                   int64_t np, int64_t t0, int64_t n, int64_t out, const float* bias, float* y,
                   int64_t r0, int64_t r1) {
  // U non-zeros per step into U accumulator sets: U * V independent multiply-add chains hide the
  // FMA latency (one chain would run at a quarter of the FMA throughput). Rows hold a multiple of
  // 8 non-zeros, so U (a divisor of 8) needs no tail loop.
  constexpr int U = V >= 4 ? 2 : 4;
  const int64_t valid = std::min<int64_t>(V * 8, n - t0);
  for (int64_t r = r0; r < r1; ++r) {
    v8f acc[U][V];
    for (int u = 0; u < U; ++u)
      for (int v = 0; v < V; ++v) acc[u][v] = splat(0.f);
    for (int32_t k = ptr[r]; k < ptr[r + 1]; k += U) {
      for (int u = 0; u < U; ++u) {
        const v8f w = splat(val[k + u]);
        const float* xr = xt + static_cast<int64_t>(col[k + u]) * np + t0;
        for (int v = 0; v < V; ++v) acc[u][v] += w * load8(xr + 8 * v);
      }
    }
    float tmp[V * 8];
    const v8f b = splat(bias ? bias[r] : 0.f);
    for (int v = 0; v < V; ++v) {
      v8f sum = b;
      for (int u = 0; u < U; ++u) sum += acc[u][v];
      store8(tmp + 8 * v, sum);
    }
    for (int64_t t = 0; t < valid; ++t) y[(t0 + t) * out + r] = tmp[t];
  }
}

template <typename Idx>
void csr_run(const at::Tensor& x, const at::Tensor& ptr_t, const at::Tensor& col_t,
             const at::Tensor& val_t, const float* bias, at::Tensor& y) {
  const int64_t n = x.size(0), out = y.size(1);
  const int32_t* ptr = ptr_t.data_ptr<int32_t>();
  const Idx* col = reinterpret_cast<const Idx*>(col_t.data_ptr());
  const float* val = val_t.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  const int64_t nnz = ptr[out];
  if (n == 1) {
    const float* xd = x.data_ptr<float>();
    for_rows(ptr, out, nnz, [&](int64_t r0, int64_t r1) {
      csr_spmv<Idx>(ptr, col, val, xd, bias, yd, r0, r1);
    });
    return;
  }
  const int64_t np = (n + 7) / 8 * 8;
  const at::Tensor xt = transpose_pad(x, np);
  const float* xtd = xt.data_ptr<float>();
  for_rows(ptr, out, nnz * n, [&](int64_t r0, int64_t r1) {
    // A few rows at a time through token tiles of 32, then 16, then 8: their non-zeros stay in
    // cache across tiles.
    for (int64_t c0 = r0; c0 < r1; c0 += kRowChunk) {
      const int64_t c1 = std::min(r1, c0 + kRowChunk);
      int64_t t0 = 0;
      for (; t0 + 32 <= np; t0 += 32)
        csr_spmm_tile<Idx, 4>(ptr, col, val, xtd, np, t0, n, out, bias, yd, c0, c1);
      for (; t0 + 16 <= np; t0 += 16)
        csr_spmm_tile<Idx, 2>(ptr, col, val, xtd, np, t0, n, out, bias, yd, c0, c1);
      for (; t0 < np; t0 += 8)
        csr_spmm_tile<Idx, 1>(ptr, col, val, xtd, np, t0, n, out, bias, yd, c0, c1);
    }
  });
}

void check_common(const at::Tensor& x, const at::Tensor& ptr, const at::Tensor& val,
                  const c10::optional<at::Tensor>& bias, int64_t out, int64_t in) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "prunus_cpu: x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(x.size(1) == in, "prunus_cpu: x has ", x.size(1), " features, the layer takes ", in);
  TORCH_CHECK(ptr.scalar_type() == at::kInt && ptr.is_contiguous() && ptr.numel() >= 1,
              "prunus_cpu: row pointer must be contiguous int32");
  TORCH_CHECK(val.scalar_type() == at::kFloat && val.is_contiguous(),
              "prunus_cpu: values must be contiguous float32");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "prunus_cpu: bias must be contiguous float32 of size out_features");
  }
}

// y (N, out) = x (N, in) @ W^T + bias for W in CSR with rows padded to multiples of 8 non-zeros.
at::Tensor csr_linear(const at::Tensor& x_in, const at::Tensor& ptr, const at::Tensor& col,
                      const at::Tensor& val, const c10::optional<at::Tensor>& bias,
                      int64_t out, int64_t in) {
  check_common(x_in, ptr, val, bias, out, in);
  TORCH_CHECK(ptr.numel() == out + 1, "prunus_cpu: row pointer must have out_features + 1 entries");
  TORCH_CHECK(col.is_contiguous() && col.numel() == val.numel(),
              "prunus_cpu: column indices must be contiguous and match the values");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({x.size(0), out}, x.options());
  if (x.size(0) == 0) return y;
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (col.scalar_type() == at::kShort) {
    csr_run<uint16_t>(x, ptr, col, val, b, y);
  } else {
    TORCH_CHECK(col.scalar_type() == at::kInt, "prunus_cpu: column indices must be int16 or int32");
    csr_run<int32_t>(x, ptr, col, val, b, y);
  }
  return y;
}

// ---------------------------------------------------------------------------------------------
// Bitmap: for moderate sparsity (50-80%) where an index per weight costs more than it saves.
// bits (out, G) uint8, G = ceil(in / 8): bit j of bits[r, g] keeps W[r, 8g + j]; vals holds the
// kept weights row by row in column order (row r from vptr[r]), followed by 8 zeros so that a
// group may always load 8 values. A group expands its popcount(bits) values to 8 lanes with one
// permute from a 256-entry table, then multiplies the dense activation x[t, 8g:8g+8]: the weight
// stream is ~(1 - sparsity) * 4 + 1/8 bytes per weight, and the activation loads are contiguous.

#if defined(__AVX2__) && defined(__FMA__)
// For mask m: lane j takes packed value rank(j) = popcount(m & ((1 << j) - 1)) when bit j is set,
// else index 0 with the sign bit set, which blendv turns into 0.
struct ExpandTable {
  alignas(32) int32_t idx[256][8];
  ExpandTable() {
    for (int m = 0; m < 256; ++m) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        if (m & (1 << j)) idx[m][j] = rank++;
        else idx[m][j] = static_cast<int32_t>(0x80000000u);
      }
    }
  }
};
const ExpandTable kExpand;

inline __m256 expand8(const float* p, uint8_t m) {
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.idx[m]));
  const __m256 v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), idx);
  return _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_castsi256_ps(idx));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// T tokens (rows of x, stride ldx) at once; U groups per step into U accumulator sets so that
// U * T multiply-add chains are in flight.
template <int T>
void bitmap_rows_avx2(const uint8_t* bits, const int32_t* vptr, const float* vals, int64_t G,
                 const float* x, int64_t ldx, const float* bias, float* y, int64_t ldy,
                 int64_t out, int64_t r0, int64_t r1) {
  constexpr int U = T >= 4 ? 1 : 4 / T;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* b = bits + r * G;
    const float* p = vals + vptr[r];
    __m256 acc[U][T];
    for (int u = 0; u < U; ++u)
      for (int t = 0; t < T; ++t) acc[u][t] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + U <= G; g += U) {
      for (int u = 0; u < U; ++u) {
        const uint8_t m = b[g + u];
        const __m256 w = expand8(p, m);
        p += __builtin_popcount(m);
        for (int t = 0; t < T; ++t)
          acc[u][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * ldx + 8 * (g + u)), acc[u][t]);
      }
    }
    for (; g < G; ++g) {
      const uint8_t m = b[g];
      const __m256 w = expand8(p, m);
      p += __builtin_popcount(m);
      for (int t = 0; t < T; ++t)
        acc[0][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * ldx + 8 * g), acc[0][t]);
    }
    const float bv = bias ? bias[r] : 0.f;
    for (int t = 0; t < T; ++t) {
      __m256 s = acc[0][t];
      for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][t]);
      y[t * ldy + r] = hsum8(s) + bv;
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512VL__)
// AVX-512: 16 columns per step, expanded with one vexpandps from the 16-bit mask of two groups.
template <int T>
void bitmap_rows(const uint8_t* bits, const int32_t* vptr, const float* vals, int64_t G,
                 const float* x, int64_t ldx, const float* bias, float* y, int64_t ldy,
                 int64_t out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* b = bits + r * G;
    const float* p = vals + vptr[r];
    __m512 acc[2][T];
    for (int u = 0; u < 2; ++u)
      for (int t = 0; t < T; ++t) acc[u][t] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) {
      uint32_t k32;
      std::memcpy(&k32, b + g, 4);
      const __mmask16 k0 = static_cast<__mmask16>(k32), k1 = static_cast<__mmask16>(k32 >> 16);
      const __m512 w0 = _mm512_maskz_expand_ps(k0, _mm512_loadu_ps(p));
      p += __builtin_popcount(k0);
      const __m512 w1 = _mm512_maskz_expand_ps(k1, _mm512_loadu_ps(p));
      p += __builtin_popcount(k1);
      for (int t = 0; t < T; ++t) {
        acc[0][t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * ldx + 8 * g), acc[0][t]);
        acc[1][t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * ldx + 8 * g + 16), acc[1][t]);
      }
    }
    float tail[T] = {};
    for (; g < G; ++g) {
      for (unsigned m = b[g]; m; m &= m - 1) {
        const int64_t c = 8 * g + __builtin_ctz(m);
        const float w = *p++;
        for (int t = 0; t < T; ++t) tail[t] += w * x[t * ldx + c];
      }
    }
    const float bv = bias ? bias[r] : 0.f;
    for (int t = 0; t < T; ++t)
      y[t * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][t], acc[1][t])) + tail[t] + bv;
  }
}

// Row r as a dense float row of G * 8 columns (the prefill path).
inline void bitmap_row_dense(const uint8_t* bits, const int32_t* vptr, const float* vals, int64_t G,
                             int64_t r, float* o) {
  const uint8_t* b = bits + r * G;
  const float* p = vals + vptr[r];
  int64_t g = 0;
  for (; g + 2 <= G; g += 2) {
    uint16_t k;
    std::memcpy(&k, b + g, 2);
    _mm512_storeu_ps(o + 8 * g, _mm512_maskz_expand_ps(k, _mm512_loadu_ps(p)));
    p += __builtin_popcount(k);
  }
  for (; g < G; ++g) {
    _mm256_storeu_ps(o + 8 * g, expand8(p, b[g]));
    p += __builtin_popcount(b[g]);
  }
}
#else
template <int T>
void bitmap_rows(const uint8_t* bits, const int32_t* vptr, const float* vals, int64_t G,
                 const float* x, int64_t ldx, const float* bias, float* y, int64_t ldy,
                 int64_t out, int64_t r0, int64_t r1) {
  bitmap_rows_avx2<T>(bits, vptr, vals, G, x, ldx, bias, y, ldy, out, r0, r1);
}

inline void bitmap_row_dense(const uint8_t* bits, const int32_t* vptr, const float* vals, int64_t G,
                             int64_t r, float* o) {
  const uint8_t* b = bits + r * G;
  const float* p = vals + vptr[r];
  for (int64_t g = 0; g < G; ++g) {
    _mm256_storeu_ps(o + 8 * g, expand8(p, b[g]));
    p += __builtin_popcount(b[g]);
  }
}

#endif
#else
template <int T>
void bitmap_rows(const uint8_t* bits, const int32_t* vptr, const float* vals, int64_t G,
                 const float* x, int64_t ldx, const float* bias, float* y, int64_t ldy,
                 int64_t out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* b = bits + r * G;
    const float* p = vals + vptr[r];
    float acc[T] = {};
    for (int64_t g = 0; g < G; ++g) {
      for (unsigned m = b[g]; m; m &= m - 1) {
        const int64_t c = 8 * g + __builtin_ctz(m);
        const float w = *p++;
        for (int t = 0; t < T; ++t) acc[t] += w * x[t * ldx + c];
      }
    }
    for (int t = 0; t < T; ++t) y[t * ldy + r] = acc[t] + (bias ? bias[r] : 0.f);
  }
}

inline void bitmap_row_dense(const uint8_t* bits, const int32_t* vptr, const float* vals, int64_t G,
                             int64_t r, float* o) {
  const uint8_t* b = bits + r * G;
  const float* p = vals + vptr[r];
  for (int64_t g = 0; g < G; ++g)
    for (int j = 0; j < 8; ++j) o[8 * g + j] = (b[g] >> j) & 1 ? *p++ : 0.f;
}
#endif

at::Tensor bitmap_linear(const at::Tensor& x_in, const at::Tensor& vptr_t, const at::Tensor& bits_t,
                         const at::Tensor& vals_t, const c10::optional<at::Tensor>& bias,
                         int64_t out, int64_t in_features) {
  check_common(x_in, vptr_t, vals_t, bias, out, in_features);
  TORCH_CHECK(vptr_t.numel() == out + 1, "prunus_cpu: value pointer must have out_features + 1 entries");
  TORCH_CHECK(bits_t.scalar_type() == at::kByte && bits_t.is_contiguous() && bits_t.dim() == 2 &&
                  bits_t.size(0) == out,
              "prunus_cpu: bits must be contiguous uint8 (out, ceil(in / 8))");
  const int64_t G = bits_t.size(1), n = x_in.size(0), in = x_in.size(1);
  TORCH_CHECK((in + 7) / 8 == G, "prunus_cpu: bits do not match in_features");
  const int32_t* vptr = vptr_t.data_ptr<int32_t>();
  TORCH_CHECK(vals_t.numel() >= vptr[out] + 16, "prunus_cpu: values need 16 zeros of padding");
  // The kernel reads x in whole groups of 8 columns: pad a copy when in is not a multiple of 8.
  at::Tensor x = x_in.contiguous();
  if (in % 8) {
    at::Tensor xp = at::zeros({n, G * 8}, x.options());
    xp.narrow(1, 0, in).copy_(x);
    x = xp;
  }
  const uint8_t* bits = bits_t.data_ptr<uint8_t>();
  if (n >= 16) {  // prefill: decode the rows and let oneDNN/MKL do the product
    at::Tensor wd = at::empty({out, G * 8}, x.options());
    float* wp = wd.data_ptr<float>();
    const float* vs = vals_t.data_ptr<float>();
    prunus_kernels::for_even_rows(out, out * G * 8, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) bitmap_row_dense(bits, vptr, vs, G, r, wp + r * G * 8);
    });
    return at::linear(x, wd, bias);
  }
  at::Tensor y = at::empty({n, out}, x.options());
  if (n == 0) return y;
  const float* vals = vals_t.data_ptr<float>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float* xd = x.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  const int64_t ldx = G * 8;
  const int64_t work = (static_cast<int64_t>(vptr[out]) + out * G) * n;
  for_rows(vptr, out, work, [&](int64_t r0, int64_t r1) {
    // A few rows at a time through every token tile, so their weights are read from memory once.
    for (int64_t c0 = r0; c0 < r1; c0 += kRowChunk) {
      const int64_t c1 = std::min(r1, c0 + kRowChunk);
      int64_t t = 0;
      for (; t + 8 <= n; t += 8)
        bitmap_rows<8>(bits, vptr, vals, G, xd + t * ldx, ldx, b, yd + t * out, out, out, c0, c1);
      if (n - t >= 4) {
        bitmap_rows<4>(bits, vptr, vals, G, xd + t * ldx, ldx, b, yd + t * out, out, out, c0, c1);
        t += 4;
      }
      if (n - t >= 2) {
        bitmap_rows<2>(bits, vptr, vals, G, xd + t * ldx, ldx, b, yd + t * out, out, out, c0, c1);
        t += 2;
      }
      if (n - t >= 1)
        bitmap_rows<1>(bits, vptr, vals, G, xd + t * ldx, ldx, b, yd + t * out, out, out, c0, c1);
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// BSR: blocks of R x C weights; bptr (out/R + 1) block-row pointer, bcol (nblocks) block columns,
// bval (nblocks, R, C) values.

void bsr_spmv(const int32_t* bptr, const int32_t* bcol, const float* bval, int64_t R, int64_t C,
              const float* x, const float* bias, float* y, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t r = 0; r < R; ++r) {
      // Four partial sums: one running sum would wait on the add latency at every weight.
      float s[4] = {0.f, 0.f, 0.f, 0.f};
      for (int32_t b = bptr[i]; b < bptr[i + 1]; ++b) {
        const float* w = bval + (static_cast<int64_t>(b) * R + r) * C;
        const float* xs = x + static_cast<int64_t>(bcol[b]) * C;
        int64_t c = 0;
        for (; c + 4 <= C; c += 4) {
          s[0] += w[c] * xs[c];
          s[1] += w[c + 1] * xs[c + 1];
          s[2] += w[c + 2] * xs[c + 2];
          s[3] += w[c + 3] * xs[c + 3];
        }
        for (; c < C; ++c) s[c & 3] += w[c] * xs[c];
      }
      const float t = (s[0] + s[1]) + (s[2] + s[3]);
      const int64_t row = i * R + r;
      y[row] = bias ? t + bias[row] : t;
    }
  }
}

// RB rows of one block-row at a time share each loaded activation row (register blocking), and
// U accumulator sets over the block's columns keep RB * U * V multiply-add chains in flight.
template <int RB, int V>
void bsr_spmm_tile(const int32_t* bptr, const int32_t* bcol, const float* bval, int64_t R,
                   int64_t C, const float* xt, int64_t np, int64_t t0, int64_t n, int64_t out,
                   const float* bias, float* y, int64_t i0, int64_t i1) {
  constexpr int U = RB >= 4 ? 1 : 4 / RB;
  const int64_t valid = std::min<int64_t>(V * 8, n - t0);
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t r0 = 0; r0 < R; r0 += RB) {
      v8f acc[U][RB][V];
      for (int u = 0; u < U; ++u)
        for (int q = 0; q < RB; ++q)
          for (int v = 0; v < V; ++v) acc[u][q][v] = splat(0.f);
      for (int32_t b = bptr[i]; b < bptr[i + 1]; ++b) {
        const float* w = bval + (static_cast<int64_t>(b) * R + r0) * C;
        const float* xb = xt + static_cast<int64_t>(bcol[b]) * C * np + t0;
        int64_t c = 0;
        for (; c + U <= C; c += U) {
          for (int u = 0; u < U; ++u) {
            v8f xv[V];
            for (int v = 0; v < V; ++v) xv[v] = load8(xb + (c + u) * np + 8 * v);
            for (int q = 0; q < RB; ++q) {
              const v8f wq = splat(w[q * C + c + u]);
              for (int v = 0; v < V; ++v) acc[u][q][v] += wq * xv[v];
            }
          }
        }
        for (; c < C; ++c) {
          v8f xv[V];
          for (int v = 0; v < V; ++v) xv[v] = load8(xb + c * np + 8 * v);
          for (int q = 0; q < RB; ++q) {
            const v8f wq = splat(w[q * C + c]);
            for (int v = 0; v < V; ++v) acc[0][q][v] += wq * xv[v];
          }
        }
      }
      for (int q = 0; q < RB; ++q) {
        const int64_t row = i * R + r0 + q;
        float tmp[V * 8];
        for (int v = 0; v < V; ++v) {
          v8f sum = splat(bias ? bias[row] : 0.f);
          for (int u = 0; u < U; ++u) sum += acc[u][q][v];
          store8(tmp + 8 * v, sum);
        }
        for (int64_t t = 0; t < valid; ++t) y[(t0 + t) * out + row] = tmp[t];
      }
    }
  }
}

template <int RB>
void bsr_tiles(const int32_t* bptr, const int32_t* bcol, const float* bval, int64_t R, int64_t C,
               const float* xt, int64_t np, int64_t n, int64_t out, const float* bias, float* y,
               int64_t i0, int64_t i1) {
  int64_t t0 = 0;
  for (; t0 + 16 <= np; t0 += 16)
    bsr_spmm_tile<RB, 2>(bptr, bcol, bval, R, C, xt, np, t0, n, out, bias, y, i0, i1);
  for (; t0 < np; t0 += 8)
    bsr_spmm_tile<RB, 1>(bptr, bcol, bval, R, C, xt, np, t0, n, out, bias, y, i0, i1);
}

at::Tensor bsr_linear(const at::Tensor& x_in, const at::Tensor& bptr_t, const at::Tensor& bcol_t,
                      const at::Tensor& bval_t, const c10::optional<at::Tensor>& bias,
                      int64_t out, int64_t in) {
  check_common(x_in, bptr_t, bval_t, bias, out, in);
  TORCH_CHECK(bval_t.dim() == 3, "prunus_cpu: BSR values must be (nblocks, R, C)");
  const int64_t R = bval_t.size(1), C = bval_t.size(2);
  TORCH_CHECK(out % R == 0 && bptr_t.numel() == out / R + 1,
              "prunus_cpu: block-row pointer must have out_features / R + 1 entries");
  TORCH_CHECK(bcol_t.scalar_type() == at::kInt && bcol_t.is_contiguous() &&
                  bcol_t.numel() == bval_t.size(0),
              "prunus_cpu: block columns must be contiguous int32, one per block");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0);
  at::Tensor y = at::empty({n, out}, x.options());
  if (n == 0) return y;
  const int32_t* bptr = bptr_t.data_ptr<int32_t>();
  const int32_t* bcol = bcol_t.data_ptr<int32_t>();
  const float* bval = bval_t.data_ptr<float>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yd = y.data_ptr<float>();
  const int64_t brows = out / R;
  const int64_t work = static_cast<int64_t>(bptr[brows]) * R * C * n;
  if (n == 1) {
    const float* xd = x.data_ptr<float>();
    for_rows(bptr, brows, work, [&](int64_t i0, int64_t i1) {
      bsr_spmv(bptr, bcol, bval, R, C, xd, b, yd, i0, i1);
    });
    return y;
  }
  const int64_t np = (n + 7) / 8 * 8;
  const at::Tensor xt = transpose_pad(x, np);
  const float* xtd = xt.data_ptr<float>();
  for_rows(bptr, brows, work, [&](int64_t i0, int64_t i1) {
    if (R % 4 == 0)
      bsr_tiles<4>(bptr, bcol, bval, R, C, xtd, np, n, out, b, yd, i0, i1);
    else if (R % 2 == 0)
      bsr_tiles<2>(bptr, bcol, bval, R, C, xtd, np, n, out, b, yd, i0, i1);
    else
      bsr_tiles<1>(bptr, bcol, bval, R, C, xtd, np, n, out, b, yd, i0, i1);
  });
  return y;
}

// The instruction set this build targets, so Python can report it.
std::string isa() {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  return "avx512+vnni";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2+fma";
#else
  return "baseline";
#endif
}

}  // namespace

TORCH_LIBRARY(prunus_cpu, m) {
  m.def("csr_linear(Tensor x, Tensor row_ptr, Tensor col, Tensor val, Tensor? bias, int out_features, int in_features) -> Tensor");
  m.def("bsr_linear(Tensor x, Tensor block_ptr, Tensor block_col, Tensor val, Tensor? bias, int out_features, int in_features) -> Tensor");
  m.def("bitmap_linear(Tensor x, Tensor val_ptr, Tensor bits, Tensor val, Tensor? bias, int out_features, int in_features) -> Tensor");
  m.def("isa() -> str", isa);
}

TORCH_LIBRARY_IMPL(prunus_cpu, CPU, m) {
  m.impl("csr_linear", csr_linear);
  m.impl("bsr_linear", bsr_linear);
  m.impl("bitmap_linear", bitmap_linear);
}
