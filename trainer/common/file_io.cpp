#include "trainer/common/file_io.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

#include "trainer/common/user_error.hpp"

namespace moeforge {
namespace {

std::string error_text() {
  return std::strerror(errno);
}

// An open read-only descriptor of a regular file, closed on scope exit.
class ReadDescriptor {
 public:
  ReadDescriptor(const std::string& path, const std::string& label) {
    const auto fail = [&](const std::string& problem) {
      return UserError(label.empty() ? fmt::format("'{}': {}", path, problem)
                                     : fmt::format("{}: '{}': {}", label, path, problem));
    };
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0)
      throw UserError(label.empty()
                          ? fmt::format("cannot open '{}': {}", path, error_text())
                          : fmt::format("{}: cannot open '{}': {}", label, path, error_text()));
    struct stat info {};
    if (::fstat(fd_, &info) != 0) {
      const auto reason = error_text();
      ::close(fd_);
      throw fail("cannot stat: " + reason);
    }
    if (S_ISDIR(info.st_mode)) {
      ::close(fd_);
      throw fail("is a directory, expected a file");
    }
    size_ = static_cast<uint64_t>(info.st_size);
  }
  ~ReadDescriptor() { ::close(fd_); }
  ReadDescriptor(const ReadDescriptor&) = delete;
  ReadDescriptor& operator=(const ReadDescriptor&) = delete;
  int fd() const { return fd_; }
  uint64_t size() const { return size_; }

 private:
  int fd_ = -1;
  uint64_t size_ = 0;
};

}  // namespace

std::string read_file(const std::string& path, const std::string& label) {
  const ReadDescriptor file(path, label);
  std::string text(file.size(), '\0');
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::read(file.fd(), text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw UserError(fmt::format("{}: read failed: {}", path, error_text()));
    if (n == 0) break;  // shrank while reading
    done += static_cast<size_t>(n);
  }
  text.resize(done);
  return text;
}

DurableWriter::DurableWriter(std::string path) : path_(std::move(path)) {
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) throw UserError(fmt::format("{}: cannot create: {}", path_, error_text()));
}

DurableWriter::~DurableWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void DurableWriter::write(const void* data, size_t bytes) {
  const auto* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::write(fd_, p, bytes);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw UserError(fmt::format("{}: write failed: {}", path_, error_text()));
    p += n;
    bytes -= static_cast<size_t>(n);
  }
}

void DurableWriter::commit() {
  const bool synced = ::fsync(fd_) == 0;
  const auto sync_error = error_text();
  const bool closed = ::close(fd_) == 0;
  fd_ = -1;
  if (!synced || !closed)
    throw UserError(fmt::format("{}: could not be flushed to disk: {}", path_,
                                synced ? error_text() : sync_error));
}

void fsync_directory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw UserError(fmt::format("{}: cannot open directory: {}", dir, error_text()));
  const bool synced = ::fsync(fd) == 0;
  const auto reason = error_text();
  ::close(fd);
  if (!synced) throw UserError(fmt::format("{}: could not be flushed to disk: {}", dir, reason));
}

void write_file_atomically(const std::string& path, std::string_view bytes) {
  const std::string tmp = path + ".tmp";
  {
    DurableWriter writer(tmp);
    writer.write(bytes.data(), bytes.size());
    writer.commit();
  }
  std::error_code error;
  std::filesystem::rename(tmp, path, error);
  if (error)
    throw UserError(fmt::format("{}: cannot rename into place: {}", path, error.message()));
  const auto parent = std::filesystem::path(path).parent_path();
  fsync_directory(parent.empty() ? "." : parent.string());
}

MappedFile MappedFile::open(const std::string& path, const std::string& label) {
  const ReadDescriptor file(path, label);
  MappedFile mapped;
  if (file.size() == 0) return mapped;
  void* mapping = ::mmap(nullptr, file.size(), PROT_READ, MAP_PRIVATE, file.fd(), 0);
  if (mapping == MAP_FAILED) throw UserError(fmt::format("{}: cannot map: {}", path, error_text()));
  mapped.mapping_ = mapping;
  mapped.size_ = file.size();
  return mapped;
}

MappedFile::~MappedFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, size_);
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : mapping_(std::exchange(other.mapping_, nullptr)), size_(std::exchange(other.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    if (mapping_ != nullptr) ::munmap(mapping_, size_);
    mapping_ = std::exchange(other.mapping_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

std::string invoked_binary() {
  std::error_code error;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", error);
  if (error) return "moeforge";
  const auto relative = exe.lexically_relative(std::filesystem::current_path(error));
  const bool below = !error && !relative.empty() && *relative.begin() != "..";
  return below ? relative.string() : exe.string();
}

}  // namespace moeforge
