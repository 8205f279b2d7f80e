// A host emulation of the CUDA execution model, enough to run this project's
// kernels (csrc/kernels/cuda) on the CPU in the test suite: every thread of a
// block is a fiber, __syncthreads() switches fibers, __shared__ variables are
// function statics (blocks run one after another), and launch_kernel
// (kernels/cuda/launch.cuh) runs the grid here instead of on a GPU.
//
// What it checks: the host code that builds launch tables and device
// arguments, the kernels' indexing, block reductions and device-scalar reads,
// launch configurations (block and grid limits, empty grids), and barriers
// (every waiting thread at the same __syncthreads). Running threads and blocks
// in reverse order as well exposes results that depend on scheduling. What it
// cannot: timing, memory coalescing, warp-level behaviour, real device memory,
// and reads of shared memory before any write (it keeps its contents between
// blocks and launches).
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>

// CUDA's math functions are global in device code.
using std::isfinite;

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace torchopt_ext::cuda_emulation {

struct Coordinates {
  dim3 thread_idx;
  dim3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// The calling CUDA thread's coordinates (only inside a running kernel).
const Coordinates& current();
// __syncthreads(): waits until every thread of the block that has not exited
// reaches a barrier; all of them must wait at the same call site.
void sync_threads(const char* file, int line);
// Runs `kernel` once per thread of grid x block, block after block.
void launch(dim3 grid, dim3 block, const std::function<void()>& kernel);

// The order threads run between barriers and blocks run in a grid.
enum class Order { kForward, kReverse };
void set_order(Order order);

struct Counters {
  int64_t launches = 0;
  int64_t blocks = 0;
  int64_t barriers = 0;  // barrier releases, summed over blocks
};
Counters counters();
void reset_counters();

}  // namespace torchopt_ext::cuda_emulation

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __grid_constant__
#define __launch_bounds__(...)
#define threadIdx (::torchopt_ext::cuda_emulation::current().thread_idx)
#define blockIdx (::torchopt_ext::cuda_emulation::current().block_idx)
#define blockDim (::torchopt_ext::cuda_emulation::current().block_dim)
#define gridDim (::torchopt_ext::cuda_emulation::current().grid_dim)
#define __syncthreads() ::torchopt_ext::cuda_emulation::sync_threads(__FILE__, __LINE__)
