#pragma once
// Suggestions for misspelled names (config keys, subcommands): "did you mean ...?".
#include <cstddef>
#include <string>
#include <vector>

namespace moeforge {

// Levenshtein distance: insertions, deletions and substitutions of one character each.
size_t edit_distance(const std::string& a, const std::string& b);

// The candidate closest to `word` when at most max(2, |word| / 3) edits away, else "".
std::string closest_spelling(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace moeforge
