#pragma once
// The tokenizer files a Hugging Face model ships. moeforge does not tokenize; it carries them
// along so that a run directory (import, upcycle) and an exported model keep the tokenizer that
// the weights' vocabulary belongs to: AutoTokenizer.from_pretrained(export_dir) works.
#include <cstdint>
#include <string>
#include <vector>

namespace moeforge {

// tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json and
// the legacy vocabulary files (tokenizer.model, vocab.json, merges.txt, added_tokens.json).
const std::vector<std::string>& tokenizer_file_names();

// Where the tokenizer of `path` is: `path` itself, or for a checkpoint inside a run directory
// the run directory above it. Empty when none of them holds a tokenizer file.
std::string tokenizer_dir_of(const std::string& path);

// The directory holding `file_or_dir`'s tokenizer.json (the file itself or a directory with
// one). UserError naming `label` (e.g. the config key) when there is none.
std::string tokenizer_directory(const std::string& file_or_dir, const std::string& label);

// Number of token ids of `dir`/tokenizer.json (vocabulary and added tokens), 0 without one.
int64_t tokenizer_size(const std::string& dir);

// UserError when `dir`'s tokenizer has more token ids than the model's embedding (`vocab_size`):
// its ids would be out of range. Fewer is normal (Hugging Face pads the embedding).
void check_tokenizer_fits(const std::string& dir, int64_t vocab_size);

// Copies the tokenizer files present in `from` into `to` (nothing when `from` is empty).
// UserError when the tokenizer has more token ids than the model's embedding (`vocab_size`):
// its ids would be out of range. Fewer is normal (Hugging Face pads the embedding).
void copy_tokenizer(const std::string& from, const std::string& to, int64_t vocab_size);

}  // namespace moeforge
