#pragma once
// A planted violation: parallel/ must not include moe/.
#include "moe/moe_layer.hpp"
