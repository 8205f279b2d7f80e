// The element-wise helpers (kernels/algos/elementwise_math.h) together with
// ATen's CPU vector types they are instantiated with in the CPU kernels.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "kernels/algos/elementwise_math.h"
