#pragma once
// Token data: a train/validation split of one token stream, and a deterministic sample order.
//
// Sources (DataConfig.source): `builtin` (generate_builtin_corpus, bytes as tokens), `text`
// (a file's bytes as tokens: byte-level tokenisation, vocab 256), `bin` (a flat little-endian
// uint16/uint32 token file as written by common preprocessing scripts, memory-mapped): the last
// `val_fraction` of the tokens is validation. `megatron`: Megatron indexed datasets, one or a
// weighted blend, packed across documents (data/blended_dataset.hpp). open() validates everything
// up front and throws UserError naming the file and the key (missing file, bad size, token >=
// vocab, too short).
//
// Training samples are non-overlapping windows of seq_len+1 tokens starting at multiples of
// seq_len; each epoch visits them in a fresh permutation seeded by (seed, epoch). Sample i is
// a pure function of (i, seed), so ranks compute their own shard and resume needs only the
// number of samples consumed. Copies share the underlying tokens (cheap).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "trainer/config/config.hpp"
#include "trainer/data/blended_dataset.hpp"

namespace moeforge {

class TokenDataset {
 public:
  static TokenDataset open(const DataConfig& config, int64_t vocab_size, int64_t seq_len);

  int64_t train_tokens() const { return train_tokens_; }
  int64_t val_tokens() const { return val_tokens_; }
  int64_t vocab_size() const { return vocab_size_; }
  int64_t train_windows() const;
  int64_t val_windows() const;

  // [count, seq_len+1] int64: training samples first .. first+count-1.
  at::Tensor train_samples(int64_t first, int64_t count, int64_t seed) const;
  // [count, seq_len+1] int64: validation windows in order, wrapping around.
  at::Tensor val_samples(int64_t first, int64_t count) const;

  // Unigram entropy of the training split in nats (a context-free model's loss).
  double unigram_entropy_nats() const;

 private:
  struct Storage;
  int64_t token(int64_t index) const;  // index into the whole stream
  at::Tensor window(int64_t start) const;
  const std::vector<int64_t>& epoch_order(int64_t epoch, int64_t seed) const;

  static TokenDataset open_blend(const DataConfig& config, int64_t vocab_size, int64_t seq_len);
  std::shared_ptr<const Storage> storage_;
  std::shared_ptr<const BlendedDataset> blend_;  // data.source: megatron
  int64_t vocab_size_ = 0;
  int64_t seq_len_ = 0;
  int64_t train_tokens_ = 0;
  int64_t val_tokens_ = 0;
  // The most recent epoch's permutation (recomputed on demand; not thread-safe).
  mutable int64_t cached_epoch_ = -1;
  mutable int64_t cached_seed_ = 0;
  mutable std::vector<int64_t> cached_order_;
};

// Next-token targets of samples [B, seq_len+1]: tokens 1..seq_len, with -100 (no loss) after
// an end-of-document token when data.mask_loss_after_eod (that token starts another document,
// not predictable from the context).
at::Tensor next_token_targets(const at::Tensor& samples, int64_t seq_len, const DataConfig& data);

}  // namespace moeforge
