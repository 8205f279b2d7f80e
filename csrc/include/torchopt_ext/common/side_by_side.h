// Independent work units of one optimizer step (one param's preconditioner
// update, say) spread over the CPU's intra-op threads.
#pragma once

#include <cstddef>
#include <functional>
#include <vector>

namespace torchopt_ext::common {

// Runs fn(u) once for every u < costs.size(): independent work units (one
// param's factor update, say) with a relative cost each. On the CPU with
// more than one intra-op thread, units run side by side, one thread each
// (their ATen ops and GEMMs then run single-threaded): small problems keep
// a core busy with one whole GEMM chain instead of splitting every GEMM.
// A unit costing more than an even share of what is left runs first on
// its own with every thread. Elsewhere (one thread, CUDA, inside a parallel
// region) the units run in order. fn must touch only its unit's outputs.
void run_side_by_side(const std::vector<double>& costs, bool cpu, const std::function<void(size_t)>& fn);

}  // namespace torchopt_ext::common
