// CSR with int8 values (prunus.kernels.backends.cpu_quant, kernel cpu_csr_int8): weight-only,
// y (N, out) = x (N, in) @ W^T + bias with W[r, c] = s[r, g] * v for each kept weight, g = c / group.
//
// Format (built by prunus.kernels.quant_formats.csr_q8_arrays):
//  - row_ptr int32 (out + 1): row r's kept weights are k in [row_ptr[r], row_ptr[r + 1]);
//  - col (nnz): their columns, ascending within a row; uint16 held in an int16 tensor when
//    in_features <= 65536, else int32;
//  - vals int8 (nnz): their values q - z (symmetric int8, or int4 codes minus their zero point);
//  - scales float32 (out, G): one per row and group of `group` columns (G = 1: per channel).
// Per kept weight: 2 (or 4) bytes of index + 1 byte of value, plus 4 bytes of row pointer per row.
//
// At 1 to 15 tokens each row gathers x at its columns and multiply-adds the int8 values, summing
// each group's products apart and scaling the partial sum once by the group's scale (columns are
// ascending, so a group is a contiguous run of a row's entries). From 16 tokens (prefill) the rows
// are decoded into a float32 (out, in) matrix and at::linear does the product. Rows are split
// between torch's threads by their number of kept weights (at::parallel_for via common.h).
//
// The decoded weight equals QuantizedWeight.dequantize() bit for bit; only the order of the sums
// differs. With AVX-512 (F, BW, VL) the gather-multiply-add takes 16 entries per step
// (_mm512_i32gather_ps, masked at a group's tail); otherwise a portable loop runs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PRUNUS_CSR_Q8_AVX512 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

using prunus_kernels::for_even_rows;
using prunus_kernels::for_rows;

constexpr int64_t kCsrQ8DenseFrom = 16;  // tokens from which rows are decoded and at::linear runs

// The arrays of one layer; Idx is uint16_t or int32_t.
template <typename Idx>
struct CsrQ8 {
  const int32_t* ptr;
  const Idx* col;
  const int8_t* v;
  const float* s;
  int64_t in, G, group;
};

// End (exclusive) of the run of row entries [k, end) that lie in group g: the first entry whose
// column is at or past (g + 1) * group (binary search: columns ascend within a row).
template <typename Idx>
inline int64_t group_end(const CsrQ8<Idx>& w, int64_t k, int64_t end, int64_t g) {
  if (w.G == 1) return end;
  const int64_t limit = (g + 1) * w.group;
  const Idx* p = std::lower_bound(w.col + k, w.col + end, limit,
                                  [](Idx c, int64_t lim) { return static_cast<int64_t>(c) < lim; });
  return p - w.col;
}

// Row r decoded into floats (out[in]): zero, then s * v at each kept column.
template <typename Idx>
void csr_q8_row(const CsrQ8<Idx>& w, int64_t r, float* out) {
  std::fill(out, out + w.in, 0.f);
  const float* s = w.s + r * w.G;
  for (int64_t k = w.ptr[r]; k < w.ptr[r + 1]; ++k) {
    const int64_t c = static_cast<int64_t>(w.col[k]);
    out[c] = static_cast<float>(w.v[k]) * s[w.G == 1 ? 0 : c / w.group];
  }
}

// Rows [r0, r1) for T tokens starting at x (row stride in), y (row stride out): portable loop.
template <int T, typename Idx>
void csr_q8_rows_portable(const CsrQ8<Idx>& w, const float* x, const float* bias, float* y,
                          int64_t out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc[T] = {};
    const int64_t end = w.ptr[r + 1];
    for (int64_t k = w.ptr[r]; k < end;) {
      const int64_t g = w.G == 1 ? 0 : static_cast<int64_t>(w.col[k]) / w.group;
      const int64_t kend = group_end(w, k, end, g);
      float part[T] = {};
      for (; k < kend; ++k) {
        const float v = static_cast<float>(w.v[k]);
        const int64_t c = static_cast<int64_t>(w.col[k]);
        for (int t = 0; t < T; ++t) part[t] += v * x[t * w.in + c];
      }
      const float sc = w.s[r * w.G + g];
      for (int t = 0; t < T; ++t) acc[t] += sc * part[t];
    }
    for (int t = 0; t < T; ++t) y[t * out + r] = acc[t] + (bias ? bias[r] : 0.f);
  }
}

#ifdef PRUNUS_CSR_Q8_AVX512
// 16 (or `m`-masked fewer) column indices from p, widened to int32.
inline __m512i load_idx(const uint16_t* p, __mmask16 m) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512i load_idx(const int32_t* p, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, p); }

// Rows [r0, r1) for T tokens: 16 entries per step, x gathered at their columns.
template <int T, typename Idx>
void csr_q8_rows_simd(const CsrQ8<Idx>& w, const float* x, const float* bias, float* y,
                      int64_t out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
    const int64_t end = w.ptr[r + 1];
    for (int64_t k = w.ptr[r]; k < end;) {
      const int64_t g = w.G == 1 ? 0 : static_cast<int64_t>(w.col[k]) / w.group;
      const int64_t kend = group_end(w, k, end, g);
      __m512 part[T];
      for (int t = 0; t < T; ++t) part[t] = _mm512_setzero_ps();
      for (; k < kend; k += 16) {
        const int64_t left = kend - k;
        const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                                       : static_cast<__mmask16>((1u << left) - 1);
        const __m512i idx = load_idx(w.col + k, m);
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w.v + k)));
        for (int t = 0; t < T; ++t) {
          const __m512 xg = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, x + t * w.in, 4);
          part[t] = _mm512_fmadd_ps(v, xg, part[t]);
        }
      }
      k = kend;
      const __m512 sc = _mm512_set1_ps(w.s[r * w.G + g]);
      for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(sc, part[t], acc[t]);
    }
    for (int t = 0; t < T; ++t)
      y[t * out + r] = _mm512_reduce_add_ps(acc[t]) + (bias ? bias[r] : 0.f);
  }
}
#endif

// y rows [r0, r1) for every token, in tiles of 4, 2, 1 tokens.
template <typename Idx>
void csr_q8_rows(const CsrQ8<Idx>& w, const float* x, int64_t n, const float* bias, float* y,
                 int64_t out, int64_t r0, int64_t r1) {
  auto tile = [&](auto tc, int64_t t) {
    constexpr int T = decltype(tc)::value;
#ifdef PRUNUS_CSR_Q8_AVX512
    csr_q8_rows_simd<T>(w, x + t * w.in, bias, y + t * out, out, r0, r1);
#else
    csr_q8_rows_portable<T>(w, x + t * w.in, bias, y + t * out, out, r0, r1);
#endif
  };
  prunus_kernels::token_tiles(n, tile);
}

template <typename Idx>
at::Tensor csr_q8_run(const CsrQ8<Idx>& w, const at::Tensor& x, int64_t out,
                      const c10::optional<at::Tensor>& bias) {
  const int64_t n = x.size(0), nnz = w.ptr[out];
  if (n >= kCsrQ8DenseFrom) {  // prefill: decode, then the dense product
    at::Tensor wd = at::empty({out, w.in}, x.options());
    float* wp = wd.data_ptr<float>();
    for_even_rows(out, out * w.in, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) csr_q8_row(w, r, wp + r * w.in);
    });
    return at::linear(x, wd, bias);
  }
  at::Tensor y = at::empty({n, out}, x.options());
  if (n == 0) return y;
  const float* xd = x.data_ptr<float>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yd = y.data_ptr<float>();
  for_rows(w.ptr, out, (nnz + out) * n, [&](int64_t r0, int64_t r1) {
    csr_q8_rows(w, xd, n, b, yd, out, r0, r1);
  });
  return y;
}

// y (N, out) = x (N, in) @ W^T + bias for W in CSR with int8 values and per-group scales.
at::Tensor csr_q8_linear(const at::Tensor& x_in, const at::Tensor& ptr_t, const at::Tensor& col_t,
                         const at::Tensor& vals_t, const at::Tensor& scales,
                         const c10::optional<at::Tensor>& bias, int64_t group, int64_t in) {
  TORCH_CHECK(ptr_t.scalar_type() == at::kInt && ptr_t.is_contiguous() && ptr_t.dim() == 1 &&
                  ptr_t.numel() >= 1,
              "prunus_cpu: row pointer must be contiguous int32 with out_features + 1 entries");
  const int64_t out = ptr_t.numel() - 1;
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2,
              "prunus_cpu: x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(x_in.size(1) == in, "prunus_cpu: x has ", x_in.size(1), " features, the layer takes ", in);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "prunus_cpu: bias must be contiguous float32 of size out_features");
  }
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == out && scales.size(1) >= 1,
              "prunus_cpu: scales must be contiguous float32 (out, groups)");
  const int64_t G = scales.size(1);
  TORCH_CHECK(G == 1 || (group >= 1 && group * G == in),
              "prunus_cpu: scales do not match in_features / group");
  const int32_t* ptr = ptr_t.data_ptr<int32_t>();
  const int64_t nnz = ptr[out];
  TORCH_CHECK(ptr[0] == 0 && nnz >= 0, "prunus_cpu: row pointer must start at 0");
  TORCH_CHECK(vals_t.scalar_type() == at::kChar && vals_t.is_contiguous() && vals_t.numel() >= nnz,
              "prunus_cpu: values must be contiguous int8 with row_ptr[-1] entries");
  TORCH_CHECK(col_t.is_contiguous() && col_t.numel() >= nnz,
              "prunus_cpu: column indices must be contiguous with row_ptr[-1] entries");
  const at::Tensor x = x_in.contiguous();
  const int8_t* v = vals_t.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  const int64_t grp = G == 1 ? in : group;
  if (col_t.scalar_type() == at::kShort) {
    TORCH_CHECK(in <= 65536, "prunus_cpu: int16 (uint16) column indices need in_features <= 65536");
    const CsrQ8<uint16_t> w{ptr, reinterpret_cast<const uint16_t*>(col_t.data_ptr()), v, s, in, G, grp};
    return csr_q8_run(w, x, out, bias);
  }
  TORCH_CHECK(col_t.scalar_type() == at::kInt, "prunus_cpu: column indices must be int16 or int32");
  const CsrQ8<int32_t> w{ptr, col_t.data_ptr<int32_t>(), v, s, in, G, grp};
  return csr_q8_run(w, x, out, bias);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prunus_cpu, m) {
  m.def("csr_q8_linear(Tensor x, Tensor row_ptr, Tensor col, Tensor vals, Tensor scales, Tensor? bias, int group, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(prunus_cpu, CPU, m) { m.impl("csr_q8_linear", csr_q8_linear); }
