// Helpers shared by the prunus CPU kernels (cpu_sparse.cpp, cpu_quant.cpp): splitting rows between
// torch's threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace prunus_kernels {

// Split [0, rows) into `parts` contiguous ranges with about equal non-zero counts.
// ptr has rows + 1 entries (a CSR/BSR row pointer); returns parts + 1 boundaries.
inline std::vector<int64_t> balanced_split(const int32_t* ptr, int64_t rows, int64_t parts) {
  std::vector<int64_t> bounds(parts + 1, rows);
  bounds[0] = 0;
  const int64_t total = ptr[rows];
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t want = total * p / parts;
    bounds[p] = std::lower_bound(ptr, ptr + rows + 1, static_cast<int32_t>(want)) - ptr;
    bounds[p] = std::max(bounds[p], bounds[p - 1]);
  }
  return bounds;
}

// Run f(row_begin, row_end) over [0, rows) on torch's threads, balanced by non-zeros.
template <typename F>
void for_rows(const int32_t* ptr, int64_t rows, int64_t work, const F& f) {
  int64_t threads = at::get_num_threads();
  // Below ~32k multiply-adds a second thread costs more to wake than it saves.
  if (threads <= 1 || work < (1 << 15) || at::in_parallel_region()) {
    f(0, rows);
    return;
  }
  threads = std::min<int64_t>(threads, rows);
  const std::vector<int64_t> bounds = balanced_split(ptr, rows, threads);
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      if (bounds[p] < bounds[p + 1]) f(bounds[p], bounds[p + 1]);
    }
  });
}

// Run f(row_begin, row_end) over [0, rows) on torch's threads in equal parts (dense rows), each
// part starting at a multiple of `align` rows.
template <typename F>
void for_even_rows(int64_t rows, int64_t work, int64_t align, const F& f) {
  int64_t threads = at::get_num_threads();
  if (threads <= 1 || work < (1 << 15) || at::in_parallel_region()) {
    f(0, rows);
    return;
  }
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, (rows + align - 1) / align));
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t r0 = rows * p / threads / align * align;
      const int64_t r1 = p + 1 == threads ? rows : rows * (p + 1) / threads / align * align;
      if (r0 < r1) f(r0, r1);
    }
  });
}

// Tokens [0, n) in tiles of 4, 2, 1: tile(std::integral_constant<int, T>(), t) for each tile's first
// token t (the decode kernels unroll over T tokens).
template <typename Tile>
void token_tiles(int64_t n, const Tile& tile) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) tile(std::integral_constant<int, 4>(), t);
  if (n - t >= 2) {
    tile(std::integral_constant<int, 2>(), t);
    t += 2;
  }
  if (n - t >= 1) tile(std::integral_constant<int, 1>(), t);
}

}  // namespace prunus_kernels
