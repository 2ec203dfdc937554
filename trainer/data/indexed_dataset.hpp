#pragma once
// Megatron's indexed dataset (megatron/core/datasets/indexed_dataset.py), read byte-compatibly:
//
//   PREFIX.idx  "MMIDIDX\0\0" | u64 version = 1 | u8 dtype code | u64 sequence count S |
//               u64 document-index count D+1 | i32 lengths[S] | i64 byte pointers[S] |
//               i64 document indices[D+1] (0 first, S last: document d is sequences
//               [doc[d], doc[d+1]))
//   PREFIX.bin  the tokens of every sequence, back to back, little-endian
//
// dtype codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16;
// only the integer (token) types are accepted. Both files are memory-mapped; the .bin is never
// read whole. open() checks everything a reader relies on and throws UserError naming the file
// and what is wrong (magic, version, dtype, truncation, pointers out of order or range, the
// document index, an empty dataset).
#include <cstdint>
#include <string>
#include <vector>

#include "trainer/common/file_io.hpp"

namespace moeforge {

class IndexedDataset {
 public:
  static IndexedDataset open(const std::string& prefix);

  const std::string& prefix() const { return prefix_; }
  int64_t num_sequences() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_documents() const { return static_cast<int64_t>(document_index_.size()) - 1; }
  int64_t num_tokens() const { return num_tokens_; }
  int token_bytes() const { return token_bytes_; }
  const char* dtype_name() const;

  // Tokens of document d: its sequences back to back.
  int64_t document_length(int64_t document) const;
  // Tokens [offset, offset + count) of document d, as int64, into `out`.
  void read_document(int64_t document, int64_t offset, int64_t count, int64_t* out) const;
  // Tokens [offset, offset + count) of sequence s.
  void read_sequence(int64_t sequence, int64_t offset, int64_t count, int64_t* out) const;
  int64_t sequence_length(int64_t sequence) const { return lengths_[sequence]; }
  // D+1 sequence indices: document d is sequences [index[d], index[d+1]).
  const std::vector<int64_t>& document_index() const { return document_index_; }

 private:
  void parse_index(const std::string& idx_path);
  void check_pointers(const std::string& bin_path) const;
  std::string prefix_;
  MappedFile bin_;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> pointers_;        // byte offset of each sequence in the .bin
  std::vector<int64_t> document_index_;  // D+1 sequence indices
  int dtype_code_ = 0;
  int token_bytes_ = 0;
  bool signed_ = false;
  int64_t num_tokens_ = 0;
};

}  // namespace moeforge
