#pragma once
// Text <-> token ids for the commands that take or give text (generate, eval, forward).
//
// A model trained on bytes (data.source builtin or text: vocab 256 or more) reads text as its
// UTF-8 bytes. A model that ships a tokenizer (imported or upcycled from Hugging Face, or any
// directory given with --tokenizer) uses that tokenizer through the `tokenizers` library of the
// project's Python environment — the same library that tokenized its data (launch/preprocess.py),
// so ids agree exactly. moeforge has no tokenizer of its own in C++.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moeforge {

class TextCodec {
 public:
  virtual ~TextCodec() = default;
  virtual std::vector<int64_t> encode(const std::string& text) const = 0;
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;
  // Whether decode of a prefix is a prefix of the whole decode (bytes: yes), so generated
  // text can be printed as it comes.
  virtual bool streams() const = 0;
  virtual std::string describe() const = 0;
};

// `tokenizer`: a directory with tokenizer.json or the file itself; empty = the one that comes
// with the model at `model_path` (tokenizer_dir_of), else bytes. UserError when the model's
// vocabulary cannot hold the codec's ids (bytes need vocab_size >= 256).
std::unique_ptr<TextCodec> make_text_codec(const std::string& model_path,
                                           const std::string& tokenizer, int64_t vocab_size);

// The Python interpreter of the project's environment: $MOEFORGE_PYTHON, else the .venv next to
// the build directory holding this binary, else python3 from PATH.
std::string project_python();

}  // namespace moeforge
