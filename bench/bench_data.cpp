// Data loading must never be the bottleneck: samples/s of the Megatron indexed reader with
// random access (packed windows across documents, per-epoch shuffles) over a dataset this
// program writes itself, with the page cache cold (pages dropped with posix_fadvise) and warm,
// beside what training consumes.
//
//   build/bench/bench_data [--gib 1.0] [--seq-len 256] [--dir /tmp] [--consumed-tokens-per-s N]
//
// --consumed-tokens-per-s: the trainer's rate to compare with (default: configs/small.yaml at
// 2 ranks here, 3 950 tokens/s, docs/benchmarks.md).
#include <ATen/ATen.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <vector>

#include "trainer/data/blended_dataset.hpp"

using namespace moeforge;

namespace {

// Documents of 100-4000 uint16 tokens until `bytes`, Megatron's layout (one sequence each).
void write_dataset(const std::string& prefix, int64_t bytes) {
  std::mt19937_64 rng(7);
  std::ofstream bin(prefix + ".bin", std::ios::binary);
  std::vector<int32_t> lengths;
  std::vector<int64_t> pointers;
  std::vector<uint16_t> doc;
  int64_t written = 0;
  while (written < bytes) {
    doc.resize(100 + rng() % 3900);
    for (auto& t : doc) t = static_cast<uint16_t>(rng() % 50000);
    pointers.push_back(written);
    lengths.push_back(static_cast<int32_t>(doc.size()));
    bin.write(reinterpret_cast<const char*>(doc.data()), static_cast<std::streamsize>(doc.size() * 2));
    written += static_cast<int64_t>(doc.size() * 2);
  }
  std::vector<int64_t> documents(lengths.size() + 1);
  for (size_t i = 0; i < documents.size(); ++i) documents[i] = static_cast<int64_t>(i);
  std::ofstream idx(prefix + ".idx", std::ios::binary);
  const uint64_t version = 1, sequences = lengths.size(), count = documents.size();
  const uint8_t dtype = 8;
  idx.write("MMIDIDX\0\0", 9);
  idx.write(reinterpret_cast<const char*>(&version), 8);
  idx.write(reinterpret_cast<const char*>(&dtype), 1);
  idx.write(reinterpret_cast<const char*>(&sequences), 8);
  idx.write(reinterpret_cast<const char*>(&count), 8);
  idx.write(reinterpret_cast<const char*>(lengths.data()), static_cast<std::streamsize>(lengths.size() * 4));
  idx.write(reinterpret_cast<const char*>(pointers.data()), static_cast<std::streamsize>(pointers.size() * 8));
  idx.write(reinterpret_cast<const char*>(documents.data()), static_cast<std::streamsize>(documents.size() * 8));
}

void drop_page_cache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

double samples_per_second(const BlendedDataset& data, int64_t first, int64_t count,
                          int64_t seq_len) {
  std::vector<int64_t> out(static_cast<size_t>(seq_len + 1));
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = first; i < first + count; ++i) data.train_window(i, 1234, out.data());
  return static_cast<double>(count) /
         std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"indexed dataset read rate vs training consumption"};
  double gib = 1.0, consumed_tokens_per_s = 3950.0;
  int64_t seq_len = 256, samples = 20000;
  std::string dir = std::filesystem::temp_directory_path().string();
  app.add_option("--gib", gib);
  app.add_option("--seq-len", seq_len);
  app.add_option("--samples", samples);
  app.add_option("--dir", dir);
  app.add_option("--consumed-tokens-per-s", consumed_tokens_per_s);
  CLI11_PARSE(app, argc, argv);
  const auto prefix = dir + "/moeforge-bench-data";
  write_dataset(prefix, static_cast<int64_t>(gib * (1LL << 30)));
  const auto bytes = std::filesystem::file_size(prefix + ".bin");
  // Statistics are cached on first open (one scan): keep it out of the timed reads.
  const BlendedDataset data({{1.0, prefix}}, 0.01, seq_len);
  const double consumed = consumed_tokens_per_s / static_cast<double>(seq_len);
  drop_page_cache(prefix + ".bin");
  const double cold = samples_per_second(data, 5000000, samples, seq_len);
  samples_per_second(data, 0, samples, seq_len);  // touch, then measure the same windows warm
  const double warm = samples_per_second(data, 0, samples, seq_len);
  fmt::print("dataset {:.2f} GiB ({} tokens), windows of {} tokens, {} random samples each\n",
             static_cast<double>(bytes) / (1 << 30), bytes / 2, seq_len + 1, samples);
  fmt::print("  page cache cold: {:10.0f} samples/s = {:6.0f}x what training consumes\n", cold,
             cold / consumed);
  fmt::print("  page cache warm: {:10.0f} samples/s = {:6.0f}x what training consumes\n", warm,
             warm / consumed);
  fmt::print("  training consumes {:.1f} samples/s ({:.0f} tokens/s)\n", consumed,
             consumed_tokens_per_s);
  for (const char* ext : {".bin", ".idx", ".moeforge-stats.json"})
    std::filesystem::remove(prefix + ext);
  return 0;
}
