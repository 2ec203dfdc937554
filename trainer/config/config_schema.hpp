#pragma once
// The config schema: one entry per key (dotted path, type, binding into Config, allowed range
// or values, doc line). The single source for parsing, validation, the resolved-config dump
// and the generated reference (configs/README.md). Defaults are the Config structs' defaults.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "trainer/config/config.hpp"

namespace moeforge {

enum class KeyType { kInt, kFloat, kBool, kString };

struct KeySpec {
  std::string path;  // e.g. "moe.balancing.aux_loss.coeff"
  KeyType type = KeyType::kInt;
  std::string doc;
  // Exactly one binding is set, matching `type`.
  std::function<int64_t&(Config&)> int_field;
  std::function<double&(Config&)> float_field;
  std::function<bool&(Config&)> bool_field;
  // Strings and enums: read and write the key's value as its YAML text.
  std::function<std::string(const Config&)> get_text;
  std::function<void(Config&, const std::string&)> set_text;
  double min = 0, max = 0;           // numeric range, inclusive
  std::vector<std::string> choices;  // allowed strings; empty = any
  // Choices may be combined: a YAML list, or one string of names separated by spaces or
  // commas; set_text receives them space-separated. choices.front() ("none") stands alone.
  bool combinable = false;
  std::string allowed_text() const;  // "an integer in [1, 64]", "one of softmax | sigmoid"
};

const std::vector<KeySpec>& config_schema();

// Section paths ("model", "moe.balancing", ...) in schema order.
const std::vector<std::string>& config_sections();

}  // namespace moeforge
