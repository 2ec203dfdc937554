#include "moe/grouped_matmul.hpp"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <iostream>
#include <mutex>
#include <optional>

#include "moe/cpu_gemm.hpp"

namespace moeforge::moe {
namespace {

bool is_16_byte_aligned(const at::Tensor& t) {
  const int64_t bytes = t.element_size();
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.stride(d) != 1 && t.size(d) > 1 && (t.stride(d) * bytes) % 16 != 0) return false;
  return true;
}

// at::_grouped_mm takes f32/bf16/f16 with 16-byte aligned operand and result strides, i.e.
// K and N multiples of 16 / element size; anything else takes the loop.
bool has_grouped_kernel(const at::Tensor& a, const at::Tensor& b, int64_t result_columns) {
  const auto type = a.scalar_type();
  // On CUDA the grouped GEMM kernel is bf16 (Hopper); other types take the per-group loop there.
  if (a.is_cuda() && type != at::kBFloat16) return false;
  if (type != at::kFloat && type != at::kBFloat16 && type != at::kHalf) return false;
  // CPU fp32: at::_grouped_mm loops over MKL's sgemm there; the loop's gemm_into is faster.
  if (onednn_operand(a)) return false;
  return is_16_byte_aligned(a) && is_16_byte_aligned(b) &&
         (result_columns * a.element_size()) % 16 == 0;
}

at::Tensor group_offsets(const std::vector<int64_t>& rows_per_group, const at::Device& device) {
  std::vector<int32_t> ends(rows_per_group.size());
  int64_t end = 0;
  for (size_t g = 0; g < rows_per_group.size(); ++g)
    ends[g] = static_cast<int32_t>(end += rows_per_group[g]);
  // Asynchronous copy: a blocking one would synchronise the stream before every grouped GEMM.
  return at::tensor(ends, at::kInt).to(device, /*non_blocking=*/true);
}

// at::_grouped_mm(a, b, offsets) when a kernel takes these operands; nullopt sends the caller to
// its per-group loop. A layout the kernel refuses (its checks throw before any launch) is
// reported once and then takes the loop too, so a slow path is visible instead of fatal.
std::optional<at::Tensor> grouped_kernel(const at::Tensor& a, const at::Tensor& b,
                                         int64_t result_columns,
                                         const std::vector<int64_t>& rows_per_group) {
  if (!has_grouped_kernel(a, b, result_columns)) return std::nullopt;
  try {
    return at::_grouped_mm(a, b, group_offsets(rows_per_group, a.device()));
  } catch (const c10::Error& e) {
    static std::once_flag reported;
    std::call_once(reported, [&] {
      std::cerr << "moeforge: at::_grouped_mm refused " << a.sizes() << "·" << b.sizes()
                << "; using the per-group loop: " << e.what_without_backtrace() << std::endl;
    });
    return std::nullopt;
  }
}

// x [R, K] · w[g] [K, N] per row group -> [R, N].
at::Tensor rows_times_groups(const at::Tensor& x, const at::Tensor& w,
                             const std::vector<int64_t>& rows_per_group) {
  if (auto out = grouped_kernel(x, w, w.size(2), rows_per_group)) return *out;
  auto out = at::empty({x.size(0), w.size(2)}, x.options());
  int64_t offset = 0;
  for (size_t g = 0; g < rows_per_group.size(); ++g) {
    const int64_t rows = rows_per_group[g];
    if (rows > 0) {
      gemm_into(out.narrow(0, offset, rows), x.narrow(0, offset, rows), w[g], false,
                RowCounts::kPerStep);
    }
    offset += rows;
  }
  return out;
}

// a [K, R] · b [R, N] split along R by group -> [G, K, N] (weight gradients).
at::Tensor per_group_outer(const at::Tensor& a, const at::Tensor& b,
                           const std::vector<int64_t>& rows_per_group) {
  if (auto out = grouped_kernel(a, b, b.size(1), rows_per_group)) {
    // An expert that received no rows has a zero gradient; not every kernel writes empty groups.
    for (size_t g = 0; g < rows_per_group.size(); ++g)
      if (rows_per_group[g] == 0) (*out)[static_cast<int64_t>(g)].zero_();
    return *out;
  }
  auto out =
      at::zeros({static_cast<int64_t>(rows_per_group.size()), a.size(0), b.size(1)}, a.options());
  int64_t offset = 0;
  for (size_t g = 0; g < rows_per_group.size(); ++g) {
    const int64_t rows = rows_per_group[g];
    if (rows > 0) {
      gemm_into(out[g], a.narrow(1, offset, rows), b.narrow(0, offset, rows), false,
                RowCounts::kPerStep);
    }
    offset += rows;
  }
  return out;
}

class GroupedMatmul : public torch::autograd::Function<GroupedMatmul> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w, std::vector<int64_t> rows_per_group) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["rows"] = rows_per_group;
    return rows_times_groups(x, w, rows_per_group);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    const auto rows = ctx->saved_data["rows"].toIntVector();
    const auto grad_out = grad_outputs[0].contiguous();  // may arrive expanded (stride 0)
    at::Tensor grad_x, grad_w;
    if (ctx->needs_input_grad(0)) grad_x = rows_times_groups(grad_out, w.transpose(1, 2), rows);
    if (ctx->needs_input_grad(1)) {
      // In w's own layout: experts store w [G, N, K] (nn.Linear style) and pass its transpose, so
      // compute dyᵀ·x [G, N, K] contiguous and hand back its transpose. A contiguous [G, K, N]
      // gradient would reach the parameter transposed, and every accumulation into .grad would
      // be a strided copy (on the GPU, the slowest kernel of the layer's backward).
      const bool transposed = w.transpose(1, 2).is_contiguous() && !w.is_contiguous();
      grad_w = transposed ? per_group_outer(grad_out.t(), x, rows).transpose(1, 2)
                          : per_group_outer(x.t(), grad_out, rows);
    }
    return {grad_x, grad_w, at::Tensor()};
  }
};

}  // namespace

PaddedGroups pad_groups(const std::vector<int64_t>& rows_per_group, int64_t padded_rows_of_group,
                        int64_t multiple, const at::Device& device) {
  PaddedGroups padded;
  std::vector<int64_t> positions;
  for (const int64_t count : rows_per_group) {
    const int64_t size = std::max(count, padded_rows_of_group);
    for (int64_t r = 0; r < count; ++r) positions.push_back(padded.rows + r);
    padded.counts.push_back((size + multiple - 1) / multiple * multiple);
    padded.rows += padded.counts.back();
  }
  padded.positions = at::tensor(positions, at::kLong).to(device);
  return padded;
}

at::Tensor grouped_matmul(const at::Tensor& x, const at::Tensor& w,
                          const std::vector<int64_t>& rows_per_group) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && x.size(1) == w.size(1) &&
                  static_cast<int64_t>(rows_per_group.size()) == w.size(0),
              "grouped_matmul: x [R, K] and w [G, K, N] with G row groups expected");
  const bool bounded_shapes = x.is_cpu() && x.element_size() == 2;  // see the header
  if (!bounded_shapes) return GroupedMatmul::apply(x.contiguous(), w, rows_per_group);
  const auto padded = pad_groups(rows_per_group, 0, 64, x.device());
  const auto spread = at::zeros({padded.rows, x.size(1)}, x.options())
                          .index_copy(0, padded.positions, x.contiguous());
  return GroupedMatmul::apply(spread, w, padded.counts).index_select(0, padded.positions);
}

}  // namespace moeforge::moe
