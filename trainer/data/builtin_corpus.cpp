#include "trainer/data/builtin_corpus.hpp"

#include <array>
#include <string_view>
#include <vector>

#include "trainer/common/hashing.hpp"

namespace moeforge {
namespace {

class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next() {  // the splitmix64 sequence
    const uint64_t z = splitmix64(state_);
    state_ += kGoldenGamma;
    return z;
  }
  uint64_t below(uint64_t n) { return next() % n; }
  template <typename T, size_t N>
  const T& pick(const std::array<T, N>& items) {
    return items[below(N)];
  }

 private:
  uint64_t state_;
};

using Words = std::string_view;

constexpr std::array<Words, 12> kSingularNouns = {
    "the cat",   "a dog",         "the farmer", "my sister", "the teacher", "a small bird",
    "the river", "our neighbour", "the king",   "a sailor",  "the old man", "the baker"};
constexpr std::array<Words, 10> kPluralNouns = {
    "the cats",  "two dogs",    "the farmers", "my brothers",  "the children",
    "the birds", "the sailors", "many people", "the students", "the bakers"};
constexpr std::array<std::pair<Words, Words>, 10> kVerbs = {{{"walks", "walk"},
                                                             {"sings", "sing"},
                                                             {"reads", "read"},
                                                             {"runs", "run"},
                                                             {"sleeps", "sleep"},
                                                             {"waits", "wait"},
                                                             {"works", "work"},
                                                             {"laughs", "laugh"},
                                                             {"writes", "write"},
                                                             {"listens", "listen"}}};
constexpr std::array<Words, 10> kPlaces = {
    "in the garden", "by the sea",     "at the market",  "near the hill", "in the morning",
    "after dinner",  "under the tree", "at the station", "in the rain",   "before noon"};
constexpr std::array<std::pair<Words, Words>, 12> kCapitals = {{{"France", "Paris"},
                                                                {"Italy", "Rome"},
                                                                {"Spain", "Madrid"},
                                                                {"Japan", "Tokyo"},
                                                                {"Egypt", "Cairo"},
                                                                {"Peru", "Lima"},
                                                                {"Kenya", "Nairobi"},
                                                                {"Norway", "Oslo"},
                                                                {"Chile", "Santiago"},
                                                                {"Canada", "Ottawa"},
                                                                {"India", "New Delhi"},
                                                                {"Greece", "Athens"}}};
constexpr std::array<Words, 8> kNames = {"Alice", "Bob",   "Clara", "David",
                                         "Eva",   "Frank", "Grace", "Henry"};
constexpr std::array<Words, 6> kGreetings = {"Good morning",        "Hello",
                                             "How are you",         "Nice to see you",
                                             "Where are you going", "What time is it"};
constexpr std::array<Words, 6> kReplies = {"I am fine, thank you", "I am going home",
                                           "It is almost noon",    "Very well",
                                           "Hello to you too",     "I am looking for the station"};
constexpr std::array<Words, 4> kVerses = {
    "Twinkle, twinkle, little star, how I wonder what you are.",
    "Row, row, row your boat, gently down the stream.",
    "The rain in Spain stays mainly in the plain.", "An apple a day keeps the doctor away."};
constexpr std::array<Words, 10> kNumberWords = {"zero", "one", "two",   "three", "four",
                                                "five", "six", "seven", "eight", "nine"};

std::string capitalised(Words words) {
  std::string s(words);
  if (!s.empty() && s[0] >= 'a' && s[0] <= 'z') s[0] = static_cast<char>(s[0] - 'a' + 'A');
  return s;
}

// One line of one of several kinds, with fixed proportions.
std::string sentence(Rng& rng) {
  const uint64_t kind = rng.below(100);
  if (kind < 35) {  // agreement: singular subjects take -s verbs, plural ones do not
    const auto& verb = rng.pick(kVerbs);
    if (rng.below(2) == 0)
      return capitalised(rng.pick(kSingularNouns)) + " " + std::string(verb.first) + " " +
             std::string(rng.pick(kPlaces)) + ".";
    return capitalised(rng.pick(kPluralNouns)) + " " + std::string(verb.second) + " " +
           std::string(rng.pick(kPlaces)) + ".";
  }
  if (kind < 50) {  // a fixed table of facts
    const auto& fact = rng.pick(kCapitals);
    return "The capital of " + std::string(fact.first) + " is " + std::string(fact.second) + ".";
  }
  if (kind < 65) {  // arithmetic that is always right
    const uint64_t a = rng.below(50), b = rng.below(50);
    return std::to_string(a) + " + " + std::to_string(b) + " = " + std::to_string(a + b) + ".";
  }
  if (kind < 75) {  // counting
    const uint64_t start = rng.below(6);
    std::string s = "Counting:";
    for (uint64_t i = start; i < start + 4; ++i) {
      s += ' ';  // appended piecewise: GCC 12 warns falsely on " " + std::string(...)
      s += kNumberWords[i];
    }
    return s + ".";
  }
  if (kind < 90) {  // dialogue
    const auto& a = rng.pick(kNames);
    const auto& b = rng.pick(kNames);
    return std::string(a) + ": " + std::string(rng.pick(kGreetings)) + ", " + std::string(b) +
           "?\n" + std::string(b) + ": " + std::string(rng.pick(kReplies)) + ".";
  }
  return std::string(rng.pick(kVerses));
}

}  // namespace

std::string generate_builtin_corpus(int64_t num_bytes, uint64_t seed) {
  Rng rng(seed);
  std::string text;
  text.reserve(static_cast<size_t>(num_bytes) + 256);
  while (static_cast<int64_t>(text.size()) < num_bytes) {
    text += sentence(rng);
    text += '\n';
  }
  text.resize(static_cast<size_t>(num_bytes));
  return text;
}

}  // namespace moeforge
