#include "trainer/common/user_error.hpp"

namespace moeforge {

void require(bool condition, const std::string& message) {
  if (!condition) throw UserError(message);
}

}  // namespace moeforge
