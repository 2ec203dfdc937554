#include "trainer/data/blended_dataset.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

#include "trainer/common/hashing.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/data/token_statistics.hpp"

namespace moeforge {
namespace {

// Fisher–Yates with splitmix64: the same permutation on every platform.
void shuffle(std::vector<int64_t>& values, uint64_t seed) {
  uint64_t state = seed;
  for (int64_t i = static_cast<int64_t>(values.size()) - 1; i > 0; --i) {
    state = splitmix64(state);
    std::swap(values[i], values[state % static_cast<uint64_t>(i + 1)]);
  }
}

std::vector<int64_t> prefix_sums(const IndexedDataset& data, const std::vector<int64_t>& docs) {
  std::vector<int64_t> starts(docs.size() + 1, 0);
  for (size_t i = 0; i < docs.size(); ++i)
    starts[i + 1] = starts[i] + data.document_length(docs[i]);
  return starts;
}

}  // namespace

DocumentSamples::DocumentSamples(std::shared_ptr<const IndexedDataset> data, double val_fraction,
                                 int64_t seq_len, uint64_t salt)
    : data_(std::move(data)), seq_len_(seq_len), salt_(salt) {
  const int64_t documents = data_->num_documents();
  const auto val_documents =
      static_cast<int64_t>(std::ceil(static_cast<double>(documents) * val_fraction));
  first_val_document_ = documents - std::min(val_documents, documents);
  for (int64_t d = first_val_document_; d < documents; ++d) val_documents_.push_back(d);
  val_starts_ = prefix_sums(*data_, val_documents_);
  val_tokens_ = val_starts_.back();
  train_tokens_ = data_->num_tokens() - val_tokens_;
  const int64_t needed = seq_len + 1;
  if (train_tokens_ < needed || (val_fraction > 0 && val_tokens_ < needed))
    throw UserError(fmt::format(
        "{}: {} documents of {} tokens are too few: one training and one validation sequence of "
        "train.seq_len+1 = {} tokens need that many tokens in the first {} documents (training) "
        "and in the last {} (validation, data.val_fraction = {}); they hold {} and {}",
        data_->prefix(), documents, data_->num_tokens(), needed, first_val_document_,
        val_documents_.size(), val_fraction, train_tokens_, val_tokens_));
}

const DocumentSamples::Epoch& DocumentSamples::epoch(int64_t number, int64_t seed) const {
  if (cached_.number == number && cached_.seed == seed) return cached_;
  cached_.number = number;
  cached_.seed = seed;
  cached_.documents.resize(static_cast<size_t>(first_val_document_));
  std::iota(cached_.documents.begin(), cached_.documents.end(), int64_t{0});
  const auto seeds = [&](uint64_t what) {
    return mix_seeds({static_cast<uint64_t>(seed), salt_, static_cast<uint64_t>(number), what});
  };
  shuffle(cached_.documents, seeds(1));
  cached_.starts = prefix_sums(*data_, cached_.documents);
  cached_.windows.resize(static_cast<size_t>(train_windows()));
  std::iota(cached_.windows.begin(), cached_.windows.end(), int64_t{0});
  shuffle(cached_.windows, seeds(2));
  return cached_;
}

void DocumentSamples::read_span(const std::vector<int64_t>& documents,
                                const std::vector<int64_t>& starts, int64_t offset, int64_t count,
                                int64_t* out) const {
  // The document holding `offset`: the last start ≤ offset.
  auto i = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), offset) -
                               starts.begin() - 1);
  while (count > 0) {
    const int64_t inside = offset - starts[i];
    const int64_t take = std::min(count, starts[i + 1] - starts[i] - inside);
    if (take > 0) data_->read_document(documents[i], inside, take, out);
    out += take;
    count -= take;
    offset += take;
    ++i;
  }
}

void DocumentSamples::train_window(int64_t index, int64_t seed, int64_t* out) const {
  const int64_t per_epoch = train_windows();
  const auto& e = epoch(index / per_epoch, seed);
  read_span(e.documents, e.starts, e.windows[index % per_epoch] * seq_len_, seq_len_ + 1, out);
}

void DocumentSamples::val_window(int64_t index, int64_t* out) const {
  read_span(val_documents_, val_starts_, (index % val_windows()) * seq_len_, seq_len_ + 1, out);
}

std::vector<std::pair<double, std::string>> parse_blend(const std::string& text) {
  std::istringstream in(text);
  std::vector<std::string> words;
  for (std::string word; in >> word;) words.push_back(word);
  if (words.size() == 1) return {{1.0, words[0]}};
  if (words.empty() || words.size() % 2 != 0)
    throw UserError(fmt::format(
        "data.blend: '{}' must be 'weight prefix weight prefix ...' (Megatron's --data-path)",
        text));
  std::vector<std::pair<double, std::string>> blend;
  for (size_t i = 0; i < words.size(); i += 2) {
    char* end = nullptr;
    const double weight = std::strtod(words[i].c_str(), &end);
    if (end == words[i].c_str() || *end != '\0' || !(weight > 0) || !std::isfinite(weight))
      throw UserError(fmt::format("data.blend: weight '{}' of '{}' must be a positive number",
                                  words[i], words[i + 1]));
    blend.emplace_back(weight, words[i + 1]);
  }
  return blend;
}

BlendedDataset::BlendedDataset(const std::vector<std::pair<double, std::string>>& blend,
                               double val_fraction, int64_t seq_len) {
  double total = 0.0;
  for (const auto& [weight, prefix] : blend) total += weight;
  for (size_t k = 0; k < blend.size(); ++k) {
    auto data = std::make_shared<const IndexedDataset>(IndexedDataset::open(blend[k].second));
    const auto stats = token_statistics(*data);
    if (stats.min_token < 0)
      throw UserError(
          fmt::format("{}: holds negative token id {}", data->prefix(), stats.min_token));
    max_token_ = std::max(max_token_, stats.max_token);
    counts_.push_back(stats.counts);
    parts_.emplace_back(std::move(data), val_fraction, seq_len, k);
    weights_.push_back(blend[k].first / total);
  }
  // Blocks long enough that every dataset gets at least one sample per block.
  const double smallest = *std::min_element(weights_.begin(), weights_.end());
  block_ = std::max<int64_t>(1024, static_cast<int64_t>(std::ceil(2.0 / smallest)));
}

int64_t BlendedDataset::train_tokens() const {
  int64_t total = 0;
  for (const auto& part : parts_) total += part.train_tokens();
  return total;
}

int64_t BlendedDataset::val_tokens() const {
  int64_t total = 0;
  for (const auto& part : parts_) total += part.val_tokens();
  return total;
}

std::vector<int64_t> BlendedDataset::block_start_counts(int64_t block) const {
  // floor(w_k·n) each, the remainder to the largest fractions (ties: lower k).
  const int64_t n = block * block_;
  std::vector<int64_t> counts(weights_.size());
  std::vector<std::pair<double, size_t>> fractions;
  int64_t assigned = 0;
  for (size_t k = 0; k < weights_.size(); ++k) {
    const double exact = weights_[k] * static_cast<double>(n);
    counts[k] = static_cast<int64_t>(std::floor(exact));
    assigned += counts[k];
    fractions.emplace_back(-(exact - std::floor(exact)), k);
  }
  std::sort(fractions.begin(), fractions.end());
  for (int64_t r = 0; r < n - assigned; ++r) ++counts[fractions[r].second];
  return counts;
}

std::pair<size_t, int64_t> BlendedDataset::locate(int64_t index) const {
  const int64_t block = index / block_;
  if (block != cached_block_) {
    auto counts = block_start_counts(block);
    const auto next = block_start_counts(block + 1);
    cached_locations_.clear();
    std::vector<int64_t> taken(weights_.size(), 0);
    for (int64_t i = 0; i < block_; ++i) {
      // The dataset furthest behind its share of this block (ties: lower k).
      size_t best = 0;
      double best_deficit = -1e300;
      for (size_t k = 0; k < weights_.size(); ++k) {
        const int64_t quota = next[k] - counts[k];
        if (taken[k] >= quota) continue;
        const double deficit =
            static_cast<double>(quota) * static_cast<double>(i + 1) / static_cast<double>(block_) -
            static_cast<double>(taken[k]);
        if (deficit > best_deficit) best_deficit = deficit, best = k;
      }
      cached_locations_.emplace_back(best, counts[best] + taken[best]);
      ++taken[best];
    }
    cached_block_ = block;
  }
  return cached_locations_[static_cast<size_t>(index % block_)];
}

void BlendedDataset::train_window(int64_t index, int64_t seed, int64_t* out) const {
  const auto [k, local] = locate(index);
  parts_[k].train_window(local, seed, out);
}

void BlendedDataset::val_window(int64_t index, int64_t* out) const {
  const auto [k, local] = locate(index);
  parts_[k].val_window(local, out);
}

double BlendedDataset::unigram_entropy_nats() const {
  std::vector<double> p;
  for (size_t k = 0; k < counts_.size(); ++k) {
    const double total = std::accumulate(counts_[k].begin(), counts_[k].end(), 0.0);
    if (counts_[k].size() > p.size()) p.resize(counts_[k].size(), 0.0);
    for (size_t id = 0; id < counts_[k].size(); ++id)
      p[id] += weights_[k] * static_cast<double>(counts_[k][id]) / std::max(total, 1.0);
  }
  double entropy = 0.0;
  for (const double q : p)
    if (q > 0) entropy -= q * std::log(q);
  return entropy;
}

}  // namespace moeforge
