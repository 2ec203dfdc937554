#include "trainer/data/data.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <cmath>

#include "trainer/common/file_io.hpp"
#include "trainer/common/hashing.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/data/builtin_corpus.hpp"

namespace moeforge {

// Token bytes: owned (builtin/text, 1 byte per token) or a read-only file mapping (bin).
struct TokenDataset::Storage {
  std::string owned;
  MappedFile mapped;
  const uint8_t* data = nullptr;
  size_t bytes = 0;
  int width = 1;  // bytes per token
  int64_t size() const { return static_cast<int64_t>(bytes / width); }
  int64_t at(int64_t i) const {
    const uint8_t* p = data + i * width;
    switch (width) {
      case 1:
        return p[0];
      case 2:
        return static_cast<int64_t>(p[0]) | (static_cast<int64_t>(p[1]) << 8);
      default:
        return static_cast<int64_t>(p[0]) | (static_cast<int64_t>(p[1]) << 8) |
               (static_cast<int64_t>(p[2]) << 16) | (static_cast<int64_t>(p[3]) << 24);
    }
  }
};

namespace {

// "configs/x.yaml:33: data.path" — where the user set the path, for messages.
std::string data_path_label(const DataConfig& config) {
  return config.path_origin.empty() ? "data.path" : config.path_origin + ": data.path";
}

}  // namespace

TokenDataset TokenDataset::open_blend(const DataConfig& config, int64_t vocab_size,
                                      int64_t seq_len) {
  TokenDataset data;
  data.blend_ = std::make_shared<const BlendedDataset>(
      parse_blend(config.blend.empty() ? config.path : config.blend), config.val_fraction, seq_len);
  // Checked here, once, instead of failing inside the embedding.
  if (data.blend_->max_token() >= vocab_size)
    throw UserError(fmt::format(
        "{}: holds token id {}, but model.vocab_size is {}: the dataset was tokenized for a "
        "larger vocabulary (or another tokenizer); use the model that matches its tokenizer",
        config.blend.empty() ? config.path : "data.blend", data.blend_->max_token(), vocab_size));
  data.vocab_size_ = vocab_size;
  data.seq_len_ = seq_len;
  data.train_tokens_ = data.blend_->train_tokens();
  data.val_tokens_ = data.blend_->val_tokens();
  return data;
}

TokenDataset TokenDataset::open(const DataConfig& config, int64_t vocab_size, int64_t seq_len) {
  if (config.source == DataSource::kMegatron) return open_blend(config, vocab_size, seq_len);
  auto storage = std::make_shared<Storage>();
  std::string what;  // names the data in messages
  switch (config.source) {
    case DataSource::kBuiltin:
      storage->owned = generate_builtin_corpus(config.builtin_bytes, 0x5eed);
      what = "built-in corpus";
      break;
    case DataSource::kText:
      what = fmt::format("data.path '{}'", config.path);
      storage->owned = read_file(config.path, data_path_label(config));
      break;
    case DataSource::kMegatron:  // open_blend
      break;
    case DataSource::kBin:
      what = fmt::format("data.path '{}'", config.path);
      storage->width = config.dtype == TokenWidth::kUint32 ? 4 : 2;
      storage->mapped = MappedFile::open(config.path, data_path_label(config));
      if (storage->mapped.size() % storage->width != 0)
        throw UserError(fmt::format(
            "{}: {} bytes is not a whole number of {} tokens ({} bytes each); is data.dtype "
            "right?",
            what, storage->mapped.size(), enum_text(config.dtype), storage->width));
      break;
  }
  const bool mapped = config.source == DataSource::kBin;
  storage->data =
      mapped ? storage->mapped.data() : reinterpret_cast<const uint8_t*>(storage->owned.data());
  storage->bytes = mapped ? storage->mapped.size() : storage->owned.size();
  const int64_t total = storage->size();
  if (total == 0) throw UserError(fmt::format("{}: holds no tokens", what));

  // Every token id must fit the model's vocabulary (one linear pass).
  for (int64_t i = 0; i < total; ++i) {
    const int64_t t = storage->at(i);
    if (t >= vocab_size)
      throw UserError(
          fmt::format("{}: token {} at position {} is outside the vocabulary "
                      "(model.vocab_size = {})",
                      what, t, i, vocab_size));
  }

  TokenDataset data;
  data.storage_ = storage;
  data.vocab_size_ = vocab_size;
  data.seq_len_ = seq_len;
  data.val_tokens_ =
      static_cast<int64_t>(std::floor(static_cast<double>(total) * config.val_fraction));
  data.train_tokens_ = total - data.val_tokens_;
  const int64_t needed = seq_len + 1;
  if (data.train_tokens_ < needed || data.val_tokens_ < needed) {
    throw UserError(fmt::format(
        "{}: {} tokens are too few: one training and one validation sequence of train.seq_len+1 "
        "= {} tokens need at least {} training and {} validation tokens (data.val_fraction = "
        "{}), got {} and {}",
        what, total, needed, needed, needed, config.val_fraction, data.train_tokens_,
        data.val_tokens_));
  }
  return data;
}

int64_t TokenDataset::train_windows() const {
  return (train_tokens_ - 1) / seq_len_;
}
int64_t TokenDataset::val_windows() const {
  return (val_tokens_ - 1) / seq_len_;
}

int64_t TokenDataset::token(int64_t index) const {
  return storage_->at(index);
}

at::Tensor TokenDataset::window(int64_t start) const {
  auto out = at::empty({seq_len_ + 1}, at::kLong);
  auto* p = out.data_ptr<int64_t>();
  for (int64_t i = 0; i <= seq_len_; ++i) p[i] = token(start + i);
  return out;
}

const std::vector<int64_t>& TokenDataset::epoch_order(int64_t epoch, int64_t seed) const {
  if (epoch == cached_epoch_ && seed == cached_seed_) return cached_order_;
  const int64_t n = train_windows();
  cached_order_.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) cached_order_[i] = i;
  // Fisher–Yates with our own generator: identical on every platform.
  uint64_t state =
      splitmix64(static_cast<uint64_t>(seed) ^ splitmix64(static_cast<uint64_t>(epoch) + 1));
  for (int64_t i = n - 1; i > 0; --i) {
    state = splitmix64(state);
    const auto j = static_cast<int64_t>(state % static_cast<uint64_t>(i + 1));
    std::swap(cached_order_[i], cached_order_[j]);
  }
  cached_epoch_ = epoch;
  cached_seed_ = seed;
  return cached_order_;
}

at::Tensor TokenDataset::train_samples(int64_t first, int64_t count, int64_t seed) const {
  auto out = at::empty({count, seq_len_ + 1}, at::kLong);
  if (blend_) {
    for (int64_t r = 0; r < count; ++r)
      blend_->train_window(first + r, seed, out[r].data_ptr<int64_t>());
    return out;
  }
  const int64_t per_epoch = train_windows();
  for (int64_t r = 0; r < count; ++r) {
    const int64_t index = first + r;
    const auto& order = epoch_order(index / per_epoch, seed);
    out[r].copy_(window(order[index % per_epoch] * seq_len_));
  }
  return out;
}

at::Tensor TokenDataset::val_samples(int64_t first, int64_t count) const {
  auto out = at::empty({count, seq_len_ + 1}, at::kLong);
  if (blend_) {
    for (int64_t r = 0; r < count; ++r) blend_->val_window(first + r, out[r].data_ptr<int64_t>());
    return out;
  }
  for (int64_t r = 0; r < count; ++r) {
    const int64_t w = (first + r) % val_windows();
    out[r].copy_(window(train_tokens_ + w * seq_len_));
  }
  return out;
}

double TokenDataset::unigram_entropy_nats() const {
  if (blend_) return blend_->unigram_entropy_nats();
  std::vector<double> counts(static_cast<size_t>(vocab_size_), 0.0);
  for (int64_t i = 0; i < train_tokens_; ++i) counts[static_cast<size_t>(token(i))] += 1.0;
  double entropy = 0.0;
  for (double c : counts) {
    if (c <= 0) continue;
    const double p = c / static_cast<double>(train_tokens_);
    entropy -= p * std::log(p);
  }
  return entropy;
}

at::Tensor next_token_targets(const at::Tensor& samples, int64_t seq_len, const DataConfig& data) {
  auto targets = samples.narrow(1, 1, seq_len);
  if (!data.mask_loss_after_eod) return targets;
  return targets.masked_fill(samples.narrow(1, 0, seq_len) == data.eod_token_id, -100);
}

}  // namespace moeforge
