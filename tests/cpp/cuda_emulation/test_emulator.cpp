// The emulator's own checks: coordinates, barriers, launch limits, and that a
// kernel with a race gives different results in the two thread orders (what
// run_both_orders relies on to catch one).
#include <gtest/gtest.h>

#include <stdexcept>
#include <vector>

#include "cuda_emulation.h"
#include "kernels/cuda/launch.cuh"

namespace torchopt_ext::emulation_testing {
namespace {

namespace emu = cuda_emulation;
using kernels::cuda::launch_kernel;

__global__ void write_linear_ids(int* out) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  out[block * (blockDim.x * blockDim.y * blockDim.z) + thread] = static_cast<int>(block * 1000 + thread);
}

// A block sum with a barrier between the writes and the reads (correct) or
// without one (thread 0 reads its neighbours' slots before they are written
// when it runs first).
template <bool kWithBarrier>
__global__ void neighbour_sum(const int* in, int* out) {
  __shared__ int slots[8];
  slots[threadIdx.x] = in[threadIdx.x];
  if constexpr (kWithBarrier) {
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int i = 0; i < 8; ++i) {
      sum += slots[i];
    }
    *out = sum;
  }
}

__global__ void divergent_barrier() {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void early_exit_then_barrier(int* out) {
  if (threadIdx.x >= 4) {
    return;  // exited threads do not hold the barrier
  }
  __syncthreads();
  out[threadIdx.x] = 1;
}

TEST(CudaEmulator, ThreadAndBlockCoordinatesCoverTheGrid) {
  const dim3 grid(3, 2, 2);
  const dim3 block(4, 2, 3);
  std::vector<int> out(3 * 2 * 2 * 4 * 2 * 3, -1);
  launch_kernel(write_linear_ids, grid, block, nullptr, out.data());
  for (size_t i = 0; i < out.size(); ++i) {
    EXPECT_EQ(out[i], static_cast<int>(i / 24 * 1000 + i % 24)) << i;
  }
}

TEST(CudaEmulator, AMissingBarrierShowsUpAsAnOrderDependence) {
  int forward = 0, reverse = 0;
  emu::reset_counters();
  for (bool barrier : {true, false}) {
    // Shared memory keeps its contents between launches here, so the racy run
    // gets new values: stale slots then differ from fresh ones.
    const std::vector<int> in =
        barrier ? std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8} : std::vector<int>{10, 20, 30, 40, 50, 60, 70, 80};
    emu::set_order(emu::Order::kForward);
    launch_kernel(barrier ? neighbour_sum<true> : neighbour_sum<false>, 1, 8, nullptr, in.data(), &forward);
    emu::set_order(emu::Order::kReverse);
    launch_kernel(barrier ? neighbour_sum<true> : neighbour_sum<false>, 1, 8, nullptr, in.data(), &reverse);
    emu::set_order(emu::Order::kForward);
    if (barrier) {
      EXPECT_EQ(emu::counters().barriers, 2) << "one barrier release per launch";
      EXPECT_EQ(forward, 36);
      EXPECT_EQ(reverse, 36);
    } else {
      EXPECT_NE(forward, reverse) << "the race went unnoticed";
    }
  }
}

TEST(CudaEmulator, BarriersMustBeTheSameCallSite) {
  EXPECT_THROW(launch_kernel(divergent_barrier, 1, 8, nullptr), std::logic_error);
  // The emulator recovers: the next launch runs normally.
  std::vector<int> out(8, 0);
  launch_kernel(early_exit_then_barrier, 1, 8, nullptr, out.data());
  EXPECT_EQ(out, (std::vector<int>{1, 1, 1, 1, 0, 0, 0, 0}));
}

TEST(CudaEmulator, LaunchConfigurationsOutsideCudaLimitsAreRefused) {
  std::vector<int> out(4096, 0);
  EXPECT_THROW(launch_kernel(write_linear_ids, 0, 32, nullptr, out.data()), std::invalid_argument);
  EXPECT_THROW(launch_kernel(write_linear_ids, 1, 2048, nullptr, out.data()), std::invalid_argument);
  EXPECT_THROW(launch_kernel(write_linear_ids, dim3(1, 70000), 1, nullptr, out.data()), std::invalid_argument);
  EXPECT_THROW(emu::current(), std::logic_error);  // no kernel running
}

}  // namespace
}  // namespace torchopt_ext::emulation_testing
