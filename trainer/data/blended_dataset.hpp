#pragma once
// Training samples from Megatron indexed datasets, blended by weight.
//
// One dataset (DocumentSamples), as Megatron's GPT dataset packs them: the first
// 1 - val_fraction of the documents train, the rest validate. Each epoch the training documents
// are put in a fresh order (seeded by seed, dataset, epoch), concatenated, and cut into windows
// of seq_len+1 tokens at multiples of seq_len — windows cross document boundaries — and the
// windows are visited in a fresh order too. Validation windows: the validation documents in
// file order, in order.
//
// A blend (BlendedDataset) of K datasets with normalised weights w_k: global sample i belongs to
// dataset k by a deterministic interleaving in blocks of B samples: after b blocks dataset k
// has had floor(w_k·b·B) samples (plus at most one, the remainder handed out by largest
// fraction), and inside a block the samples go to whichever dataset is furthest behind its
// share. So the proportions are exact to ±1 per block, and sample i is a function of
// (i, seed) alone: every rank computes its own shard, resume needs only the samples consumed.
// (Megatron's exact order is not reproduced; its proportions and its packing are.)
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "trainer/data/indexed_dataset.hpp"

namespace moeforge {

class DocumentSamples {
 public:
  DocumentSamples(std::shared_ptr<const IndexedDataset> data, double val_fraction, int64_t seq_len,
                  uint64_t salt);

  int64_t train_windows() const { return (train_tokens_ - 1) / seq_len_; }
  int64_t val_windows() const { return (val_tokens_ - 1) / seq_len_; }
  int64_t train_tokens() const { return train_tokens_; }
  int64_t val_tokens() const { return val_tokens_; }
  const IndexedDataset& data() const { return *data_; }

  // seq_len+1 tokens into `out`: training window `index` (over all epochs) / validation window.
  void train_window(int64_t index, int64_t seed, int64_t* out) const;
  void val_window(int64_t index, int64_t* out) const;

 private:
  struct Epoch {
    int64_t number = -1, seed = 0;
    std::vector<int64_t> documents;  // training documents in this epoch's order
    std::vector<int64_t> starts;     // token offset of each in the concatenation (+ total)
    std::vector<int64_t> windows;    // window visiting order
  };
  const Epoch& epoch(int64_t number, int64_t seed) const;
  // `count` tokens from `offset` of the concatenation of `documents` (starts = prefix sums).
  void read_span(const std::vector<int64_t>& documents, const std::vector<int64_t>& starts,
                 int64_t offset, int64_t count, int64_t* out) const;

  std::shared_ptr<const IndexedDataset> data_;
  int64_t seq_len_;
  uint64_t salt_;
  int64_t first_val_document_ = 0;
  int64_t train_tokens_ = 0, val_tokens_ = 0;
  std::vector<int64_t> val_documents_, val_starts_;
  mutable Epoch cached_;  // the most recent epoch (not thread-safe)
};

class BlendedDataset {
 public:
  // (weight, dataset prefix) pairs; weights > 0, normalised here.
  BlendedDataset(const std::vector<std::pair<double, std::string>>& blend, double val_fraction,
                 int64_t seq_len);

  int64_t train_tokens() const;
  int64_t val_tokens() const;
  const std::vector<double>& weights() const { return weights_; }
  const std::vector<DocumentSamples>& parts() const { return parts_; }
  // Which dataset global sample i comes from, and its index within that dataset's samples.
  std::pair<size_t, int64_t> locate(int64_t index) const;
  void train_window(int64_t index, int64_t seed, int64_t* out) const;
  void val_window(int64_t index, int64_t* out) const;
  // Largest token id in any of the datasets (scanned once, cached beside each dataset).
  int64_t max_token() const { return max_token_; }
  // Entropy (nats) of the blend's unigram distribution Σ w_k p_k, from the cached counts.
  double unigram_entropy_nats() const;

 private:
  std::vector<int64_t> block_start_counts(int64_t block) const;
  std::vector<DocumentSamples> parts_;
  std::vector<double> weights_;
  std::vector<std::vector<int64_t>> counts_;  // token counts of each dataset
  int64_t block_ = 1024;
  int64_t max_token_ = -1;
  mutable int64_t cached_block_ = -1;
  mutable std::vector<std::pair<size_t, int64_t>> cached_locations_;
};

// "0.7 corpus_a 0.3 corpus_b" (Megatron's --data-path syntax) or a single prefix -> pairs.
// UserError naming data.blend on a weight that is not a positive number or a missing prefix.
std::vector<std::pair<double, std::string>> parse_blend(const std::string& text);

}  // namespace moeforge
