// CPU fp32 products through oneDNN (moe/cpu_gemm, moe/tiled_gemm, moe/projection) against
// float64 products: row and reduction counts below, at and around the 64-step split between
// oneDNN and ATen and the brgemm tiles' pieces, transposed operands, accumulation, threads, and
// the projection's autograd node.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moe/cpu_gemm.hpp"
#include "moe/experts.hpp"
#include "moe/gathered_experts.hpp"
#include "moe/projection.hpp"
#include "moe/tiled_gemm.hpp"

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

using Product = std::function<void(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                                   bool accumulate)>;

// product(out, a, b, ·) against float64: written over NaN (every element must be written), and
// accumulated onto a known start.
void expect_product(const Product& product, const at::Tensor& a, const at::Tensor& b) {
  const auto expected = at::mm(a.to(at::kDouble), b.to(at::kDouble));
  const auto label = ::testing::Message()
                     << a.size(0) << "x" << a.size(1) << "x" << b.size(1)
                     << (a.is_contiguous() ? "" : " aT") << (b.is_contiguous() ? "" : " bT");
  auto out = at::full({a.size(0), b.size(1)}, std::nan(""));
  product(out, a, b, /*accumulate=*/false);
  EXPECT_LT(relative_error(out, expected), 1e-6) << label;
  const auto start = at::randn({a.size(0), b.size(1)});
  auto sum = start.clone();
  product(sum, a, b, /*accumulate=*/true);
  EXPECT_LT(relative_error(sum, expected + start.to(at::kDouble)), 1e-6) << label << " accumulated";
}

TEST(CpuGemm, MatchesFloat64AroundTheShapeSplit) {
  at::manual_seed(11);
  const Product product = [](const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                             bool accumulate) { gemm_into(out, a, b, accumulate); };
  for (const int64_t rows : {1, 63, 64, 65, 200})
    for (const int64_t depth : {17, 64, 100, 192})
      expect_product(product, at::randn({rows, depth}), at::randn({depth, 48}));
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

// An operand in the given layout: row-major, or the transposed view of a row-major matrix.
at::Tensor laid_out(const at::Tensor& t, bool transposed) {
  return transposed ? t.t().contiguous().t() : t.contiguous();
}

// The brgemm tiles at the sizes that pick every kind of piece (whole 256 panels, multiples of
// 64, powers of two down to 1), with each operand in either layout, written and accumulated.
TEST(TiledGemm, MatchesFloat64InEveryLayoutAndPiece) {
  at::manual_seed(15);
  const Product product = [](const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                             bool accumulate) {
    ASSERT_TRUE(tiled_gemm_takes(out, a, b));
    tiled_gemm_into(out, a, b, accumulate);
  };
  for (const int64_t rows : {1, 7, 64, 117, 300}) {
    for (const int64_t depth : {1, 37, 256, 333}) {
      const int64_t columns = rows == 117 ? 520 : 48;
      const auto a = at::randn({rows, depth}), b = at::randn({depth, columns});
      for (const bool a_t : {false, true})
        for (const bool b_t : {false, true})
          expect_product(product, laid_out(a, a_t), laid_out(b, b_t));
    }
  }
}

// A row block of a larger buffer as the result (its neighbours untouched), the rows split
// between threads outside a parallel region and run inline inside one, and an empty reduction.
TEST(TiledGemm, RowBlocksThreadsAndEmptyReduction) {
  at::manual_seed(16);
  const auto a = at::randn({700, 96}), w = at::randn({40, 96});
  const auto expected = at::mm(a.to(at::kDouble), w.t().to(at::kDouble));
  auto buffer = at::full({720, 40}, 7.0F);
  auto block = buffer.narrow(0, 10, 700);
  tiled_gemm_into(block, a, w.t(), /*accumulate=*/false);
  EXPECT_LT(relative_error(block, expected), 1e-6);
  EXPECT_TRUE(buffer.narrow(0, 0, 10).eq(7.0F).all().item<bool>());
  EXPECT_TRUE(buffer.narrow(0, 710, 10).eq(7.0F).all().item<bool>());
  std::vector<at::Tensor> outs = {at::empty({700, 40}), at::empty({700, 40})};
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) tiled_gemm_into(outs[i], a, w.t(), false);
  });
  for (const auto& out : outs) EXPECT_LT(relative_error(out, expected), 1e-6);
  auto zeroed = at::full({5, 3}, 2.0F);
  tiled_gemm_into(zeroed, at::empty({5, 0}), at::empty({0, 3}), /*accumulate=*/false);
  EXPECT_TRUE(zeroed.eq(0.0F).all().item<bool>());
}

// Through gemm_into: products marked as changing rows every step take the tiles, the others
// oneDNN's matmul; both agree with float64, and an operand neither layout serves (a matrix
// with every second column) still gets the right product.
TEST(CpuGemm, PerStepRowCountsTakeTheTiles) {
  at::manual_seed(17);
  const auto a = at::randn({129, 80}), b = at::randn({80, 33});
  const auto expected = at::mm(a.to(at::kDouble), b.to(at::kDouble));
  for (const auto counts : {RowCounts::kFixed, RowCounts::kPerStep}) {
    auto out = at::empty({129, 33});
    gemm_into(out, a, b, false, counts);
    EXPECT_LT(relative_error(out, expected), 1e-6);
  }
  const auto strided = at::randn({129, 160}).slice(1, 0, 160, 2);  // strides (160, 2)
  ASSERT_FALSE(tiled_gemm_takes(at::empty({129, 33}), strided, b));
  auto out = at::empty({129, 33});
  gemm_into(out, strided, b, false, RowCounts::kPerStep);
  EXPECT_LT(relative_error(out, at::mm(strided.to(at::kDouble), b.to(at::kDouble))), 1e-6);
}

// Kernel calls by name while a guard lives (RecordFunction's global callbacks see every
// thread, the experts' shares included).
class KernelCalls {
 public:
  KernelCalls()
      : handle_(at::addGlobalCallback(at::RecordFunctionCallback(&KernelCalls::count)
                                          .needsInputs(false)
                                          .scopes({at::RecordScope::FUNCTION}))) {
    tiles() = matmul() = 0;
  }
  ~KernelCalls() { at::removeCallback(handle_); }
  KernelCalls(const KernelCalls&) = delete;
  KernelCalls& operator=(const KernelCalls&) = delete;
  static std::atomic<int>& tiles() {
    static std::atomic<int> calls{0};
    return calls;
  }
  static std::atomic<int>& matmul() {
    static std::atomic<int> calls{0};
    return calls;
  }

 private:
  static std::unique_ptr<at::ObserverContext> count(const at::RecordFunction& fn) {
    const std::string name = fn.name();
    if (name == "moeforge::brgemm_tiles") ++tiles();
    if (name == "moeforge::onednn_mm_out") ++matmul();
    return nullptr;
  }
  at::CallbackHandle handle_;
};

// The routed experts (rows changing every step) take the tiles; a dense FeedForward, run as
// one expert, takes oneDNN's matmul: which kernel serves which product is part of the speed
// the benchmarks report, so a silent change of path fails here.
TEST(CpuGemm, RoutedExpertsTakeTheTilesAndDenseTheMatmul) {
  if (std::getenv("MOEFORGE_CPU_GEMM") || std::getenv("MOEFORGE_EXPERT_GEMM"))
    GTEST_SKIP() << "kernel choice set by the caller";
  at::manual_seed(18);
  const std::vector<int64_t> rows_per_expert = {70, 0, 130};
  const auto rows = at::randn({200, 64}).requires_grad_();
  const auto gates = at::rand({200});
  const auto wg = at::randn({3, 96, 64}) * 0.1, wu = at::randn({3, 96, 64}) * 0.1;
  const auto wd = at::randn({3, 64, 96}) * 0.1;
  {
    const KernelCalls calls;
    gated_expert_rows(rows, gates, rows_per_expert, wg, wu, wd).sum().backward();
    EXPECT_EQ(KernelCalls::tiles(), 2 * 9);  // 3 forward + 6 backward products per expert
    EXPECT_EQ(KernelCalls::matmul(), 0);
  }
  {
    const KernelCalls calls;
    FeedForward dense(64, 96);
    dense(rows).sum().backward();
    EXPECT_EQ(KernelCalls::tiles(), 0);
    EXPECT_GT(KernelCalls::matmul(), 0);
  }
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
