#pragma once
// Precompiled header for every LibTorch translation unit (see CMakeLists.txt). Sources still
// include the narrow headers they need so they compile without it.
#include <torch/torch.h>
