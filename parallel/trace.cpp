#include "parallel/trace.hpp"

#include <algorithm>
#include <atomic>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <vector>

namespace moeforge::parallel::trace {
namespace {

struct Event {
  const char* lane;
  std::string name;
  Clock::time_point start, end;
};

std::atomic<bool> on{false};
std::mutex mutex;
std::vector<Event> events;
// Timestamps are wall-clock microseconds (system_clock, shared by every rank of a node and
// NTP-aligned across nodes), so all ranks' files line up on one timeline.
const Clock::time_point steady_origin = Clock::now();
const double wall_origin_us =
    std::chrono::duration<double, std::micro>(std::chrono::system_clock::now().time_since_epoch())
        .count();

double micros(Clock::time_point t) {
  return wall_origin_us + std::chrono::duration<double, std::micro>(t - steady_origin).count();
}

}  // namespace

void enable(bool value) {
  on = value;
}
bool enabled() {
  return on;
}

void record(const char* lane, const std::string& name, Clock::time_point start,
            Clock::time_point end) {
  if (!on) return;
  std::lock_guard<std::mutex> lock(mutex);
  events.push_back({lane, name, start, end});
}

void write(const std::string& path, int rank) {
  std::vector<Event> taken;
  {
    std::lock_guard<std::mutex> lock(mutex);
    taken.swap(events);
  }
  auto list = nlohmann::json::array();
  // The worker's lanes ("comm", "comm 2", ...) hold the collectives in flight at once.
  static const std::vector<std::string> lanes = {"compute", "comm", "comm 2", "comm 3", "comm 4"};
  const auto lane_id = [](const std::string& lane) {
    const auto at = std::find(lanes.begin(), lanes.end(), lane);
    return at == lanes.end() ? 1 : static_cast<int>(at - lanes.begin()) + 1;
  };
  for (const auto& lane : lanes)
    list.push_back({{"ph", "M"},
                    {"name", "thread_name"},
                    {"pid", rank},
                    {"tid", lane_id(lane)},
                    {"args", {{"name", lane}}}});
  list.push_back({{"ph", "M"},
                  {"name", "process_name"},
                  {"pid", rank},
                  {"args", {{"name", "rank " + std::to_string(rank)}}}});
  for (const auto& e : taken)
    list.push_back({{"ph", "X"},
                    {"name", e.name},
                    {"cat", e.lane},
                    {"pid", rank},
                    {"tid", lane_id(e.lane)},
                    {"ts", micros(e.start)},
                    {"dur", micros(e.end) - micros(e.start)}});
  std::ofstream out(path);
  out << nlohmann::json{{"traceEvents", list}, {"displayTimeUnit", "ms"}}.dump() << '\n';
  if (!out) throw std::runtime_error("cannot write trace file " + path);
}

}  // namespace moeforge::parallel::trace
