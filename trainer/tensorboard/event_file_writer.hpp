#pragma once
// A TensorBoard event file (what tf.summary / torch.utils.tensorboard write): a TFRecord file of
// serialized `tensorboard.Event` protobufs, one record each —
//   uint64 length (little-endian), uint32 masked CRC32C of those 8 bytes, the data,
//   uint32 masked CRC32C of the data;  masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8.
// The first record carries file_version "brain.Event:2". TensorBoard reads every file whose
// name contains "tfevents" in a directory, in name order; names here start with the creation
// time in seconds, made later than any file already there, so a resumed run's file sorts last.
#include <cstdint>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

namespace moeforge {

class EventFileWriter {
 public:
  // Creates `dir` if needed and a new events.out.tfevents.<seconds>.<host>.<pid> file in it.
  // UserError naming the file when it cannot be written.
  explicit EventFileWriter(const std::string& dir);

  // One event at `step` holding every (tag, value) as a scalar (stored as float32, as
  // TensorBoard's simple_value is).
  void add_scalars(int64_t step, const std::vector<std::pair<std::string, double>>& scalars);

  // A SessionLog START at `step`: TensorBoard then discards the events of steps ≥ `step` that
  // earlier files of the directory hold (written after the checkpoint a run resumed from).
  void start_session_at(int64_t step);

  const std::string& path() const { return path_; }

 private:
  void write_event(const std::string& serialized);
  std::string path_;
  std::ofstream file_;
};

}  // namespace moeforge
