#pragma once
// Sparse upcycling: a dense model's weights become the initial weights of a MoE model of the
// same shape (every block that the MoE config makes MoE must be dense in the source).
//
//   copy      every expert = the dense FFN. With softmax top-k and renormalised gates the MoE
//             model computes the same function as the dense one (the gates sum to 1).
//   noise     copy, plus N(0, (noise_std · std(W))²) per element, independently per expert.
//   drop      Drop-Upcycling (Nakamura et al. 2025): per expert, a different random
//             `drop_ratio` of the intermediate channels is re-initialised from N(mean(W), std(W))
//             of the dense matrix (gate/up rows, down columns).
//   granular  Megatron-Core's granular upcycling: g = ffn_size / expert_ffn_size; expert i is
//             chunk (i mod g) of the dense FFN along the intermediate dimension, router rows are
//             replicated in groups of g (expert i uses row ⌊i/g⌋), and gate/up/down are scaled
//             by s^(1/3) with s = g (renormalised gates) or s = E·g/k (un-normalised), so
//             activations keep their scale (exact for linear activations; SiLU makes it
//             approximate).
//   Shared expert (when the MoE config has one and shared_from_dense): the dense FFN; then the
//   shared and the routed down projections are both halved, so copy still computes the dense
//   function exactly.
// The router is N(0, router_std²) (small), the expert bias 0; everything else is copied.
#include <cstdint>
#include <string>

#include "trainer/config/config.hpp"
#include "trainer/model/model_weights.hpp"

namespace moeforge {

struct UpcycleOptions {
  std::string method = "copy";  // copy | noise | drop | granular
  double noise_std = 0.01;      // noise: relative to each matrix's standard deviation
  double drop_ratio = 0.5;      // drop: fraction of intermediate channels re-initialised
  double router_std = 0.02;
  bool shared_from_dense = true;
  uint64_t seed = 1234;
};

// UserError when the configs' shared shapes differ, a block to upcycle is not dense in the
// source, or the method cannot make experts of moe_config's size.
WeightMap upcycle(const Config& dense_config, const WeightMap& dense, const Config& moe_config,
                  const UpcycleOptions& options);

}  // namespace moeforge
