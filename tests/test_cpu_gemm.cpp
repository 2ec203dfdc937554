// CPU fp32 products through oneDNN (moe/cpu_gemm, moe/projection) against float64 products:
// row and reduction counts below, at and around the 64-step split between oneDNN and ATen,
// transposed operands, accumulation, and the projection's autograd node.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moe/cpu_gemm.hpp"
#include "moe/projection.hpp"

namespace moeforge::moe {
namespace {

double relative_error(const at::Tensor& actual, const at::Tensor& expected) {
  const auto reference = expected.to(at::kDouble);
  return ((actual.to(at::kDouble) - reference).norm() / reference.norm()).item<double>();
}

// The LibTorch this project pins takes fp32 through oneDNN: if the probe fell back, the speed
// the benchmarks report is gone, and that should fail loudly here, not quietly in a figure.
TEST(CpuGemm, OneDnnServesFp32InThisLibTorch) {
  if (std::getenv("MOEFORGE_CPU_GEMM")) GTEST_SKIP() << "MOEFORGE_CPU_GEMM set by the caller";
  EXPECT_EQ(cpu_gemm(), CpuGemm::kOneDnn);
}

TEST(CpuGemm, MatchesFloat64AroundTheShapeSplit) {
  at::manual_seed(11);
  for (const int64_t rows : {1, 63, 64, 65, 200}) {
    for (const int64_t depth : {17, 64, 100, 192}) {
      const int64_t columns = 48;
      const auto a = at::randn({rows, depth}), b = at::randn({depth, columns});
      const auto expected = at::mm(a.to(at::kDouble), b.to(at::kDouble));
      auto out = at::full({rows, columns}, std::nan(""));  // every element must be written
      gemm_into(out, a, b);
      EXPECT_LT(relative_error(out, expected), 1e-6) << rows << "x" << depth;
      // Accumulate onto a known start.
      const auto start = at::randn({rows, columns});
      auto sum = start.clone();
      gemm_into(sum, a, b, /*accumulate=*/true);
      EXPECT_LT(relative_error(sum, expected + start.to(at::kDouble)), 1e-6)
          << rows << "x" << depth << " accumulated";
    }
  }
}

// The layouts the experts use: aᵀ (weight gradients over rows), bᵀ (weights [N, K]), and a
// result that is a row block of a larger buffer.
TEST(CpuGemm, TransposedOperandsAndRowBlocks) {
  at::manual_seed(12);
  const auto a_t = at::randn({96, 130}), b_t = at::randn({40, 96});
  auto buffer = at::full({150, 40}, 7.0F);
  auto block = buffer.narrow(0, 10, 130);
  gemm_into(block, a_t.t(), b_t.t());
  EXPECT_LT(relative_error(block, at::mm(a_t.t().to(at::kDouble), b_t.t().to(at::kDouble))), 1e-6);
  EXPECT_TRUE(buffer.narrow(0, 0, 10).eq(7.0F).all().item<bool>());
  EXPECT_TRUE(buffer.narrow(0, 140, 10).eq(7.0F).all().item<bool>());
}

TEST(CpuGemm, FallsBackForOtherTypes) {
  const auto a = at::randn({70, 65}, at::kDouble), b = at::randn({65, 9}, at::kDouble);
  EXPECT_TRUE(gemm(a, b).equal(at::mm(a, b)));  // float64 references stay exact ATen
}

// y = x·wᵀ + bias and both gradients against float64 autograd through at::linear.
TEST(Projection, MatchesFloat64LinearAndGradients) {
  at::manual_seed(13);
  const auto x64 = at::randn({3, 45, 80}, at::kDouble);
  const auto w64 = at::randn({72, 80}, at::kDouble), b64 = at::randn({72}, at::kDouble);
  const auto dy64 = at::randn({3, 45, 72}, at::kDouble);
  const auto x = x64.to(at::kFloat).requires_grad_(), w = w64.to(at::kFloat).requires_grad_();
  const auto b = b64.to(at::kFloat).requires_grad_();
  const auto y = projection(x, w, b);
  y.backward(dy64.to(at::kFloat));
  const auto rx = x64.clone().requires_grad_(), rw = w64.clone().requires_grad_();
  const auto rb = b64.clone().requires_grad_();
  at::linear(rx, rw, rb).backward(dy64);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{3, 45, 72}));
  EXPECT_LT(relative_error(y, at::linear(x64, w64, b64)), 1e-6);
  EXPECT_LT(relative_error(x.grad(), rx.grad()), 1e-6);
  EXPECT_LT(relative_error(w.grad(), rw.grad()), 1e-6);
  EXPECT_LT(relative_error(b.grad(), rb.grad()), 1e-6);
}

// Only the weight needs a gradient (a frozen input), and the node keeps no graph under no_grad.
TEST(Projection, WeightOnlyGradientAndNoGrad) {
  at::manual_seed(14);
  const auto x = at::randn({130, 64});
  const auto w = at::randn({32, 64}).requires_grad_();
  projection(x, w).sum().backward();
  const auto expected = x.to(at::kDouble).sum(0).expand({32, 64});
  EXPECT_LT(relative_error(w.grad(), expected), 1e-6);
  at::NoGradGuard no_grad;
  EXPECT_FALSE(projection(x, w).requires_grad());
}

}  // namespace
}  // namespace moeforge::moe
