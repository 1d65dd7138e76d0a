// The CPU registration's public helper.
#pragma once

#include <string>

namespace gpoe::cpu {

// The instruction set whose kernels run: the widest of those compiled in that ATen also uses
// (so ATEN_CPU_CAPABILITY=avx2 or =default selects the narrower kernels, as it does for ATen).
std::string capability_name();

}  // namespace gpoe::cpu
