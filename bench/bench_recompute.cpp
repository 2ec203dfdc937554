// Activation memory and step time of every train.recompute setting, side by side in one run.
//
//   build/bench/bench_recompute [CONFIG] [--iterations N] [--set key=value ...]
//   (default CONFIG configs/small.yaml: one micro-batch of micro_batch_size × seq_len tokens)
//
// Each setting runs in its own forked process (none, moe_act, moe, attention, block): one
// warm-up forward+backward of the model on one micro-batch, then N timed ones. Reported:
//   act MiB   live ATen CPU bytes at the end of the forward minus before it: exactly what the
//             forward keeps for backward (a counting allocator wraps LibTorch's CPU allocator);
//   peak MiB  peak live ATen bytes during forward+backward minus before it (activations,
//             gradients and the transients of backward and of the recompute);
//   RSS MiB   the process's peak resident set growth over its resident set before the first
//             forward (getrusage; includes allocator slack);
//   tokens/s  micro-batch tokens / median forward+backward time (the optimizer step, the same
//             for every setting, is left out, so the overhead ratio is the conservative one);
// and each as a ratio to none. The target: block cuts activation memory ≥ 3× for
// ≤ 40% more step time.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/CPUAllocator.h>
#include <fmt/format.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <string>
#include <vector>

#include "child_process.hpp"
#include "parallel/process_groups.hpp"
#include "trainer/common/host_allocator.hpp"
#include "trainer/config/config.hpp"
#include "trainer/model/model.hpp"

using namespace moeforge;

namespace {

// LibTorch's CPU allocator with live and peak byte counts.
class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* inner) : inner_(inner) {}

  c10::DataPtr allocate(size_t bytes) override {
    auto inner = inner_->allocate(bytes);
    void* data = inner.get();
    const auto device = inner.device();
    auto* block = new Block{std::move(inner), bytes, this};
    const int64_t live = live_ += static_cast<int64_t>(bytes);
    for (int64_t peak = peak_; live > peak && !peak_.compare_exchange_weak(peak, live);) {
    }
    return {data, block, &release, device};
  }
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t live() const { return live_; }
  int64_t peak() const { return peak_; }
  void reset_peak() { peak_ = live_.load(); }

 private:
  struct Block {
    c10::DataPtr inner;
    size_t bytes;
    CountingAllocator* owner;
  };
  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    block->owner->live_ -= static_cast<int64_t>(block->bytes);
    delete block;  // frees the inner allocation
  }
  c10::Allocator* inner_;
  std::atomic<int64_t> live_{0}, peak_{0};
};

struct Measurement {
  double seconds = 0;         // median forward+backward
  double activation_mib = 0;  // held at the end of the forward
  double step_peak_mib = 0;   // peak during forward+backward
  double rss_growth_mib = 0;  // peak RSS over the RSS before the first forward
};

constexpr double kMiB = 1024.0 * 1024.0;

// One forward+backward of `model` on `tokens`, as the trainer computes the loss.
void forward_backward(DecoderLMImpl& model, const Config& config, const at::Tensor& tokens,
                      CountingAllocator& counter, Measurement& m) {
  const int64_t seq = config.train.seq_len;
  model.zero_grad(/*set_to_none=*/true);
  const int64_t before = counter.live();
  counter.reset_peak();
  const auto out = model.forward(tokens.narrow(1, 0, seq));
  auto loss = language_model_loss(out.logits, tokens.narrow(1, 1, seq)) +
              config.moe.balancing.aux_loss.coeff * out.aux_loss +
              config.moe.balancing.z_loss.coeff * out.z_loss;
  m.activation_mib = std::max(m.activation_mib, (counter.live() - before) / kMiB);
  loss.backward();
  m.step_peak_mib = std::max(m.step_peak_mib, (counter.peak() - before) / kMiB);
}

// Runs in a forked child (bench::run_in_child): all ATen work stays there.
Measurement measure_in_child(const Config& config, int iterations) {
  static CountingAllocator counter(c10::GetCPUAllocator());
  c10::SetCPUAllocator(&counter, /*priority=*/100);
  const auto groups = parallel::make_single_process_groups();
  DecoderLM model(config, *groups.ep);
  initialize_parameters(*model, config, static_cast<uint64_t>(config.train.seed));
  auto generator = at::make_generator<at::CPUGeneratorImpl>(7);
  const auto tokens =
      at::randint(config.model.vocab_size,
                  {config.train.micro_batch_size, config.train.seq_len + 1}, generator, at::kLong);
  Measurement m;
  const long rss_before = bench::current_rss_kb();
  forward_backward(*model, config, tokens, counter, m);  // warm-up
  std::vector<double> times;
  for (int i = 0; i < iterations; ++i) {
    const auto start = std::chrono::steady_clock::now();
    forward_backward(*model, config, tokens, counter, m);
    times.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  m.seconds = times[times.size() / 2];
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  m.rss_growth_mib = (usage.ru_maxrss - rss_before) / 1024.0;
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  tune_host_allocator();  // as the trainer does
  std::string path = "configs/small.yaml";
  int iterations = 3;
  std::vector<std::string> overrides;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--iterations" && i + 1 < argc) {
      iterations = std::stoi(argv[++i]);
    } else if (arg == "--set" && i + 1 < argc) {
      overrides.push_back(argv[++i]);
    } else {
      path = arg;
    }
  }
  const auto base = load_config(path, overrides);
  fmt::print("{}: {} tokens per micro-batch, {} timed iterations after one warm-up\n", path,
             base.train.micro_batch_size * base.train.seq_len, iterations);
  fmt::print("{:<10} {:>9} {:>9} {:>9} {:>10}   {:>6} {:>6} {:>6} {:>6}\n", "recompute", "act MiB",
             "peak MiB", "RSS MiB", "tokens/s", "act", "peak", "RSS", "time");
  Measurement none;
  for (const char* setting : {"none", "moe_act", "moe", "attention", "block"}) {
    auto with_setting = overrides;
    with_setting.push_back(std::string("train.recompute=") + setting);
    const auto config = load_config(path, with_setting);
    const auto m =
        bench::run_in_child<Measurement>([&] { return measure_in_child(config, iterations); });
    if (std::string(setting) == "none") none = m;
    const double tokens = static_cast<double>(config.train.micro_batch_size * config.train.seq_len);
    fmt::print(
        "{:<10} {:>9.1f} {:>9.1f} {:>9.1f} {:>10.0f}   {:>5.2f}x {:>5.2f}x {:>5.2f}x {:>5.2f}x\n",
        setting, m.activation_mib, m.step_peak_mib, m.rss_growth_mib, tokens / m.seconds,
        m.activation_mib / none.activation_mib, m.step_peak_mib / none.step_peak_mib,
        m.rss_growth_mib / none.rss_growth_mib, m.seconds / none.seconds);
  }
  fmt::print("(ratios: to none; time = forward+backward seconds, > 1 is slower)\n");
  return 0;
}
