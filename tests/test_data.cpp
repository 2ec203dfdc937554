// Data: the built-in corpus, text/bin loading, window order and errors.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>

#include "trainer/common/user_error.hpp"
#include "trainer/data/blended_dataset.hpp"
#include "trainer/data/builtin_corpus.hpp"
#include "trainer/data/data.hpp"
#include "trainer/data/indexed_dataset.hpp"

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

namespace moeforge {
namespace {

// A Megatron indexed dataset written field by field (the layout of indexed_dataset.py), with
// hooks to corrupt any part. The reader's agreement with Megatron's own writer is proven by
// tests/data_interop_test.py; here every malformed variant must give one clear error.
struct IndexedFiles {
  std::string magic = std::string("MMIDIDX\0\0", 9);
  uint64_t version = 1;
  uint8_t dtype = 8;  // uint16
  std::vector<std::vector<uint16_t>> documents;
  std::vector<int64_t> pointer_shift;  // added to each pointer (corruption)
  int64_t document_index_end_shift = 0;
  int64_t bin_truncate = 0;  // bytes cut off the .bin
  int64_t idx_truncate = 0;  // bytes cut off the .idx

  std::string write(const std::string& name) const {
    const auto prefix = scratch(name).string();
    std::string bin, idx = magic;
    std::vector<int32_t> lengths;
    std::vector<int64_t> pointers, document_index = {0};
    for (const auto& doc : documents) {
      pointers.push_back(static_cast<int64_t>(bin.size()));
      lengths.push_back(static_cast<int32_t>(doc.size()));
      bin.append(reinterpret_cast<const char*>(doc.data()), doc.size() * 2);
      document_index.push_back(static_cast<int64_t>(lengths.size()));
    }
    for (size_t i = 0; i < pointer_shift.size() && i < pointers.size(); ++i)
      pointers[i] += pointer_shift[i];
    document_index.back() += document_index_end_shift;
    const auto put = [&idx](const void* p, size_t n) {
      idx.append(static_cast<const char*>(p), n);
    };
    const uint64_t sequences = lengths.size(), document_count = document_index.size();
    put(&version, 8);
    put(&dtype, 1);
    put(&sequences, 8);
    put(&document_count, 8);
    put(lengths.data(), lengths.size() * 4);
    put(pointers.data(), pointers.size() * 8);
    put(document_index.data(), document_index.size() * 8);
    std::ofstream(prefix + ".idx", std::ios::binary)
        << idx.substr(0, idx.size() - static_cast<size_t>(idx_truncate));
    std::ofstream(prefix + ".bin", std::ios::binary)
        << bin.substr(0, bin.size() - static_cast<size_t>(bin_truncate));
    return prefix;
  }
};

IndexedFiles three_documents() {
  IndexedFiles files;
  for (uint16_t d = 0; d < 3; ++d) {
    std::vector<uint16_t> doc;
    for (uint16_t t = 0; t < 20 + 5 * d; ++t) doc.push_back(static_cast<uint16_t>(100 * d + t));
    files.documents.push_back(doc);
  }
  return files;
}

std::string open_indexed_error(const IndexedFiles& files, const std::string& name) {
  try {
    IndexedDataset::open(files.write(name));
  } catch (const UserError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(IndexedDataset, ReadsDocumentsAcrossSequences) {
  const auto data = IndexedDataset::open(three_documents().write("good"));
  EXPECT_EQ(data.num_documents(), 3);
  EXPECT_EQ(data.num_tokens(), 20 + 25 + 30);
  std::vector<int64_t> out(10);
  data.read_document(1, 3, 10, out.data());
  for (int64_t i = 0; i < 10; ++i) EXPECT_EQ(out[i], 100 + 3 + i);
}

TEST(IndexedDataset, EveryMalformationIsOneClearError) {
  struct Case {
    const char* name;
    std::function<void(IndexedFiles&)> corrupt;
    const char* expected;
  };
  const std::vector<Case> cases = {
      {"magic", [](IndexedFiles& f) { f.magic[0] = 'X'; }, "does not start with MMIDIDX"},
      {"version", [](IndexedFiles& f) { f.version = 2; }, "index version 2 is not supported"},
      {"dtype", [](IndexedFiles& f) { f.dtype = 9; }, "dtype code 9 (unknown)"},
      {"float", [](IndexedFiles& f) { f.dtype = 7; }, "dtype code 7 (float32) is not a token"},
      {"idx_short", [](IndexedFiles& f) { f.idx_truncate = 12; }, "truncated"},
      {"bin_short", [](IndexedFiles& f) { f.bin_truncate = 4; }, "the .bin is truncated"},
      {"order",
       [](IndexedFiles& f) {
         f.pointer_shift = {0, 2};
       },
       "pointers out of order"},
      {"doc_end", [](IndexedFiles& f) { f.document_index_end_shift = -1; },
       "must start at 0 and end at the sequence count 3"},
      {"empty",
       [](IndexedFiles& f) {
         f.documents = {{}, {}};
       },
       "holds no tokens"},
  };
  for (const auto& c : cases) {
    auto files = three_documents();
    c.corrupt(files);
    const auto message = open_indexed_error(files, std::string("bad_") + c.name);
    EXPECT_NE(message.find(c.expected), std::string::npos) << c.name << ": " << message;
    EXPECT_NE(message.find("bad_"), std::string::npos) << c.name << " names no file: " << message;
  }
}

DataConfig megatron_config(const std::string& blend) {
  DataConfig config;
  config.source = DataSource::kMegatron;
  config.blend = blend;
  config.val_fraction = 0.34;  // 1 of 3 documents
  return config;
}

TEST(IndexedDataset, TrainingSetChecksAndVocabulary) {
  const auto prefix = three_documents().write("vocab");
  auto config = megatron_config("");
  config.path = prefix;
  const auto open_error = [&](const DataConfig& c, int64_t vocab, int64_t seq_len) {
    try {
      TokenDataset::open(c, vocab, seq_len);
    } catch (const UserError& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_NE(open_error(config, 100, 8).find("holds token id 229, but model.vocab_size is 100"),
            std::string::npos);
  EXPECT_NE(open_error(config, 1000, 64).find("are too few"), std::string::npos);
  config.path = "";
  config.blend = "0.5 " + prefix + " -1 " + prefix;
  EXPECT_NE(open_error(config, 1000, 8).find("weight '-1'"), std::string::npos);
  config.blend = "0.5 " + prefix + " 0.5 /nonexistent/corpus";
  EXPECT_NE(open_error(config, 1000, 8).find("/nonexistent/corpus.idx"), std::string::npos);
}

// Packing: windows of seq_len+1 consecutive tokens of the epoch's document order (crossing
// documents), every training window once per epoch, documents reordered between epochs.
TEST(IndexedDataset, PackedWindowsCoverTheTrainingDocumentsEachEpoch) {
  IndexedFiles files;
  for (uint16_t d = 0; d < 12; ++d)
    files.documents.push_back(std::vector<uint16_t>(7 + d, static_cast<uint16_t>(d)));
  auto config = megatron_config("");
  config.path = files.write("packed");
  config.val_fraction = 0.25;  // the last 3 documents validate
  const auto data = TokenDataset::open(config, 64, 8);
  const int64_t windows = data.train_windows();
  const auto epoch0 = data.train_samples(0, windows, 5),
             epoch1 = data.train_samples(windows, windows, 5);
  std::map<int64_t, int64_t> counts;
  for (int64_t w = 0; w < windows; ++w)
    for (int64_t i = 0; i < 8; ++i) ++counts[epoch0[w][i].item<int64_t>()];
  EXPECT_EQ(counts.size(), 9u) << "training documents 0-8 only";
  EXPECT_EQ(counts.count(9) + counts.count(10) + counts.count(11), 0u);
  EXPECT_FALSE(at::equal(epoch0, epoch1)) << "the epoch order did not change";
  EXPECT_TRUE(at::equal(data.val_samples(0, 1)[0].narrow(0, 0, 8), at::full({8}, 9, at::kLong)));
}

// Blends: proportions within one sample per block of the weights; sample i is a function of i
// alone, so ranks taking interleaved indices get disjoint samples covering the global batch.
TEST(IndexedDataset, BlendProportionsAndShards) {
  IndexedFiles a = three_documents(), b = three_documents();
  for (auto& doc : b.documents)
    for (auto& t : doc) t = static_cast<uint16_t>(t + 1000);
  const auto blend = "0.7 " + a.write("blend_a") + " 0.3 " + b.write("blend_b");
  BlendedDataset data(parse_blend(blend), 0.34, 8);
  int64_t from_b = 0;
  const int64_t n = 100000;
  std::set<std::pair<size_t, int64_t>> seen;
  for (int64_t i = 0; i < n; ++i) {
    const auto location = data.locate(i);
    from_b += location.first == 1 ? 1 : 0;
    EXPECT_TRUE(seen.insert(location).second) << "sample " << i << " repeats a location";
  }
  EXPECT_NEAR(static_cast<double>(from_b) / n, 0.3, 2.0 / 1024);
  // Two ranks, micro-batches of 2: rank r takes samples (micro·2 + r)·2 .. +2 of a batch.
  const auto shard = [&](int rank) {
    std::set<std::pair<size_t, int64_t>> s;
    for (int64_t micro = 0; micro < 4; ++micro)
      for (int64_t j = 0; j < 2; ++j) s.insert(data.locate((micro * 2 + rank) * 2 + j));
    return s;
  };
  const auto r0 = shard(0), r1 = shard(1);
  std::set<std::pair<size_t, int64_t>> both(r0.begin(), r0.end());
  both.insert(r1.begin(), r1.end());
  EXPECT_EQ(both.size(), r0.size() + r1.size()) << "the ranks' shards overlap";
  std::set<std::pair<size_t, int64_t>> global;
  for (int64_t i = 0; i < 16; ++i) global.insert(data.locate(i));
  EXPECT_EQ(both, global) << "the shards do not cover the global batch";
}

}  // namespace
}  // namespace moeforge
