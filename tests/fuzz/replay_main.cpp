// Standalone driver for fuzz targets when libFuzzer is not available (GCC builds, CI): runs the
// target on built-in seeds, on every file of the directories given, and on deterministic
// mutations of all of them (byte flips, truncations, insertions, digit edits).
//   fuzz_safetensors_header [--mutations N] [--seed S] [--write-seeds DIR] [DIR...]
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

std::string file_with(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

// Valid and nearly valid files covering every header feature.
std::vector<std::string> seeds() {
  return {
      file_with(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(8, 'a')),
      file_with(
          R"({"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"b":{"dtype":"I64","shape":[1],"data_offsets":[8,16]}})",
          std::string(16, 'b')),
      file_with(
          R"({"e":{"dtype":"F16","shape":[0,3],"data_offsets":[0,0]},"s":{"dtype":"U8","shape":[],"data_offsets":[0,1]}})",
          "x"),
      file_with(R"({"x":{"dtype":"F64","shape":[1,1,1],"data_offsets":[0,8]}}        )",
                std::string(8, 'c')),
      file_with(
          R"({"o":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"p":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
          std::string(8, 'd')),
  };
}

void run(const std::string& input) {
  LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(input.data()), input.size());
}

std::string mutate(std::string s, std::mt19937_64& rng) {
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int e = 0; e < edits; ++e) {
    const size_t pos = s.empty() ? 0 : rng() % s.size();
    switch (rng() % 6) {
      case 0:  // flip a bit
        if (!s.empty()) s[pos] = static_cast<char>(s[pos] ^ (1 << (rng() % 8)));
        break;
      case 1:  // truncate
        s.resize(pos);
        break;
      case 2:  // insert a byte
        s.insert(pos, 1, static_cast<char>(rng() % 256));
        break;
      case 3:  // change a digit (offsets, shapes, header length)
        for (size_t i = pos; i < s.size(); ++i)
          if (s[i] >= '0' && s[i] <= '9') {
            s[i] = static_cast<char>('0' + rng() % 10);
            break;
          }
        break;
      case 4:  // overwrite the header length with something large or small
        if (s.size() >= 8) {
          const auto v = le64(rng() % 3 == 0 ? rng() : rng() % (s.size() + 16));
          s.replace(0, 8, v);
        }
        break;
      default:  // splice in a JSON fragment
        static const char* fragments[] = {
            "-1", "1e400", "[]", "{}", "\"", "null", "18446744073709551615", ",", "\"F8\""};
        s.insert(pos, fragments[rng() % 9]);
    }
  }
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t mutations = 20000, seed = 1;
  std::vector<std::string> inputs = seeds();
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--mutations" && i + 1 < argc) {
      mutations = std::stoull(argv[++i]);
    } else if (arg == "--seed" && i + 1 < argc) {
      seed = std::stoull(argv[++i]);
    } else if (arg == "--write-seeds" && i + 1 < argc) {
      const std::filesystem::path dir(argv[++i]);
      std::filesystem::create_directories(dir);
      for (size_t s = 0; s < inputs.size(); ++s)
        std::ofstream(dir / ("seed-" + std::to_string(s)), std::ios::binary) << inputs[s];
      return 0;
    } else {
      for (const auto& entry : std::filesystem::directory_iterator(arg)) {
        std::ifstream in(entry.path(), std::ios::binary);
        std::stringstream bytes;
        bytes << in.rdbuf();
        inputs.push_back(bytes.str());
      }
    }
  }
  for (const auto& input : inputs) run(input);
  std::mt19937_64 rng(seed);
  for (uint64_t m = 0; m < mutations; ++m) run(mutate(inputs[rng() % inputs.size()], rng));
  std::cout << "fuzz replay: " << inputs.size() << " inputs and " << mutations
            << " mutations, no contract violation" << std::endl;
  return 0;
}
