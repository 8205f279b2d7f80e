// The one TORCH_LIBRARY block of the torchopt_ext namespace. Each algorithm's
// schema lives next to its registration in csrc/ops/<algo>.cpp as a fragment.
#include <torch/library.h>

TORCH_LIBRARY(torchopt_ext, m) {
  // Fake (meta) implementations live in Python: torchopt_ext/_ops.py.
  m.set_python_module("torchopt_ext._ops");
}
