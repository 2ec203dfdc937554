#pragma once
// Deterministic seeds and hashes: the one splitmix64 (Steele, Lea & Flood 2014) and FNV-1a the
// trainer derives every stream from (parameter init, data order, the built-in corpus, router
// jitter, upcycling noise), so each is a function of the config's seed and nothing else.
#include <cstdint>
#include <initializer_list>
#include <string_view>

namespace moeforge {

inline constexpr uint64_t kGoldenGamma = 0x9e3779b97f4a7c15ULL;

inline constexpr uint64_t splitmix64(uint64_t x) {
  x += kGoldenGamma;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

inline constexpr uint64_t fnv1a(std::string_view text) {
  uint64_t hash = 0xcbf29ce484222325ULL;
  for (const unsigned char c : text) hash = (hash ^ c) * 0x100000001b3ULL;
  return hash;
}

// One seed from several values, each folded in through splitmix64.
inline constexpr uint64_t mix_seeds(std::initializer_list<uint64_t> values) {
  uint64_t seed = 0;
  for (const uint64_t v : values) seed = splitmix64(seed ^ splitmix64(v));
  return seed;
}

}  // namespace moeforge
