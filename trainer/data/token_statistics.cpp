#include "trainer/data/token_statistics.hpp"

#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "trainer/common/file_io.hpp"
#include "trainer/common/user_error.hpp"

namespace moeforge {
namespace {

// What the cache is valid for: the .bin's size and modification time.
std::string bin_identity(const std::string& bin_path) {
  struct stat info {};
  if (::stat(bin_path.c_str(), &info) != 0) return "";
  return fmt::format("{}:{}.{}", info.st_size, info.st_mtim.tv_sec, info.st_mtim.tv_nsec);
}

TokenStatistics scan(const IndexedDataset& data) {
  TokenStatistics stats;
  stats.min_token = std::numeric_limits<int64_t>::max();
  std::vector<int64_t> buffer;
  for (int64_t s = 0; s < data.num_sequences(); ++s) {
    buffer.resize(static_cast<size_t>(data.sequence_length(s)));
    data.read_sequence(s, 0, data.sequence_length(s), buffer.data());
    for (const int64_t token : buffer) {
      stats.min_token = std::min(stats.min_token, token);
      stats.max_token = std::max(stats.max_token, token);
      if (token >= 0 && token < (int64_t{1} << 24)) {  // counts only for sane ids
        if (token >= static_cast<int64_t>(stats.counts.size()))
          stats.counts.resize(static_cast<size_t>(token) + 1, 0);
        ++stats.counts[static_cast<size_t>(token)];
      }
    }
  }
  return stats;
}

}  // namespace

TokenStatistics token_statistics(const IndexedDataset& data) {
  const auto cache_path = data.prefix() + ".moeforge-stats.json";
  const auto identity = bin_identity(data.prefix() + ".bin");
  if (std::filesystem::exists(cache_path)) {
    const auto cached = nlohmann::json::parse(read_file(cache_path), nullptr, false);
    if (cached.is_object() && cached.value("bin", std::string()) == identity &&
        cached.contains("counts")) {
      TokenStatistics stats;
      stats.min_token = cached.value("min_token", int64_t{0});
      stats.max_token = cached.value("max_token", int64_t{-1});
      stats.counts = cached["counts"].get<std::vector<int64_t>>();
      return stats;
    }
  }
  auto stats = scan(data);
  try {
    const nlohmann::json cache = {{"bin", identity},
                                  {"min_token", stats.min_token},
                                  {"max_token", stats.max_token},
                                  {"counts", stats.counts}};
    write_file_atomically(cache_path, cache.dump());
  } catch (const UserError&) {
    // Read-only dataset storage: no cache, the scan is repeated next time.
  }
  return stats;
}

}  // namespace moeforge
