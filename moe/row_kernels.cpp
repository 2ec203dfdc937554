#include "moe/row_kernels.hpp"

#include <bit>
#include <cstdint>
#include <cstring>

// One clone per instruction set; the dynamic loader picks the processor's best (GCC ifunc).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOEFORGE_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOEFORGE_VECTOR_CLONES
#endif

namespace moeforge::moe {
namespace {

// e^x for fp32 without branches or calls, so that loops around it vectorise: x = n·ln2 + r with
// |r| ≤ ln2/2, e^r by a degree-6 Taylor polynomial (relative error < 2e-7 on that range), 2^n
// put into the exponent bits. Inputs are clamped to where e^x is a normal float.
[[gnu::always_inline]] inline float exp_poly(float x) {
  constexpr float kLog2e = 1.44269504088896341F;
  constexpr float kLn2Hi = 0.693145751953125F;  // ln 2 split so that n·kLn2Hi is exact
  constexpr float kLn2Lo = 1.428606765330187e-06F;
  constexpr float kRound = 12582912.0F;  // 1.5·2^23: adding it rounds to an integer
  x = x > -87.0F ? x : -87.0F;           // two selects (not nested): each compiles to max / min
  x = x < 88.0F ? x : 88.0F;
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0F / 720;
  p = p * r + 1.0F / 120;
  p = p * r + 1.0F / 24;
  p = p * r + 1.0F / 6;
  p = p * r + 0.5F;
  p = p * r + 1.0F;
  p = p * r + 1.0F;
  const auto exponent = static_cast<int32_t>(n) + 127;
  return p * std::bit_cast<float>(exponent << 23);
}

[[gnu::always_inline]] inline float sigmoid(float x) {
  return 1.0F / (1.0F + exp_poly(-x));
}

}  // namespace

MOEFORGE_VECTOR_CLONES
void swiglu_rows(int64_t rows, int64_t width, RowBlock<const float> g, RowBlock<const float> u,
                 RowBlock<float> h) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict gr = g.data + r * g.stride;
    const float* __restrict ur = u.data + r * u.stride;
    float* __restrict hr = h.data + r * h.stride;
    for (int64_t c = 0; c < width; ++c) hr[c] = gr[c] * sigmoid(gr[c]) * ur[c];
  }
}

MOEFORGE_VECTOR_CLONES
void swiglu_rows_backward(int64_t rows, int64_t width, RowBlock<const float> dh,
                          RowBlock<const float> g, RowBlock<const float> u, const float* gate,
                          RowBlock<float> d_g, RowBlock<float> d_up) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict dhr = dh.data + r * dh.stride;
    const float* __restrict gr = g.data + r * g.stride;
    const float* __restrict ur = u.data + r * u.stride;
    float* __restrict dgr = d_g.data + r * d_g.stride;
    float* __restrict dur = d_up.data + r * d_up.stride;
    const float scale = gate[r];
    for (int64_t c = 0; c < width; ++c) {
      const float t = scale * dhr[c], s = sigmoid(gr[c]);
      dur[c] = t * gr[c] * s;
      dgr[c] = t * ur[c] * s * (1.0F + gr[c] * (1.0F - s));
    }
  }
}

MOEFORGE_VECTOR_CLONES
void row_dots_then_scale(int64_t rows, int64_t width, RowBlock<const float> a, RowBlock<float> b,
                         const float* scale, float* dots) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict ar = a.data + r * a.stride;
    float* __restrict br = b.data + r * b.stride;
    if (dots) {
      // Eight partial sums: a single running sum is an ordered reduction no compiler vectorises.
      double partial[8] = {};
      int64_t c = 0;
      for (; c + 8 <= width; c += 8)
        for (int j = 0; j < 8; ++j) partial[j] += static_cast<double>(ar[c + j]) * br[c + j];
      double sum = 0.0;
      for (; c < width; ++c) sum += static_cast<double>(ar[c]) * br[c];
      for (const double p : partial) sum += p;
      dots[r] = static_cast<float>(sum);
    }
    const float s = scale[r];
    for (int64_t c = 0; c < width; ++c) br[c] *= s;
  }
}

namespace {

// Eight floats as one vector (GCC's vector extension: one AVX register, two SSE ones).
using Float8 = float __attribute__((vector_size(32)));
using Index8 = int32_t __attribute__((vector_size(32)));

[[gnu::always_inline]] inline Float8 load8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Picks lanes of (a, b) by index (0-7: a's, 8-15: b's).
[[gnu::always_inline]] inline Float8 pick(Float8 a, Float8 b, Index8 lanes) {
  return __builtin_shuffle(a, b, lanes);
}

// to's 8 rows from c on ← from's 8 x 8 block at (r, c) transposed, in three rounds of lane
// shuffles (pairs of rows interleaved, then pairs of pairs, then halves swapped).
[[gnu::always_inline]] inline void transpose8x8(const float* from, int64_t from_stride, float* to,
                                                int64_t to_stride) {
  Float8 row[8], pair[8];
  for (int i = 0; i < 8; ++i) row[i] = load8(from + i * from_stride);
  for (int i = 0; i < 8; i += 2) {
    pair[i] = pick(row[i], row[i + 1], Index8{0, 8, 1, 9, 4, 12, 5, 13});
    pair[i + 1] = pick(row[i], row[i + 1], Index8{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int i = 0; i < 8; i += 4) {
    for (int j = 0; j < 2; ++j) {
      row[i + 2 * j] = pick(pair[i + j], pair[i + j + 2], Index8{0, 1, 8, 9, 4, 5, 12, 13});
      row[i + 2 * j + 1] = pick(pair[i + j], pair[i + j + 2], Index8{2, 3, 10, 11, 6, 7, 14, 15});
    }
  }
  // row[0..3]: columns (0, 4), (1, 5), (2, 6), (3, 7) of rows 0-3 in their halves; row[4..7]
  // the same of rows 4-7.
  for (int c = 0; c < 4; ++c) {
    const Float8 low = pick(row[c], row[c + 4], Index8{0, 1, 2, 3, 8, 9, 10, 11});
    const Float8 high = pick(row[c], row[c + 4], Index8{4, 5, 6, 7, 12, 13, 14, 15});
    std::memcpy(to + c * to_stride, &low, sizeof low);
    std::memcpy(to + (c + 4) * to_stride, &high, sizeof high);
  }
}

}  // namespace

MOEFORGE_VECTOR_CLONES
void transpose_rows(int64_t rows, int64_t cols, RowBlock<const float> from, RowBlock<float> to) {
  // Whole 8 x 8 blocks in registers; the ragged edges element by element.
  const int64_t full_rows = rows / 8 * 8, full_cols = cols / 8 * 8;
  for (int64_t r = 0; r < full_rows; r += 8)
    for (int64_t c = 0; c < full_cols; c += 8)
      transpose8x8(from.data + r * from.stride + c, from.stride, to.data + c * to.stride + r,
                   to.stride);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < full_rows ? full_cols : 0; c < cols; ++c)
      to.data[c * to.stride + r] = from.data[r * from.stride + c];
}

MOEFORGE_VECTOR_CLONES
void add_scaled(int64_t width, float s, const float* __restrict from, float* __restrict to) {
  for (int64_t c = 0; c < width; ++c) to[c] += s * from[c];
}

}  // namespace moeforge::moe
