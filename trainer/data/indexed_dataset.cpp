#include "trainer/data/indexed_dataset.hpp"

#include <fmt/format.h>

#include <cstring>

#include "trainer/common/user_error.hpp"

namespace moeforge {
namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};

struct DtypeInfo {
  int code;
  const char* name;
  int bytes;
  bool is_signed;
  bool is_token_type;
};

constexpr DtypeInfo kDtypes[] = {{1, "uint8", 1, false, true},   {2, "int8", 1, true, true},
                                 {3, "int16", 2, true, true},    {4, "int32", 4, true, true},
                                 {5, "int64", 8, true, true},    {6, "float64", 8, true, false},
                                 {7, "float32", 4, true, false}, {8, "uint16", 2, false, true}};

// Reads little-endian fields off the .idx mapping, naming the file when it runs out.
class Cursor {
 public:
  Cursor(const uint8_t* data, uint64_t size, const std::string& path)
      : data_(data), size_(size), path_(path) {}
  const uint8_t* take(uint64_t bytes, const char* what) {
    if (bytes > size_ - position_)
      throw UserError(fmt::format("{}: truncated: the {} ends at byte {} but the file has {}",
                                  path_, what, position_ + bytes, size_));
    const uint8_t* at = data_ + position_;
    position_ += bytes;
    return at;
  }
  template <typename T>
  T value(const char* what) {
    T v;
    std::memcpy(&v, take(sizeof(T), what), sizeof(T));
    return v;
  }
  template <typename T>
  std::vector<T> array(uint64_t count, const char* what) {
    if (count > (size_ - position_) / sizeof(T))
      throw UserError(fmt::format("{}: truncated: {} {} do not fit in the {} bytes left", path_,
                                  count, what, size_ - position_));
    std::vector<T> values(count);
    std::memcpy(values.data(), take(count * sizeof(T), what), count * sizeof(T));
    return values;
  }

 private:
  const uint8_t* data_;
  uint64_t size_;
  uint64_t position_ = 0;
  const std::string& path_;
};

}  // namespace

IndexedDataset IndexedDataset::open(const std::string& prefix) {
  IndexedDataset dataset;
  dataset.prefix_ = prefix;
  dataset.parse_index(prefix + ".idx");
  const auto bin_path = prefix + ".bin";
  dataset.bin_ = MappedFile::open(bin_path, "data.path");
  dataset.check_pointers(bin_path);
  return dataset;
}

void IndexedDataset::parse_index(const std::string& idx_path) {
  const auto idx = MappedFile::open(idx_path, "data.path");
  Cursor in(idx.data(), idx.size(), idx_path);
  if (std::memcmp(in.take(sizeof(kMagic), "magic"), kMagic, sizeof(kMagic)) != 0)
    throw UserError(fmt::format(
        "{}: not a Megatron indexed dataset index (the file does not start with MMIDIDX)",
        idx_path));
  if (const auto version = in.value<uint64_t>("version"); version != 1)
    throw UserError(
        fmt::format("{}: index version {} is not supported (version 1 is)", idx_path, version));
  dtype_code_ = in.value<uint8_t>("dtype code");
  const DtypeInfo* dtype = nullptr;
  for (const auto& d : kDtypes)
    if (d.code == dtype_code_) dtype = &d;
  if (dtype == nullptr || !dtype->is_token_type)
    throw UserError(fmt::format(
        "{}: dtype code {} ({}) is not a token type; allowed 1 uint8, 2 int8, 3 int16, 4 int32, "
        "5 int64, 8 uint16",
        idx_path, dtype_code_, dtype ? dtype->name : "unknown"));
  token_bytes_ = dtype->bytes;
  signed_ = dtype->is_signed;
  const auto sequences = in.value<uint64_t>("sequence count");
  const auto documents = in.value<uint64_t>("document count");
  lengths_ = in.array<int32_t>(sequences, "sequence lengths");
  pointers_ = in.array<int64_t>(sequences, "sequence pointers");
  document_index_ = in.array<int64_t>(documents, "document indices");
  if (document_index_.empty() || document_index_.front() != 0 ||
      document_index_.back() != static_cast<int64_t>(sequences))
    throw UserError(fmt::format(
        "{}: the document index must start at 0 and end at the sequence count {} (it has {} "
        "entries{})",
        idx_path, sequences, document_index_.size(),
        document_index_.empty()
            ? ""
            : fmt::format(", {} .. {}", document_index_.front(), document_index_.back())));
  for (size_t d = 1; d < document_index_.size(); ++d)
    if (document_index_[d] < document_index_[d - 1])
      throw UserError(fmt::format("{}: document index entry {} ({}) is below the one before ({})",
                                  idx_path, d, document_index_[d], document_index_[d - 1]));
}

void IndexedDataset::check_pointers(const std::string& bin_path) const {
  const auto idx_path = prefix_ + ".idx";
  int64_t expected = 0;
  for (size_t s = 0; s < lengths_.size(); ++s) {
    if (lengths_[s] < 0)
      throw UserError(
          fmt::format("{}: sequence {} has negative length {}", idx_path, s, lengths_[s]));
    if (pointers_[s] != expected)
      throw UserError(fmt::format(
          "{}: sequence {} starts at byte {}, but the sequences before it end at byte {} "
          "(pointers out of order or corrupt)",
          idx_path, s, pointers_[s], expected));
    expected += static_cast<int64_t>(lengths_[s]) * token_bytes_;
  }
  if (static_cast<uint64_t>(expected) > bin_.size())
    throw UserError(fmt::format("{}: {} bytes, but the index needs {} (the .bin is truncated)",
                                bin_path, bin_.size(), expected));
  if (expected == 0) throw UserError(fmt::format("{}: the dataset holds no tokens", prefix_));
  const_cast<IndexedDataset*>(this)->num_tokens_ = expected / token_bytes_;
}

const char* IndexedDataset::dtype_name() const {
  for (const auto& d : kDtypes)
    if (d.code == dtype_code_) return d.name;
  return "unknown";
}

int64_t IndexedDataset::document_length(int64_t document) const {
  int64_t length = 0;
  for (int64_t s = document_index_[document]; s < document_index_[document + 1]; ++s)
    length += lengths_[s];
  return length;
}

void IndexedDataset::read_sequence(int64_t sequence, int64_t offset, int64_t count,
                                   int64_t* out) const {
  const uint8_t* p = bin_.data() + pointers_[sequence] + offset * token_bytes_;
  for (int64_t i = 0; i < count; ++i, p += token_bytes_) {
    uint64_t raw = 0;
    std::memcpy(&raw, p, token_bytes_);  // little-endian host
    const int shift = 64 - 8 * token_bytes_;
    out[i] = signed_ && shift > 0 ? (static_cast<int64_t>(raw << shift) >> shift)
                                  : static_cast<int64_t>(raw);
  }
}

void IndexedDataset::read_document(int64_t document, int64_t offset, int64_t count,
                                   int64_t* out) const {
  for (int64_t s = document_index_[document]; s < document_index_[document + 1] && count > 0; ++s) {
    const int64_t length = lengths_[s];
    if (offset >= length) {
      offset -= length;
      continue;
    }
    const int64_t take = std::min(count, length - offset);
    read_sequence(s, offset, take, out);
    out += take;
    count -= take;
    offset = 0;
  }
}

}  // namespace moeforge
