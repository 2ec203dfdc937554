// Data: the built-in corpus, text/bin loading, window order and errors.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "trainer/common/user_error.hpp"
#include "trainer/data/builtin_corpus.hpp"
#include "trainer/data/data.hpp"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

fs::path scratch(const std::string& name) {
  const auto dir = fs::temp_directory_path() / ("moeforge-data-" + std::to_string(getpid()));
  fs::create_directories(dir);
  return dir / name;
}

// H(X_t | X_{t-2}, X_{t-1}) in nats, from counts.
double conditional_entropy_order2(const std::string& text) {
  std::map<std::string, std::map<char, double>> counts;
  for (size_t i = 2; i < text.size(); ++i) counts[text.substr(i - 2, 2)][text[i]] += 1;
  double entropy = 0, total = static_cast<double>(text.size() - 2);
  for (const auto& [context, next] : counts) {
    double n = 0;
    for (const auto& item : next) n += item.second;
    for (const auto& item : next) entropy -= item.second / total * std::log(item.second / n);
  }
  return entropy;
}

double unigram_entropy(const std::string& text) {
  std::map<char, double> counts;
  for (char c : text) counts[c] += 1;
  double entropy = 0;
  for (const auto& item : counts) {
    const double p = item.second / static_cast<double>(text.size());
    entropy -= p * std::log(p);
  }
  return entropy;
}

TEST(BuiltinCorpus, DeterministicAsciiAndLearnable) {
  const auto a = generate_builtin_corpus(200000, 7);
  EXPECT_EQ(a, generate_builtin_corpus(200000, 7));
  EXPECT_NE(a, generate_builtin_corpus(200000, 8));
  EXPECT_EQ(a.size(), 200000u);
  for (char c : a) EXPECT_TRUE((c >= 32 && c < 127) || c == '\n');
  const double h1 = unigram_entropy(a), h3 = conditional_entropy_order2(a);
  EXPECT_LT(h3, h1 - 1.5) << "unigram " << h1 << " vs order-2 " << h3;
}

Config text_config(const fs::path& path) {
  Config c;
  c.data.source = DataSource::kText;
  c.data.path = path.string();
  c.data.val_fraction = 0.25;
  return c;
}

TEST(TokenDataset, TextFileBytesAreTokensWithTailValidation) {
  const auto path = scratch("small.txt");
  std::string text;
  for (int i = 0; i < 100; ++i) text += static_cast<char>('a' + i % 26);
  std::ofstream(path) << text;
  const auto data = TokenDataset::open(text_config(path).data, 256, 4);
  EXPECT_EQ(data.train_tokens(), 75);
  EXPECT_EQ(data.val_tokens(), 25);
  const auto val = data.val_samples(0, 2);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(val[0][i].item<int64_t>(), text[75 + i]);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(val[1][i].item<int64_t>(), text[79 + i]);
  // Hand-computed unigram entropy of the training split.
  EXPECT_NEAR(data.unigram_entropy_nats(), unigram_entropy(text.substr(0, 75)), 1e-12);
}

TEST(TokenDataset, WindowsArePermutedPerEpochAndSliceable) {
  const auto path = scratch("windows.txt");
  std::string text;
  for (int i = 0; i < 400; ++i) text += static_cast<char>(32 + (i * 7) % 90);
  std::ofstream(path) << text;
  auto c = text_config(path);
  c.data.val_fraction = 0.1;
  const int64_t seq = 8;
  const auto data = TokenDataset::open(c.data, 256, seq);
  const int64_t windows = data.train_windows();
  EXPECT_EQ(windows, (360 - 1) / seq);
  const auto epoch0 = data.train_samples(0, windows, 3);
  std::set<int64_t> starts;
  for (int64_t r = 0; r < windows; ++r) {
    // Each row is a slice of the raw stream at a multiple of seq_len.
    int64_t found = -1;
    for (int64_t w = 0; w < windows && found < 0; ++w) {
      bool same = true;
      for (int64_t i = 0; i <= seq && same; ++i)
        same = epoch0[r][i].item<int64_t>() == text[w * seq + i];
      if (same) found = w;
    }
    ASSERT_GE(found, 0) << "row " << r;
    starts.insert(found);
  }
  EXPECT_EQ(static_cast<int64_t>(starts.size()), windows) << "an epoch visits every window once";
  // Pure function of (first, count, seed): slices agree; another seed gives another order.
  EXPECT_TRUE(at::equal(data.train_samples(5, 10, 3), epoch0.narrow(0, 5, 10)));
  EXPECT_FALSE(at::equal(data.train_samples(0, windows, 4), epoch0));
  EXPECT_FALSE(at::equal(data.train_samples(windows, windows, 3), epoch0));  // epoch 1 differs
}

TEST(TokenDataset, BinFilesLittleEndian) {
  for (const std::string dtype : {"uint16", "uint32"}) {
    const auto path = scratch("tokens_" + dtype + ".bin");
    const int width = dtype == "uint16" ? 2 : 4;
    std::string bytes;
    for (int i = 0; i < 200; ++i) {
      const uint32_t token = static_cast<uint32_t>(i * 301 % 1000);
      for (int b = 0; b < width; ++b) bytes += static_cast<char>((token >> (8 * b)) & 0xff);
    }
    std::ofstream(path, std::ios::binary) << bytes;
    Config c;
    c.data.source = DataSource::kBin;
    c.data.path = path.string();
    c.data.dtype = *enum_from_text<TokenWidth>(dtype);
    c.data.val_fraction = 0.5;
    const auto data = TokenDataset::open(c.data, 1000, 4);
    const auto val = data.val_samples(0, 1);
    for (int i = 0; i < 5; ++i)
      EXPECT_EQ(val[0][i].item<int64_t>(), (100 + i) * 301 % 1000) << dtype;
  }
}

std::string open_error(const DataConfig& config, int64_t vocab, int64_t seq) {
  try {
    TokenDataset::open(config, vocab, seq);
  } catch (const UserError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(TokenDataset, ClearErrors) {
  DataConfig c;
  c.source = DataSource::kText;
  c.path = "/nonexistent/corpus.txt";
  EXPECT_NE(open_error(c, 256, 4).find("data.path: cannot open '/nonexistent/corpus.txt'"),
            std::string::npos);

  const auto empty = scratch("empty.txt");
  std::ofstream(empty).close();
  c.path = empty.string();
  EXPECT_NE(open_error(c, 256, 4).find("holds no tokens"), std::string::npos);

  const auto odd = scratch("odd.bin");
  std::ofstream(odd, std::ios::binary) << "abcdef";
  c.source = DataSource::kBin;
  c.path = odd.string();
  c.dtype = TokenWidth::kUint32;
  const auto m = open_error(c, 1000, 1);
  EXPECT_NE(m.find("6 bytes is not a whole number of uint32 tokens"), std::string::npos) << m;

  const auto big = scratch("big.bin");
  std::ofstream(big, std::ios::binary)
      << std::string("\x01\x00\xff\x7f", 4) << std::string(60, '\0');
  c.path = big.string();
  c.dtype = TokenWidth::kUint16;
  const auto v = open_error(c, 1000, 1);
  EXPECT_NE(v.find("token 32767 at position 1 is outside the vocabulary (model.vocab_size = 1000)"),
            std::string::npos)
      << v;

  const auto tiny = scratch("tiny.txt");
  std::ofstream(tiny) << "hello world";
  c.source = DataSource::kText;
  c.path = tiny.string();
  const auto t = open_error(c, 256, 64);
  EXPECT_NE(t.find("too few"), std::string::npos) << t;
}

}  // namespace
}  // namespace moeforge
