#include "trainer/checkpoint/safetensors.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "trainer/common/user_error.hpp"

namespace fs = std::filesystem;

namespace moeforge::safetensors {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the reference implementation's limit

const std::vector<std::pair<std::string, c10::ScalarType>>& dtype_names() {
  static const std::vector<std::pair<std::string, c10::ScalarType>> names = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
      {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},    {"BOOL", at::kBool}};
  return names;
}

std::string dtype_name(c10::ScalarType type) {
  for (const auto& [name, t] : dtype_names())
    if (t == type) return name;
  throw UserError(
      fmt::format("safetensors: dtype {} has no safetensors name", c10::toString(type)));
}

bool parse_dtype(const std::string& name, c10::ScalarType* type) {
  for (const auto& [n, t] : dtype_names()) {
    if (n == name) {
      *type = t;
      return true;
    }
  }
  return false;
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// A file descriptor closed on scope exit, with checked full writes.
}  // namespace

void save(const std::string& path, const NamedTensors& tensors,
          const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> contiguous;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    auto t = tensor.detach().to(at::kCPU).contiguous();
    const uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[name] = {{"dtype", dtype_name(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    contiguous.push_back(std::move(t));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data section 8-byte aligned
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<uint8_t>((text.size() >> (8 * i)) & 0xff);
  DurableWriter out(path);
  out.write(length, 8);
  out.write(text.data(), text.size());
  for (const auto& t : contiguous) {
    if (t.numel() > 0) out.write(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size());
  }
  out.commit();
}

namespace {

// The JSON header of a file of `file_size` bytes; sets *data_start to the data section.
nlohmann::json read_header_json(const uint8_t* data, uint64_t file_size, const std::string& source,
                                uint64_t* data_start) {
  if (file_size < 8)
    throw UserError(
        fmt::format("{}: {} bytes is too short for a safetensors file (needs an 8-byte "
                    "header length)",
                    source, file_size));
  const uint64_t header_bytes = read_u64_le(data);
  if (header_bytes == 0) throw UserError(fmt::format("{}: header length is 0", source));
  if (header_bytes > kMaxHeaderBytes || header_bytes > file_size - 8)
    throw UserError(fmt::format("{}: header length {} runs past the end of the file ({} bytes)",
                                source, header_bytes, file_size));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(data + 8, data + 8 + header_bytes);
  } catch (const nlohmann::json::exception& e) {
    throw UserError(fmt::format("{}: header is not valid JSON: {}", source, e.what()));
  }
  if (!header.is_object()) throw UserError(fmt::format("{}: header is not a JSON object", source));
  *data_start = 8 + header_bytes;
  return header;
}

void read_metadata_entry(const nlohmann::json& entry, const std::string& source,
                         std::map<std::string, std::string>* metadata) {
  if (!entry.is_object())
    throw UserError(fmt::format("{}: __metadata__ must be a map of strings", source));
  for (const auto& [key, value] : entry.items()) {
    if (!value.is_string())
      throw UserError(fmt::format("{}: __metadata__ '{}' is not a string", source, key));
    if (metadata) (*metadata)[key] = value.get<std::string>();
  }
}

// Shape of a header entry; the element count goes to *numel. `fail` makes the error.
template <class Fail>
std::vector<int64_t> read_shape(const nlohmann::json& entry, uint64_t* numel, const Fail& fail) {
  if (!entry.contains("shape") || !entry["shape"].is_array()) throw fail("missing shape");
  std::vector<int64_t> shape;
  *numel = 1;
  for (const auto& dim : entry["shape"]) {
    if (!dim.is_number_integer() || dim.get<int64_t>() < 0)
      throw fail(fmt::format("shape {} must hold non-negative integers", entry["shape"].dump()));
    const auto d = dim.get<uint64_t>();
    if (d != 0 && *numel > (1ull << 62) / d) throw fail("shape is absurdly large");
    *numel *= d;
    shape.push_back(static_cast<int64_t>(d));
  }
  return shape;
}

// One tensor's header entry, checked against the data section of `data_bytes` bytes.
TensorInfo read_tensor_entry(const std::string& name, const nlohmann::json& entry,
                             const std::string& source, uint64_t data_bytes) {
  const auto fail = [&source, &name](const std::string& what) {
    return UserError(fmt::format("{}: tensor '{}': {}", source, name, what));
  };
  if (!entry.is_object()) throw fail("entry is not an object");
  if (!entry.contains("dtype") || !entry["dtype"].is_string()) throw fail("missing dtype");
  TensorInfo info;
  info.name = name;
  const auto dtype = entry["dtype"].get<std::string>();
  if (!parse_dtype(dtype, &info.dtype))
    throw fail(
        fmt::format("unsupported dtype '{}' (F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)", dtype));
  uint64_t numel = 1;
  info.shape = read_shape(entry, &numel, fail);
  const auto& offsets = entry.contains("data_offsets") ? entry["data_offsets"] : nlohmann::json();
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned())
    throw fail("data_offsets must be two non-negative integers");
  info.begin = offsets[0].get<uint64_t>();
  info.end = offsets[1].get<uint64_t>();
  if (info.begin > info.end)
    throw fail(fmt::format("data_offsets [{}, {}] are reversed", info.begin, info.end));
  if (info.end > data_bytes)
    throw fail(
        fmt::format("data_offsets [{}, {}] run past the data section ({} bytes; the file "
                    "may be truncated)",
                    info.begin, info.end, data_bytes));
  const uint64_t expected = numel * c10::elementSize(info.dtype);
  if (info.end - info.begin != expected)
    throw fail(fmt::format("data_offsets [{}, {}] hold {} bytes but {} shape [{}] needs {}",
                           info.begin, info.end, info.end - info.begin, dtype,
                           fmt::join(info.shape, ", "), expected));
  return info;
}

}  // namespace

std::vector<TensorInfo> parse_header(const uint8_t* data, uint64_t file_size,
                                     const std::string& source, uint64_t* data_start,
                                     std::map<std::string, std::string>* metadata) {
  const auto header = read_header_json(data, file_size, source, data_start);
  const uint64_t data_bytes = file_size - *data_start;
  std::vector<TensorInfo> tensors;
  for (const auto& item : header.items()) {
    if (item.key() == "__metadata__")
      read_metadata_entry(item.value(), source, metadata);
    else
      tensors.push_back(read_tensor_entry(item.key(), item.value(), source, data_bytes));
  }
  std::sort(tensors.begin(), tensors.end(),
            [](const TensorInfo& a, const TensorInfo& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < tensors.size(); ++i) {
    if (tensors[i].begin < tensors[i - 1].end)
      throw UserError(fmt::format("{}: tensors '{}' and '{}' overlap", source, tensors[i - 1].name,
                                  tensors[i].name));
  }
  return tensors;
}

File File::open(const std::string& path) {
  File file;
  file.path_ = path;
  file.mapped_ = MappedFile::open(path);
  uint64_t data_start = 0;
  file.tensors_ =
      parse_header(file.mapped_.data(), file.mapped_.size(), path, &data_start, &file.metadata_);
  file.data_ = file.mapped_.data() + data_start;
  for (size_t i = 0; i < file.tensors_.size(); ++i) file.index_[file.tensors_[i].name] = i;
  return file;
}

const TensorInfo& File::info(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end()) throw UserError(fmt::format("{}: has no tensor '{}'", path_, name));
  return tensors_[it->second];
}

at::Tensor File::load(const std::string& name) const {
  const auto& t = info(name);
  auto out = at::empty(t.shape, at::TensorOptions().dtype(t.dtype));
  if (t.end > t.begin) std::memcpy(out.data_ptr(), data_ + t.begin, t.end - t.begin);
  return out;
}

at::Tensor File::load(const std::string& name, c10::ScalarType as) const {
  return load(name).to(as);
}

std::vector<std::string> save_sharded(const std::string& dir, const NamedTensors& tensors,
                                      uint64_t max_shard_bytes,
                                      const std::map<std::string, std::string>& metadata) {
  fs::create_directories(dir);
  std::vector<NamedTensors> shards(1);
  uint64_t in_shard = 0, total = 0;
  for (const auto& item : tensors) {
    const uint64_t bytes = static_cast<uint64_t>(item.second.numel()) * item.second.element_size();
    if (!shards.back().empty() && in_shard + bytes > max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(item);
    in_shard += bytes;
    total += bytes;
  }
  std::vector<std::string> names;
  if (shards.size() == 1) {
    save((fs::path(dir) / "model.safetensors").string(), shards[0], metadata);
    return {"model.safetensors"};
  }
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    const auto name = fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, shards.size());
    save((fs::path(dir) / name).string(), shards[i], metadata);
    for (const auto& item : shards[i]) weight_map[item.first] = name;
    names.push_back(name);
  }
  nlohmann::ordered_json index = {{"metadata", {{"total_size", total}}},
                                  {"weight_map", weight_map}};
  write_file_atomically((fs::path(dir) / "model.safetensors.index.json").string(),
                        index.dump(2) + "\n");
  return names;
}

ShardedReader ShardedReader::open(const std::string& dir) {
  ShardedReader reader;
  reader.dir_ = dir;
  const auto index_path = fs::path(dir) / "model.safetensors.index.json";
  if (!fs::exists(index_path)) {
    const auto single = fs::path(dir) / "model.safetensors";
    if (!fs::exists(single))
      throw UserError(
          fmt::format("{}: neither model.safetensors nor "
                      "model.safetensors.index.json is there",
                      dir));
    auto file = std::make_shared<File>(File::open(single.string()));
    for (const auto& t : file->tensors()) reader.owner_[t.name] = file;
    reader.files_.push_back(file);
    return reader;
  }
  nlohmann::json index;
  try {
    std::ifstream in(index_path);
    index = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw UserError(fmt::format("{}: not valid JSON: {}", index_path.string(), e.what()));
  }
  if (!index.contains("weight_map") || !index["weight_map"].is_object())
    throw UserError(fmt::format("{}: has no weight_map object", index_path.string()));
  std::map<std::string, std::shared_ptr<File>> by_file;
  for (const auto& [tensor, file_name] : index["weight_map"].items()) {
    if (!file_name.is_string())
      throw UserError(
          fmt::format("{}: weight_map['{}'] is not a file name", index_path.string(), tensor));
    const auto name = file_name.get<std::string>();
    if (!by_file.count(name)) {
      const auto path = fs::path(dir) / name;
      if (!fs::exists(path))
        throw UserError(fmt::format("{}: shard {} (holding '{}') is missing", index_path.string(),
                                    name, tensor));
      by_file[name] = std::make_shared<File>(File::open(path.string()));
      reader.files_.push_back(by_file[name]);
    }
    if (!by_file[name]->contains(tensor))
      throw UserError(fmt::format("{}: the index puts '{}' in {}, which does not hold it",
                                  index_path.string(), tensor, name));
    reader.owner_[tensor] = by_file[name];
  }
  return reader;
}

std::vector<std::string> ShardedReader::names() const {
  std::vector<std::string> names;
  for (const auto& item : owner_) names.push_back(item.first);
  return names;
}

const TensorInfo& ShardedReader::info(const std::string& name) const {
  const auto it = owner_.find(name);
  if (it == owner_.end()) throw UserError(fmt::format("{}: has no tensor '{}'", dir_, name));
  return it->second->info(name);
}

at::Tensor ShardedReader::load(const std::string& name) const {
  info(name);
  return owner_.at(name)->load(name);
}

at::Tensor ShardedReader::load(const std::string& name, c10::ScalarType as) const {
  return load(name).to(as);
}

}  // namespace moeforge::safetensors
