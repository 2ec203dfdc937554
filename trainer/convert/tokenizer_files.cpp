#include "trainer/convert/tokenizer_files.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "trainer/common/file_io.hpp"
#include "trainer/common/user_error.hpp"

namespace fs = std::filesystem;

namespace moeforge {

const std::vector<std::string>& tokenizer_file_names() {
  static const std::vector<std::string> names = {"tokenizer.json",
                                                 "tokenizer_config.json",
                                                 "special_tokens_map.json",
                                                 "generation_config.json",
                                                 "tokenizer.model",
                                                 "vocab.json",
                                                 "merges.txt",
                                                 "added_tokens.json"};
  return names;
}

std::string tokenizer_dir_of(const std::string& path) {
  for (fs::path dir = fs::absolute(path); !dir.empty(); dir = dir.parent_path()) {
    for (const auto& name : tokenizer_file_names())
      if (fs::exists(dir / name)) return dir.string();
    if (fs::exists(dir / "run.json") || fs::exists(dir / "config.yaml") || dir == dir.parent_path())
      break;  // the run directory is as far up as a run's tokenizer can be
  }
  return "";
}

std::string tokenizer_directory(const std::string& file_or_dir, const std::string& label) {
  const fs::path path(file_or_dir);
  if (fs::is_directory(path) && fs::exists(path / "tokenizer.json")) return path.string();
  if (fs::is_regular_file(path) && path.filename() == "tokenizer.json")
    return path.parent_path().string();
  throw UserError(
      fmt::format("{}: '{}' is neither a tokenizer.json file nor a directory holding "
                  "one",
                  label, file_or_dir));
}

int64_t tokenizer_size(const std::string& dir) {
  const auto path = fs::path(dir) / "tokenizer.json";
  if (!fs::exists(path)) return 0;
  const auto json = nlohmann::json::parse(read_file(path.string()), nullptr, false);
  if (!json.is_object()) throw UserError(fmt::format("{}: not valid JSON", path.string()));
  int64_t size = 0;
  const auto& vocab =
      json.contains("model") ? json["model"].value("vocab", nlohmann::json()) : nlohmann::json();
  if (vocab.is_object())  // BPE / WordLevel / WordPiece: token -> id
    for (const auto& [token, id] : vocab.items())
      if (id.is_number_integer()) size = std::max(size, id.get<int64_t>() + 1);
  if (vocab.is_array())
    size = std::max<int64_t>(size, static_cast<int64_t>(vocab.size()));  // Unigram
  for (const auto& added : json.value("added_tokens", nlohmann::json::array()))
    if (added.contains("id") && added["id"].is_number_integer())
      size = std::max(size, added["id"].get<int64_t>() + 1);
  return size;
}

void check_tokenizer_fits(const std::string& dir, int64_t vocab_size) {
  const int64_t size = tokenizer_size(dir);
  if (size > vocab_size)
    throw UserError(fmt::format(
        "{}/tokenizer.json: the tokenizer has {} token ids but the model's embedding has "
        "model.vocab_size = {} rows: ids ≥ {} would be out of range",
        dir, size, vocab_size, vocab_size));
}

void copy_tokenizer(const std::string& from, const std::string& to, int64_t vocab_size) {
  if (from.empty()) return;
  check_tokenizer_fits(from, vocab_size);
  fs::create_directories(to);
  for (const auto& name : tokenizer_file_names()) {
    const auto source = fs::path(from) / name;
    if (fs::exists(source))
      write_file_atomically((fs::path(to) / name).string(), read_file(source.string()));
  }
}

}  // namespace moeforge
