#include "moe/tiled_gemm.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <bit>
#include <memory>
#include <new>

#include "moe/row_kernels.hpp"

namespace moeforge::moe {
namespace {

constexpr int64_t kTileRows = 64;  // rows per kernel call
constexpr int64_t kPanel = 256;    // reduction and column block; rows per packed A block

// The next piece of a dimension with `left` to go: a whole block, else a multiple of 64, else
// the largest power of two, so pieces (and so kernels) come from a fixed set.
int64_t next_piece(int64_t left, int64_t block) {
  if (left >= block) return block;
  if (left >= 64) return left / 64 * 64;
  return std::bit_floor(static_cast<uint64_t>(left));
}

bool row_major(const at::Tensor& t) {
  return t.stride(1) == 1 && t.stride(0) >= t.size(1);
}
bool transposed(const at::Tensor& t) {
  return t.stride(0) == 1 && t.stride(1) >= t.size(0);
}

// A kPanel x kPanel fp32 buffer of the calling thread, 64-byte aligned.
float* pack_buffer(int slot) {
  struct Aligned {
    void operator()(float* p) const { ::operator delete[](p, std::align_val_t{64}); }
  };
  thread_local std::unique_ptr<float[], Aligned> buffers[2];
  auto& buffer = buffers[slot];
  constexpr size_t kBytes = sizeof(float) * kPanel * kPanel;
  if (!buffer) buffer.reset(static_cast<float*>(::operator new[](kBytes, std::align_val_t{64})));
  return buffer.get();
}

// A row-major [rows, cols] block of operand t from (row, col): t's own memory when t is
// row-major, else a packed copy in buffer `slot`.
struct Block {
  const float* data;
  int64_t stride;
};
Block block_of(const at::Tensor& t, int64_t row, int64_t col, int64_t rows, int64_t cols,
               int slot) {
  const float* base = t.const_data_ptr<float>();
  if (row_major(t)) return {base + row * t.stride(0) + col, t.stride(0)};
  // t is a transposed view: its transpose is row-major [cols of t, rows of t].
  float* packed = pack_buffer(slot);
  transpose_rows(cols, rows, {base + col * t.stride(1) + row, t.stride(1)}, {packed, cols});
  return {packed, cols};
}

// C[rows, cols] (+)= A[rows, depth] · B[depth, cols], in tiles of at most kTileRows rows.
void kernel_tiles(int64_t rows, int64_t cols, int64_t depth, Block a, Block b, float* c,
                  int64_t ldc, bool add) {
  for (int64_t r = 0; r < rows;) {
    const int64_t tile = next_piece(rows - r, kTileRows);
    at::native::cpublas::brgemm(tile, cols, depth, a.stride, b.stride, ldc, add,
                                a.data + r * a.stride, b.data, c + r * ldc);
    r += tile;
  }
}

}  // namespace

bool tiled_gemm_takes(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const auto fp32_cpu = [](const at::Tensor& t) {
    return t.dim() == 2 && t.is_cpu() && t.scalar_type() == at::kFloat;
  };
  return fp32_cpu(out) && fp32_cpu(a) && fp32_cpu(b) && row_major(out) &&
         (row_major(a) || transposed(a)) && (row_major(b) || transposed(b));
}

void tiled_gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                     bool accumulate) {
  RECORD_FUNCTION("moeforge::brgemm_tiles", std::vector<c10::IValue>());
  const int64_t rows = a.size(0), depth = a.size(1), cols = b.size(1);
  if (depth == 0) {
    if (!accumulate) at::Tensor(out).zero_();
    return;
  }
  float* c = out.data_ptr<float>();
  const int64_t ldc = out.stride(0);
  // Row chunks, one task each: at most kPanel rows where A is packed (its buffer's size); a
  // row-major A is read in place, so a chunk spans the rows of one thread's even share (all of
  // them inside the experts' per-thread shares, where parallel_for runs inline) and each B
  // block is packed (if at all) once per chunk.
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t share = (rows + threads - 1) / threads;
  const int64_t chunk = row_major(a) ? std::max<int64_t>((share + 63) / 64 * 64, 1)
                                     : std::min<int64_t>(kPanel, std::max<int64_t>(share, 1));
  at::parallel_for(0, (rows + chunk - 1) / chunk, 1, [&](int64_t first, int64_t last) {
    for (int64_t r0 = first * chunk; r0 < std::min(last * chunk, rows); r0 += chunk) {
      const int64_t chunk_rows = std::min(chunk, rows - r0);
      for (int64_t k0 = 0; k0 < depth;) {
        const int64_t k = next_piece(depth - k0, kPanel);
        const Block a_block = block_of(a, r0, k0, chunk_rows, k, 0);
        for (int64_t n0 = 0; n0 < cols;) {
          const int64_t n = next_piece(cols - n0, kPanel);
          const Block b_block = block_of(b, k0, n0, k, n, 1);
          kernel_tiles(chunk_rows, n, k, a_block, b_block, c + r0 * ldc + n0, ldc,
                       accumulate || k0 > 0);
          n0 += n;
        }
        k0 += k;
      }
    }
  });
}

}  // namespace moeforge::moe
