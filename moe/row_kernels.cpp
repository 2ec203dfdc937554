#include "moe/row_kernels.hpp"

#include <bit>
#include <cstdint>

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

MOEFORGE_VECTOR_CLONES
void transpose_rows(int64_t rows, int64_t cols, RowBlock<const float> from, RowBlock<float> to) {
  // 16 x 16 tiles: each tile's 16 source rows are read once into registers' worth of lines and
  // written as 16 destination rows, so both sides stream whole cache lines.
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t r_end = r0 + kTile < rows ? r0 + kTile : rows;
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t c_end = c0 + kTile < cols ? c0 + kTile : cols;
      for (int64_t c = c0; c < c_end; ++c) {
        float* __restrict out = to.data + c * to.stride;
        const float* __restrict in = from.data + c;
        for (int64_t r = r0; r < r_end; ++r) out[r] = in[r * from.stride];
      }
    }
  }
}

MOEFORGE_VECTOR_CLONES
void add_scaled(int64_t width, float s, const float* __restrict from, float* __restrict to) {
  for (int64_t c = 0; c < width; ++c) to[c] += s * from[c];
}

}  // namespace moeforge::moe
