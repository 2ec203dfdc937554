#pragma once
// A planted violation: moe/ must not include trainer/.
#include "trainer/config/config.hpp"
