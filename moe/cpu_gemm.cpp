#include "moe/cpu_gemm.hpp"

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <cstdlib>
#include <iostream>
#include <stdexcept>
#include <string>

#include "moe/tiled_gemm.hpp"

// Exported by libtorch_cpu (ATen/native/mkldnn/Matmul.h, not installed with the wheel):
// result = beta · result + alpha · mat1 · mat2 through oneDNN's matmul primitive.
namespace at::native {
void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result,
                   float beta, float alpha);
}  // namespace at::native

namespace moeforge::moe {
namespace {

// oneDNN sees row and reduction counts in steps of this; the remainder goes to ATen.
constexpr int64_t kShapeStep = 64;

// Whether environment variable `name` chose `other` over `fallback` (its default); any third
// value is an error naming both.
bool environment_chose(const char* name, const std::string& fallback, const std::string& other) {
  const char* value = std::getenv(name);
  const std::string choice = value ? value : fallback;
  if (choice != fallback && choice != other)
    throw std::invalid_argument(std::string(name) + "='" + choice + "': allowed values are " +
                                fallback + " (default) and " + other);
  return choice == other;
}

CpuGemm requested_kernel() {
  return environment_chose("MOEFORGE_CPU_GEMM", "onednn", "aten") ? CpuGemm::kAten
                                                                  : CpuGemm::kOneDnn;
}

// oneDNN takes fp32 in this LibTorch and agrees with a float64 product; anything else (an
// exception from a build that allows only 16-bit types there, a wrong result) means ATen.
bool onednn_takes_fp32() {
  try {
    // Fixed values, not at::randn: the probe must not consume the caller's random stream.
    const auto a = at::linspace(-1.0, 1.0, kShapeStep * kShapeStep).view({kShapeStep, kShapeStep});
    const auto b = at::sin(a * 7.0).t().contiguous();
    auto out = at::empty({kShapeStep, kShapeStep});
    at::native::mkldnn_matmul(a, b, out, 0.0F, 1.0F);
    const auto reference = at::mm(a.to(at::kDouble), b.to(at::kDouble));
    const double error =
        ((out.to(at::kDouble) - reference).norm() / reference.norm()).item<double>();
    if (error < 1e-5) return true;
    std::cerr << "moeforge: oneDNN's fp32 matmul is off by " << error
              << " (relative) in this LibTorch; CPU fp32 products use ATen" << std::endl;
  } catch (const c10::Error& e) {
    std::cerr << "moeforge: this LibTorch's oneDNN matmul refuses fp32 ("
              << e.what_without_backtrace() << "); CPU fp32 products use ATen" << std::endl;
  }
  return false;
}

void aten_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  at::Tensor target = out;  // a handle to the same data: written, not rebound
  if (accumulate)
    target.addmm_(a, b);
  else
    at::mm_out(target, a, b);
}

// Whether the experts' products go through brgemm tiles (MOEFORGE_EXPERT_GEMM).
bool experts_tiled() {
  static const bool tiled = !environment_chose("MOEFORGE_EXPERT_GEMM", "tiles", "matmul");
  return tiled;
}

bool uses_onednn(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  // A strided result would be copied in and out by LibTorch's wrapper: ATen writes it in place.
  return onednn_operand(a) && onednn_operand(b) && onednn_operand(out) && out.is_contiguous();
}

}  // namespace

CpuGemm cpu_gemm() {
  static const CpuGemm kernel = [] {
    const CpuGemm requested = requested_kernel();
    experts_tiled();  // both variables checked at the first product (the run's MFU probe)
    if (requested == CpuGemm::kOneDnn && !onednn_takes_fp32()) return CpuGemm::kAten;
    return requested;
  }();
  return kernel;
}

bool onednn_operand(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && cpu_gemm() == CpuGemm::kOneDnn;
}

void gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
               RowCounts row_counts) {
  if (row_counts == RowCounts::kPerStep && experts_tiled() && onednn_operand(a) &&
      tiled_gemm_takes(out, a, b)) {
    tiled_gemm_into(out, a, b, accumulate);
    return;
  }
  const int64_t rows = a.size(0), depth = a.size(1);
  const int64_t bulk_rows = rows / kShapeStep * kShapeStep;
  const int64_t bulk_depth = depth / kShapeStep * kShapeStep;
  if (bulk_rows == 0 || bulk_depth == 0 || !uses_onednn(out, a, b)) {
    aten_into(out, a, b, accumulate);
    return;
  }
  // Not an ATen op: named for profiles (bench_moe_layer --profile, profile_step_summary.py).
  RECORD_FUNCTION("moeforge::onednn_mm_out", std::vector<c10::IValue>());
  const auto bulk_out = out.narrow(0, 0, bulk_rows);
  const auto bulk_a = a.narrow(0, 0, bulk_rows);
  at::native::mkldnn_matmul(bulk_a.narrow(1, 0, bulk_depth), b.narrow(0, 0, bulk_depth), bulk_out,
                            accumulate ? 1.0F : 0.0F, 1.0F);
  if (bulk_depth < depth)
    aten_into(bulk_out, bulk_a.narrow(1, bulk_depth, depth - bulk_depth),
              b.narrow(0, bulk_depth, depth - bulk_depth), /*accumulate=*/true);
  if (bulk_rows < rows)
    aten_into(out.narrow(0, bulk_rows, rows - bulk_rows), a.narrow(0, bulk_rows, rows - bulk_rows),
              b, accumulate);
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm_into(out, a, b);
  return out;
}

}  // namespace moeforge::moe
