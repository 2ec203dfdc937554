#include "trainer/data/data_info.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <iostream>

#include "trainer/checkpoint/safetensors.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/data/indexed_dataset.hpp"
#include "trainer/data/token_statistics.hpp"

namespace moeforge {
namespace {

void write_tokens(const IndexedDataset& data, const std::string& path) {
  auto tokens = at::empty({data.num_tokens()}, at::kLong);
  auto lengths = at::empty({data.num_sequences()}, at::kLong);
  int64_t* out = tokens.data_ptr<int64_t>();
  for (int64_t s = 0; s < data.num_sequences(); ++s) {
    lengths[s] = data.sequence_length(s);
    data.read_sequence(s, 0, data.sequence_length(s), out);
    out += data.sequence_length(s);
  }
  const auto& index = data.document_index();
  const auto documents = at::tensor(std::vector<int64_t>(index.begin(), index.end()), at::kLong);
  safetensors::save(
      path, {{"tokens", tokens}, {"sequence_lengths", lengths}, {"document_index", documents}});
}

}  // namespace

int data_info_command(const DataInfoArgs& args) {
  const auto data = IndexedDataset::open(args.prefix);
  const auto stats = token_statistics(data);
  int64_t empty = 0, longest = 0;
  for (int64_t d = 0; d < data.num_documents(); ++d) {
    const int64_t length = data.document_length(d);
    empty += length == 0 ? 1 : 0;
    longest = std::max(longest, length);
  }
  std::cout << fmt::format(
      "{}: Megatron indexed dataset, dtype {}\n"
      "  documents {} ({} empty), sequences {}, tokens {} (mean {:.1f}, longest {} per document)\n"
      "  token ids {} .. {}\n",
      args.prefix, data.dtype_name(), data.num_documents(), empty, data.num_sequences(),
      data.num_tokens(),
      static_cast<double>(data.num_tokens()) / std::max<int64_t>(1, data.num_documents()), longest,
      stats.min_token, stats.max_token);
  if (args.vocab_size > 0) {
    require(stats.min_token >= 0 && stats.max_token < args.vocab_size,
            fmt::format("{}: token ids {} .. {} do not fit a vocabulary of {}", args.prefix,
                        stats.min_token, stats.max_token, args.vocab_size));
    std::cout << fmt::format("  every token id fits a vocabulary of {}\n", args.vocab_size);
  }
  if (!args.tokens_out.empty()) write_tokens(data, args.tokens_out);
  return 0;
}

}  // namespace moeforge
