// Stochastic rounding of bf16 params: a counter-based random stream and the
// rounding itself. Host-device: the CUDA kernels draw the same bits and round
// the same way, so a seed gives the same params on both.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace torchopt_ext::kernels::cpu {

// SplitMix64 finaliser: a counter-based hash, so the random bits for element i
// do not depend on how the work was split across threads.
C10_HOST_DEVICE inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Stochastic rounding of an fp32 value to bf16: adding 16 uniform random bits
// below the kept mantissa and truncating rounds up with probability equal to
// the discarded fraction, so the rounding is unbiased in expectation.
C10_HOST_DEVICE inline c10::BFloat16 round_bf16_stochastic(float value, uint32_t random16) {
#if defined(__CUDA_ARCH__)
  if (!::isfinite(value)) {
    return c10::BFloat16(value);
  }
  const uint32_t bits = __float_as_uint(value);
#else
  if (!std::isfinite(value)) {
    return c10::BFloat16(value);
  }
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
#endif
  const uint32_t rounded = bits + (random16 & 0xFFFFu);
  // Rounding a finite value up past the largest bf16 keeps the sign and gives
  // inf, the same as round-to-nearest does for values that large.
  return c10::BFloat16(static_cast<uint16_t>(rounded >> 16), c10::BFloat16::from_bits());
}

// Stores n math-type values to T storage: stochastic rounding for bf16 (the
// random bits of element `offset + i` come from `stream`, so they do not depend
// on how the work was split), round-to-nearest for other types.
template <typename T, typename S>
inline void store_stochastic(T* dst, const S* values, int64_t n, uint64_t stream, int64_t offset) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const auto random = static_cast<uint32_t>(mix64(stream ^ static_cast<uint64_t>(offset + i)));
      dst[i] = round_bf16_stochastic(values[i], random);
    } else {
      dst[i] = static_cast<T>(values[i]);
    }
  }
}

// Per-tensor random stream for stochastic rounding: the user's seed, the
// tensor's position in its group and the step count, hashed together.
C10_HOST_DEVICE inline uint64_t rounding_stream(int64_t seed, int64_t tensor_index, double step) {
  return mix64(mix64(static_cast<uint64_t>(seed)) ^ mix64(static_cast<uint64_t>(tensor_index) << 32) ^
               static_cast<uint64_t>(step));
}

}  // namespace torchopt_ext::kernels::cpu
