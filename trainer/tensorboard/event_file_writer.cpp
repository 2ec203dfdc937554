#include "trainer/tensorboard/event_file_writer.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <array>
#include <boost/crc.hpp>
#include <chrono>
#include <filesystem>

#include "trainer/common/user_error.hpp"
#include "trainer/tensorboard/tensorboard_event.pb.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

constexpr std::string_view kFilePrefix = "events.out.tfevents.";

// CRC32C (Castagnoli), masked as TFRecord stores it (a CRC of data holding CRCs stays robust).
uint32_t masked_crc32c(const void* data, size_t size) {
  boost::crc_optimal<32, 0x1EDC6F41, 0xFFFFFFFF, 0xFFFFFFFF, true, true> crc;
  crc.process_bytes(data, size);
  const uint32_t value = crc.checksum();
  return ((value >> 15) | (value << 17)) + 0xa282ead8u;
}

double unix_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Seconds for the new file's name: now, or one past the newest event file of `dir`, so that
// TensorBoard, which reads a directory's files in name order, reads this one last.
int64_t file_seconds(const fs::path& dir) {
  auto seconds = static_cast<int64_t>(unix_seconds());
  for (const auto& entry : fs::directory_iterator(dir)) {
    const auto name = entry.path().filename().string();
    if (!name.starts_with(kFilePrefix)) continue;
    const auto existing = std::strtoll(name.c_str() + kFilePrefix.size(), nullptr, 10);
    seconds = std::max<int64_t>(seconds, existing + 1);
  }
  return seconds;
}

std::string host_name() {
  std::array<char, 256> name{};
  return gethostname(name.data(), name.size() - 1) == 0 ? std::string(name.data()) : "localhost";
}

template <class Number>
void append_little_endian(std::string& out, Number value) {
  for (size_t i = 0; i < sizeof(Number); ++i) out.push_back(static_cast<char>(value >> (8 * i)));
}

}  // namespace

EventFileWriter::EventFileWriter(const std::string& dir) {
  std::error_code error;
  fs::create_directories(dir, error);
  require(!error,
          fmt::format("{}: cannot create the TensorBoard directory: {}", dir, error.message()));
  path_ = (fs::path(dir) /
           fmt::format("{}{:010}.{}.{}", kFilePrefix, file_seconds(dir), host_name(), getpid()))
              .string();
  file_.open(path_, std::ios::binary | std::ios::trunc);
  require(file_.is_open(), fmt::format("{}: cannot open the TensorBoard event file", path_));
  tensorboard::Event event;
  event.set_wall_time(unix_seconds());
  event.set_file_version("brain.Event:2");
  write_event(event.SerializeAsString());
}

void EventFileWriter::add_scalars(int64_t step,
                                  const std::vector<std::pair<std::string, double>>& scalars) {
  tensorboard::Event event;
  event.set_wall_time(unix_seconds());
  event.set_step(step);
  auto* summary = event.mutable_summary();
  for (const auto& [tag, value] : scalars) {
    auto* entry = summary->add_value();
    entry->set_tag(tag);
    entry->set_simple_value(static_cast<float>(value));
  }
  write_event(event.SerializeAsString());
}

void EventFileWriter::start_session_at(int64_t step) {
  tensorboard::Event event;
  event.set_wall_time(unix_seconds());
  event.set_step(step);
  event.mutable_session_log()->set_status(tensorboard::SessionLog::START);
  write_event(event.SerializeAsString());
}

void EventFileWriter::write_event(const std::string& serialized) {
  std::string record;
  append_little_endian(record, static_cast<uint64_t>(serialized.size()));
  append_little_endian(record, masked_crc32c(record.data(), sizeof(uint64_t)));
  record += serialized;
  append_little_endian(record, masked_crc32c(serialized.data(), serialized.size()));
  file_.write(record.data(), static_cast<std::streamsize>(record.size()));
  file_.flush();
  require(static_cast<bool>(file_),
          fmt::format("{}: writing the TensorBoard event file failed (is the disk full?)", path_));
}

}  // namespace moeforge
