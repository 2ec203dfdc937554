#pragma once
// File I/O every part of the trainer shares, with every failure a UserError naming the path:
// whole-file reads, durable writes (checked write/fsync/close, EINTR retried, atomic rename
// with the directory fsynced after) and read-only memory maps.
#include <cstdint>
#include <string>
#include <string_view>

namespace moeforge {

// The whole file. Refuses directories and unreadable paths with one clear message, prefixed
// with `label` (what the file is, e.g. the config key naming it) when given.
std::string read_file(const std::string& path, const std::string& label = "");

// Writes `path` directly, checking every write and the final fsync + close.
class DurableWriter {
 public:
  explicit DurableWriter(std::string path);
  ~DurableWriter();  // closes without committing if commit() was not reached
  DurableWriter(const DurableWriter&) = delete;
  DurableWriter& operator=(const DurableWriter&) = delete;
  void write(const void* data, size_t bytes);
  void commit();  // fsync + close; throws when either fails

 private:
  std::string path_;
  int fd_ = -1;
};

// `bytes` to `path.tmp`, flushed, renamed over `path`, parent directory flushed: readers see
// the old file or the new one, never a part.
void write_file_atomically(const std::string& path, std::string_view bytes);

// This program as a user would type it in hints ("build/moeforge train ..."): its path relative
// to the working directory when it lies below it, else absolute.
std::string invoked_binary();

// Makes renames and creations in `dir` durable.
void fsync_directory(const std::string& dir);

// Read-only mapping of a whole file; an empty file maps to nothing. Move-only.
class MappedFile {
 public:
  MappedFile() = default;
  static MappedFile open(const std::string& path, const std::string& label = "");
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  const uint8_t* data() const { return static_cast<const uint8_t*>(mapping_); }
  uint64_t size() const { return size_; }

 private:
  void* mapping_ = nullptr;
  uint64_t size_ = 0;
};

}  // namespace moeforge
