#pragma once
// `moeforge data-info PREFIX [--vocab-size N] [--tokens-out FILE]`: what a Megatron indexed
// dataset holds (documents, sequences, tokens, dtype, token-id range, empty documents), after
// every check training would make. --tokens-out writes all its tokens (I64 "tokens"), the
// sequence lengths and the document index as safetensors, for comparing with other readers.
#include <cstdint>
#include <string>

namespace moeforge {

struct DataInfoArgs {
  std::string prefix;
  int64_t vocab_size = 0;  // > 0: also check every token id is below it
  std::string tokens_out;
};

// 0, or UserError on a malformed dataset (the caller prints it and exits 2).
int data_info_command(const DataInfoArgs& args);

}  // namespace moeforge
