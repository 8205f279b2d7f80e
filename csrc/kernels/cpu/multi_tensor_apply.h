// Work splitting shared by every fused CPU kernel: one parallel_for over
// fixed-size chunks of all tensors of a param group, so a group of many small
// tensors keeps both cores busy as well as one large tensor does.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace torchopt_ext::kernels::cpu {

// Elements per chunk: large enough to amortise the per-chunk setup, small
// enough that a 200-tensor group balances across threads.
inline constexpr int64_t kChunkNumel = 1 << 16;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<Chunk> split_into_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunkNumel) {
      chunks.push_back({t, b, std::min(numels[t], b + kChunkNumel)});
    }
  }
  return chunks;
}

// Calls fn(tensor_index, begin, end) for every chunk, in parallel.
template <typename Fn>
void for_each_chunk(const std::vector<int64_t>& numels, const Fn& fn) {
  const auto chunks = split_into_chunks(numels);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      fn(chunks[c].tensor, chunks[c].begin, chunks[c].end);
    }
  });
}

// Picks the kernel instantiation for a (param storage, state storage) pair:
// make(P{}, St{}) returns a function pointer for those types. Pairs whose math
// types differ (fp64 with anything else) have no kernel.
template <typename Make>
auto select_kernel(const char* op, at::ScalarType param_type, at::ScalarType state_type, const Make& make) {
  decltype(make(float{}, float{})) fn = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param_type, "torchopt_ext_cpu_kernel", [&] {
    using P = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, state_type, "torchopt_ext_cpu_kernel", [&] {
      if constexpr (std::is_same_v<at::opmath_type<P>, at::opmath_type<scalar_t>>) {
        fn = make(P{}, scalar_t{});
      }
    });
  });
  TORCH_CHECK(fn != nullptr, op, ": no CPU kernel for ", param_type, " params with ", state_type, " state");
  return fn;
}

}  // namespace torchopt_ext::kernels::cpu
