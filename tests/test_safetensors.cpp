// safetensors: exact round trips, byte-level format, a corpus of broken files, sharding.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "trainer/checkpoint/safetensors.hpp"
#include "trainer/common/user_error.hpp"

namespace fs = std::filesystem;

namespace moeforge::safetensors {
namespace {

fs::path scratch(const std::string& name) {
  const auto dir = fs::temp_directory_path() / ("moeforge-st-" + std::to_string(getpid()));
  fs::create_directories(dir);
  return dir / name;
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A file built by hand: header length, JSON, data.
std::string hand_file(const std::string& json, const std::string& data) {
  return le64(json.size()) + json + data;
}

TEST(Safetensors, RoundTripEveryDtypeExactly) {
  at::manual_seed(1);
  NamedTensors tensors = {
      {"f64", at::randn({3, 2}, at::kDouble)},
      {"f32", at::randn({4, 5})},
      {"f16", at::randn({7}).to(at::kHalf)},
      {"bf16", at::randn({2, 3, 2}).to(at::kBFloat16)},
      {"i64", at::randint(-1000, 1000, {6}, at::kLong)},
      {"i32", at::randint(-1000, 1000, {2, 2}, at::kInt)},
      {"i16", at::randint(-1000, 1000, {3}, at::kShort)},
      {"i8", at::randint(-100, 100, {3}, at::kChar)},
      {"u8", at::randint(0, 255, {5}, at::kByte)},
      {"bool", at::randint(0, 2, {4}, at::kByte).to(at::kBool)},
      {"scalar", at::tensor(3.5)},
      {"empty", at::zeros({0, 4})},
      {"transposed", at::randn({3, 4}).t()},  // non-contiguous input
  };
  const auto path = scratch("all.safetensors");
  save(path.string(), tensors, {{"format", "pt"}});
  const auto file = File::open(path.string());
  EXPECT_EQ(file.metadata().at("format"), "pt");
  EXPECT_EQ(file.tensors().size(), tensors.size());
  for (const auto& [name, tensor] : tensors) {
    const auto loaded = file.load(name);
    EXPECT_EQ(loaded.scalar_type(), tensor.scalar_type()) << name;
    EXPECT_EQ(loaded.sizes(), tensor.sizes()) << name;
    EXPECT_TRUE(at::equal(loaded, tensor.contiguous())) << name;
  }
  EXPECT_TRUE(at::equal(file.load("f16", at::kFloat), tensors[2].second.to(at::kFloat)));
}

TEST(Safetensors, ByteLevelFormatMatchesTheSpecification) {
  // One F32 tensor [2] = {1.0, -2.0}: little-endian 0x3f800000, 0xc0000000.
  const std::string data("\x00\x00\x80\x3f\x00\x00\x00\xc0", 8);
  const std::string json = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  std::string padded = json;
  padded.append((8 - padded.size() % 8) % 8, ' ');
  const auto path = scratch("spec.safetensors");
  save(path.string(), {{"w", at::tensor({1.0f, -2.0f})}});
  std::ifstream in(path, std::ios::binary);
  const std::string written((std::istreambuf_iterator<char>(in)), {});
  EXPECT_EQ(written, hand_file(padded, data));

  // And a hand-built file (unpadded header, metadata first) reads back.
  const auto hand = scratch("hand.safetensors");
  write_bytes(
      hand,
      hand_file(
          R"({"__metadata__":{"a":"b"},"x":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}})",
          std::string("\x80\x3f", 2)));  // bf16 1.0
  const auto file = File::open(hand.string());
  EXPECT_EQ(file.load("x", at::kFloat).item<float>(), 1.0f);
  EXPECT_EQ(file.metadata().at("a"), "b");
}

struct Broken {
  const char* name;
  std::string bytes;
  const char* expected;
};

TEST(Safetensors, BrokenFilesGiveClearErrors) {
  const std::string w4 = R"("w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
  const std::vector<Broken> corpus = {
      {"too_short", "abc", "too short"},
      {"zero_header", le64(0), "header length is 0"},
      {"header_past_eof", le64(1000) + "{}", "runs past the end of the file"},
      {"bad_json", hand_file("{not json", ""), "not valid JSON"},
      {"not_object", hand_file("[1,2]", ""), "not a JSON object"},
      {"entry_not_object", hand_file(R"({"w":3})", ""), "tensor 'w': entry is not an object"},
      {"unknown_dtype", hand_file(R"({"w":{"dtype":"F8","shape":[1],"data_offsets":[0,1]}})", "x"),
       "tensor 'w': unsupported dtype 'F8'"},
      {"negative_shape",
       hand_file(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "xxxx"),
       "tensor 'w': shape"},
      {"reversed_offsets",
       hand_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", "xxxx"),
       "tensor 'w': data_offsets [4, 0] are reversed"},
      {"offsets_past_end", hand_file("{" + w4 + "}", "xx"), "run past the data section"},
      {"byte_count_mismatch",
       hand_file(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})",
                 std::string(20, 'x')),
       "hold 20 bytes but F32 shape [2, 3] needs 24"},
      {"overlap",
       hand_file(
           R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
           std::string(8, 'x')),
       "tensors 'a' and 'b' overlap"},
      {"metadata_not_strings", hand_file(R"({"__metadata__":{"a":1}})", ""),
       "__metadata__ 'a' is not a string"},
      {"offsets_not_numbers",
       hand_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":"0-4"}})", "xxxx"),
       "data_offsets must be two non-negative integers"},
  };
  for (const auto& broken : corpus) {
    const auto path = scratch(std::string(broken.name) + ".safetensors");
    write_bytes(path, broken.bytes);
    try {
      File::open(path.string());
      ADD_FAILURE() << broken.name << " was accepted";
    } catch (const UserError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(path.string()), std::string::npos) << broken.name << ": " << m;
      EXPECT_NE(m.find(broken.expected), std::string::npos) << broken.name << ": " << m;
    }
  }
  // Truncating a valid file anywhere in its data is caught too.
  const auto good = scratch("good.safetensors");
  save(good.string(), {{"w", at::randn({16})}});
  const auto size = fs::file_size(good);
  fs::resize_file(good, size - 3);
  EXPECT_THROW(File::open(good.string()), UserError);
  EXPECT_THROW(File::open(scratch("missing.safetensors").string()), UserError);
}

TEST(Safetensors, ShardedDirectoryRoundTrip) {
  const auto dir = scratch("sharded");
  fs::remove_all(dir);
  NamedTensors tensors;
  for (int i = 0; i < 7; ++i) tensors.emplace_back("layer." + std::to_string(i), at::randn({64}));
  const auto files = save_sharded(dir.string(), tensors, /*max_shard_bytes=*/600);
  EXPECT_GE(files.size(), 3u);
  EXPECT_TRUE(fs::exists(dir / "model.safetensors.index.json"));
  const auto reader = ShardedReader::open(dir.string());
  EXPECT_EQ(reader.names().size(), 7u);
  for (const auto& [name, tensor] : tensors) EXPECT_TRUE(at::equal(reader.load(name), tensor));
  fs::remove(dir / files.back());
  try {
    ShardedReader::open(dir.string());
    FAIL();
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("is missing"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moeforge::safetensors
