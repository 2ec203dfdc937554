#pragma once
// safetensors reader and writer (the Hugging Face format):
//   u64 little-endian N | N bytes of UTF-8 JSON header | raw little-endian tensor data
// header: {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
//          "__metadata__": {"key": "value"}}; offsets are relative to the data section.
//
// File::open memory-maps the file read-only and validates the whole header before returning;
// every malformed file gives a UserError naming the file and (where it applies) the tensor —
// never a crash. Sharded directories follow Hugging Face: model.safetensors, or
// model-00001-of-0000N.safetensors shards plus model.safetensors.index.json (weight_map).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "trainer/common/file_io.hpp"

namespace moeforge::safetensors {

struct TensorInfo {
  std::string name;
  c10::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the data section
  uint64_t end = 0;
};

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Writes `tensors` in order (made contiguous, moved to CPU). UserError if the file cannot be
// written completely (e.g. disk full) or a dtype has no safetensors name.
void save(const std::string& path, const NamedTensors& tensors,
          const std::map<std::string, std::string>& metadata = {});

// Parses and validates a header held in memory (the fuzz target's entry point too).
// `file_size` is the total size; `source` names the file in messages.
std::vector<TensorInfo> parse_header(const uint8_t* data, uint64_t file_size,
                                     const std::string& source, uint64_t* data_start,
                                     std::map<std::string, std::string>* metadata);

class File {
 public:
  static File open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // by begin offset
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  const TensorInfo& info(const std::string& name) const;
  at::Tensor load(const std::string& name) const;  // owned CPU copy
  at::Tensor load(const std::string& name, c10::ScalarType as) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  File() = default;
  std::string path_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
  MappedFile mapped_;
  const uint8_t* data_ = nullptr;  // start of the data section inside the mapping
};

// Writes tensors into shards of at most `max_shard_bytes` of data each (a tensor larger than
// that gets a shard of its own): `model.safetensors` when one shard suffices, otherwise
// `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`. Returns file names.
std::vector<std::string> save_sharded(const std::string& dir, const NamedTensors& tensors,
                                      uint64_t max_shard_bytes,
                                      const std::map<std::string, std::string>& metadata = {});

// Reads a directory written by save_sharded (or by Hugging Face tools).
class ShardedReader {
 public:
  static ShardedReader open(const std::string& dir);
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return owner_.count(name) > 0; }
  const TensorInfo& info(const std::string& name) const;
  at::Tensor load(const std::string& name) const;
  at::Tensor load(const std::string& name, c10::ScalarType as) const;
  const std::string& file_of(const std::string& name) const { return owner_.at(name)->path(); }

 private:
  std::string dir_;
  std::vector<std::shared_ptr<File>> files_;
  std::map<std::string, std::shared_ptr<File>> owner_;
};

}  // namespace moeforge::safetensors
