#pragma once
// Checkpoints (docs/architecture.md, "Checkpoints").
//
// Layout of one checkpoint, `<out_dir>/checkpoints/step-00000100/`:
//   model.safetensors        non-expert parameters and buffers (router expert_bias) — rank 0
//   optimizer.safetensors    AdamW state of those (exp_avg.<name>, exp_avg_sq.<name>) + RNG
//   experts-EEEEE-of-PPPPP.safetensors
//                            one per EP rank of the first EP group: every global expert's
//                            weights and AdamW state under *global* names
//                            (layers.3.mlp.experts.17.w_gate, exp_avg.layers.3...)
//   checkpoint.json          step, samples consumed, resolved config, layout, CRC-32 per file
// It is written to `step-XXXXXXXX.tmp/` and renamed into place only when complete; then
// `checkpoints/latest` (the directory name) is replaced atomically. Because tensors carry
// global names, any ep_size / world size can load any checkpoint (resharding on load).
#include <optional>
#include <string>

#include "parallel/process_groups.hpp"
#include "trainer/model/model.hpp"
#include "trainer/optim/optimizer.hpp"

namespace moeforge {

struct TrainingState {
  int64_t step = 0;              // optimizer steps completed
  int64_t samples_consumed = 0;  // training sequences consumed (global)
};

class CheckpointManager {
 public:
  // `checkpoints_dir` = <out_dir>/checkpoints. Groups are used for the collective save.
  CheckpointManager(std::string checkpoints_dir, const parallel::ProcessGroups& groups);

  // Collective over world. Writes step-<step>, updates latest, keeps the newest `keep`
  // (0 = all). Returns the checkpoint directory.
  std::string save(DecoderLMImpl& model, AdamW& optimizer, const TrainingState& state,
                   const std::string& resolved_config_yaml, int64_t keep);

  // The run whose checkpoints this manager writes and prunes (docs: run_directory.hpp).
  void set_run_id(std::string run_id) { run_id_ = std::move(run_id); }
  // Removes the `.tmp` directories of saves that never completed (rank 0, at start).
  void remove_incomplete() const;

  // `requested` empty or "latest" -> the directory named by checkpoints/latest; otherwise a
  // checkpoint directory (or a run/checkpoints directory holding `latest`). UserError when
  // there is none.
  std::string resolve(const std::string& requested) const;

  // Loads parameters, expert biases, optimizer state and RNG into this rank's shard. Verifies
  // every file's checksum and every tensor's shape; UserError naming file/tensor otherwise.
  TrainingState load(const std::string& checkpoint_dir, DecoderLMImpl& model, AdamW& optimizer);

 private:
  std::string dir_;
  std::string run_id_;
  const parallel::ProcessGroups& groups_;
};

// `requested` empty or "latest" -> the directory named by <checkpoints_dir>/latest; otherwise a
// checkpoint directory, or a run / checkpoints directory holding `latest`. UserError naming
// `purpose` ("resume from", "initialise from") when there is none.
std::string resolve_checkpoint(const std::string& checkpoints_dir, const std::string& requested,
                               const std::string& purpose);

// The checks that need no tensor data (format, version, every file present with its recorded
// size), cheap enough to run on every rank before any work: UserError naming the file.
void check_checkpoint(const std::string& checkpoint_dir);

// What checkpoint.json says about a checkpoint (after check_checkpoint's checks).
struct CheckpointInfo {
  int64_t step = 0;
  std::string run_id;  // "" for checkpoints written before run ids existed
};
CheckpointInfo checkpoint_info(const std::string& checkpoint_dir);

// The resolved config YAML stored in a checkpoint's checkpoint.json. UserError when absent.
std::string checkpoint_config_yaml(const std::string& checkpoint_dir);

// CRC-32 of a file's bytes, as 8 hex digits.
std::string file_crc32(const std::string& path);

}  // namespace moeforge
