#include "trainer/inference/text_codec.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "trainer/common/file_io.hpp"
#include "trainer/common/shell_command.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/convert/tokenizer_files.hpp"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

class ByteCodec final : public TextCodec {
 public:
  std::vector<int64_t> encode(const std::string& text) const override {
    std::vector<int64_t> ids;
    for (const unsigned char byte : text) ids.push_back(byte);
    return ids;
  }
  std::string decode(const std::vector<int64_t>& ids) const override {
    std::string text;
    for (const auto id : ids) text.push_back(static_cast<char>(id < 256 ? id : '?'));
    return text;
  }
  bool streams() const override { return true; }
  std::string describe() const override { return "bytes (UTF-8, one token per byte)"; }
};

// encode: text file -> ids, one per line; decode: ids -> text. Run by the `tokenizers` library.
constexpr const char* kBridge = R"(import sys
from tokenizers import Tokenizer
mode, tokenizer, source, target = sys.argv[1:5]
tok = Tokenizer.from_file(tokenizer)
if mode == "encode":
    text = open(source, encoding="utf-8").read()
    ids = tok.encode(text, add_special_tokens=False).ids
    open(target, "w").write("\n".join(map(str, ids)))
else:
    ids = [int(line) for line in open(source) if line.strip()]
    open(target, "w", encoding="utf-8").write(tok.decode(ids, skip_special_tokens=False))
)";

std::string shell_quote(const std::string& text) {
  std::string quoted = "'";
  for (const char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

class HfTokenizerCodec final : public TextCodec {
 public:
  explicit HfTokenizerCodec(std::string file) : file_(std::move(file)) {}

  std::vector<int64_t> encode(const std::string& text) const override {
    std::vector<int64_t> ids;
    std::istringstream lines(run("encode", text));
    for (std::string line; std::getline(lines, line);)
      if (!line.empty()) ids.push_back(std::stoll(line));
    return ids;
  }
  std::string decode(const std::vector<int64_t>& ids) const override {
    std::string lines;
    for (const auto id : ids) lines += std::to_string(id) + "\n";
    return run("decode", lines);
  }
  bool streams() const override { return false; }  // merges can rewrite the tail
  std::string describe() const override { return "tokenizer " + file_; }

 private:
  std::string run(const std::string& mode, const std::string& input) const {
    const auto dir = fs::temp_directory_path() / fmt::format("moeforge-codec-{}", ::getpid());
    fs::create_directories(dir);
    const auto in = (dir / "in").string(), out = (dir / "out").string();
    std::ofstream(in, std::ios::binary) << input;
    const auto command =
        fmt::format("{} -c {} {} {} {} {}", shell_quote(project_python()), shell_quote(kBridge),
                    mode, shell_quote(file_), shell_quote(in), shell_quote(out));
    const int status = run_shell_command(command);
    std::string result = status == 0 && fs::exists(out) ? read_file(out) : "";
    fs::remove_all(dir);
    if (status != 0)
      throw UserError(fmt::format(
          "{}: the tokenizer could not {} (it runs in Python's `tokenizers` library: {} must "
          "have it; set MOEFORGE_PYTHON to another interpreter, or run launch/setup.sh)",
          file_, mode, project_python()));
    return result;
  }
  std::string file_;
};

std::string tokenizer_file(const std::string& model_path, const std::string& tokenizer) {
  const std::string where = tokenizer.empty() ? tokenizer_dir_of(model_path) : tokenizer;
  if (where.empty()) return "";
  const auto file = fs::is_directory(where) ? fs::path(where) / "tokenizer.json" : fs::path(where);
  if (fs::exists(file)) return file.string();
  if (!tokenizer.empty())
    throw UserError(fmt::format("--tokenizer {}: no tokenizer.json there", tokenizer));
  return "";  // only legacy files (tokenizer.model): not readable here, fall back to bytes
}

}  // namespace

std::string project_python() {
  if (const char* python = std::getenv("MOEFORGE_PYTHON"); python && *python) return python;
  std::error_code error;
  const auto exe = fs::read_symlink("/proc/self/exe", error);
  if (!error) {
    const auto venv = exe.parent_path().parent_path() / ".venv" / "bin" / "python";
    if (fs::exists(venv)) return venv.string();
  }
  return "python3";
}

std::unique_ptr<TextCodec> make_text_codec(const std::string& model_path,
                                           const std::string& tokenizer, int64_t vocab_size) {
  if (const auto file = tokenizer_file(model_path, tokenizer); !file.empty()) {
    check_tokenizer_fits(fs::path(file).parent_path().string(), vocab_size);
    return std::make_unique<HfTokenizerCodec>(file);
  }
  require(vocab_size >= 256,
          fmt::format("{}: no tokenizer comes with this model and its vocabulary ({} ids) cannot "
                      "hold bytes; give one with --tokenizer DIR",
                      model_path, vocab_size));
  return std::make_unique<ByteCodec>();
}

}  // namespace moeforge
