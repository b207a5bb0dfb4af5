// Decode kernels that skip zero inputs (activation sparsity), for prunus.kernels.backends.cpu_actskip.
//
// y (N, out) = x (N, in) @ W^T + bias, with W stored INPUT-MAJOR: row j of the stored matrix holds
// the weights of input j for every output, contiguous, padded to ldw outputs (a multiple of 64).
// For a tile of T <= 4 tokens the inputs j where some token has x[t, j] != 0 are gathered first,
// and only their rows are read:  P[t, :] += x[t, j] * Wt[j, :]. An input that a gate (TEAL, WINA)
// zeroed costs nothing; at batch 1 with 40% of the inputs zero, 60% of the weights are read.
// Several tokens share one pass over the union of their non-zero inputs. The layer's activation gate
// can be fused in (threshold, scale): inputs whose score is below it count as zero, so the model
// need not zero them first (one pass over x instead of a hook and three tensor ops per layer).
//
// Formats (built by prunus.kernels.actskip_formats; g = j / group, G groups along the input):
//  - f32: wt float32 (in, ldw).
//  - q8: codes int8 (in, ldw); scales (G, ldw) float32; zeros (G, ldw) float32 or none:
//    W[o, j] = s[g, o] * (q[j, o] - z[g, o]).
//  - q4: unsigned 4-bit codes, (in, ldw / 2) bytes; the 32 outputs of block b of row j are the 16
//    bytes at j * ldw / 2 + 16 b: byte i holds output 32 b + i (low nibble) and 32 b + 16 + i (high
//    nibble); zeros (G, ldw) (8 for a symmetric grid).
//  - b8 (bitmap): bit i of word w of row j (bits int64 (in, ldw / 64)) says output 64 w + i is kept;
//    its value (q - z, int8) is in vals from wptr[j, w] on (int32 (in, ldw / 64)); vals ends with
//    64 bytes of padding; scales (G, ldw). Pruned weights are not stored.
//
// The raw codes are summed per group and the group's scale multiplies the partial sum once; a zero
// point enters as s * z * (sum of x over the group):  y = sum_g s_g * (P_g - z_g * xsum_g) + bias.
// So the result is the product with QuantizedWeight.dequantize() up to float summation order.
//
// Threads (at::parallel_for) split the non-zero inputs in equal shares: each reads whole rows, so its
// reads are long ascending streams with gaps where inputs are zero (the hardware prefetchers follow
// them; split by outputs instead, every thread jumped from row to row every ldw / threads outputs),
// and keeps its partial sums for every output (T x ldw floats, in L1 or L2); the shares' sums are
// added at the end (with the bias). With AVX-512 (F, BW, VL, DQ, VBMI2;
// the Python loader passes -mavx512* where the CPU has them) 64 outputs of J rows are decoded and
// multiply-added per step (no software prefetch: on the whole-row streams the hardware prefetchers
// do better; issuing it for the next rows cost 3-10% on an AMD Zen 5); elsewhere a portable loop decodes a row
// segment and adds it (the compiler vectorises it for AVX2).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__AVX512VBMI2__)
#define PRUNUS_SKIP_AVX512 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using prunus_kernels::for_even_rows;
using prunus_kernels::token_tiles;

constexpr int64_t kLanes = 64;  // ldw is a multiple of this (the AVX-512 step: 64 outputs)

// ---------------------------------------------------------------------------------------------
// The formats: decode a segment [o0, o1) of row j (portable), and 64 outputs (AVX-512).

struct F32 {
  const float* w;
  int64_t ldw;
  void row(int64_t j, int64_t o0, int64_t o1, float* dst) const {
    std::memcpy(dst, w + j * ldw + o0, (o1 - o0) * sizeof(float));
  }
#ifdef PRUNUS_SKIP_AVX512
  void load64(int64_t j, int64_t o, __m512* v) const {
    const float* p = w + j * ldw + o;
    for (int i = 0; i < 4; ++i) v[i] = _mm512_loadu_ps(p + 16 * i);
  }
#endif
};

struct Q8 {
  const int8_t* q;
  int64_t ldw;
  void row(int64_t j, int64_t o0, int64_t o1, float* dst) const {
    const int8_t* p = q + j * ldw;
    for (int64_t o = o0; o < o1; ++o) dst[o - o0] = static_cast<float>(p[o]);
  }
#ifdef PRUNUS_SKIP_AVX512
  void load64(int64_t j, int64_t o, __m512* v) const {
    const int8_t* p = q + j * ldw + o;
    for (int i = 0; i < 4; ++i)
      v[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i))));
  }
#endif
};

struct Q4 {
  const uint8_t* p;
  int64_t ldw;
  void row(int64_t j, int64_t o0, int64_t o1, float* dst) const {
    const uint8_t* r = p + j * (ldw / 2);
    for (int64_t o = o0; o < o1; ++o) {
      const uint8_t byte = r[(o >> 5) * 16 + (o & 15)];
      dst[o - o0] = static_cast<float>((o & 16) ? (byte >> 4) : (byte & 15));
    }
  }
#ifdef PRUNUS_SKIP_AVX512
  void load64(int64_t j, int64_t o, __m512* v) const {
    const uint8_t* r = p + j * (ldw / 2) + o / 2;
    const __m512i low4 = _mm512_set1_epi32(15);
    for (int i = 0; i < 2; ++i) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 16 * i)));
      v[2 * i] = _mm512_cvtepi32_ps(_mm512_and_si512(b, low4));
      v[2 * i + 1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
    }
  }
#endif
};

struct B8 {
  const int32_t* wptr;
  const uint64_t* bits;
  const int8_t* vals;
  int64_t ldw, W;
  void row(int64_t j, int64_t o0, int64_t o1, float* dst) const {
    std::fill(dst, dst + (o1 - o0), 0.f);
    for (int64_t w = o0 / 64; w < o1 / 64; ++w) {
      uint64_t k = bits[j * W + w];
      const int8_t* v = vals + wptr[j * W + w];
      while (k) {
        const int i = __builtin_ctzll(k);
        dst[64 * w + i - o0] = static_cast<float>(*v++);
        k &= k - 1;
      }
    }
  }
#ifdef PRUNUS_SKIP_AVX512
  void load64(int64_t j, int64_t o, __m512* v) const {
    const int64_t w = j * W + o / 64;
    const __m512i e = _mm512_maskz_expand_epi8(static_cast<__mmask64>(bits[w]),
                                               _mm512_loadu_si512(reinterpret_cast<const void*>(vals + wptr[w])));
    v[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(e)));
    v[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(e, 1)));
    v[2] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(e, 2)));
    v[3] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(e, 3)));
  }
#endif
};

// ---------------------------------------------------------------------------------------------
// The non-zero inputs of a tile of T tokens.

struct Tile {
  std::vector<int32_t> idx;     // ascending inputs where some token's x is non-zero
  std::vector<float> xv;        // xv[k * T + t] = x[t, idx[k]]
  std::vector<int64_t> gstart;  // G + 1 bounds into idx, one range per group
};

// The gate (activation sparsity) fused in: x[t, j] counts as zero when its score |x[t, j]| * s[j]
// (s: the column norms of WINA's score, or 1) is below thr, as prunus.activation.gate.gate_input
// has it (float32 score; a score equal to thr is kept; thr = 0 and no s: every x != 0 is kept).
struct Gate {
  float thr;
  const float* s;  // (in,) or nullptr
  bool keep(float v, int64_t j) const {
    return v != 0.f && !((s ? std::fabs(v) * s[j] : std::fabs(v)) < thr);
  }
};

Tile gather(const float* x, int64_t in, int T, int64_t G, int64_t gs, const Gate& gate) {
  Tile tl;
  tl.idx.reserve(in);
  tl.xv.reserve(in * T);
  float v[4];
  for (int64_t j = 0; j < in; ++j) {
    bool any = false;
    for (int t = 0; t < T; ++t) {
      v[t] = gate.keep(x[t * in + j], j) ? x[t * in + j] : 0.f;
      any |= v[t] != 0.f;
    }
    if (!any) continue;
    tl.idx.push_back(static_cast<int32_t>(j));
    for (int t = 0; t < T; ++t) tl.xv.push_back(v[t]);
  }
  tl.gstart.resize(G + 1);
  for (int64_t g = 0; g <= G; ++g)
    tl.gstart[g] = std::lower_bound(tl.idx.begin(), tl.idx.end(), static_cast<int32_t>(std::min(g * gs, in))) -
                   tl.idx.begin();
  return tl;
}

// ---------------------------------------------------------------------------------------------
// P[t, o - o0] += sum over k in [k0, k1) of xv[k, t] * row idx[k] at o, for o in [o0, o1).

#ifdef PRUNUS_SKIP_AVX512
template <int T, int J, typename Fmt>
inline void acc_rows(const Fmt& f, const int32_t* rows, const float* xv, float* P, int64_t len, int64_t o0,
                     int64_t o1) {
  __m512 xb[J][T];
  for (int j = 0; j < J; ++j)
    for (int t = 0; t < T; ++t) xb[j][t] = _mm512_set1_ps(xv[j * T + t]);
  for (int64_t o = o0; o < o1; o += 64) {
    float* p = P + (o - o0);
    __m512 a[T][4];
    for (int t = 0; t < T; ++t)
      for (int v = 0; v < 4; ++v) a[t][v] = _mm512_loadu_ps(p + t * len + 16 * v);
    for (int j = 0; j < J; ++j) {
      __m512 w[4];
      f.load64(rows[j], o, w);
      for (int t = 0; t < T; ++t)
        for (int v = 0; v < 4; ++v) a[t][v] = _mm512_fmadd_ps(xb[j][t], w[v], a[t][v]);
    }
    for (int t = 0; t < T; ++t)
      for (int v = 0; v < 4; ++v) _mm512_storeu_ps(p + t * len + 16 * v, a[t][v]);
  }
}

template <int T, typename Fmt>
void accumulate(const Fmt& f, const Tile& tl, int64_t k0, int64_t k1, float* P, int64_t len, int64_t o0,
                int64_t o1) {
  constexpr int J = T == 4 ? 2 : 4;  // rows per step: J * T broadcasts + 4 T sums in registers
  const int32_t* idx = tl.idx.data();
  const float* xv = tl.xv.data();
  int64_t k = k0;
  for (; k + J <= k1; k += J) acc_rows<T, J>(f, idx + k, xv + k * T, P, len, o0, o1);
  for (; k < k1; ++k) acc_rows<T, 1>(f, idx + k, xv + k * T, P, len, o0, o1);
}
#else
template <int T, typename Fmt>
void accumulate(const Fmt& f, const Tile& tl, int64_t k0, int64_t k1, float* P, int64_t len, int64_t o0,
                int64_t o1) {
  std::vector<float> row(len);
  for (int64_t k = k0; k < k1; ++k) {
    f.row(tl.idx[k], o0, o1, row.data());
    for (int t = 0; t < T; ++t) {
      const float xj = tl.xv[k * T + t];
      float* p = P + t * len;
      for (int64_t o = 0; o < len; ++o) p[o] += xj * row[o];
    }
  }
}
#endif

// Scales and zero points (G, ldw) of the integer formats; none for f32.
struct Grid {
  const float* s;
  const float* z;
  int64_t G, gs;
};

// The non-zero rows k in [ka, kb) of the tile, every output: A (T, ldw) += their products, scaled
// per group (a zero point with the sum of x over these rows of the group). A thread's share.
template <int T, typename Fmt>
void tile_rows(const Fmt& f, const Tile& tl, const Grid& q, int64_t ldw, int64_t ka, int64_t kb, float* A) {
  std::vector<float> P(q.s ? T * ldw : 0);
  for (int64_t g = 0; g < q.G; ++g) {
    const int64_t k0 = std::max<int64_t>(tl.gstart[g], ka), k1 = std::min<int64_t>(tl.gstart[g + 1], kb);
    if (k0 >= k1) continue;
    if (!q.s) {  // float32: no scales, the rows add into A directly
      accumulate<T>(f, tl, k0, k1, A, ldw, 0, ldw);
      continue;
    }
    std::fill(P.begin(), P.end(), 0.f);
    accumulate<T>(f, tl, k0, k1, P.data(), ldw, 0, ldw);
    const float* s = q.s + g * ldw;
    const float* z = q.z ? q.z + g * ldw : nullptr;
    for (int t = 0; t < T; ++t) {
      float xs = 0.f;
      if (z)
        for (int64_t k = k0; k < k1; ++k) xs += tl.xv[k * T + t];
      const float* p = P.data() + t * ldw;
      float* a = A + t * ldw;
      if (z)
        for (int64_t o = 0; o < ldw; ++o) a[o] += (p[o] - z[o] * xs) * s[o];
      else
        for (int64_t o = 0; o < ldw; ++o) a[o] += p[o] * s[o];
    }
  }
}

Gate gate_of(double threshold, const c10::optional<at::Tensor>& scale, int64_t in) {
  TORCH_CHECK(threshold >= 0, "prunus_cpu: the gate threshold must be at least 0");
  if (scale.has_value())
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == in,
                "prunus_cpu: the gate scale must be contiguous float32 of size in_features");
  return Gate{static_cast<float>(threshold), scale.has_value() ? scale->data_ptr<float>() : nullptr};
}

template <typename Fmt>
at::Tensor skip_run(const Fmt& f, const Grid& q, const at::Tensor& x_in, int64_t in, int64_t ldw,
                    int64_t out, const c10::optional<at::Tensor>& bias, double threshold,
                    const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2,
              "prunus_cpu: x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(x_in.size(1) == in, "prunus_cpu: x has ", x_in.size(1), " features, the layer takes ", in);
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "prunus_cpu: bias must be contiguous float32 of size out_features");
  const Gate gate = gate_of(threshold, scale, in);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0);
  at::Tensor y = at::empty({n, out}, x.options());
  const float* xd = x.data_ptr<float>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yd = y.data_ptr<float>();
  token_tiles(n, [&](auto tile, int64_t t) {
    constexpr int T = decltype(tile)::value;
    const Tile tl = gather(xd + t * in, in, T, q.G, q.gs, gate);
    const int64_t nk = static_cast<int64_t>(tl.idx.size());
    int64_t parts = at::get_num_threads();
    if (parts <= 1 || nk * ldw * T < (1 << 15) || at::in_parallel_region()) parts = 1;
    parts = std::max<int64_t>(1, std::min<int64_t>(parts, nk / 8));
    std::vector<float> acc(parts * T * ldw, 0.f);
    auto share = [&](int64_t p) {
      tile_rows<T>(f, tl, q, ldw, nk * p / parts, nk * (p + 1) / parts, acc.data() + p * T * ldw);
    };
    if (parts == 1) share(0);
    else at::parallel_for(0, parts, 1, [&](int64_t b0, int64_t e0) { for (int64_t p = b0; p < e0; ++p) share(p); });
    for (int tt = 0; tt < T; ++tt) {
      float* dst = yd + (t + tt) * out;
      for (int64_t o = 0; o < out; ++o) {
        float v = b ? b[o] : 0.f;
        for (int64_t p = 0; p < parts; ++p) v += acc[(p * T + tt) * ldw + o];
        dst[o] = v;
      }
    }
  });
  return y;
}

// The decoded float32 W^T (in, ldw): the prefill path multiplies it with at::addmm.
template <typename Fmt>
at::Tensor skip_dense(const Fmt& f, const Grid& q, int64_t in, int64_t ldw) {
  at::Tensor wt = at::empty({in, ldw}, at::TensorOptions().dtype(at::kFloat));
  float* d = wt.data_ptr<float>();
  for_even_rows(in, in * ldw, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      float* r = d + j * ldw;
      f.row(j, 0, ldw, r);
      if (!q.s) continue;
      const int64_t g = j / q.gs;
      const float* s = q.s + g * ldw;
      const float* z = q.z ? q.z + g * ldw : nullptr;
      for (int64_t o = 0; o < ldw; ++o) r[o] = (z ? r[o] - z[o] : r[o]) * s[o];
    }
  });
  return wt;
}

// ---------------------------------------------------------------------------------------------
// Argument checks and the ops

int64_t check_ldw(int64_t ldw, int64_t out) {
  TORCH_CHECK(ldw % kLanes == 0 && ldw >= out && ldw < out + kLanes,
              "prunus_cpu: input-major rows must hold out_features rounded up to a multiple of 64");
  return ldw;
}

Grid grid_of(const at::Tensor& s, const c10::optional<at::Tensor>& z, int64_t ldw, int64_t in,
             int64_t group) {
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 && s.size(1) == ldw,
              "prunus_cpu: scales must be contiguous float32 (groups, padded out_features)");
  const int64_t G = s.size(0);
  TORCH_CHECK(G >= 1 && (G == 1 || group * G == in), "prunus_cpu: scales do not match in_features / group");
  if (z.has_value())
    TORCH_CHECK(z->scalar_type() == at::kFloat && z->is_contiguous() && z->sizes() == s.sizes(),
                "prunus_cpu: zero points must be contiguous float32 shaped like the scales");
  return Grid{s.data_ptr<float>(), z.has_value() ? z->data_ptr<float>() : nullptr, G, G == 1 ? in : group};
}

at::Tensor skip_f32_linear(const at::Tensor& x, const at::Tensor& wt, const c10::optional<at::Tensor>& bias,
                           int64_t out, double threshold, const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(wt.scalar_type() == at::kFloat && wt.is_contiguous() && wt.dim() == 2,
              "prunus_cpu: the weight must be contiguous float32 (in, padded out)");
  const int64_t ldw = check_ldw(wt.size(1), out);
  return skip_run(F32{wt.data_ptr<float>(), ldw}, Grid{nullptr, nullptr, 1, wt.size(0)}, x, wt.size(0),
                  ldw, out, bias, threshold, scale);
}

void check_q8(const at::Tensor& codes) {
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous() && codes.dim() == 2,
              "prunus_cpu: int8 codes must be contiguous int8 (in, padded out)");
}

at::Tensor skip_q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                          const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& bias,
                          int64_t group, int64_t out, double threshold, const c10::optional<at::Tensor>& scale) {
  check_q8(codes);
  const int64_t in = codes.size(0), ldw = check_ldw(codes.size(1), out);
  return skip_run(Q8{codes.data_ptr<int8_t>(), ldw}, grid_of(scales, zeros, ldw, in, group), x, in, ldw,
                  out, bias, threshold, scale);
}

at::Tensor skip_q8_dense(const at::Tensor& codes, const at::Tensor& scales,
                         const c10::optional<at::Tensor>& zeros, int64_t group) {
  check_q8(codes);
  const int64_t in = codes.size(0), ldw = codes.size(1);
  return skip_dense(Q8{codes.data_ptr<int8_t>(), ldw}, grid_of(scales, zeros, ldw, in, group), in, ldw);
}

void check_q4(const at::Tensor& packed) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2,
              "prunus_cpu: int4 codes must be contiguous uint8 (in, padded out / 2)");
}

at::Tensor skip_q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                          const at::Tensor& zeros, const c10::optional<at::Tensor>& bias, int64_t group,
                          int64_t out, double threshold, const c10::optional<at::Tensor>& scale) {
  check_q4(packed);
  const int64_t in = packed.size(0), ldw = check_ldw(packed.size(1) * 2, out);
  return skip_run(Q4{packed.data_ptr<uint8_t>(), ldw}, grid_of(scales, zeros, ldw, in, group), x, in, ldw,
                  out, bias, threshold, scale);
}

at::Tensor skip_q4_dense(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                         int64_t group) {
  check_q4(packed);
  const int64_t in = packed.size(0), ldw = packed.size(1) * 2;
  return skip_dense(Q4{packed.data_ptr<uint8_t>(), ldw}, grid_of(scales, zeros, ldw, in, group), in, ldw);
}

B8 b8_of(const at::Tensor& wptr, const at::Tensor& bits, const at::Tensor& vals) {
  TORCH_CHECK(bits.scalar_type() == at::kLong && bits.is_contiguous() && bits.dim() == 2,
              "prunus_cpu: bits must be contiguous int64 words (in, padded out / 64)");
  TORCH_CHECK(wptr.scalar_type() == at::kInt && wptr.is_contiguous() && wptr.sizes() == bits.sizes(),
              "prunus_cpu: word offsets must be contiguous int32 shaped like the bits");
  TORCH_CHECK(vals.scalar_type() == at::kChar && vals.is_contiguous() && vals.dim() == 1,
              "prunus_cpu: values must be contiguous int8");
  const int64_t words = bits.numel();
  const int32_t* wp = wptr.data_ptr<int32_t>();
  if (words) {
    const int64_t last = static_cast<int64_t>(wp[words - 1]) +
                         __builtin_popcountll(static_cast<uint64_t>(bits.data_ptr<int64_t>()[words - 1]));
    TORCH_CHECK(wp[0] == 0 && vals.numel() >= last + 64, "prunus_cpu: values need 64 bytes of padding");
  }
  return B8{wp, reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>()), vals.data_ptr<int8_t>(),
            bits.size(1) * 64, bits.size(1)};
}

at::Tensor skip_bitmap_q8_linear(const at::Tensor& x, const at::Tensor& wptr, const at::Tensor& bits,
                                 const at::Tensor& vals, const at::Tensor& scales,
                                 const c10::optional<at::Tensor>& bias, int64_t group, int64_t out,
                                 double threshold, const c10::optional<at::Tensor>& scale) {
  const B8 f = b8_of(wptr, bits, vals);
  const int64_t in = bits.size(0), ldw = check_ldw(f.ldw, out);
  return skip_run(f, grid_of(scales, c10::nullopt, ldw, in, group), x, in, ldw, out, bias, threshold, scale);
}

at::Tensor skip_bitmap_q8_dense(const at::Tensor& wptr, const at::Tensor& bits, const at::Tensor& vals,
                                const at::Tensor& scales, int64_t group) {
  const B8 f = b8_of(wptr, bits, vals);
  const int64_t in = bits.size(0);
  return skip_dense(f, grid_of(scales, c10::nullopt, f.ldw, in, group), in, f.ldw);
}

bool skip_simd() {
#ifdef PRUNUS_SKIP_AVX512
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prunus_cpu, m) {
  m.def("skip_f32_linear(Tensor x, Tensor wt, Tensor? bias, int out_features, float threshold=0., Tensor? scale=None) -> Tensor");
  m.def("skip_q8_linear(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias, int group, int out_features, float threshold=0., Tensor? scale=None) -> Tensor");
  m.def("skip_q4_linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, Tensor? bias, int group, int out_features, float threshold=0., Tensor? scale=None) -> Tensor");
  m.def("skip_bitmap_q8_linear(Tensor x, Tensor wptr, Tensor bits, Tensor vals, Tensor scales, Tensor? bias, int group, int out_features, float threshold=0., Tensor? scale=None) -> Tensor");
  m.def("skip_q8_dense(Tensor codes, Tensor scales, Tensor? zeros, int group) -> Tensor");
  m.def("skip_q4_dense(Tensor packed, Tensor scales, Tensor zeros, int group) -> Tensor");
  m.def("skip_bitmap_q8_dense(Tensor wptr, Tensor bits, Tensor vals, Tensor scales, int group) -> Tensor");
  m.def("skip_simd() -> bool", skip_simd);
}

TORCH_LIBRARY_IMPL(prunus_cpu, CPU, m) {
  m.impl("skip_f32_linear", skip_f32_linear);
  m.impl("skip_q8_linear", skip_q8_linear);
  m.impl("skip_q4_linear", skip_q4_linear);
  m.impl("skip_bitmap_q8_linear", skip_bitmap_q8_linear);
  m.impl("skip_q8_dense", skip_q8_dense);
  m.impl("skip_q4_dense", skip_q4_dense);
  m.impl("skip_bitmap_q8_dense", skip_bitmap_q8_dense);
}
