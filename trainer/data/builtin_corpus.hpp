#pragma once
// The built-in training corpus: generated English-like ASCII text, so the demo needs no
// download. It has structure at several scales for a byte-level model to learn — spelling,
// subject/verb agreement, a fixed table of facts, arithmetic, counting, recurring verses — so
// the loss falls well below the unigram entropy. Deterministic: the same (num_bytes, seed) give
// the same bytes on every machine (own PRNG, no std:: distributions).
#include <cstdint>
#include <string>

namespace moeforge {

std::string generate_builtin_corpus(int64_t num_bytes, uint64_t seed);

}  // namespace moeforge
